"""Recommend: value per GiB, marginal ranking, constraints, flags, and the command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor import runfolder as rf
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.recommend.options import RecommendOptions
from advisor.recommend.stage import recommend
from advisor.schema import SIM

QUERIES = 1_000_000
LLAMA8 = kv.resolve_model("llama-3.1-8b")


def row(block_size: int, num_blocks: int | None, hit_rate: float, *, kv_gib: float | None = None,
        mode: str = "sequential", window: str = "cold", policy: str = "lru", peak: int = 0,
        ceiling: float = 0.9) -> dict[str, Any]:
    return {
        "block_size": block_size, "num_blocks": num_blocks, "kv_gib": kv_gib, "policy": policy,
        "mode": mode, "window": window, "requests": 100, "queries": QUERIES,
        "hit_tokens": int(round(hit_rate * QUERIES)), "hit_rate": hit_rate, "evictions": 0,
        "peak_blocks_in_use": peak, "ceiling_hit_rate": ceiling,
    }


def sim(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=SIM))  # type: ignore[return-value]


def blocks_for_gib(gib: float, block_size: int = 16) -> int:
    return int(gib * kv.GIB) // kv.bytes_per_block(LLAMA8, block_size) - 1


def test_small_gain_that_needs_40_gib_more_loses() -> None:
    small, big = blocks_for_gib(2), blocks_for_gib(42)
    table = sim([
        row(16, small, 0.500, kv_gib=2.0),
        row(16, big, 0.503, kv_gib=42.0),
        row(16, None, 0.503),
    ])
    out = recommend(table, None, RecommendOptions(model="llama-3.1-8b"), geom=LLAMA8)
    assert out["recommended"]["num_blocks"] == small
    assert out["runner_up"]["num_blocks"] == big
    assert "below the price" in out["runner_up"]["why_lost"]
    ranks = {c["num_blocks"]: c["rank"] for c in out["candidates"]}
    assert ranks == {small: 1, big: 2}


def test_a_large_gain_per_gib_does_win() -> None:
    small, big = blocks_for_gib(2), blocks_for_gib(6)
    table = sim([row(16, small, 0.30, kv_gib=2.0), row(16, big, 0.60, kv_gib=6.0)])
    out = recommend(table, None, RecommendOptions(model="llama-3.1-8b"), geom=LLAMA8)
    assert out["recommended"]["num_blocks"] == big  # 7.5 points per GiB beats the 0.1 price


curve = st.lists(
    st.tuples(st.floats(0.1, 50.0), st.floats(0.0, 1.0)), min_size=1, max_size=8,
    unique_by=lambda t: round(t[0], 3),
)


@settings(max_examples=60, deadline=None)
@given(points=curve, min_gain=st.sampled_from([0.0005, 0.001, 0.01]))
def test_recommendation_maximises_value_and_marginals_match_naive(
    points: list[tuple[float, float]], min_gain: float
) -> None:
    pts = sorted((round(g, 3), r) for g, r in points)
    hits_sorted = sorted(r for _, r in pts)  # hit rate grows with memory, as on any LRU curve
    rows = [row(16, blocks_for_gib(g), h, kv_gib=g) for (g, _), h in zip(pts, hits_sorted)]
    out = recommend(sim(rows), None, RecommendOptions(min_gain_per_gib=min_gain))  # GiB from the rows
    price = min_gain * QUERIES
    # naive reference: value = hits - price x GiB, ties to less memory
    values = [(int(round(h * QUERIES)) - price * g, -g) for (g, _), h in zip(pts, hits_sorted)]
    best = max(range(len(pts)), key=lambda i: values[i])
    assert out["recommended"]["kv_gib"] == pytest.approx(pts[best][0], abs=1e-3)
    prev_g, prev_h = 0.0, 0
    for cand, (g, _), h in zip(out["candidates"], pts, hits_sorted):
        hits = int(round(h * QUERIES))
        assert cand["marginal_tokens_per_gib"] == pytest.approx((hits - prev_h) / (g - prev_g), abs=0.1)
        prev_g, prev_h = g, hits


def _three_sizes() -> pl.DataFrame:
    return sim([
        row(16, 1000, 0.60), row(16, None, 0.62),
        row(32, 500, 0.55), row(32, None, 0.58),
        row(48, 333, 0.50),
    ])


def test_cuda_backend_takes_multiples_of_16() -> None:
    out = recommend(_three_sizes(), None, RecommendOptions(backend="cuda"))
    assert out["recommended"]["block_size"] == 16
    assert out["runner_up"]["block_size"] in (32, 48)
    assert "--block-size 16" in out["vllm_serve"]


def test_cpu_backend_drops_block_sizes_that_are_not_multiples_of_32() -> None:
    out = recommend(_three_sizes(), None, RecommendOptions(backend="cpu"))
    assert out["recommended"]["block_size"] == 32
    assert {c["block_size"] for c in out["candidates"]} == {32}
    assert any("dropped 16, 48" in c for c in out["constraints"])
    assert out["runner_up"] is None or out["runner_up"]["block_size"] == 32


def test_without_a_model_memory_is_pinned_in_blocks() -> None:
    out = recommend(_three_sizes(), None, RecommendOptions())
    assert out["recommended"]["kv_gib"] is None
    assert out["recommended"]["marginal_tokens_per_gib"] is None
    assert "--num-gpu-blocks-override 1001" in out["vllm_serve"]  # 1000 usable + the null block
    assert out["vllm_serve"].startswith("vllm serve <MODEL> --enable-prefix-caching")


def test_model_without_gpu_pins_kv_bytes() -> None:
    n = blocks_for_gib(4)
    out = recommend(sim([row(16, n, 0.5)]), None, RecommendOptions(model="llama-3.1-8b"), geom=LLAMA8)
    want = (n + 1) * 16 * 32 * 8 * 128 * 2 * 2
    assert f"--kv-cache-memory-bytes {want}" in out["vllm_serve"]
    assert out["vllm_serve"].startswith("vllm serve meta-llama/Llama-3.1-8B-Instruct ")  # the HF repo id


def test_hash_trace_recommends_memory_only() -> None:
    table = sim([row(512, 100, 0.30), row(512, 400, 0.45), row(512, None, 0.46)])
    out = recommend(table, None, RecommendOptions(backend="cpu"), input_kind="hash_trace")
    assert out["input_kind"] == "hash_trace"
    assert out["recommended"]["block_size"] == 512  # not dropped by the backend rule
    assert any("fixed by the trace" in c for c in out["constraints"])
    assert out["reasoning"][0].startswith("Recommended KV memory")
    # The block size is stated, the version's default for the backend: 400 blocks of 512
    # tokens = 1,600 blocks of the CPU backend's 128, plus the null block.
    assert "--block-size 128 --num-gpu-blocks-override 1601" in out["vllm_serve"]
    # On GPUs with vLLM 0.32: 12,800 blocks of its default 16.
    out = recommend(table, None, RecommendOptions(vllm_version="0.32"), input_kind="hash_trace")
    assert "--block-size 16 --num-gpu-blocks-override 12801" in out["vllm_serve"]


def test_running_requests_reserve_blocks_at_logged_concurrency() -> None:
    table = sim([
        row(16, 100, 0.50, mode="concurrent", peak=300),
        row(16, 400, 0.52, mode="concurrent", peak=300),
        row(16, 1000, 0.5201, mode="concurrent", peak=300),  # 0.01 points for ~1.2 GiB more
    ])
    out = recommend(table, None, RecommendOptions())
    assert all(c["num_blocks"] >= 300 for c in out["candidates"])
    assert out["recommended"]["num_blocks"] == 400
    assert any("300 blocks at B=16" in c for c in out["constraints"])


def test_prefers_concurrent_warm_rows_and_says_so() -> None:
    table = sim([
        row(16, 500, 0.10, mode="sequential", window="cold"),
        row(16, 500, 0.70, mode="concurrent", window="warm"),
        row(16, 500, 0.40, mode="concurrent", window="cold"),
        row(16, 500, 0.99, policy="belady", mode="concurrent", window="warm"),
    ])
    out = recommend(table, None, RecommendOptions())
    assert out["view"] == {"policy": "lru", "mode": "concurrent", "window": "warm"}
    assert out["recommended"]["hit_rate"] == 0.70
    assert "concurrent simulation's warm window" in out["reasoning"][1]


def test_offloading_when_the_curve_climbs_past_the_gpu() -> None:
    gpu = kv.resolve_gpu("l4")  # 22.5 GiB x 0.92 - 15 GiB weights - 2 GiB headroom: ~3.7 GiB for KV
    kv_left = kv.kv_bytes_for_gpu(LLAMA8, gpu, 0.92) / kv.GIB
    assert 3.0 < kv_left < 4.0
    table = sim([
        row(16, blocks_for_gib(1), 0.20, kv_gib=1.0),
        row(16, blocks_for_gib(3), 0.30, kv_gib=3.0),
        row(16, blocks_for_gib(20), 0.80, kv_gib=20.0),
    ])
    out = recommend(table, None, RecommendOptions(model="llama-3.1-8b", gpu="l4"), geom=LLAMA8, gpu_gib=gpu)
    assert out["recommended"]["kv_gib"] == 3.0
    # Not simulated (no offload.parquet): a hint, no flags. The CPU tier holds a copy of the
    # GPU's blocks, so it is sized as the whole 20 GiB wanted, not 20 minus the GPU's share.
    assert out["offload"]["beyond_gpu_hit_rate"] == 0.80 and out["offload"]["gib"] is None
    assert out["offload"]["suggested_gib"] == pytest.approx(20.0, abs=0.11)
    assert out["offload"]["suggested_gib"] > 20.0 - kv_left + 1
    assert "--kv-offloading-size" not in out["vllm_serve"]
    assert "--gpu-memory-utilization" in out["vllm_serve"]


def _util(serve: str) -> float:
    return float(serve.split("--gpu-memory-utilization ")[1].split()[0])


def test_memory_flag_pins_the_recommended_kv_exactly_under_concurrency() -> None:
    """The serve line pins the pool with --kv-cache-memory-bytes: exactly the recommended
    usable blocks plus vLLM's null block; the utilization is offered only as an estimate,
    and it too buys at least the blocks (and 0.01 less would not)."""
    gpu = kv.resolve_gpu("h100")
    n = blocks_for_gib(10)
    out = recommend(sim([row(16, n, 0.5, mode="concurrent", peak=10)]), None,
                    RecommendOptions(model="llama-3.1-8b", gpu="h100"), geom=LLAMA8, gpu_gib=gpu)
    pinned = int(re.search(r"--kv-cache-memory-bytes (\d+)", out["vllm_serve"]).group(1))
    assert pinned == (n + 1) * kv.bytes_per_block(LLAMA8, 16)
    assert kv.blocks_for_kv_bytes(LLAMA8, 16, pinned) == n
    assert "--gpu-memory-utilization" not in out["vllm_serve"]
    estimate = next(r for r in out["reasoning"] if "estimated: --gpu-memory-utilization" in r)
    util = float(re.search(r"--gpu-memory-utilization ([0-9.]+)", estimate).group(1))
    assert util < 0.92  # 10 GiB of KV needs far less than the whole H100
    assert kv.blocks_for_kv_bytes(LLAMA8, 16, kv.kv_bytes_for_gpu(LLAMA8, gpu, util)) >= n
    assert kv.blocks_for_kv_bytes(LLAMA8, 16, kv.kv_bytes_for_gpu(LLAMA8, gpu, util - 0.01)) < n


def test_sequential_view_keeps_the_utilization_ceiling() -> None:
    out = recommend(sim([row(16, blocks_for_gib(10), 0.5)]), None,
                    RecommendOptions(model="llama-3.1-8b", gpu="h100", gpu_memory_utilization=0.9),
                    geom=LLAMA8, gpu_gib=kv.resolve_gpu("h100"))
    assert _util(out["vllm_serve"]) == 0.9
    assert any("--kv-cache-memory-bytes" in r for r in out["reasoning"])


def test_prompt_fixes_from_breakers_sorted_by_gain() -> None:
    stats = {"breakers": [
        {"label": "uuid/id", "rate_lost": 0.05, "description": "a request id in the system prompt"},
        {"label": "timestamp", "rate_lost": 0.20, "description": "the date at the top"},
    ]}
    out = recommend(_three_sizes(), stats, RecommendOptions())
    assert [f["breaker"] for f in out["prompt_fixes"]] == ["timestamp", "uuid/id"]
    assert out["prompt_fixes"][0]["hit_rate_gain"] == 0.20
    none = recommend(_three_sizes(), None, RecommendOptions())
    assert none["prompt_fixes"] == [] and any("No stats.json" in r for r in none["reasoning"])


def test_no_lru_rows_is_a_clear_error() -> None:
    with pytest.raises(AdvisorError, match="pc-advise simulate"):
        recommend(sim([row(16, 10, 0.1, policy="fifo")]), None, RecommendOptions())


# --- the command ---
def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    rows = [row(16, blocks_for_gib(g), h, kv_gib=g) for g, h in ((1, 0.3), (4, 0.5), (16, 0.505))]
    rows += [row(32, blocks_for_gib(g, 32), h, kv_gib=g) for g, h in ((1, 0.28), (4, 0.49))]
    rows += [row(16, None, 0.55), row(32, None, 0.54)]
    rf.write_table(run / rf.SIM, pa.Table.from_pylist(rows, schema=SIM), SIM)
    return run


def test_cli_recommend_writes_recommendation_json(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    res = CliRunner().invoke(main, ["recommend", str(run), "--model", "llama-3.1-8b", "--gpu", "h100"])
    assert res.exit_code == 0, res.output
    assert "vllm serve meta-llama/Llama-3.1-8B-Instruct --enable-prefix-caching --block-size 16" in res.output
    doc = json.loads((run / rf.RECOMMENDATION).read_text())
    for key in ("input_kind", "recommended", "runner_up", "flags", "vllm_serve", "reasoning", "offload",
                "prompt_fixes", "candidates", "constraints", "cost_model"):
        assert key in doc
    assert doc["recommended"]["kv_gib"] == 4.0
    manifest = json.loads((run / rf.MANIFEST).read_text())
    assert manifest["stages"]["recommend"]["options"]["model"] == "llama-3.1-8b"


def test_cli_recommend_without_sim_names_the_stage(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["recommend", str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert "pc-advise simulate" in res.output


def test_cli_recommend_weights_too_big_for_gpu(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    res = CliRunner().invoke(main, ["recommend", str(run), "--model", "llama-3.1-70b", "--gpu", "l4"])
    assert res.exit_code == 1
    assert "--tensor-parallel-size" in res.output


def test_recommend_model_reprices_rows_simulated_with_another_model() -> None:
    n = blocks_for_gib(4)
    out = recommend(sim([row(16, n, 0.5, kv_gib=999.0)]), None, RecommendOptions(), geom=LLAMA8)
    assert out["recommended"]["kv_gib"] == pytest.approx((n + 1) * 16 * 131072 / kv.GIB, abs=1e-3)


def test_mla_models_on_cuda_take_flashmla_pages_of_64() -> None:
    ds = kv.resolve_model("deepseek-v3")
    out = recommend(_three_sizes().vstack(sim([row(64, 250, 0.45)])), None, RecommendOptions(), geom=ds)
    assert {c["block_size"] for c in out["candidates"]} == {64}
    assert any("multiple of 64" in c for c in out["constraints"])


def test_budgets_that_preempt_under_load_are_not_recommended() -> None:
    rows = [row(16, 200, 0.50, mode="concurrent", peak=150), row(16, 2000, 0.51, mode="concurrent", peak=150)]
    rows[0]["preemptions"], rows[1]["preemptions"] = 7, 0
    table = pl.DataFrame(rows, schema_overrides={"num_blocks": pl.Int64, "kv_gib": pl.Float64})
    out = recommend(table, None, RecommendOptions())
    assert out["recommended"]["num_blocks"] == 2000
    assert any("preempted" in c and "200 blocks" in c for c in out["constraints"])
