"""Memory arithmetic and the `vllm serve` line for the chosen point.

Inputs: `RecommendOptions`, the model geometry and GPU memory when known, the ranked
points (advisor.recommend.rank).
Outputs: `gpu_kv_budget` -> the GPU's KV bytes per GPU; `serve_flags` ->
the flags, the `vllm serve` command line, and notes on how the memory flag was chosen.

The flags are for `options.vllm_version` (advisor.vllm_versions): `--block-size` is always
given, because its default moved between versions (16 on GPUs through 0.33, 64 in 0.34).
"""

from __future__ import annotations

import math
from typing import Any

from advisor import kvmemory as kv
from advisor import vllm_versions as vv
from advisor.kvlayout import KVLayout
from advisor.recommend.options import RecommendOptions
from advisor.recommend.rank import Point

MODEL_PLACEHOLDER = "<MODEL>"


def headroom(options: RecommendOptions) -> float:
    return kv.DEFAULT_HEADROOM_GIB if options.headroom_gib is None else options.headroom_gib


def gpu_kv_budget(
    options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
) -> tuple[int | None, list[str], list[str]]:
    """KV bytes per GPU once weights and headroom are paid (None when unknown), the
    constraint that shows the sum, and a note when the GPU cannot be checked."""
    if geom is not None and gpu_gib is not None:
        tp = options.tensor_parallel_size
        kv_bytes = kv.kv_bytes_for_gpu(geom, gpu_gib, options.gpu_memory_utilization, options.headroom_gib, tp)
        return kv_bytes, [
            f"GPU: {gpu_gib:.1f} GiB x {options.gpu_memory_utilization:g} - {geom.weight_bytes / tp / kv.GIB:.1f} GiB "
            f"weights - {headroom(options):.1f} GiB activation headroom = {kv_bytes / kv.GIB:.1f} GiB for KV per GPU"
        ], []
    if gpu_gib is not None:
        return None, [], ["--gpu given without --model: weights unknown, so the GPU's KV budget is not checked"]
    return None, [], []


def serve_flags(
    best: Point, options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
    hash_trace: bool, offload: dict[str, Any] | None, concurrent: bool,
    longest_request: int | None = None, gpu_kv_bytes: int | None = None, layout: KVLayout | None = None,
) -> tuple[list[str], str, list[str]]:
    """The flags, the `vllm serve` line, and notes on how the memory flags were chosen.

    The line must start: vLLM refuses to start unless one request of `--max-model-len`
    tokens fits the pool (null block aside), so the length is set from the log and checked
    against the pool the memory flag gives (`max_model_len`; a hybrid `layout` by its
    groups' rule, `KVLayout.startup_bytes`). `geom`: with a hybrid layout, its pool geometry
    (`KVLayout.pool_geometry`), so the memory flag buys the layout's blocks."""
    tp = options.tensor_parallel_size
    facts = vv.facts(options.vllm_version)
    flags = ["--enable-prefix-caching"]  # vLLM's default; stated so a config diff shows it
    block_size = best.block_size if not hash_trace else trace_serve_block_size(best.block_size, options)
    flags.append(f"--block-size {block_size}")
    memory_flag, pool_blocks, notes = _memory_flag(best, options, geom, gpu_gib, concurrent, gpu_kv_bytes,
                                                   block_size)
    flags.append(memory_flag)
    notes.insert(0, version_note(facts, options.backend, memory_flag))
    in_flight = 2 * kv.vllm_batch_defaults(options.gpu, options.vllm_version)[1]  # async: two batches in flight
    length, length_notes = max_model_len(longest_request, block_size, pool_blocks, geom, layout, in_flight)
    if length is not None:
        flags.append(f"--max-model-len {length}")
    notes += length_notes
    if tp > 1:
        flags.append(f"--tensor-parallel-size {tp}")
    if offload is not None and offload.get("gib") is not None:  # recommended (advisor.recommend.offload)
        flags.append(f"--kv-offloading-size {offload['gib']:g}")
        flags.append("--kv-offloading-backend native")
    if geom is not None and geom.serve_name:
        model = geom.serve_name
    else:
        model = options.model or MODEL_PLACEHOLDER
    return flags, " ".join(["vllm serve", model, *flags]), notes


MAX_MODEL_LEN_STEP = 256  # --max-model-len is rounded up to this, to read well


def max_model_len(
    longest_request: int | None, block_size: int, pool_blocks: int | None, geom: kv.ModelGeometry | None,
    layout: KVLayout | None = None, max_in_flight_tokens: int = 0,
) -> tuple[int | None, list[str]]:
    """`--max-model-len` for the serve line, and what it caps.

    The log's longest request (prompt + reply) rounded up, capped by the model's context when
    known, then by what vLLM's start-up check allows: one request of that many tokens must
    fit the usable blocks (`cdiv(max_model_len, block_size) <= pool_blocks`, the null block
    held back), else vLLM refuses to start. A hybrid model's check sums its layers' needs
    (`KVLayout.longest_startable`: a sliding-window or chunked-local layer needs only its
    admission cap, which grows with `max_in_flight_tokens`)."""
    if longest_request is None or longest_request <= 0:
        return None, ["--max-model-len is not set: the simulation did not record the log's longest "
                      "request (rerun `pc-advise simulate`); vLLM then takes the model's whole context, "
                      "which must fit the KV pool for vLLM to start."]
    length = -(-longest_request // MAX_MODEL_LEN_STEP) * MAX_MODEL_LEN_STEP
    notes = []
    context = geom.max_position_embeddings if geom is not None else None
    if context is not None and length > context:
        length = context
        if longest_request > context:
            notes.append(f"The log's longest request ({longest_request:,} tokens) is longer than the "
                         f"model's context ({context:,}): vLLM rejects it.")
    hybrid = layout is not None and layout.needs_hybrid_cache
    if pool_blocks is not None and hybrid:
        assert layout is not None
        fits = layout.longest_startable(pool_blocks, block_size, max_in_flight_tokens, length)
    else:
        fits = length if pool_blocks is None or -(-length // block_size) <= pool_blocks else pool_blocks * block_size
    if fits < length:
        if fits < longest_request:
            notes.append(f"--max-model-len {fits:,}: the largest that one request can fill in this pool "
                         f"({pool_blocks:,} usable blocks of {block_size}); the log's longest request is "
                         f"{longest_request:,} tokens, so vLLM rejects requests longer than {fits:,} "
                         "(the simulation refused them too).")
        length = fits
    what = f"the log's longest request is {longest_request:,} tokens (prompt + reply)"
    notes.insert(0, f"--max-model-len {length:,}: {what}; vLLM starts only if one request of that "
                    "length fits the KV pool, so the model's full context is not asked for"
                 + (f" ({context:,} tokens)." if context is not None and context > length else "."))
    return length, notes


def version_note(facts: vv.VllmFacts, backend: str, memory_flag: str) -> str:
    """The note that names the vLLM version the flags are for, and what of it they rely on."""
    default = facts.block_size.gpu if backend == "cuda" else facts.block_size.cpu
    note = (f"Flags for vLLM {facts.version} (--vllm-version): --block-size is always given, since its "
            f"default moved between versions ({default} on the {backend} backend in {facts.version}).")
    if facts.memory.after_warmup and memory_flag.startswith("--gpu-memory-utilization"):
        note += (f" vLLM {facts.version} sizes the KV cache after warm-up and, left unset, takes "
                 f"--gpu-memory-utilization {facts.memory.gpu_memory_utilization:g}; the flag keeps the "
                 "value simulated.")
    elif facts.memory.after_warmup and memory_flag.split()[0] in facts.memory.pinned_by:
        note += (f" {memory_flag.split()[0]} also turns off vLLM {facts.version}'s after-warm-up sizing, "
                 "so the pool is exactly what it says.")
    return note


def trace_serve_block_size(trace_block_size: int, options: RecommendOptions) -> int:
    """`--block-size` for a hash trace: the version's default when it divides the trace's
    block (the trace's blocks are then whole blocks of it), else the trace's own."""
    default = vv.default_block_size(options.vllm_version, options.backend)
    return default if trace_block_size % default == 0 else trace_block_size


def _memory_flag(
    best: Point, options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
    concurrent: bool, gpu_kv_bytes: int | None, block_size: int,
) -> tuple[str, int | None, list[str]]:
    """The flag that sizes the KV cache, the usable blocks it gives (None: unknown), notes.

    With a model the exact `--kv-cache-memory-bytes` (the chosen blocks plus the null block);
    `--gpu-memory-utilization` only as an estimated alternative (it rests on a guess of the
    activation memory). Without a model, the block count itself, at `block_size` (the serve
    line's; a hash trace's blocks are converted to it)."""
    tp = options.tensor_parallel_size
    # The pool at the serve line's block size (a hash trace's blocks converted to it).
    blocks = -(-best.num_blocks * best.block_size // block_size)
    notes = [] if blocks == best.num_blocks else [
        f"The trace's {best.num_blocks:,} blocks of {best.block_size} tokens are {blocks:,} blocks at "
        f"--block-size {block_size}, vLLM {vv.facts(options.vllm_version).version}'s default."]
    need = kv.kv_bytes_for_blocks(geom, block_size, blocks, tp) if geom is not None else None
    if need is not None and not concurrent and gpu_kv_bytes is not None:
        # Running requests were not simulated: do not pin the pool to the prefix cache's share.
        pool = kv.blocks_for_kv_bytes(geom, block_size, gpu_kv_bytes, tp)
        return f"--gpu-memory-utilization {options.gpu_memory_utilization:.2f}", pool, notes + [
            f"The prefix cache needs {need / kv.GIB:.2f} GiB per GPU (--kv-cache-memory-bytes {need} "
            "pins exactly that); the flag keeps --gpu-memory-utilization "
            f"{options.gpu_memory_utilization:.2f} because the sequential simulation does not size the "
            "memory running requests need."
        ]
    if need is not None:
        notes.append(f"--kv-cache-memory-bytes {need} gives the KV cache exactly {blocks:,} usable "
                     f"blocks ({need / kv.GIB:.2f} GiB per GPU, vLLM's null block included).")
        if gpu_gib is not None:
            util = kv.utilization_for_kv_bytes(geom, gpu_gib, need, options.headroom_gib, tp)
            util = min(options.gpu_memory_utilization, math.ceil(util * 100) / 100)
            notes.append(f"Alternative, estimated: --gpu-memory-utilization {util:.2f} (it assumes "
                         f"{headroom(options):.1f} GiB of activations and runtime besides the weights; a "
                         "0.5 GiB error there moves the pool by as much).")
        return f"--kv-cache-memory-bytes {need}", blocks, notes
    return f"--num-gpu-blocks-override {blocks + 1}", blocks, notes  # + the null block


def data_parallel_flags(replicas: int, balanced_by_vllm: bool) -> list[str]:
    """`--data-parallel-size N` when the N replicas are vLLM's own data-parallel engines, each
    with its own KV pool, balanced by vLLM's front end (advisor.recommend.replicas says which
    simulated router that is); none for one replica or an outside router."""
    return [f"--data-parallel-size {replicas}"] if replicas > 1 and balanced_by_vllm else []
