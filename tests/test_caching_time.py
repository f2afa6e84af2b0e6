"""What caching buys in time (advisor.recommend.timing) and the report's section on it."""

from __future__ import annotations

import numpy as np
import pytest

from advisor.recommend.timing import caching_time, simulate_options_from_record
from advisor.sim.configuration import SimulateOptions
from advisor.workload import Workload


def shared_prefix_log(n: int = 60, seed: int = 0) -> Workload:
    """A 2,000-token system prompt shared by every request, a short question each, arriving
    10 per second, 50 output tokens each."""
    rng = np.random.default_rng(seed)
    system = list(rng.integers(1, 30_000, 2000))
    reqs = [system + list(rng.integers(1, 30_000, int(rng.integers(20, 80)))) for _ in range(n)]
    return Workload.from_token_lists(reqs, timestamps=np.arange(n) * 0.1, output_tokens=[50] * n)


def test_caching_cuts_ttft_and_raises_the_sustained_rate_on_a_shared_prefix() -> None:
    w = shared_prefix_log()
    opts = SimulateOptions(model="llama-3.1-8b", gpu="h100", workers=1, use_logged_latency=False)
    t = caching_time(w, 16, 4000, opts)
    on, off = t["logged_rate"]["on"], t["logged_rate"]["off"]
    assert off["hit_rate"] == 0 and on["hit_rate"] > 0.9
    # with 97% of each prompt cached, a prefill is ~30x cheaper: TTFT falls by far more than 2x
    assert on["ttft_p50_s"] * 2 < off["ttft_p50_s"]
    assert on["prefill_s"] * 5 < off["prefill_s"]
    sat = t["saturated"]
    assert sat["on"]["throughput_rps"] > sat["off"]["throughput_rps"]
    assert t["saturated_throughput_gain"] > 1 and 0 < t["replicas_saved_share"] < 1
    assert t["clock"]["kind"] == "roofline" and t["scheduling"] == "async"
    # at the logged rate the engine keeps up: it finishes what arrives, both ways
    assert on["throughput_rps"] == off["throughput_rps"] or abs(on["throughput_rps"] / off["throughput_rps"] - 1) < 0.05


def test_a_log_that_arrives_faster_than_the_engine_sustains_is_called_overloaded() -> None:
    """Flat rates: 60 requests of ~2,050 tokens, 10 per second. The same log spread over 600 s
    (one request every 10 s) is within what the engine sustains either way."""
    opts = SimulateOptions(workers=1, prefill_tps=5_000.0)
    fast = caching_time(shared_prefix_log(), 16, 4000, opts)
    assert fast["arrival_rps"] == pytest.approx(10.0)
    # without caching each prefill takes ~0.4 s at 5,000 tokens/s: ~2.4 req/s, below 10 req/s
    assert fast["saturated"]["off"]["throughput_rps"] < 10 and fast["overloaded"]["off"]
    w = shared_prefix_log()
    slow = Workload.from_token_lists([w.tokens(i).tolist() for i in range(w.num_requests)],
                                     timestamps=np.arange(60) * 10.0, output_tokens=[50] * 60)
    quiet = caching_time(slow, 16, 4000, opts)
    assert quiet["arrival_rps"] == pytest.approx(0.1) and not any(quiet["overloaded"].values())


def test_without_reuse_caching_buys_nothing() -> None:
    rng = np.random.default_rng(1)
    reqs = [list(rng.integers(1, 30_000, 500)) for _ in range(30)]
    w = Workload.from_token_lists(reqs, timestamps=np.arange(30) * 0.1, output_tokens=[20] * 30)
    t = caching_time(w, 16, 4000, SimulateOptions(workers=1))
    on, off = t["logged_rate"]["on"], t["logged_rate"]["off"]
    assert on["hit_rate"] == 0
    assert on["ttft_p50_s"] == off["ttft_p50_s"] and t["saturated_throughput_gain"] == 1


def test_the_simulate_record_rebuilds_its_options() -> None:
    opts = SimulateOptions(model="llama-3.1-8b", gpu="h100", block_sizes=(16, 32), workers=1)
    again = simulate_options_from_record(opts.as_dict())
    assert again == opts


def test_the_report_says_what_caching_buys_in_time(tmp_path) -> None:
    """The whole pipeline on a bundled log with a model and a GPU: recommendation.json has the
    time section, and both reports show it (the HTML with its plot)."""
    import json
    from pathlib import Path

    import advisor

    log = Path(__file__).parent.parent / "sample_logs" / "timestamp_system_prompt.jsonl"
    out = tmp_path / "run"
    advisor.run(log, out, model="llama-3.1-8b", gpu="h100", replay=False, block_sizes=(16, 32), sweep_points=4)
    t = json.loads((out / "recommendation.json").read_text())["time"]
    lr, sat = t["logged_rate"], t["saturated"]
    assert lr["on"]["ttft_p95_s"] < lr["off"]["ttft_p95_s"]
    # a per-request timestamp in the system prompt: fixing it (analyze's rewrite) turns most
    # prompt tokens into hits, and the engine sustains a higher rate; removing all sharing
    # leaves no hits at all
    assert t["breakers_fixed"]["rewritten_requests"] > 0
    assert lr["breakers_fixed"]["hit_rate"] > lr["on"]["hit_rate"] + 0.3
    assert sat["breakers_fixed"]["throughput_rps"] > sat["on"]["throughput_rps"]
    assert lr["sharing_removed"]["hit_rate"] == 0
    md = (out / "report.md").read_text()
    section = md.split("## What caching buys in time", 1)[1].split("\n## ", 1)[0]
    assert "caching off" in section and "TTFT p50 at the logged rate" in section and "x faster" in section
    assert "### High vs low overlap, on this log" in section and "cache breakers fixed" in section
    from advisor.cli.summary import summary_rows
    from advisor.runfolder import RunDir

    rows = dict(summary_rows(RunDir(out)))
    assert rows["caching on"].endswith("(predicted: roofline of llama-3.1-8b on h100)")
    assert "hit rate" in rows["breakers fixed"]
    page = (out / "report.html").read_text()
    time_html = page.split('<section id="time">', 1)[1].split("</section>", 1)[0]
    assert "<svg" in time_html and "highest sustained request rate" in time_html


def test_the_report_quotes_a_timed_replay_as_measured_not_predicted() -> None:
    from types import SimpleNamespace

    from advisor.report.timefacts import measured_time_text

    replay = {"time": {"device": "cpu", "model": "tiny", "runs": [
        {"mode": "sequential", "arrivals": None, "ratios": {"on_vs_off": {"ttft_p50": 0.14, "requests_per_s": 6.1}}},
        {"mode": "concurrent", "arrivals": "burst", "ratios": {"on_vs_off": None}}]}}
    text = measured_time_text(SimpleNamespace(replay=replay))
    assert text is not None and "sequential (one at a time): TTFT p50 x0.14, requests/s x6.10" in text
    assert "burst" not in text and "not the predicted GPU's times" in text
    assert measured_time_text(SimpleNamespace(replay={"time": {"status": "not_run", "runs": []}})) is None
    assert measured_time_text(SimpleNamespace(replay=None)) is None


def test_the_recommendation_prices_memory_in_prefill_time_when_the_clock_gives_it() -> None:
    """With concurrent rows and their caching-off baseline, each candidate's value is the
    prefill GPU time it saves (caching off's prefill_s minus its own), and memory is priced in
    seconds; without the baseline, in tokens as before."""
    import polars as pl

    from advisor import kvmemory as kv
    from advisor.recommend.options import RecommendOptions
    from advisor.recommend.stage import recommend
    from advisor.sim.grid import simulate_grid

    w = shared_prefix_log(n=40)
    opts = SimulateOptions(model="llama-3.1-8b", gpu="h100", block_sizes=(16,), num_blocks=(300, 600, 1200, 4000),
                           workers=1, use_logged_latency=False, reference_budgets=0)
    sim = pl.from_arrow(simulate_grid(w, opts, kv.resolve_model("llama-3.1-8b")).sim)
    rec = recommend(sim, None, RecommendOptions(model="llama-3.1-8b", gpu="h100"), geom=kv.resolve_model("llama-3.1-8b"),
                    gpu_gib=kv.resolve_gpu("h100"))
    assert rec["cost_model"]["value_unit"] == "prefill GPU-seconds"
    assert "s of prefill GPU time over the whole log" in rec["reasoning"][0]
    off = sim.filter((pl.col("policy") == "off") & (pl.col("window") == "warm")).sort("num_blocks")["prefill_s"][-1]
    for c in rec["candidates"]:
        row = sim.filter((pl.col("policy") == "lru") & (pl.col("mode") == "concurrent") & (pl.col("window") == "warm")
                         & (pl.col("num_blocks") == c["num_blocks"]))
        assert c["prefill_s_saved"] == pytest.approx(off - row["prefill_s"][0], abs=1e-6)
    tokens_only = recommend(sim.filter(pl.col("policy") != "off"), None, RecommendOptions(model="llama-3.1-8b", gpu="h100"),
                            geom=kv.resolve_model("llama-3.1-8b"), gpu_gib=kv.resolve_gpu("h100"))
    assert tokens_only["cost_model"]["value_unit"] == "prefill tokens"
    assert tokens_only["recommended"]["prefill_s_saved"] is None
