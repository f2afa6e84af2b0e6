"""Recommend the router and the replica layout (advisor.recommend.replicas): stories on hand-made
replicas.parquet rows with hand-counted layouts, pools and choices, then the stage on a sample
log and the CLI's --gpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import advisor
from advisor import kvmemory as kv
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.recommend.deploy import SINGLE_ENGINE, RouterSettings
from advisor.recommend.options import RecommendOptions
from advisor.recommend.replicas import BalanceLimit, recommend_replicas
from advisor.schema import REPLICAS, SIM

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"
QUERIES = 100_000
LLAMA8 = kv.resolve_model("llama-3.1-8b")


def rrow(replicas: int, router: str, num_blocks: int, hit_rate: float, *, spread: float = 1.0,
         ttft_p95: float = 0.1, refused: int = 0, block_size: int = 16, mode: str = "concurrent",
         **extra: Any) -> dict[str, Any]:
    return {"block_size": block_size, "num_blocks": num_blocks, "kv_gib": None, "replicas": replicas,
            "router": router, "mode": mode, "requests": 500, "queries": QUERIES, "hit_tokens": int(round(hit_rate * QUERIES)),
            "hit_rate": hit_rate, "refused": refused, "evictions": 0, "preemptions": 0, "ttft_p50_s": ttft_p95 / 2,
            "ttft_p95_s": ttft_p95, "e2e_p50_s": 1.0, "e2e_p95_s": 2.0, "makespan_s": 100.0,
            "load_spread": spread, "fallbacks": 0, **extra}


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=REPLICAS))  # type: ignore[return-value]


REC = {"block_size": 16, "num_blocks": 1000}


def test_without_gpus_the_router_is_chosen_at_the_largest_count_within_the_balance_limit() -> None:
    """At 4 replicas cache-aware hits most but its busiest replica takes 3x the mean; session's
    p95 TTFT is 1.5x round-robin's; prefix-hash is within both limits and wins. Cache-aware,
    which would save the most, is the runner-up and says what the limit cost."""
    rows = [rrow(c, r, 1000, h, spread=s, ttft_p95=t) for c, r, h, s, t in [
        (2, "round-robin", 0.40, 1.0, 0.10), (2, "prefix-hash", 0.55, 1.4, 0.09), (2, "cache-aware", 0.60, 1.2, 0.08),
        (4, "round-robin", 0.30, 1.0, 0.10), (4, "session", 0.70, 1.5, 0.15), (4, "prefix-hash", 0.60, 1.8, 0.12),
        (4, "cache-aware", 0.75, 3.0, 0.09),
    ]]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    assert out is not None and out["choice"] == "router" and out["value_unit"] == "prefill tokens"
    best, runner = out["recommended"], out["runner_up"]
    assert (best["replicas"], best["router"], best["value"]) == (4, "prefix-hash", 60_000)
    assert best["ttft_p95_vs_round_robin"] == pytest.approx(1.2)
    assert runner["router"] == "cache-aware" and not runner["within_limit"]
    assert runner["why_lost"] == ("it would save 15,000 prefill tokens more, but its busiest replica gets 3.00x the "
                                  "mean requests per replica (limit 2x): over the balance limit")
    session = next(c for c in out["candidates"] if c["replicas"] == 4 and c["router"] == "session")
    assert "1.50x round-robin's" in session["out_of_limit"]
    # at 2 replicas all three are within the limit: the most hits wins there
    assert [(p["replicas"], p["router"]) for p in out["per_count"]] == [(2, "cache-aware"), (4, "prefix-hash")]
    assert "--gpus" in out["reasoning"][-1]


def test_the_limit_is_a_setting_and_a_looser_one_lets_the_most_hits_win() -> None:
    rows = [rrow(4, "round-robin", 1000, 0.30), rrow(4, "cache-aware", 1000, 0.75, spread=3.0)]
    assert recommend_replicas(frame(rows), REC, RecommendOptions())["recommended"]["router"] == "round-robin"
    loose = recommend_replicas(frame(rows), REC, RecommendOptions(), limit=BalanceLimit(load_spread=3.0))
    assert loose["recommended"]["router"] == "cache-aware" and loose["balance_limit"]["load_spread"] == 3.0


def test_refused_requests_put_a_router_out_and_nothing_in_limit_still_shows_the_best_with_why() -> None:
    rows = [rrow(2, "session", 1000, 0.9, refused=3), rrow(2, "prefix-hash", 1000, 0.5, spread=2.5)]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    assert out["recommended"]["router"] == "session" and out["recommended"]["out_of_limit"] == "it refused 3 requests"
    assert any("No candidate is within the balance limit" in line for line in out["reasoning"])


def test_ties_go_to_the_more_even_load() -> None:
    rows = [rrow(2, "session", 1000, 0.5, spread=1.6), rrow(2, "round-robin", 1000, 0.5, spread=1.0)]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    assert out["recommended"]["router"] == "round-robin"
    assert out["runner_up"]["why_lost"].startswith("saves as much")


def test_no_count_above_one_gives_no_section_and_sequential_rows_are_not_used() -> None:
    assert recommend_replicas(frame([rrow(1, "round-robin", 1000, 0.5)]), REC, RecommendOptions()) is None
    rows = [rrow(2, "round-robin", 1000, 0.5, mode="concurrent"), rrow(2, "session", 1000, 0.9, mode="sequential")]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    assert [c["router"] for c in out["candidates"]] == ["round-robin"]


def test_the_budget_nearest_the_recommended_one_is_compared() -> None:
    rows = [rrow(2, "round-robin", b, h) for b, h in [(500, 0.3), (900, 0.4), (4000, 0.6)]]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    assert out["recommended"]["num_blocks"] == 900  # |900 - 1000| < |500 - 1000|


# --- layouts of the GPUs given ---
# llama-3.1-8b (bf16, 32 layers, 8 KV heads of 128, 32 attention heads, 14.96 GiB of weights) on an
# 80 GiB GPU at 0.92 utilisation and 2 GiB headroom: 73.6 - 14.96/t - 2 GiB of KV per GPU, at
# 2 x 32 x (8/t) x 128 x 2 B = 128/t KiB per token per GPU, 16-token blocks of 2/t MiB:
#   TP1: 56.64 GiB / 2 MiB = 29,001 blocks -> 29,000 usable; TP2: 64.12 GiB / 1 MiB -> 65,659;
#   TP4: 67.86 GiB / 0.5 MiB -> 138,977; TP8: 69.73 GiB / 0.25 MiB -> 285,614.
POOLS = {1: 29_000, 2: 65_659, 4: 138_977, 8: 285_614}
BUDGETS = (20_000, 60_000, 130_000, 280_000)


def layout_rows(hits: dict[tuple[int, str], tuple[float, float]]) -> pl.DataFrame:
    rows = []
    for (count, router), (hit, spread) in hits.items():
        for b in BUDGETS:
            rows.append(rrow(count, router, b, hit * min(1.0, b / 60_000), spread=spread))
    return frame(rows)


def test_eight_gpus_as_layouts_each_at_the_largest_simulated_budget_its_pool_holds() -> None:
    """8 H100s: 8 x TP1, 4 x TP2, 2 x TP4, 1 x TP8, each evaluated at the largest simulated
    budget below its pool (hand-counted above). Hits grow with the budget up to 60,000 blocks,
    so 8 x TP1 (20,000 each) loses a third of its hits; 4 x TP2 under prefix-hash (85%) beats
    2 x TP4 (80%) and one engine on all eight (80%)."""
    hits = {(1, "round-robin"): (0.80, 1.0), (2, "round-robin"): (0.70, 1.0), (2, "prefix-hash"): (0.80, 1.5),
            (4, "round-robin"): (0.60, 1.0), (4, "prefix-hash"): (0.85, 1.6), (8, "round-robin"): (0.5, 1.0),
            (8, "prefix-hash"): (0.9, 1.9)}
    out = recommend_replicas(layout_rows(hits), REC, RecommendOptions(model="llama-3.1-8b", gpus=8), geom=LLAMA8,
                             gpu_gib=80.0)
    assert out["choice"] == "layout"
    got = {(c["replicas"], c["tensor_parallel_size"]): (c["num_blocks"], c["pool_blocks"]) for c in out["candidates"]}
    assert got == {(8, 1): (20_000, POOLS[1]), (4, 2): (60_000, POOLS[2]), (2, 4): (130_000, POOLS[4]),
                   (1, 8): (280_000, POOLS[8])}
    for lay, pool in POOLS.items():  # the hand count is kvmemory's arithmetic
        assert kv.blocks_for_kv_bytes(LLAMA8, 16, kv.kv_bytes_for_gpu(LLAMA8, 80.0, 0.92, None, lay), lay) == pool
    best = out["recommended"]
    assert (best["replicas"], best["tensor_parallel_size"], best["router"]) == (4, 2, "prefix-hash")
    assert best["hit_tokens"] == 85_000
    assert best["kv_gib_per_gpu"] == pytest.approx(60_001 * 16 * 64 * 1024 / kv.GIB, abs=1e-3)  # 64 KiB/token at TP2
    single = next(c for c in out["candidates"] if c["replicas"] == 1)
    assert single["router"] == SINGLE_ENGINE  # one engine: the routers' rows are one run
    d = best["deploy"]
    assert d["gpus_used"] == 8 and "--tensor-parallel-size 2" in d["vllm_serve"]
    pinned = int(d["vllm_serve"].split("--kv-cache-memory-bytes ")[1].split()[0])
    assert pinned == kv.kv_bytes_for_blocks(LLAMA8, 16, 60_000, 2)  # the budget evaluated, per GPU at TP2
    assert "--data-parallel-size" not in d["vllm_serve"] and "4 servers" in d["launch"]
    assert any("evaluated below their pools" in n and "--num-blocks" in n for n in out["notes"])


def test_least_loaded_deploys_as_vllm_data_parallel_and_says_where_it_differs() -> None:
    hits = {(2, "least-loaded"): (0.8, 1.0), (2, "round-robin"): (0.6, 1.0)}
    out = recommend_replicas(layout_rows(hits), REC, RecommendOptions(model="llama-3.1-8b", gpus=4), geom=LLAMA8,
                             gpu_gib=80.0)
    d = out["recommended"]["deploy"]
    assert out["recommended"]["router"] == "least-loaded" and d["data_parallel"]
    assert d["flags"][-2:] == ["--tensor-parallel-size 2", "--data-parallel-size 2"]
    assert d["vllm_serve"].endswith("--tensor-parallel-size 2 --data-parallel-size 2")
    assert "ties spread round-robin" in d["differs_from_simulated"]


def test_a_tensor_parallel_size_the_heads_do_not_divide_or_weights_that_do_not_fit_are_left_out() -> None:
    odd = kv.ModelGeometry(name="m", layers=32, kv_heads=8, head_dim=128, dtype_bytes=2, mla_latent_dim=None,
                           params=8e9, sources=("test",), q_heads=12)
    hits = {(1, "round-robin"): (0.8, 1.0), (2, "round-robin"): (0.6, 1.0), (8, "round-robin"): (0.5, 1.0)}
    out = recommend_replicas(layout_rows(hits), REC, RecommendOptions(gpus=8), geom=odd, gpu_gib=80.0)
    assert {c["replicas"] for c in out["candidates"]} == {2, 8}
    assert any("1 x TP8 left out" in n and "12 attention heads" in n for n in out["notes"])
    big = kv.ModelGeometry(name="big", layers=32, kv_heads=8, head_dim=128, dtype_bytes=2, mla_latent_dim=None,
                           params=40e9, sources=("test",), q_heads=32)  # 74.5 GiB of weights
    out = recommend_replicas(layout_rows(hits), REC, RecommendOptions(gpus=8), geom=big, gpu_gib=80.0)
    assert {c["replicas"] for c in out["candidates"]} == {1, 2}
    assert any("8 x TP1 left out" in n and "no KV memory" in n for n in out["notes"])


def test_gpus_without_memory_choose_the_router_at_counts_that_divide_them() -> None:
    rows = [rrow(c, "round-robin", 1000, 0.1 * c) for c in (2, 3, 4)]
    out = recommend_replicas(frame(rows), REC, RecommendOptions(gpus=4))
    assert out["choice"] == "router" and {c["replicas"] for c in out["candidates"]} == {2, 4}
    assert any("--gpus without --model and --gpu" in n for n in out["notes"])
    with pytest.raises(AdvisorError, match="--gpus"):
        recommend_replicas(frame(rows), REC, RecommendOptions(gpus=0))


def test_value_is_prefill_seconds_when_the_rows_and_the_caching_off_run_give_them() -> None:
    rows = [rrow(2, "round-robin", 1000, 0.3, prefill_s=8.0), rrow(2, "session", 1000, 0.6, prefill_s=5.0)]
    off = pl.from_arrow(pa.Table.from_pylist([{
        "block_size": 16, "num_blocks": 1000, "policy": "off", "mode": "concurrent", "window": "cold",
        "requests": 500, "queries": QUERIES, "hit_tokens": 0, "hit_rate": 0.0, "prefill_s": 10.0}], schema=SIM))
    out = recommend_replicas(frame(rows), REC, RecommendOptions(), sim=off)
    assert out["value_unit"] == "prefill GPU-seconds"
    assert out["recommended"]["value"] == pytest.approx(5.0)  # 10 s with caching off - 5 s
    assert out["runner_up"]["why_lost"] == "saves 3 s less prefill time (hit rate 30.0% vs 60.0%)"


def test_router_settings_and_several_models_are_stated() -> None:
    rows = [rrow(2, "cache-aware", 1000, 0.6), rrow(2, "prefix-hash", 1000, 0.5)]
    out = recommend_replicas(frame(rows), REC, RecommendOptions(), routing=RouterSettings(3, 0.5), models=2)
    assert out["recommended"]["deploy"]["router_settings"]["load_weight"] == 0.5
    assert any("names 2 models" in n for n in out["notes"])
    out = recommend_replicas(frame(rows[1:]), REC, RecommendOptions(), routing=RouterSettings(3, 0.5))
    assert out["recommended"]["deploy"]["router_settings"] == {"prefix_hash_blocks": 3, "block_size": 16,
                                                               "hashed_tokens": 48}


# --- the stage and the command ---
def test_the_stage_writes_the_section_and_the_command_takes_gpus(tmp_path: Path) -> None:
    log = tmp_path / "head.jsonl"  # the first 40 requests of a sample log: 14 conversations interleaved
    log.write_text("".join((SAMPLES / "multiturn_chat.jsonl").read_text().splitlines(keepends=True)[:40]))
    res = advisor.run(log, out=tmp_path / "run", replay=False, block_sizes=(32,), policies=("lru",),
                      modes=("concurrent",), replicas=(1, 2), routers=("round-robin", "session"))
    rec = json.loads((tmp_path / "run" / "recommendation.json").read_text())
    sec = rec["replicas"]
    assert sec["choice"] == "router" and sec["recommended"]["replicas"] == 2
    rows = pl.read_parquet(tmp_path / "run" / "replicas.parquet").filter(
        (pl.col("replicas") == 2) & (pl.col("num_blocks") == sec["recommended"]["num_blocks"]))
    best = rows.sort("hit_tokens", descending=True).row(0, named=True)
    assert sec["recommended"]["hit_tokens"] <= best["hit_tokens"]  # the most hits unless over the limit
    assert res.stages["recommend"].counts["replicas"].startswith("Recommended ")
    cli = CliRunner().invoke(main, ["recommend", str(tmp_path / "run"), "--gpus", "2"])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "run" / "recommendation.json").read_text())["replicas"]["gpus"] == 2
    assert "Recommended " in cli.output
    bad = CliRunner().invoke(main, ["recommend", str(tmp_path / "run"), "--gpus", "0"])
    assert bad.exit_code != 0


def test_when_no_layout_fits_the_section_says_why_instead_of_failing() -> None:
    rows = frame([rrow(2, "round-robin", 500_000, 0.5)])  # above every layout's pool
    out = recommend_replicas(rows, REC, RecommendOptions(model="llama-3.1-8b", gpus=2), geom=LLAMA8, gpu_gib=80.0)
    assert out["recommended"] is None and out["candidates"] == []
    assert any("2 x TP1 left out" in n and "--num-blocks" in n for n in out["notes"])


cells = st.lists(st.tuples(st.sampled_from([2, 4]), st.sampled_from(["round-robin", "session", "prefix-hash",
                                                                     "cache-aware"]),
                           st.integers(0, 1000), st.floats(1.0, 4.0), st.floats(0.01, 1.0)),
                 min_size=1, max_size=8, unique_by=lambda c: (c[0], c[1]))


@settings(max_examples=60, deadline=None)
@given(cells)
def test_the_choice_is_the_most_saved_within_the_limit_against_a_naive_reference(
        cs: list[tuple[int, str, int, float, float]]) -> None:
    rows = [rrow(c, r, 1000, h / 1000, spread=s, ttft_p95=t) for c, r, h, s, t in cs]
    out = recommend_replicas(frame(rows), REC, RecommendOptions())
    top = max(c for c, *_ in cs)
    rr95 = {c: t for c, r, _h, _s, t in cs if r == "round-robin"}

    def ok(c: int, r: str, s: float, t: float) -> bool:  # the limit, written out again
        return s <= 2.0 and (c not in rr95 or t <= 1.25 * rr95[c])

    at_top = [(h, c, r, s, t) for c, r, h, s, t in cs if c == top]
    admissible = [x for x in at_top if ok(x[1], x[2], x[3], x[4])]
    best = out["recommended"]
    assert best["replicas"] == top and best["within_limit"] == bool(admissible)
    tokens = QUERIES // 1000  # hit_tokens per unit of h
    assert best["hit_tokens"] == tokens * max(x[0] for x in (admissible or at_top))
    runner = out["runner_up"]
    if len({x[2] for x in at_top}) > 1:
        assert runner["router"] != best["router"]
        assert runner["hit_tokens"] == tokens * max(x[0] for x in at_top if x[2] != best["router"])
