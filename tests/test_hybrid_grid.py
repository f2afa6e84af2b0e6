"""Hybrid models in the grid (advisor.sim.hybrid_grid, advisor.sim.fast.hybrid): the compiled
sequential twin against the reference HybridPrefixCache under eviction pressure, grid rows of a
sliding-window model with hand-counted hits, budgets in the hybrid pool's blocks, and what the
grid leaves out for hybrid models (fifo/belady, Mamba's own rules) said in its notes.

The reference itself is held to vLLM's KVCacheManager by tests/test_hybrid_oracle.py, and its
concurrent mode to vLLM's Scheduler by tests/test_hybrid_scheduler_oracle.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.kvlayout import kv_layout
from advisor.sim.configuration import SimulateOptions, block_trace, simulate_one
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.hybrid import (
    ceiling_sequential_hybrid,
    simulate_sequential_hybrid,
)
from advisor.sim.grid import plan_budgets, simulate_grid
from advisor.sim.hybrid import HybridPrefixCache
from advisor.sim.hybrid_grid import working_set_blocks
from advisor.workload import Workload

B = 4
LAYOUTS = {
    "gpt-oss": (("sliding_window", 9), ("full", None)),
    "gemma3": (("sliding_window", 6), ("sliding_window", 6), ("full", None)),
    "llama4": (("chunked_local", 8), ("full", None)),
    "swa-only": (("sliding_window", 9),),
    "three-specs": (("full", None), ("sliding_window", 5), ("chunked_local", 12)),
}


def trace_of(token_lists: Sequence[Sequence[int]], block_size: int = B) -> fasttrace.BlockTrace:
    offsets = np.zeros(len(token_lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in token_lists])
    values = np.concatenate([np.asarray(t, np.int32) for t in token_lists]) if offsets[-1] else np.zeros(0, np.int32)
    return fasttrace.traces_from_tokens(values, offsets, (block_size,), None)[block_size]


def reference(trace: fasttrace.BlockTrace, groups, num_blocks: int | None, skip: Sequence[bool]):
    """HybridPrefixCache admitting each request whole and freeing it: hits (-1: not admitted)."""
    cache = HybridPrefixCache(groups, num_blocks, trace.block_size)
    hits = []
    for i, n in enumerate(trace.num_tokens.tolist()):
        ids = trace.ids[trace.offsets[i]: trace.offsets[i + 1]].tolist()
        hit = cache.admit(str(i), ids, n, skip_prefix_cache=skip[i]) if n > 0 else None
        if hit is not None:
            cache.free(str(i))
        hits.append(-1 if hit is None else hit)
    return hits, cache


# --- the compiled twin equals the reference -----------------------------------------------------

SYSTEMS = [list(range(1000 * k, 1000 * k + 13)) for k in range(3)]


@st.composite
def workloads(draw: st.DrawFn, max_len: int) -> list[list[int]]:
    """Prompts sharing prefixes: a system prompt, or an earlier prompt cut at a block boundary
    (junctions, repeated block-aligned prompts), then a short tail."""
    out: list[list[int]] = []
    for _ in range(draw(st.integers(3, 24))):
        heads = [[], *SYSTEMS] + [p[: len(p) // B * B] for p in out[-6:]]
        head = draw(st.sampled_from(heads))
        tail = draw(st.lists(st.integers(0, 2), max_size=12))
        out.append((head + tail)[:max_len] or [0])
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(6, 40))
def test_compiled_sequential_twin_equals_the_reference_under_eviction_pressure(layout, data, num_blocks):
    groups = LAYOUTS[layout]
    token_lists = data.draw(workloads(60))
    skip = data.draw(st.lists(st.booleans(), min_size=len(token_lists), max_size=len(token_lists)))
    trace = trace_of(token_lists)
    expected, cache = reference(trace, groups, num_blocks, skip)
    assume(cache.evictions > 0 or -1 in expected)
    got = simulate_sequential_hybrid(trace, groups, num_blocks, np.array(skip))
    assert np.where(got.admitted, got.hit_tokens, -1).tolist() == expected
    assert (got.evictions, got.peak_blocks_in_use) == (cache.evictions, cache.peak_blocks_in_use)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_ceiling_is_the_infinite_reference_and_any_pool_past_its_blocks_gives_it(layout, data):
    """Ceiling (a pool doubled until nothing is evicted) = HybridPrefixCache with no limit; and a
    pool of `max(blocks_used, peak)` blocks, the grid's `exact_from`, gives the very same run."""
    groups = LAYOUTS[layout]
    trace = trace_of(data.draw(workloads(60)))
    skip = np.zeros(trace.num_requests, bool)
    expected, _ = reference(trace, groups, None, list(skip))
    ceiling = ceiling_sequential_hybrid(trace, groups, skip)
    assert ceiling.hit_tokens.tolist() == [max(h, 0) for h in expected] and ceiling.evictions == 0
    exact_from = max(ceiling.blocks_used, ceiling.peak_blocks_in_use)
    at = simulate_sequential_hybrid(trace, groups, exact_from, skip)
    assert at.hit_tokens.tolist() == ceiling.hit_tokens.tolist() and at.evictions == 0


# --- grid rows of a sliding-window model, hand-counted --------------------------------------------

SYSTEM = list(range(100, 356))  # 256 tokens: 16 blocks of 16


def system_prompt_story() -> Workload:
    """gpt-oss-20b (sliding window 128 on half its layers: a hit needs the cdiv(127, 16) = 8 blocks
    before it cached): three requests sharing only the system prompt, then the first one again,
    each arriving after the last has finished."""
    tails = [list(range(1000 * k, 1000 * k + 64)) for k in (1, 2, 3)]
    prompts = [SYSTEM + tails[0], SYSTEM + tails[1], SYSTEM + tails[2], SYSTEM + tails[0]]
    return Workload.from_token_lists(prompts, timestamps=[0.0, 100.0, 200.0, 300.0], output_tokens=[1] * 4)


@pytest.mark.parametrize("mode", [schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT])
def test_two_requests_sharing_only_a_system_prompt_hit_nothing_in_a_sliding_window_model(mode):
    """a (320 tokens) caches every full-attention block but only the sliding blocks 11-18 before
    its replay boundary (319 // 16 = 19). b shares the 16 system blocks: full attention would hit
    256 tokens, but the sliding group finds only blocks 11-15 before token 256 (5 < 8), so b hits 0,
    records the junction at 256 and caches its sliding blocks 8-15 there. c then hits the whole
    system prompt (256); a's own prompt again hits up to its replay boundary: 19 blocks, 304.
    Llama-3.1-8B (full attention) hits the system prompt from b on."""
    w = system_prompt_story()
    hybrid = simulate_one(w, 16, 1000, mode=mode, options=SimulateOptions(model="gpt-oss-20b", workers=1))
    assert hybrid.hit_tokens.tolist() == [0, 0, 256, 304]
    full = simulate_one(w, 16, 1000, mode=mode, options=SimulateOptions(model="llama-3.1-8b", workers=1))
    assert full.hit_tokens.tolist() == [0, 256, 256, 304]


def test_the_grid_row_sums_the_story_and_prices_the_hybrid_pool():
    w = system_prompt_story()
    options = SimulateOptions(model="gpt-oss-20b", num_blocks=(1000,), block_sizes=(16,), workers=1,
                              modes=(schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT))
    grid = simulate_grid(w, options, kv.resolve_model("gpt-oss-20b"))
    rows = [r for r in grid.sim.to_pylist() if r["num_blocks"] == 1000 and r["window"] == schema.WINDOW_COLD]
    assert {r["mode"]: r["hit_tokens"] for r in rows if r["policy"] == schema.POLICY_LRU} == {
        schema.MODE_SEQUENTIAL: 560, schema.MODE_CONCURRENT: 560}
    # one block id: 12 layers x 16 tokens x (K, V) x 8 KV heads x 64 x bf16 = 393,216 B, not 24 layers' worth
    assert all(r["kv_gib"] == pytest.approx(1001 * 393_216 / kv.GIB) for r in rows)
    assert {r["policy"] for r in grid.sim.to_pylist()} <= {schema.POLICY_LRU, schema.POLICY_OFF}
    assert any("full-attention models only" in n for n in grid.notes)
    assert any("simulated with vLLM's rules per group" in n for n in grid.notes)


# --- budgets --------------------------------------------------------------------------------------


def test_the_sweep_spans_the_blocks_every_group_holds():
    """Story at B=16: 4 x 20 full blocks, of which 16 system + 3 x 4 tails + a's again = 28
    distinct in the full group; the sliding group keeps 8 blocks before each boundary (blocks
    11-18 of each prompt: the system blocks 11-15 are shared, the tails' 16-18 are not): 5 + 3 x 3
    = 14 distinct. The largest request is 20 blocks in each of the 2 groups."""
    w = system_prompt_story()
    trace = block_trace(w, 16)
    layout = kv_layout("gpt-oss-20b")
    assert trace.working_set_blocks() == 28
    assert working_set_blocks(trace, layout.sim_groups()) == 28 + 14
    options = SimulateOptions(model="gpt-oss-20b", modes=(schema.MODE_SEQUENTIAL,), workers=1)
    _, notes = plan_budgets(w, options, None, 16, trace, layout)
    assert "working set 42 blocks, largest request 40 blocks" in notes[-1]
    _, notes = plan_budgets(w, options, None, 16, trace)
    assert "working set 28 blocks, largest request 20 blocks" in notes[-1]


def test_kv_cache_gib_buys_the_hybrid_pools_blocks():
    """Gemma 3 27B at B=16: 1,310,720 B per block id (10 layers' pages), not 62 layers' 8,126,464."""
    w = system_prompt_story()
    options = SimulateOptions(model="gemma-3-27b", kv_cache_gib=(1.0,), block_sizes=(16,), workers=1,
                              modes=(schema.MODE_SEQUENTIAL,))
    grid = simulate_grid(w, options, kv.resolve_model("gemma-3-27b"))
    finite = {r["num_blocks"] for r in grid.sim.to_pylist() if r["num_blocks"] is not None}
    assert finite == {kv.GIB // 1_310_720 - 1} == {818}


# --- what the grid leaves out for hybrid models ---------------------------------------------------


def test_fifo_and_belady_are_refused_for_a_hybrid_model():
    with pytest.raises(AdvisorError, match="full-attention models only"):
        simulate_one(system_prompt_story(), 16, 100, policy=schema.POLICY_FIFO,
                     options=SimulateOptions(model="gpt-oss-20b", workers=1))


def test_a_mamba_hybrid_runs_at_the_block_sizes_vllm_runs_and_says_what_is_not_modelled():
    """Qwen3-Next: --block-size 16 and 32 run at 544, 64 at 576, 128 at 640; its Mamba layers' own
    prefix-cache rules are not modelled (one full-attention group over the pool)."""
    w = system_prompt_story()
    options = SimulateOptions(model="qwen3-next-80b-a3b", num_blocks=(100,), workers=1,
                              modes=(schema.MODE_SEQUENTIAL,))
    grid = simulate_grid(w, options, kv.resolve_model("qwen3-next-80b-a3b"))
    assert sorted({r["block_size"] for r in grid.sim.to_pylist()}) == [544, 576, 640]
    assert any("Mamba layers' prefix caching" in n and "not modelled" in n for n in grid.notes)
    assert any("vLLM runs qwen3-next-80b-a3b at 544, 576, 640" in n for n in grid.notes)


def test_a_local_config_with_a_small_window_runs_the_hybrid_rules(tmp_path: Path):
    """A config.json the catalog does not know: its groups come from the file (gpt-oss alternates
    sliding layers from layer 0; window 32 needs 2 blocks of 16 before a hit)."""
    cfg = {"model_type": "gpt_oss", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 32, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 5000, "sliding_window": 32,
           "torch_dtype": "bfloat16"}
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    model = str(tmp_path / "tiny")
    w = system_prompt_story()
    res = simulate_one(w, 16, 1000, options=SimulateOptions(model=model, workers=1))
    # a caches sliding blocks 17-18 only (before its boundary 19): none of the 2 before token 256,
    # so b hits 0 and keeps 14-15 at its junction; c hits 256; a again hits 19 blocks, 304.
    assert res.hit_tokens.tolist() == [0, 0, 256, 304]
