"""Replay through N engines (advisor.replay.replicas): each request on the replica the simulated
router chose, measured per replica == predicted per replica in sequential mode, to the token.

Without an engine: the routes and predictions against hand counts (round-robin alternates,
session keeps a conversation together, each replica's prediction is one sequential cache over
its own requests), the plumbing with a stand-in engine, and the refusals. With vLLM: the first
requests of a sample log through 2 in-process engines under round-robin and session routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_replay import story, toks, workload

from advisor.errors import AdvisorError
from advisor.ingest.stage import run_ingest
from advisor.replay import plan
from advisor.replay import replicas as rr
from advisor.replay import stage as replay_stage
from advisor.replay.stage import ReplayOptions, run_replay
from advisor.sim import cache
from advisor.tokens.stage import run_tokenize
from advisor.workload import load_workload

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"


def with_sessions(w: plan.ReplayView, sessions: list[str | None]) -> plan.ReplayView:
    return plan.ReplayView(w.request_ids, w.token_ids, w.arrival_s, w.output_tokens, w.cache_salts, w.loras,
                           w.synthetic, sessions=sessions)


def two_conversations(b: int = 32) -> plan.ReplayView:
    """Two conversations alternating turn by turn; each turn repeats its history."""
    a, c = toks(1, 3 * b), toks(2, 3 * b)
    turns = []
    for k in range(3):
        a, c = a + toks(10 + k, b), c + toks(20 + k, b)
        turns += [a, c]
    return with_sessions(workload(turns), ["A", "C"] * 3)


# --- without an engine ---
def test_round_robin_splits_alternating_conversations_and_session_keeps_them_together() -> None:
    """Turns A1 C1 A2 C2 A3 C3 on 2 replicas. Round-robin sends every A turn to replica 0 and
    every C turn to replica 1 (k mod 2), which here keeps each conversation whole by chance;
    on 3 replicas it splits them: A1 -> 0, C1 -> 1, A2 -> 2, C2 -> 0, ... so no turn finds its
    history and nothing hits. Session routing keeps each conversation on one replica at any count:
    every later turn hits its whole history (4 and 5 full blocks of 32)."""
    w = two_conversations()
    cfg = plan.ReplayConfig(32, 100)
    two = rr.route(w, cfg, rr.ReplicaReplay(2, "round-robin"))
    assert two.replica == [0, 1, 0, 1, 0, 1]
    three = rr.route(w, cfg, rr.ReplicaReplay(3, "round-robin"))
    assert three.replica == [0, 1, 2, 0, 1, 2] and three.hits == [0] * 6
    sess = rr.route(w, cfg, rr.ReplicaReplay(3, "session"))
    assert sess.replica[0::2] == [sess.replica[0]] * 3 and sess.replica[1::2] == [sess.replica[1]] * 3
    assert sess.hits == [0, 0, 4 * 32, 4 * 32, 5 * 32, 5 * 32]


def test_each_replicas_prediction_is_one_sequential_cache_over_its_own_requests() -> None:
    """The multi-replica simulator's per-request hits equal the single sequential cache run on
    each replica's share, under eviction (a reference the replay then confirms against vLLM)."""
    w = with_sessions(workload(story(32) * 2), ["s1", "s2", "s3"] * 6)
    for router in ("round-robin", "session", "prefix-hash", "cache-aware", "least-loaded"):
        routes = rr.route(w, plan.ReplayConfig(32, 9), rr.ReplicaReplay(2, router))
        for r in (0, 1):
            idx = routes.indices(r)
            mine = cache.sequential_hits([w.token_ids[i] for i in idx], 32, 9)
            assert [routes.hits[i] for i in idx] == mine, router
    assert sum(routes.hits) < sum(cache.sequential_hits(w.token_ids, 32, None))  # the budget evicts


def stand_in_engine(cfg: plan.ReplayConfig, views: list[plan.ReplayView],
                    predictors: list[plan.Predictor]) -> plan.ReplayResult:
    """Measures what the single sequential cache gives each view (what vLLM does, per
    tests/test_replay.py), so the plumbing can be checked without an engine."""
    rows = []
    for v, predict in zip(views, predictors):
        pred, source = predict(v, cfg)
        measured = cache.sequential_hits(v.token_ids, cfg.block_size, cfg.num_blocks)
        rows.append(plan.ConfigResult(cfg.block_size, cfg.num_blocks, "sequential", True, None,
                                      queries=sum(len(t) for t in v.token_ids), predicted_hit_tokens=sum(pred),
                                      measured_hit_tokens=sum(measured), per_request_predicted=pred,
                                      per_request_measured=measured, request_ids=v.request_ids,
                                      prediction_source=source))
    return plan.ReplayResult("stand-in", "0", "none", False, rows)


def test_rows_per_replica_stand_ins_and_empty_replicas() -> None:
    w = two_conversations()
    res = rr.replay_replicas(w, [plan.ReplayConfig(16, 200)], plan.EngineOptions(), rr.ReplicaReplay(3, "session"),
                             stand_in_engine, cpu_backend=True)
    out = res.as_json()
    asked, *replicas = out["configs"]
    assert not asked["confirmable"] and "multiple of 32" in asked["reason"]
    assert [(c["block_size"], c["num_blocks"]) for c in replicas] == [(32, 100)] * 2  # the stand-in, 2 replicas used
    assert all(c["stand_in_for"] == [[16, 200]] and c["status"] == "confirmed" for c in replicas)
    assert sorted(rid for c in replicas for rid in c["request_ids"]) == sorted(w.request_ids)
    assert any("sent no request to replica" in n for n in out["notes"])  # 2 sessions, 3 replicas
    assert out["status"] == "not_confirmable" and "confirmed at block size 32" in out["reason"]


def test_a_replica_that_disagrees_makes_the_replay_a_mismatch() -> None:
    w = two_conversations()

    def off_by_one(cfg: plan.ReplayConfig, views: list[plan.ReplayView], predictors: list[plan.Predictor]) -> plan.ReplayResult:
        got = stand_in_engine(cfg, views, predictors)
        last = got.configs[-1]
        last.per_request_measured = [*last.per_request_measured[:-1], last.per_request_measured[-1] + 1]
        last.measured_hit_tokens += 1
        return got

    res = rr.replay_replicas(w, [plan.ReplayConfig(32, 100)], plan.EngineOptions(), rr.ReplicaReplay(2, "session"),
                             off_by_one)
    assert [c.status() for c in res.configs] == ["confirmed", "mismatch"] and res.status() == "mismatch"


def test_concurrent_mode_is_not_replayed_on_several_replicas_and_says_why() -> None:
    res = rr.replay_replicas(two_conversations(), [plan.ReplayConfig(32, 100)], plan.EngineOptions(mode="concurrent"),
                             rr.ReplicaReplay(2, "round-robin"), stand_in_engine)
    (row,) = res.as_json()["configs"]
    assert "sequential mode only" in row["reason"] and row["status"] == "not_confirmable"


def test_options_refuse_what_cannot_be_replayed() -> None:
    with pytest.raises(AdvisorError, match="one URL per replica"):
        ReplayOptions(replay_replicas=3, replay_url="http://a:1,http://b:2")
    with pytest.raises(AdvisorError, match="unknown router"):
        ReplayOptions(replay_router="random")
    with pytest.raises(AdvisorError, match="at least 2 replicas"):
        rr.ReplicaReplay(1, "session")
    assert ReplayOptions(replay_url="http://a:1, http://b:2").urls() == ["http://a:1", "http://b:2"]


def test_the_router_defaults_to_the_recommendation_at_that_count() -> None:
    rec = {"replicas": {"recommended": {"replicas": 2, "router": "session", "block_size": 64, "num_blocks": 50}}}
    got = replay_stage._replica_replay(ReplayOptions(replay_replicas=2), rec, {"prefix_hash_blocks": 3})
    assert got == rr.ReplicaReplay(2, "session", 3, 1.0)
    assert replay_stage._replica_budget(rec, got) == {"recommended": {"block_size": 64, "num_blocks": 50}}
    with pytest.raises(AdvisorError, match="needs a router"):
        replay_stage._replica_replay(ReplayOptions(replay_replicas=4), rec, {})
    assert replay_stage._replica_replay(ReplayOptions(), rec, {}) is None


# --- through vLLM ---
LIMIT, BLOCKS = 24, 80


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The first 24 requests of multiturn_chat (interleaved conversations, `user` = session)."""
    root = tmp_path_factory.mktemp("replicas")
    log = root / "head.jsonl"
    log.write_text("".join((SAMPLES / "multiturn_chat.jsonl").read_text().splitlines(keepends=True)[:LIMIT]))
    run_ingest(root / "run", log)
    run_tokenize(root / "run")  # the default cache folder: the embedded tokenizer is built once
    return root / "run", root / "cache"


@pytest.mark.replay
def test_two_engines_confirm_each_replica_to_the_token(sample_run: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    run, cache_dir = sample_run
    w = plan.from_workload(load_workload(run / "requests.parquet", run / "tokens.parquet"))
    assert w.sessions is not None and len(set(w.sessions)) > 2
    totals = {}
    for router in ("round-robin", "session"):
        run_replay(run, ReplayOptions(replay=True, replay_replicas=2, replay_router=router, replay_block_size=32,
                                      replay_num_blocks=BLOCKS, check=0.0), cache_dir=cache_dir, force=True)
        out = json.loads((run / "replay.json").read_text())
        rows = out["configs"]
        assert out["status"] == "confirmed" and [c["replica"] for c in rows] == [0, 1], rows
        for c in rows:
            assert c["mismatch_count"] == 0 and c["measured_hit_tokens"] == c["predicted_hit_tokens"]
            assert c["engine_queries"] == c["queries"]  # vLLM's own counters, per engine
            mine = [w.token_ids[w.request_ids.index(rid)] for rid in c["request_ids"]]
            assert c["predicted_hit_tokens"] == sum(cache.sequential_hits(mine, 32, BLOCKS))
        where = {rid: c["replica"] for c in rows for rid in c["request_ids"]}
        if router == "round-robin":
            assert [where[rid] for rid in w.request_ids] == [k % 2 for k in range(LIMIT)]
        else:
            for s in set(w.sessions):
                assert len({where[rid] for rid, t in zip(w.request_ids, w.sessions) if t == s}) == 1
        totals[router] = sum(c["measured_hit_tokens"] for c in rows)
    # the budget evicts, and splitting conversations across replicas costs hits
    assert totals["session"] > totals["round-robin"]
    assert totals["session"] < sum(cache.sequential_hits(w.token_ids, 32, None))


# --- against servers: one URL per replica ---
class _StandInServer:
    """An OpenAI-completions endpoint with vLLM's /metrics names whose cache is the simulator's
    sequential one (no vLLM): it checks that each replica's requests reach its own URL and
    that the counters and usage are read per server. tests/test_replay_server.py runs the
    real `vllm serve`."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.prompts: list[list[int]] = []
        self.queries = self.hits = 0
        me = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, body: str, ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(f'vllm:prefix_cache_queries_total{{engine="0"}} {me.queries}\n'
                               f'vllm:prefix_cache_hits_total{{engine="0"}} {me.hits}\n'
                               f'vllm:cache_config_info{{block_size="{block_size}",enable_prefix_caching="True",'
                               f'num_gpu_blocks="{num_blocks + 1}"}} 1.0\n', "text/plain")
                elif self.path == "/v1/models":
                    self._send(json.dumps({"data": [{"id": "stand-in"}]}))
                else:
                    self._send(json.dumps({"version": "stand-in"}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"{}")
                if self.path == "/reset_prefix_cache":
                    me.prompts.clear()
                    self._send("{}")
                    return
                me.prompts.append(list(body["prompt"]))
                cached = cache.sequential_hits(me.prompts, block_size, num_blocks)[-1]
                me.queries += len(body["prompt"])
                me.hits += cached
                usage = {"prompt_tokens": len(body["prompt"]), "prompt_tokens_details": {"cached_tokens": cached}}
                self._send(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n",
                           "text/event-stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_several_replay_urls_are_one_replica_each(tmp_path: Path) -> None:
    from test_replay import write_run

    w = two_conversations()
    run = write_run(tmp_path / "run", w.token_ids)
    servers = [_StandInServer(32, 100) for _ in range(2)]
    try:
        run_replay(run.root, ReplayOptions(replay=True, replay_router="round-robin", replay_block_size=32,
                                           replay_num_blocks=100, check=0.0,
                                           replay_url=",".join(s.url for s in servers)))
    finally:
        for s in servers:
            s.httpd.shutdown()
    out = json.loads(run.path("replay.json").read_text())
    assert out["status"] == "confirmed" and out["engine"] == "vllm-server"
    # round-robin over 2 replicas in log order: conversation A's turns to server 0, C's to server 1,
    # each turn hitting its history there: 0, 4 and 5 blocks of 32
    assert [s.prompts for s in servers] == [w.token_ids[0::2], w.token_ids[1::2]]
    assert [c["request_ids"] for c in out["configs"]] == [["req-0", "req-2", "req-4"], ["req-1", "req-3", "req-5"]]
    assert [c["measured_hit_tokens"] for c in out["configs"]] == [9 * 32, 9 * 32]
    assert all(c["engine_queries"] == c["queries"] and c["mismatch_count"] == 0 for c in out["configs"])
