"""Replay against a running vLLM OpenAI-compatible server (no vllm import, stdlib only).

Input: a `replay.Workload`, the configurations to confirm, the server's base URL
and an API key (or None). Output: a `replay.ReplayResult` whose measured hits
are the difference of the server's `/metrics` counters
(`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`) before
and after the replay.

Before sending anything the server's cache configuration is read from the
`vllm:cache_config_info` gauge in /metrics; the replay refuses to start when
the block size or prefix caching is unknown or differs from what is being
confirmed (unless `assume_config`). The block budget confirmed is the
server's own (`num_gpu_blocks` minus the null block); the prediction is made
for it. `POST /reset_prefix_cache` empties the cache first where the server
exposes it (vLLM does in dev mode, `VLLM_SERVER_DEV_MODE=1`); otherwise the
result says the counters and the cache include earlier traffic. Requests go to
`/v1/completions` with the token ids as the prompt, streamed so the first chunk
times the TTFT; `usage.prompt_tokens` is checked against the replayed length.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from advisor.errors import AdvisorError
from advisor.replay.plan import (
    ENGINE_SERVER,
    ConfigResult,
    EngineOptions,
    Predictor,
    ReplayConfig,
    ReplayResult,
    ReplayView,
    output_lengths,
    predicted_hits,
)
from advisor.schema import MODE_SEQUENTIAL

QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"
CACHE_INFO = "vllm:cache_config_info"
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) samples."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            continue
    return out


def counter_total(samples: Sequence[tuple[str, dict[str, str], float]], name: str) -> float | None:
    vals = [v for n, _, v in samples if n == name]
    return sum(vals) if vals else None


def server_cache_config(samples: Sequence[tuple[str, dict[str, str], float]]) -> dict[str, str] | None:
    for n, labels, _ in samples:
        if n == CACHE_INFO:
            return labels
    return None


@dataclass(frozen=True)
class Server:
    """Plain HTTP to one server. The key only ever goes into the Authorization header."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600.0

    def _request(self, path: str, body: dict[str, Any] | None = None, method: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers,
                                      method=method)

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self._request(path), timeout=self.timeout_s) as r:
            return r.read().decode("utf-8", "replace")

    def post_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self._request(path, method="POST"), timeout=self.timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stream_completion(self, body: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
        """(seconds to the first streamed chunk, the usage object of the last chunk)."""
        t0 = time.perf_counter()
        ttft, usage = None, None
        with urllib.request.urlopen(self._request("/v1/completions", body), timeout=self.timeout_s) as r:
            for raw in r:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage = chunk["usage"]
        return ttft, usage


def _metrics(server: Server) -> list[tuple[str, dict[str, str], float]]:
    try:
        return parse_metrics(server.get_text("/metrics"))
    except (urllib.error.URLError, OSError) as e:
        raise AdvisorError(f"cannot read {server.url}/metrics ({e}); check --replay-url and that "
                           "the server is up (and its API key via --api-key-env).") from None


def _served_model(server: Server) -> str:
    try:
        models = json.loads(server.get_text("/v1/models")).get("data") or []
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise AdvisorError(f"cannot list models at {server.url}/v1/models ({e}).") from None
    if not models:
        raise AdvisorError(f"{server.url} serves no model.")
    return str(models[0]["id"])


def check_server_config(
    info: dict[str, str] | None, cfg: ReplayConfig, assume_config: bool
) -> tuple[ReplayConfig, list[str]]:
    """The configuration actually confirmable on this server, and notes; raises when it differs."""
    notes: list[str] = []
    if info is None:
        if not assume_config:
            raise AdvisorError(
                "the server's /metrics has no vllm:cache_config_info, so its block size and "
                "prefix-caching setting are unknown; restart it with the flags being confirmed "
                "and pass --assume-config to trust them."
            )
        notes.append("server cache configuration unknown; assumed as given (--assume-config)")
        return cfg, notes
    bs, pc = info.get("block_size"), info.get("enable_prefix_caching")
    if pc is not None and pc != "True":
        raise AdvisorError("the server runs without prefix caching; restart it with "
                           "--enable-prefix-caching to confirm the prediction.")
    if bs is None or pc is None:
        if not assume_config:
            raise AdvisorError("the server does not say its block size or prefix-caching setting; "
                               "pass --assume-config if it runs the configuration being confirmed.")
        notes.append("server block size / prefix caching not exposed; assumed (--assume-config)")
        return cfg, notes
    if int(bs) != cfg.block_size:
        raise AdvisorError(
            f"the server runs --block-size {bs}, the configuration to confirm has "
            f"{cfg.block_size}; restart the server with --block-size {cfg.block_size} "
            "or confirm a configuration with its block size (--block-size/--num-blocks)."
        )
    blocks = info.get("num_gpu_blocks")
    if blocks and blocks != "None" and int(blocks) - 1 != cfg.num_blocks:
        notes.append(
            f"the server holds {int(blocks) - 1} usable blocks, not {cfg.num_blocks}: the "
            "prediction is made for the server's budget (pin it with --num-gpu-blocks-override "
            f"{cfg.num_blocks + 1} to confirm the recommended one)"
        )
        cfg = ReplayConfig(cfg.block_size, int(blocks) - 1)
    return cfg, notes


def _wait_for_counters(server: Server, q0: float, expected: int, timeout_s: float = 10.0) -> list[Any]:
    """Metrics are published after each engine step; poll until all queries are counted."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _metrics(server)
        q = counter_total(samples, QUERIES) or 0.0
        if q - q0 >= expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def replay_against_server(
    w: ReplayView, configs: Sequence[ReplayConfig], opts: EngineOptions, url: str,
    api_key: str | None = None, concurrency: int = 8, assume_config: bool = False,
    sim_requests: pa.Table | None = None, warn: Callable[[str], None] = lambda s: None,
    predict: Predictor | None = None,
) -> ReplayResult:
    """Replay `w` on the server at `url` and compare with the prediction for its configuration.

    A server runs one configuration: the first of `configs` is confirmed, the others are
    reported as not confirmable against this server. `predict` as `replay_inprocess`'s.
    """
    server = Server(url, api_key)
    samples = _metrics(server)
    cfg, notes = check_server_config(server_cache_config(samples), configs[0], assume_config)
    model = _served_model(server)
    warn("replay: other traffic on the server during the replay pollutes its counters")
    notes.append("other traffic on the server during the replay would be counted too")
    status = server.post_status("/reset_prefix_cache")
    if status != 200:
        notes.append(
            f"POST /reset_prefix_cache answered {status}: the cache was not emptied, so "
            "blocks cached by earlier traffic may add hits (vLLM exposes the reset with "
            "VLLM_SERVER_DEV_MODE=1)"
        )
    queries = sum(len(t) for t in w.token_ids)
    res = ConfigResult(cfg.block_size, cfg.num_blocks, opts.mode, False, None, queries=queries,
                       request_ids=w.request_ids)
    pred, source = predict(w, cfg) if predict is not None else predicted_hits(w, cfg, opts, sim_requests)
    if pred is None:
        res.reason = source
    else:
        res.per_request_predicted, res.prediction_source = pred, source
        res.predicted_hit_tokens = sum(pred)
    q0 = counter_total(samples, QUERIES) or 0.0
    h0 = counter_total(samples, HITS) or 0.0
    t = time.perf_counter()
    outcomes = _send_all(server, model, w, opts, 1 if opts.mode == MODE_SEQUENTIAL else concurrency)
    after = _wait_for_counters(server, q0, queries)
    q1, h1 = counter_total(after, QUERIES) or 0.0, counter_total(after, HITS) or 0.0
    res.wall_s = round(time.perf_counter() - t, 3)
    res.measured_hit_tokens = int(h1 - h0)
    res.confirmable = pred is not None
    ttfts = sorted(o["ttft_s"] for o in outcomes if o["ttft_s"] is not None)
    per_req = [o["cached_tokens"] for o in outcomes]
    if all(c is not None for c in per_req):
        res.per_request_measured = [int(c) for c in per_req]
    bad_len = [
        {"request_id": w.request_ids[i], "sent": len(w.token_ids[i]), "prompt_tokens": o["prompt_tokens"]}
        for i, o in enumerate(outcomes) if o["prompt_tokens"] != len(w.token_ids[i])
    ]
    res.extra = {
        "engine_queries": int(q1 - q0),
        "ttft_s": {"median": ttfts[len(ttfts) // 2], "p90": ttfts[int(len(ttfts) * 0.9)],
                   "max": ttfts[-1]} if ttfts else None,
        "prompt_token_mismatches": bad_len[:50],
        "prompt_token_mismatch_count": len(bad_len),
    }
    if bad_len:
        warn(f"replay: {len(bad_len)} requests where the server's usage.prompt_tokens differs "
             "from the replayed token ids")
    results = [res]
    for other in configs[1:]:
        results.append(ConfigResult(other.block_size, other.num_blocks, opts.mode, False,
                                    "not confirmable against this server: it runs one "
                                    "configuration (the first one given)", queries=queries))
    return ReplayResult(ENGINE_SERVER, _server_version(server), f"served model {model}",
                        w.synthetic, results, notes=notes)


def _server_version(server: Server) -> str | None:
    try:
        return str(json.loads(server.get_text("/version")).get("version"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _send_all(server: Server, model: str, w: ReplayView, opts: EngineOptions, concurrency: int) -> list[dict[str, Any]]:
    """Send every request at its (compressed) arrival time, at most `concurrency` in flight.

    Sequential mode ignores timestamps: each request starts when the previous one ended.
    """
    outs = output_lengths(w, opts.mode, opts.max_output_tokens)
    results: list[dict[str, Any]] = [{} for _ in w.token_ids]
    lock = threading.Lock()

    def one(i: int) -> None:
        body: dict[str, Any] = {
            "model": model, "prompt": w.token_ids[i], "max_tokens": outs[i],
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if w.cache_salts[i]:
            body["cache_salt"] = w.cache_salts[i]
        try:
            ttft, usage = server.stream_completion(body)
        except (urllib.error.URLError, OSError) as e:
            raise AdvisorError(f"request {w.request_ids[i]} failed on {server.url}: {e}") from None
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        with lock:
            results[i] = {"ttft_s": ttft, "prompt_tokens": usage.get("prompt_tokens"),
                          "cached_tokens": details.get("cached_tokens")}

    if concurrency <= 1:
        for i in range(len(w.token_ids)):
            one(i)
        return results
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = []
        for i, a in enumerate(w.arrival_s):
            delay = a / opts.speedup - (time.monotonic() - start)
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    return results
