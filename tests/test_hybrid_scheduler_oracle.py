"""Concurrent mode for hybrid models (advisor.sim.hybrid_grid.concurrent_hybrid: events.Engine over
a HybridPrefixCache) against vLLM's own Scheduler and AsyncScheduler with several KV cache groups.

tests/test_scheduler_oracle.py's harness (a tiny model config, fake sampled tokens, the same
one-second step clock on both sides) with the scheduler's KVCacheConfig holding the hybrid
groups instead of one full-attention group: sliding window + full (gpt-oss-like), two sliding
groups + full (Gemma-3-like), chunked local + full (Llama 4 with the hybrid manager on) and a
sliding window alone. Compared per request: `num_cached_tokens` at the first scheduling, the
preemptions and the steps. Stories with hand-counted hits, then generated workloads under
pressure (pools below the working set, token budgets that chunk prompts, 1-4 sequences).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

import tests.test_scheduler_oracle as sched_oracle
from advisor.blockhash import request_block_hashes
from advisor.sim.hybrid import HybridPrefixCache
from advisor.sim.hybrid_grid import concurrent_hybrid
from advisor.sim.steptime import StepTimeModel
from tests.test_scheduler_oracle import (
    UNLIMITED_BUDGET,
    B,
    Outcome,
    Req,
    check_same,
    req,
    run_vllm,
)

pytestmark = pytest.mark.oracle

Groups = Sequence[tuple[str, "int | None"]]
GPT_OSS = (("sliding_window", 9), ("full", None))  # window 9: a hit needs cdiv(8, 4) = 2 cached blocks
GEMMA3 = (("sliding_window", 6), ("sliding_window", 6), ("full", None))
LLAMA4 = (("chunked_local", 8), ("full", None))
SWA_ONLY = (("sliding_window", 9),)
LAYOUTS = {"gpt-oss": GPT_OSS, "gemma3": GEMMA3, "llama4": LLAMA4, "swa-only": SWA_ONLY}


@contextmanager
def hybrid_scheduler(groups: Groups):
    """tests/test_scheduler_oracle's scheduler with these KV cache groups (`run_vllm` builds it)."""
    plain = sched_oracle.make_scheduler

    def make(num_blocks: int, max_num_seqs: int, budget: int | None, *, async_scheduling: bool = False):
        import torch
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (
            ChunkedLocalAttentionSpec,
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
            SlidingWindowSpec,
        )
        from vllm.v1.structured_output import StructuredOutputManager

        one = plain(num_blocks, max_num_seqs, budget, async_scheduling=async_scheduling)  # its VllmConfig
        # vLLM's CPU config turns async scheduling off (VllmConfig.__post_init__); on a GPU it stays on,
        # and the sliding-window admission cap then reserves two batches in flight
        # (max_concurrent_batches): the GPU's setting, which the simulator models
        one.vllm_config.scheduler_config.async_scheduling = async_scheduling
        common = dict(block_size=B, num_kv_heads=1, head_size=1, dtype=torch.float32)
        specs = [FullAttentionSpec(**common) if kind == "full" else
                 SlidingWindowSpec(**common, sliding_window=window) if kind == "sliding_window" else
                 ChunkedLocalAttentionSpec(**common, attention_chunk_size=window) for kind, window in groups]
        retention = one.vllm_config.cache_config.prefix_cache_retention_interval  # 0, as the engine resolves it
        config = KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec([f"layer.{i}"], s) for i, s in enumerate(specs)],
                               prefix_cache_retention_interval=retention)
        cls = AsyncScheduler if async_scheduling else Scheduler
        sched = cls(vllm_config=one.vllm_config, kv_cache_config=config,
                    structured_output_manager=StructuredOutputManager(one.vllm_config), block_size=B, log_stats=True)
        assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == num_blocks
        in_flight = (2 if async_scheduling else 1) * (budget if budget is not None else UNLIMITED_BUDGET)
        assert sched.vllm_config.max_in_flight_tokens == in_flight  # what concurrent_hybrid derives
        assert len(sched.kv_cache_manager.coordinator.single_type_managers) == len(groups)
        return sched

    with mock.patch.object(sched_oracle, "make_scheduler", make):
        yield


def run_reference(groups: Groups, reqs: Sequence[Req], num_blocks: int, max_num_seqs: int, budget: int | None, *,
                  async_scheduling: bool = False) -> Outcome:
    res, _ = concurrent_hybrid(
        tuple(groups), num_blocks, B, [request_block_hashes(r.tokens, B) for r in reqs],
        np.array([len(r.tokens) for r in reqs], np.int64), np.array([r.output for r in reqs], np.int64),
        np.array([r.arrival for r in reqs], np.float64), StepTimeModel.from_rates(1e300, 1.0), max_num_seqs,
        budget if budget is not None else UNLIMITED_BUDGET, async_scheduling=async_scheduling, skip_prefix_cache=None)
    assert res.refused == 0, "every request of a workload here fits the pool alone"
    return Outcome(res.hit_tokens.tolist(), res.preemptions, res.steps, evictions=res.evictions)


def assert_same(groups: Groups, reqs: Sequence[Req], num_blocks: int, max_num_seqs: int, budget: int | None = None, *,
                async_scheduling: bool = False, pressure: bool = False) -> Outcome:
    ref = run_reference(groups, reqs, num_blocks, max_num_seqs, budget, async_scheduling=async_scheduling)
    if pressure:  # steer generated workloads toward evictions and preemptions
        target(float(ref.evictions + 4 * ref.preemptions))
    with hybrid_scheduler(groups):
        got = run_vllm(reqs, num_blocks, max_num_seqs, budget, async_scheduling=async_scheduling)
    check_same(ref, got, (reqs, num_blocks, max_num_seqs, budget))
    return got


# --- stories ------------------------------------------------------------------------------

SYSTEM = tuple(range(100, 116))  # 16 tokens: 4 blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_shared_system_prompt_needs_the_junction_before_it_hits(async_scheduling):
    """gpt-oss-like, each request alone: a caches its sliding blocks 4-5 (before its replay
    boundary 27); b shares only the 4 system blocks and hits 0, leaving its sliding blocks 2-3
    at the junction (16); c hits the system prompt."""
    reqs = [req(SYSTEM + tuple(range(200, 212)), 2, 0), req(SYSTEM + tuple(range(300, 312)), 2, 10),
            req(SYSTEM + tuple(range(400, 412)), 2, 20)]
    got = assert_same(GPT_OSS, reqs, 40, 4, async_scheduling=async_scheduling)
    assert got.hits == [0, 0, 16]


def test_a_long_decode_holds_only_the_window_in_the_sliding_group():
    """gpt-oss-like, a pool of 12: a (8 prompt tokens, 16 output tokens: 23 KV slots) ends holding
    6 full-attention blocks but only the sliding window's 3 (blocks 0-2 leave the window at 13, 17
    and 21 computed tokens), so it peaks at 9 blocks, not the 12 of full attention in both groups.
    Its sliding block 0 (cached: it ends at the replay boundary 7) goes to the free queue's tail
    and survives; blocks 1 and 2 (not cached) go to its head and are taken again. b, the same
    prompt after a finished, hits block 0 in both groups: 4 tokens."""
    reqs = [req(range(8), 16, 0), req(range(8), 2, 30)]
    got = assert_same(GPT_OSS, reqs, 12, 2)
    assert got.hits == [0, 4] and got.preemptions == 0
    res, _ = concurrent_hybrid(GPT_OSS, 12, B, [request_block_hashes(r.tokens, B) for r in reqs],
                               np.array([8, 8]), np.array([16, 2]), np.array([0.0, 30.0]),
                               StepTimeModel.from_rates(1e300, 1.0), 2, UNLIMITED_BUDGET, async_scheduling=False,
                               skip_prefix_cache=None)
    assert res.peak_blocks_in_use == 9 and res.evictions == 0


def test_a_prompt_computed_in_chunks_caches_its_sliding_tail():
    """Sliding window only (one group), 4 tokens a step: a's 20-token prompt runs in 5 chunks; its
    blocks 2 and 3 (before the replay boundary 19) are cached as their chunks compute them, while
    blocks 0 and 1 leave the window uncached. b, the same prompt later, finds blocks 3 and 2, the
    2 blocks a hit needs: 16 tokens."""
    got = assert_same(SWA_ONLY, [req(range(20), 1, 0), req(range(20), 1, 10)], 10, 2, budget=4)
    assert got.hits == [0, 16]


# --- generated workloads under pressure ------------------------------------------------------

SYSTEMS = [tuple(range(1000 * k, 1000 * k + n)) for k, n in enumerate((8, 11, 6))]


@st.composite
def workloads(draw: st.DrawFn, groups: Groups) -> tuple[list[Req], int, int, int | None]:
    """tests/test_scheduler_oracle's workloads, with a pool between the largest request's
    admission (all groups, sliding and chunked ones capped) and the sum of them minus one."""
    reqs: list[Req] = []
    t = 0
    for _ in range(draw(st.integers(2, 7))):
        heads = [(), *SYSTEMS] + [r.tokens[: len(r.tokens) // B * B] for r in reqs[-4:]]
        head = draw(st.sampled_from(heads))
        tail = tuple(draw(st.lists(st.integers(0, 2), max_size=8)))
        t += draw(st.integers(0, 3))
        reqs.append(Req((head + tail)[:20] or (0,), draw(st.integers(1, 10)), t))
    max_num_seqs = draw(st.integers(1, 4))
    budget = draw(st.none() | st.integers(max(max_num_seqs, 2), 12))
    in_flight = budget if budget is not None else UNLIMITED_BUDGET
    sizing = HybridPrefixCache(groups, 1, B, max_model_len=1 << 40, max_in_flight_tokens=2 * in_flight)
    need = [sizing.admission_blocks(len(r.tokens) + r.output - 1) for r in reqs]
    num_blocks = draw(st.integers(max(need), max(max(need), sum(need) - 1)))
    return reqs, num_blocks, max_num_seqs, budget


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_workloads_match_vllm(layout, async_scheduling, data):
    groups = LAYOUTS[layout]
    assert_same(groups, *data.draw(workloads(groups)), async_scheduling=async_scheduling, pressure=True)
