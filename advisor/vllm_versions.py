"""What pc-advise needs to know about each vLLM version it advises for: one table.

Input: the version the user runs (`--vllm-version`: "0.34", "0.34.0", "v0.34.1").
Output: `facts(version)`, a `VllmFacts` record of the defaults and rules that differ between
versions (block size per backend, `vllm serve`'s batch defaults per GPU, how KV memory
becomes blocks, scheduling, the hybrid KV cache manager, EAGLE's effect on cache hits),
each with its `Source` (a file inside the `vllm` package and the function or constant,
read on that version's wheel). docs/vllm-versions.md shows the same table in prose.

What does not differ (checked in `v1/core/kv_cache_manager.py`, `block_pool.py`,
`single_type_kv_cache_manager.py`, `kv_cache_utils.py` of 0.32.0, 0.33.0 and 0.34.0, and
by tests/test_oracle.py and tests/test_scheduler_oracle.py run against 0.32 and 0.34): the
prefix cache's rules without speculative decoding (chained sha256 block hashes over full
blocks with LoRA / cache_salt / multimodal extra keys, the last prompt token always
recomputed, the LRU free queue, hits taking the oldest copy of a hash). Those are what
advisor.sim models, so a version changes defaults and flags here, not the simulator.

A base module: it imports nothing from the stage packages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from advisor.errors import AdvisorError


@dataclass(frozen=True)
class Source:
    """Where a fact is in vLLM's code: a path inside the `vllm` package, and a name there."""

    path: str  # e.g. "config/cache.py"
    name: str  # a function, method or constant, e.g. "CacheConfig.DEFAULT_BLOCK_SIZE"

    def __str__(self) -> str:
        return f"vllm/{self.path}: {self.name}"


@dataclass(frozen=True)
class BlockSizeDefaults:
    """`--block-size` when the user does not give one, and what each backend accepts."""

    gpu: int  # CUDA with FlashAttention, FlashInfer or Triton attention (the common case)
    cpu: int  # vLLM's CPU attention backend
    gpu_multiple: int  # those GPU kernels take any multiple of this
    cpu_multiple: int
    source: Source  # the GPU default
    cpu_source: Source
    kernel_source: Source  # the GPU kernels' supported sizes


@dataclass(frozen=True)
class BatchTier:
    """One row of `vllm serve`'s batch defaults: GPUs with at least `min_gib` of memory
    whose name holds none of `excluded` get (max_num_seqs, max_num_batched_tokens)."""

    min_gib: float
    max_num_seqs: int
    max_num_batched_tokens: int
    excluded: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchDefaults:
    """`vllm serve`'s (OpenAI server's) defaults, picked from the device's memory and name."""

    tiers: tuple[BatchTier, ...]  # first match wins, largest first
    fallback: tuple[int, int]  # every other GPU, and a device vLLM cannot query
    cpu_per_rank: tuple[int, int]  # the CPU build: times the world size (tp x pp)
    source: Source


@dataclass(frozen=True)
class MemorySizing:
    """How GPU memory becomes KV blocks when no flag pins them."""

    gpu_memory_utilization: float  # the default the KV cache is sized under
    after_warmup: bool  # True: measured after warm-up (CUDA graphs paid); False: a profiling run
    pinned_by: tuple[str, ...]  # flags that fix the pool instead (and turn after-warm-up sizing off)
    source: Source


@dataclass(frozen=True)
class Scheduling:
    async_default_on_gpu: bool  # AsyncScheduler unless something incompatible is configured
    async_forced_off_on_cpu: bool
    source: Source
    cpu_source: Source


@dataclass(frozen=True)
class HybridKvCacheManager:
    default_on: bool  # off only where the platform or a KV connector cannot use it
    source: Source


@dataclass(frozen=True)
class EagleHits:
    """How an EAGLE-style drafter (--speculative-config method eagle, eagle3, mtp) changes
    the longest cache hit."""

    drops_last_hit_block: bool  # the last matched block is recomputed (hit one block shorter)
    lookahead_hash_tokens: int  # each block's hash also covers the next tokens (0: none)
    drop_methods: tuple[str, ...]  # methods under which the drop applies
    source: Source


@dataclass(frozen=True)
class VllmFacts:
    version: str  # "major.minor"
    checked_on: str  # the release whose sources were read
    block_size: BlockSizeDefaults
    batch: BatchDefaults
    memory: MemorySizing
    scheduling: Scheduling
    hybrid: HybridKvCacheManager
    eagle: EagleHits
    notes: tuple[str, ...] = ()  # smaller differences, for the docs and reports

    def sources(self) -> tuple[Source, ...]:
        """Every source this version's facts cite."""
        b = self.block_size
        return (b.source, b.cpu_source, b.kernel_source, self.batch.source, self.memory.source,
                self.scheduling.source, self.scheduling.cpu_source, self.hybrid.source, self.eagle.source)


# --- the table ---------------------------------------------------------------------------
_KERNELS = Source("v1/attention/backends/flash_attn.py", "FlashAttentionBackend.get_supported_kernel_block_sizes")
_SERVE = "EngineArgs.get_batch_defaults"
_ASYNC = Source("config/vllm.py", "VllmConfig.__post_init__")
_CPU_ASYNC = Source("platforms/cpu.py", "CpuPlatform.check_and_update_config")
_HYBRID = Source("config/vllm.py", "VllmConfig.__post_init__")
_SMALL_GPUS_032 = ("a100",)
# 0.33 keeps GB10 (DGX Spark, compute capability 12.1) on the small tier; vLLM tells it by
# its capability, pc-advise by the name the user gives.
_SMALL_GPUS_033 = ("a100", "gb10", "dgx-spark")


def _batch(small: tuple[str, ...]) -> BatchDefaults:
    return BatchDefaults(
        tiers=(BatchTier(160, 1024, 16384), BatchTier(70, 1024, 8192, small)),
        fallback=(256, 2048), cpu_per_rank=(128, 2048), source=Source("engine/arg_utils.py", _SERVE))


_PROFILED_032 = MemorySizing(
    0.92, after_warmup=False, pinned_by=("--kv-cache-memory-bytes", "--num-gpu-blocks-override"),
    source=Source("v1/worker/gpu_worker.py", "Worker.determine_available_memory"))

TABLE: dict[str, VllmFacts] = {
    "0.32": VllmFacts(
        version="0.32", checked_on="0.32.0",
        block_size=BlockSizeDefaults(
            gpu=16, cpu=128, gpu_multiple=16, cpu_multiple=32,
            source=Source("config/cache.py", "CacheConfig.DEFAULT_BLOCK_SIZE"),
            cpu_source=Source("platforms/cpu.py", "CpuPlatform.check_and_update_config"),
            kernel_source=_KERNELS),
        batch=_batch(_SMALL_GPUS_032),
        memory=_PROFILED_032,
        scheduling=Scheduling(True, True, _ASYNC, _CPU_ASYNC),
        hybrid=HybridKvCacheManager(True, _HYBRID),
        eagle=EagleHits(
            drops_last_hit_block=True, lookahead_hash_tokens=0,
            drop_methods=("eagle", "eagle3", "mtp", "dflash", "dspark"),
            source=Source("v1/core/single_type_kv_cache_manager.py", "FullAttentionManager.find_longest_cache_hit")),
        notes=("--num-gpu-blocks-override is applied in v1/core/kv_cache_utils.py (may_override_num_blocks).",),
    ),
    "0.33": VllmFacts(
        version="0.33", checked_on="0.33.0",
        block_size=BlockSizeDefaults(
            gpu=16, cpu=128, gpu_multiple=16, cpu_multiple=32,
            source=Source("config/cache.py", "CacheConfig.DEFAULT_BLOCK_SIZE"),
            cpu_source=Source("platforms/cpu.py", "CpuPlatform.update_block_size_for_backend"),
            kernel_source=_KERNELS),
        batch=_batch(_SMALL_GPUS_033),
        memory=_PROFILED_032,
        scheduling=Scheduling(True, True, _ASYNC, _CPU_ASYNC),
        hybrid=HybridKvCacheManager(True, _HYBRID),
        eagle=EagleHits(
            drops_last_hit_block=False, lookahead_hash_tokens=1, drop_methods=("eagle", "eagle3", "mtp"),
            source=Source("v1/core/kv_cache_utils.py", "get_request_block_hasher")),
        notes=(
            "KV cache planning moved from v1/core/kv_cache_utils.py to v1/core/kv_cache_planning.py "
            "(may_override_num_blocks applies --num-gpu-blocks-override there).",
            "EAGLE-style drafters: each block hash also covers the next token (VllmConfig."
            "num_hash_lookahead_tokens; multi-module MTP: num_speculative_tokens), so a hit is no "
            "longer shortened by a block; the old drop returns with --speculative-config "
            "disable_lookahead_block_hashes or a KV connector. dflash and dspark no longer drop.",
        ),
    ),
    "0.34": VllmFacts(
        version="0.34", checked_on="0.34.0",
        block_size=BlockSizeDefaults(
            gpu=64, cpu=128, gpu_multiple=16, cpu_multiple=32,
            source=Source("config/cache.py", "CacheConfig.DEFAULT_BLOCK_SIZE"),
            cpu_source=Source("platforms/cpu.py", "CpuPlatform.update_block_size_for_backend"),
            kernel_source=_KERNELS),
        batch=_batch(_SMALL_GPUS_033),
        memory=MemorySizing(
            1.0, after_warmup=True, pinned_by=("--kv-cache-memory-bytes", "--num-gpu-blocks-override"),
            source=Source("config/vllm.py", "VllmConfig._resolve_extensible_kv_cache")),
        scheduling=Scheduling(True, True, _ASYNC, _CPU_ASYNC),
        hybrid=HybridKvCacheManager(True, _HYBRID),
        eagle=EagleHits(
            drops_last_hit_block=False, lookahead_hash_tokens=1, drop_methods=("eagle", "eagle3", "mtp"),
            source=Source("v1/core/kv_cache_utils.py", "get_request_block_hasher")),
        notes=(
            "GPU block size 64 on FlashAttention, FlashInfer and Triton; ROCm's AITER FlashAttention "
            "(16 or 32 only) falls back to 16 (Platform.update_block_size_for_backend).",
            "The extensible KV cache (default on CUDA and ROCm) reserves address space and commits the "
            "pool after warm-up (kv_cache_planning.finalize_extensible_kv_cache); --gpu-memory-"
            "utilization then defaults to 1.0 (CacheConfig.resolved_gpu_memory_utilization), 0.92 "
            "when a pinning flag or the platform turns it off.",
            "Prompt logprobs still skip the cache read by default; with skip_reading_prefix_cache=False "
            "the hit is capped at prompt_logprob_start (Request.get_prefix_cache_hit_limit, which "
            "replaces Request.skip_reading_prefix_cache).",
            "A chat request with tools: [] is served as one without tools (0.32 and 0.33 refuse it; "
            "entrypoints/openai/chat_completion/protocol.py: ChatCompletionRequest.check_tool_usage).",
        ),
    ),
}

KNOWN_VERSIONS = tuple(sorted(TABLE, key=lambda v: tuple(map(int, v.split(".")))))
DEFAULT_VLLM_VERSION = KNOWN_VERSIONS[-1]

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.\d+)?(?:[.+\-]?[0-9A-Za-z.+\-]*)?\s*$")


def minor_version(text: str | None) -> str | None:
    """The "major.minor" of a version string ("0.34.1", "v0.34", "0.32.0+cpu"); None if it is not one."""
    m = _VERSION.match(text or "")
    return f"{int(m.group(1))}.{int(m.group(2))}" if m else None


def resolve_vllm_version(text: str | None) -> str:
    """The table's key for a version the user gives; None: DEFAULT_VLLM_VERSION.

    Raises AdvisorError naming the known versions when `text` is none of them."""
    if text is None:
        return DEFAULT_VLLM_VERSION
    minor = minor_version(str(text))
    if minor in TABLE:
        return minor
    raise AdvisorError(
        f"vLLM version {text!r} is not one pc-advise knows: pass --vllm-version with one of "
        f"{', '.join(KNOWN_VERSIONS)} (the closest to yours). Without --vllm-version, "
        f"{DEFAULT_VLLM_VERSION} (the newest known) is assumed."
    )


def facts(version: str | None) -> VllmFacts:
    """The table's row for `version` (any form resolve_vllm_version accepts)."""
    return TABLE[resolve_vllm_version(version)]


def batch_defaults(version: str | None, gpu_gib: float | None, gpu_name: str = "") -> tuple[int, int]:
    """`vllm serve`'s default (max_num_seqs, max_num_batched_tokens) on a GPU of `gpu_gib`
    GiB named `gpu_name` (a catalog key or what the user typed; "" for a bare size, which
    cannot be told from an excluded model). None: no GPU known, vLLM's own fallback."""
    rule = facts(version).batch
    if gpu_gib is None:
        return rule.fallback
    name = gpu_name.lower()
    for tier in rule.tiers:
        if gpu_gib >= tier.min_gib and not any(x in name for x in tier.excluded):
            return tier.max_num_seqs, tier.max_num_batched_tokens
    return rule.fallback


def default_block_size(version: str | None, backend: str = "cuda") -> int:
    """`--block-size` vLLM picks when none is given: backend "cuda" (FlashAttention,
    FlashInfer, Triton) or "cpu"."""
    b = facts(version).block_size
    if backend not in ("cuda", "cpu"):
        raise AdvisorError(f"unknown backend {backend!r}: use cuda or cpu.")
    return b.gpu if backend == "cuda" else b.cpu


__all__ = [
    "Source", "BlockSizeDefaults", "BatchTier", "BatchDefaults", "MemorySizing", "Scheduling",
    "HybridKvCacheManager", "EagleHits", "VllmFacts", "TABLE", "KNOWN_VERSIONS", "DEFAULT_VLLM_VERSION",
    "minor_version", "resolve_vllm_version", "facts", "batch_defaults", "default_block_size",
]
