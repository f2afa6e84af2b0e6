"""The CPU offload tier (advisor.sim.offload) without vLLM: stories with hand-counted answers
(tests/test_offload_oracle.py runs the same stories, and generated ones, against vLLM), the
sizing arithmetic, properties of the reference, the offload grid and its artifact, and the
recommendation built on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor import schema
from advisor.blockhash import request_block_hashes
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.recommend.offload import MIN_GAIN, offload_advice
from advisor.recommend.rank import Point
from advisor.sim.cache import PrefixCache
from advisor.sim.configuration import SimulateOptions
from advisor.sim.grid import simulate_grid
from advisor.sim.offload import (
    CpuOffloadManager,
    OffloadTier,
    chunk_keys,
    cpu_chunks_for_bytes,
    provisional_ranks,
)
from advisor.sim.offload_grid import tier_chunks
from advisor.workload import Workload

B = 4
A = list(range(8))  # two blocks
X = list(range(100, 112))  # three blocks
LLAMA8 = kv.resolve_model("llama-3.1-8b")


def run(prompts: list[list[int]], num_blocks: int, num_chunks: int, blocks_per_chunk: int = 1,
        version: str = "0.32") -> tuple[list[int], list[int], OffloadTier]:
    """Each prompt alone through the GPU cache, then the tier: (GPU hits, CPU hits, the tier)."""
    gpu = PrefixCache(num_blocks, B)
    tier = OffloadTier(num_chunks, B, blocks_per_chunk, vllm_version=version)
    g, c = [], []
    for i, tokens in enumerate(prompts):
        hashes = request_block_hashes(tokens, B)
        local = gpu.admit(str(i), hashes, len(tokens))
        assert local is not None
        gpu.free(str(i))
        g.append(local)
        c.append(tier.run(hashes, len(tokens), local))
    return g, c, tier


# --- stories (the same as the oracle's, hand-counted) ---------------------------------------

def test_a_prompt_evicted_from_the_gpu_is_loaded_whole_from_the_cpu() -> None:
    # 3 GPU blocks: X's three blocks evict A's two. A again: nothing on the GPU, both of its
    # chunks on the CPU, the last block too (the CPU lookup is not capped at the last token).
    g, c, tier = run([A, X, A], num_blocks=3, num_chunks=8)
    assert (g, c) == ([0, 0, 0], [0, 0, 8])
    assert (tier.counters.loads, tier.counters.stores, tier.counters.evictions) == (2, 5, 0)


def test_the_gpus_capped_last_block_comes_from_the_cpu() -> None:
    g, c, _ = run([A, A], num_blocks=10, num_chunks=8)
    assert (g, c) == ([0, 4], [0, 4])  # the GPU stops at 4 of 8; block 1 is loaded


def test_a_cpu_tier_smaller_than_a_prompt_refuses_the_whole_offer() -> None:
    _, c, tier = run([A, X, A + [9]], num_blocks=3, num_chunks=2)
    assert c == [0, 0, 8]  # X's 3 new chunks never fit in 2: A's chunks stay
    assert (tier.counters.refused_offers, tier.counters.refused_chunks) == (1, 3)


def test_032_evicts_the_chunk_a_request_just_loaded_and_033_does_not() -> None:
    # 5 chunks full after A (a0 a1) and X (x0 x1 x2), ranked a1 < a0 < x2 < x1 < x0. b hits
    # a0 on the 4-block GPU, loads a1 from the CPU and offers its two new chunks.
    b = A + list(range(50, 58))
    _, a1, b2, b3 = request_block_hashes(b, B)
    x = request_block_hashes(X, B)
    for version, kept in (("0.32", {x[0], x[1], x[2], b2, b3}), ("0.34", {a1, x[0], x[1], b2, b3})):
        g, c, tier = run([A, X, b], num_blocks=4, num_chunks=5, version=version)
        assert (g, c) == ([0, 0, 4], [0, 0, 4])
        assert set(tier.manager.chunks) == kept
        # after b finishes: its chunks re-ranked last chunk first, so b's chunk 0 (a0 or a1) is the most recent
        assert tier.manager.lru_order()[-1] == (a1 if version == "0.34" else b2)


def test_chunks_of_two_blocks_load_only_whole_chunks_past_the_gpu_hit() -> None:
    c12 = A + [1, 2, 3, 4]
    assert run([c12, X, c12], num_blocks=3, num_chunks=4, blocks_per_chunk=2)[:2] == ([0, 0, 0], [0, 0, 8])
    assert run([c12, X, c12, c12], num_blocks=4, num_chunks=4, blocks_per_chunk=2)[:2] == ([0, 0, 4, 8], [0, 0, 0, 0])


def test_a_request_that_skips_the_cache_read_hits_nothing_but_stores() -> None:
    tier = OffloadTier(8, B)
    h = request_block_hashes(A, B)
    assert tier.run(h, len(A), 0, skip_prefix_cache=True) == 0
    assert tier.run(h, len(A), 0) == 8  # stored by the request that skipped the read


def test_the_manager_refuses_an_offer_when_pending_stores_and_pins_leave_too_little() -> None:
    m = CpuOffloadManager(3)
    assert m.prepare_store("r", [1, 2], [0, 1]) == [1, 2]
    assert m.lookup(1) is None  # pending: HIT_PENDING
    assert m.prepare_store("s", [5, 6], [0, 1]) is None  # 1 free, nothing evictable
    m.complete_store([1, 2])
    m.on_request_finished("r")
    m.prepare_load("s", [1], [0])
    assert m.prepare_store("s", [5, 6], [0, 1]) == [5, 6]  # 1 free + 2 evictable (1 pinned)
    assert set(m.chunks) == {1, 5, 6}


def test_chunk_keys_name_each_whole_chunk_by_its_last_block() -> None:
    assert chunk_keys(list("abcdefg"), 28, B, 1) == list("abcdefg")
    assert chunk_keys(list("abcdefg"), 28, B, 2) == ["b", "d", "f"]
    assert chunk_keys(list("abcdefg"), 27, B, 3) == ["c", "f"]


def test_provisional_ranks_from_033() -> None:
    assert (provisional_ranks("0.32"), provisional_ranks("0.33"), provisional_ranks("0.34")) == (False, True, True)


# --- sizing -----------------------------------------------------------------------------------

def test_tier_size_is_vllms_arithmetic() -> None:
    # llama-3.1-8b: 128 KiB per token, a 16-token block is 2 MiB (a multiple of the 4 KiB page)
    assert tier_chunks(LLAMA8, 16, 1.0, 1) == 512
    # TP 2: 1 MiB per rank, times 2 ranks per chunk: the same 512 for the same total GiB
    assert tier_chunks(LLAMA8, 16, 1.0, 2) == 512
    # a chunk is rounded up to the host page: 100 B per block -> 4096 B
    assert cpu_chunks_for_bytes(40960, 100) == 10
    assert cpu_chunks_for_bytes(40960, 100, world_size=41) == 10 * 4096 // 8192
    assert cpu_chunks_for_bytes(1 << 30, 3 << 20, world_size=4, single_copy=True) == (1 << 30) // (3 << 20)


# --- properties of the reference ---------------------------------------------------------------

SYSTEM = list(range(1000, 1012))


@st.composite
def prompts(draw: st.DrawFn) -> list[list[int]]:
    out: list[list[int]] = []
    for _ in range(draw(st.integers(2, 12))):
        heads = [[], SYSTEM] + [p[: len(p) // B * B] for p in out[-3:]]
        out.append((draw(st.sampled_from(heads)) + draw(st.lists(st.integers(0, 3), max_size=9)))[:24] or [0])
    return out


@settings(max_examples=60, deadline=None)
@given(ps=prompts(), extra=st.integers(0, 8), chunks=st.integers(1, 12), per=st.sampled_from([1, 2]))
def test_the_tier_never_overfills_and_hits_stay_within_the_prompt(ps: list[list[int]], extra: int, chunks: int,
                                                                   per: int) -> None:
    need = max(-(-len(p) // B) for p in ps)
    g, c, tier = run(ps, need + extra, chunks, per)
    assert len(tier.manager.chunks) <= chunks
    assert tier.counters.stores - tier.counters.evictions == len(tier.manager.chunks)
    for p, gi, ci in zip(ps, g, c, strict=True):
        assert gi + ci <= len(p)
        assert ci == 0 or (ci >= B * per and (gi + ci) % (B * per) == 0)  # whole chunks, at least one


@settings(max_examples=60, deadline=None)
@given(ps=prompts(), extra=st.integers(0, 8), per=st.sampled_from([1, 2]))
def test_an_unbounded_tier_serves_every_prefix_computed_before_whatever_the_gpu(ps: list[list[int]], extra: int,
                                                                                per: int) -> None:
    # Every whole chunk computed is stored and never evicted, so GPU + CPU hit the longest
    # run of whole chunks seen before (no last-token cap), unless the GPU hit is longer or
    # the CPU would add less than a chunk past it.
    need = max(-(-len(p) // B) for p in ps)
    g, c, _ = run(ps, need + extra, 10_000, per)
    seen: set[Any] = set()
    tpc = B * per
    for p, gi, ci in zip(ps, g, c, strict=True):
        keys = chunk_keys(request_block_hashes(p, B), len(p), B, per)
        run_ = next((j for j, k in enumerate(keys) if k not in seen), len(keys)) * tpc
        assert gi + ci == (run_ if run_ - gi >= tpc else gi)
        seen.update(keys)


# --- the grid and its artifact -------------------------------------------------------------------

def workload() -> Workload:
    rng = np.random.default_rng(3)
    system = list(range(5000, 5100))
    reqs = [system + rng.integers(0, 50, int(rng.integers(5, 60))).tolist() for _ in range(30)]
    reqs += [list(range(9000, 9000 + 64 * (i + 1))) for i in range(4)]  # long unique prompts push the GPU
    return Workload.from_token_lists(reqs + reqs[:10])


def test_the_grid_writes_a_row_per_budget_size_and_window_and_size_0_is_the_gpu_alone() -> None:
    w = workload()
    opts = SimulateOptions(block_sizes=(16,), num_blocks=(20, 40, 400), model="llama-3.1-8b", offload_gib=(0, 0.05, 1),
                           modes=("sequential",), policies=("lru",), workers=1)
    grid = simulate_grid(w, opts, LLAMA8)
    off = pl.from_arrow(grid.offload)
    assert off.height == 3 * 3 * 2
    sim = pl.from_arrow(grid.sim).filter(pl.col("num_blocks").is_not_null())
    for r in off.filter(pl.col("offload_gib") == 0).iter_rows(named=True):
        s = sim.filter((pl.col("num_blocks") == r["num_blocks"]) & (pl.col("window") == r["window"])).row(0, named=True)
        assert (r["queries"], r["gpu_hit_tokens"], r["cpu_hit_tokens"], r["cpu_chunks"]) == (s["queries"], s["hit_tokens"], 0, 0)
    big = off.filter((pl.col("offload_gib") == 1) & (pl.col("window") == "cold"))
    assert big["cpu_chunks"].to_list() == [tier_chunks(LLAMA8, 16, 1, 1)] * 3 == [512] * 3
    # The tier helps the small GPU (it lost what the CPU kept) and not the one that holds everything.
    by = {r["num_blocks"]: r for r in big.iter_rows(named=True)}
    assert by[20]["cpu_hit_tokens"] > 0 and by[400]["cpu_hit_tokens"] == 0
    assert all(r["miss_tokens"] == r["queries"] - r["gpu_hit_tokens"] - r["cpu_hit_tokens"] for r in off.iter_rows(named=True))
    assert any("offload.parquet" in n for n in grid.notes)


def test_offload_needs_a_model_and_sizes_of_at_least_0() -> None:
    with pytest.raises(AdvisorError, match="needs --model"):
        SimulateOptions(offload_gib=(16,))
    with pytest.raises(AdvisorError, match="0 or more"):
        SimulateOptions(offload_gib=(-1,), model="llama-3.1-8b")


def test_the_simulate_command_writes_offload_parquet(tmp_path: Path) -> None:
    w = workload()
    n = w.num_requests
    log = tmp_path / "log.jsonl"
    log.write_text("".join(f'{{"prompt_token_ids": {w.tokens(i).tolist()}}}\n' for i in range(n)))
    res = CliRunner().invoke(main, ["run", str(log), "-o", str(tmp_path / "run"), "--model", "llama-3.1-8b",
                                    "--block-sizes", "16", "--num-blocks", "20,400", "--offload-gib", "0,1",
                                    "--modes", "sequential", "--policies", "lru", "--no-replay", "-q"])
    assert res.exit_code == 0, res.output
    off = pq.read_table(tmp_path / "run" / "offload.parquet")
    assert off.num_rows == 2 * 2 * 2 and off.schema.names == schema.OFFLOAD.names
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## CPU offload tier" in report and "not the sum" in report


# --- the recommendation -------------------------------------------------------------------------

def point(num_blocks: int, hit_rate: float, fits: bool = True, score: float = 0.0, gib: float = 1.0) -> Point:
    return Point(16, num_blocks, gib, gib, 10, 1000, int(hit_rate * 1000), hit_rate, 0.9, 0.0, score, fits)


def offload_rows(gpu: float, cpu: dict[float, float], num_blocks: int = 100) -> pl.DataFrame:
    rows = []
    for gib, rate in {0.0: 0.0, **cpu}.items():
        rows.append({"block_size": 16, "num_blocks": num_blocks, "kv_gib": 0.2, "offload_gib": gib,
                     "cpu_chunks": int(gib * 512), "blocks_per_chunk": 1, "window": "cold", "requests": 10,
                     "queries": 1000, "gpu_hit_tokens": int(gpu * 1000), "cpu_hit_tokens": int(rate * 1000),
                     "miss_tokens": 1000 - int(gpu * 1000) - int(rate * 1000), "gpu_hit_rate": gpu,
                     "cpu_hit_rate": rate, "hit_rate": gpu + rate, "external_queries": 500, "loads": 1, "stores": 1,
                     "evictions": 0, "refused_offers": 0, "refused_chunks": 0, "load_gib": 0.1, "store_gib": 0.1,
                     "load_s": 0.01, "store_s": 0.01})
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema.OFFLOAD))  # type: ignore[return-value]


def test_the_smallest_size_with_90_percent_of_the_largest_gain_is_recommended() -> None:
    rows = offload_rows(0.4, {4: 0.0, 16: 0.27, 64: 0.29, 256: 0.30})
    out, lines = offload_advice(rows, point(100, 0.4), "cold", [], None, 1)
    assert out is not None and out["gib"] == 16 and out["hit_rate"] == pytest.approx(0.67)  # 0.27 >= 0.9 x 0.30
    assert "--kv-offloading-size 16" in lines[0] and "not the sum" in lines[1]


def test_no_tier_when_the_largest_adds_less_than_a_point() -> None:
    out, lines = offload_advice(offload_rows(0.6, {16: MIN_GAIN / 2, 64: MIN_GAIN / 2}), point(100, 0.6), "cold", [],
                                None, 1)
    assert out is not None and out["gib"] is None and "not recommended" in lines[0]


def test_without_a_simulation_the_hint_sizes_the_tier_as_the_whole_cache_not_the_difference() -> None:
    # The best point fits 10 GiB of GPU; a 30 GiB point scores better. The tier must hold a
    # copy of all 30 GiB (x2 ranks), not 30 - 10.
    best = point(100, 0.5, fits=True, score=1.0, gib=10.0)
    far = point(300, 0.8, fits=False, score=2.0, gib=30.0)
    out, lines = offload_advice(None, best, "cold", [best, far], int(10 * kv.GIB), 2)
    assert out is not None and out["gib"] is None and out["suggested_gib"] == 60.0
    assert "not that minus the GPU" in lines[0] and "--offload-gib 0,60" in lines[0]


def test_the_serve_line_carries_the_flags_only_when_recommended() -> None:
    from advisor.recommend.options import RecommendOptions, resolve_options
    from advisor.recommend.serve import serve_flags

    best = point(100, 0.5)
    options = resolve_options(RecommendOptions(), {})
    flags, _, _ = serve_flags(best, options, None, None, False, {"gib": 16.0}, False, 1000)
    assert flags[-2:] == ["--kv-offloading-size 16", "--kv-offloading-backend native"]
    for offload in (None, {"gib": None, "suggested_gib": 60.0}):
        flags, _, _ = serve_flags(best, options, None, None, False, offload, False, 1000)
        assert not any("offloading" in f for f in flags)


def test_a_report_without_offload_rows_has_no_offload_section() -> None:
    from advisor.report import html, markdown
    from advisor.report.model import build

    data = build("run", recommendation={"offload": None})
    assert "offload tier" not in markdown.render(data) and 'id="offload"' not in html.render(data)


def test_the_report_shows_the_tier_next_to_the_gpu() -> None:
    from advisor.report import html, markdown
    from advisor.report.model import build

    rows = offload_rows(0.4, {16: 0.27, 64: 0.30}).to_dicts()
    rows += [{**r, "num_blocks": 200, "kv_gib": 0.4, "gpu_hit_rate": 0.6, "hit_rate": 0.6 + r["cpu_hit_rate"] / 2}
             for r in rows]
    rec = {"recommended": {"block_size": 16, "num_blocks": 100}, "view": {"window": "cold"},
           "offload": {"simulated": True, "gib": 16.0, "hit_rate": 0.67, "gpu_hit_rate": 0.4, "num_blocks": 100}}
    data = build("run", recommendation=rec, offload=rows)
    md, page = markdown.render(data), html.render(data)
    assert "## CPU offload tier" in md and "not the sum" in md and "| 16.0 GiB |" in md
    assert '<section id="offload">' in page and 'aria-label="hit rate versus GPU memory' in page
    assert "from 40.0% (GPU alone) to 67.0%" in md


# --- the compiled twin -----------------------------------------------------------------------------

LOAD_THEN_EVICT = [A, X, A + list(range(50, 58))]  # the 0.32 / 0.33+ story above: a load, then its store evicts


@settings(max_examples=80, deadline=None)
@example(ps=LOAD_THEN_EVICT, extra=0, chunks=5, per=1, version="0.32", skips=[False] * 12)
@example(ps=LOAD_THEN_EVICT, extra=0, chunks=5, per=1, version="0.34", skips=[False] * 12)
@given(ps=prompts(), extra=st.integers(0, 8), chunks=st.integers(0, 14), per=st.sampled_from([1, 2]),
       version=st.sampled_from(["0.32", "0.34"]), skips=st.lists(st.booleans(), min_size=12, max_size=12))
def test_the_compiled_tier_equals_the_reference(ps: list[list[int]], extra: int, chunks: int, per: int, version: str,
                                                skips: list[bool]) -> None:
    from advisor.sim.configuration import TraceHashes, block_trace
    from advisor.sim.fast import sequential as fastsim
    from advisor.sim.fast.offload import simulate_offload_compiled
    from advisor.sim.offload import simulate_offload

    skip = np.array(skips[: len(ps)])
    w = Workload.from_token_lists(ps, skip_prefix_cache=skip.tolist())
    trace = block_trace(w, B)
    gpu = fastsim.simulate_sequential(trace, max(-(-len(p) // B) for p in ps) + extra, skip)
    scheduled = gpu.fits & (trace.num_tokens > 0)
    ref = simulate_offload(TraceHashes(trace), trace.num_tokens.tolist(), gpu.hit_tokens.tolist(), scheduled.tolist(),
                           B, chunks, blocks_per_chunk=per, skip=skip.tolist(), vllm_version=version)
    fast = simulate_offload_compiled(trace, gpu.hit_tokens, scheduled, chunks, blocks_per_chunk=per, skip=skip,
                                     provisional=provisional_ranks(version))
    assert fast.cpu_hit_tokens.tolist() == ref.cpu_hit_tokens.tolist()
    assert fast.external_queries.tolist() == ref.external_queries.tolist()
    assert fast.counters == ref.counters
