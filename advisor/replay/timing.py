"""Measured time, the engine-free half: the variants replayed and what their timings come to.

Inputs: a `ReplayView` (what the replay sends), and for variant (c) analyze's findings:
prefixes.parquet (`resembles_id`, `diverge_token` per request) and stats.json (`breakers`
with `label` and `position_token`/`end_token`, `analysis_block_size`). Output:
the variants (`variants`), each one's per-request timings summarised (`summarise`), the
ratios between them (`ratios`), and replay.json's `time` object (`time_section`; its keys
are listed in advisor/replay/stage.py's docstring). advisor/replay/measure.py runs the engine.

The four variants send the same requests with the same arrivals and output lengths:

- `as_logged` (a): the log as it is, prefix caching on;
- `caching_off` (a-off): the same, `enable_prefix_caching=False`;
- `sharing_removed` (b): every request with its own `cache_salt`, so no request can reuse
  another's blocks (lengths and arrivals unchanged): the log with no overlap;
- `breakers_fixed` (c): caching on, each request analyze paired with an earlier
  near-identical one rewritten as its breakers' fixes would change it (advisor.analyze.rewrite:
  a short value takes the earlier request's value, a long one moves to the end of the prompt,
  whitespace and formatting take its form, a pure reordering takes its order). When nothing
  can be rewritten, (c) is `not_run` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from advisor.analyze import rewrite
from advisor.replay.plan import ReplayView

AS_LOGGED = "as_logged"
CACHING_OFF = "caching_off"
SHARING_REMOVED = "sharing_removed"
BREAKERS_FIXED = "breakers_fixed"
VARIANTS = (AS_LOGGED, CACHING_OFF, SHARING_REMOVED, BREAKERS_FIXED)
ARRIVALS = ("burst", "paced")
ARRIVALS_ONE_AT_A_TIME = "one at a time"
STATUS_MEASURED = "measured"
STATUS_NOT_RUN = "not_run"

DESCRIPTIONS = {
    AS_LOGGED: "(a) the log as it is, prefix caching on",
    CACHING_OFF: "(a-off) the log as it is, prefix caching off",
    SHARING_REMOVED: "(b) sharing removed: every request its own cache_salt (same lengths and arrivals)",
    BREAKERS_FIXED: "(c) cache breakers fixed (analyze's findings applied as token rewrites), caching on",
}
# replay.json's time ratios: (name, numerator variant, denominator variant)
RATIO_PAIRS = (("on_vs_off", AS_LOGGED, CACHING_OFF), ("on_vs_sharing_removed", AS_LOGGED, SHARING_REMOVED),
               ("fixed_vs_on", BREAKERS_FIXED, AS_LOGGED), ("fixed_vs_off", BREAKERS_FIXED, CACHING_OFF))

CLOCK_NOTE = ("wall clock of the machine that ran the engine (time.perf_counter); on a CPU with the tiny "
              "random model this measures the mechanism (what caching saves relative to the same engine "
              "without it), not production latency; on a GPU with the real (or real-shaped random) model "
              "it measures the real thing")
TTFT_NOTE = ("TTFT: from a request's arrival (when it was due on the wall clock; sequential mode: when it "
             "was submitted) to the return of the engine step that produced its first output token, read in "
             "the LLMEngine step loop (the moment a streaming client would receive it); end-to-end: arrival to "
             "the step that finished it. vLLM's own first_token_latency (RequestOutput.metrics, from "
             "add_request) is kept beside it as engine_ttft_s")


@dataclass(frozen=True)
class Variant:
    """One way of replaying the same requests."""

    name: str
    view: ReplayView | None  # None: not run (reason says why)
    prefix_caching: bool = True
    reason: str | None = None
    rewrite: dict[str, Any] | None = None  # breakers_fixed: what was rewritten

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.name]


@dataclass
class Measured:
    """What the engine measured for one variant, per request in view order (None: the
    request was not sent, e.g. refused at tokenization)."""

    ttft_s: list[float | None]
    e2e_s: list[float | None]
    cached_tokens: list[int | None]
    output_tokens: list[int | None]
    engine_ttft_s: list[float | None]
    wall_s: float
    engine_queries: int
    engine_hits: int
    notes: list[str] = field(default_factory=list)


# --- the variants ---
def sharing_removed(w: ReplayView) -> ReplayView:
    """`w` with a cache salt of its own on every request (kept apart from the logged salt,
    which only ever made namespaces): no request can hit another's blocks."""
    return replace(w, cache_salts=[f"{s or ''}#pc-advise-unshared-{i}" for i, s in enumerate(w.cache_salts)])


def variants(w: ReplayView, prefixes: pa.Table | None, stats: dict[str, Any] | None) -> list[Variant]:
    """The four variants of `w`, in `VARIANTS` order."""
    fixed, record = fix_breakers(w, prefixes, stats)
    return [
        Variant(AS_LOGGED, w),
        Variant(CACHING_OFF, w, prefix_caching=False),
        Variant(SHARING_REMOVED, sharing_removed(w)),
        Variant(BREAKERS_FIXED, fixed, reason=None if fixed is not None else record["reason"],
                rewrite=record if fixed is not None else None),
    ]


def fix_breakers(
    w: ReplayView, prefixes: pa.Table | None, stats: dict[str, Any] | None,
) -> tuple[ReplayView | None, dict[str, Any]]:
    """(`w` with analyze's cache breakers fixed, what was rewritten), or (None, {"reason": why
    not}): advisor.analyze.rewrite on the replayed requests."""
    tokens, record = rewrite.fix_breakers(w.request_ids, w.token_ids, prefixes, stats, synthetic=w.synthetic)
    if tokens is None:
        return None, record
    return replace(w, token_ids=[t.tolist() if isinstance(t, np.ndarray) else list(t) for t in tokens]), record


# --- summaries ---
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def summarise(v: Variant, m: Measured) -> dict[str, Any]:
    """One variant's entry in replay.json's time run (keys in stage.py's docstring)."""
    assert v.view is not None
    sent = [i for i, t in enumerate(m.ttft_s) if t is not None]
    ttft = [float(m.ttft_s[i]) for i in sent]  # type: ignore[arg-type]
    e2e = [float(m.e2e_s[i]) for i in sent]  # type: ignore[arg-type]
    engine_ttft = [float(x) for x in m.engine_ttft_s if x is not None]
    prompt = sum(len(v.view.token_ids[i]) for i in sent)
    out_tokens = sum(int(m.output_tokens[i] or 0) for i in sent)
    wall = m.wall_s
    cached = sum(int(m.cached_tokens[i] or 0) for i in sent)
    d: dict[str, Any] = {
        "status": STATUS_MEASURED, "description": v.description, "prefix_caching": v.prefix_caching,
        "cache_salt": "one per request" if v.name == SHARING_REMOVED else "as logged",
        "requests": len(sent), "prompt_tokens": prompt, "output_tokens": out_tokens,
        "wall_s": _r(wall),
        "ttft_s": {"p50": _r(percentile(ttft, 50)), "p95": _r(percentile(ttft, 95)),
                   "p99": _r(percentile(ttft, 99)), "mean": _r(float(np.mean(ttft)) if ttft else None)},
        "ttft_sum_s": _r(sum(ttft)),
        "e2e_s": {"p50": _r(percentile(e2e, 50)), "p95": _r(percentile(e2e, 95)),
                  "mean": _r(float(np.mean(e2e)) if e2e else None)},
        "engine_ttft_s": {"p50": _r(percentile(engine_ttft, 50)), "p95": _r(percentile(engine_ttft, 95))},
        "throughput": {
            "requests_per_s": _r(len(sent) / wall if wall > 0 else None, 4),
            "output_tokens_per_s": _r(out_tokens / wall if wall > 0 else None, 2),
            "prompt_tokens_per_s": _r(prompt / wall if wall > 0 else None, 2),
        },
        "counters": {
            "prefix_cache_queries": m.engine_queries, "prefix_cache_hits": m.engine_hits,
            "hit_rate": _r(m.engine_hits / m.engine_queries if m.engine_queries else None),
            "cached_tokens_sum": cached,
        },
        "per_request": {
            "ttft_s": [_r(x) for x in m.ttft_s], "e2e_s": [_r(x) for x in m.e2e_s],
            "cached_tokens": m.cached_tokens, "output_tokens": m.output_tokens,
            "prompt_tokens": [len(t) for t in v.view.token_ids],
        },
        "notes": list(m.notes),
    }
    if not v.prefix_caching:
        d["notes"].append("with prefix caching off vLLM looks nothing up, so its prefix_cache_queries "
                          "and hits stay 0")
    if v.rewrite is not None:
        d["rewrite"] = v.rewrite
    return d


def not_run_variant(v: Variant) -> dict[str, Any]:
    return {"status": STATUS_NOT_RUN, "description": v.description, "reason": v.reason}


def _metrics(d: dict[str, Any]) -> dict[str, float | None]:
    t, e, tp = d["ttft_s"], d["e2e_s"], d["throughput"]
    return {"ttft_p50": t["p50"], "ttft_p95": t["p95"], "ttft_p99": t["p99"], "ttft_sum": d["ttft_sum_s"],
            "e2e_p50": e["p50"], "e2e_p95": e["p95"], "wall": d["wall_s"],
            "requests_per_s": tp["requests_per_s"], "output_tokens_per_s": tp["output_tokens_per_s"]}


def ratios(by_variant: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None] | None]:
    """Per `RATIO_PAIRS` name, each metric's numerator ÷ denominator (times: below 1 is
    faster; throughput: above 1 is more); None when either variant was not measured."""
    out: dict[str, dict[str, float | None] | None] = {}
    for name, num, den in RATIO_PAIRS:
        n, d = by_variant.get(num), by_variant.get(den)
        if not n or not d or n["status"] != STATUS_MEASURED or d["status"] != STATUS_MEASURED:
            out[name] = None
            continue
        mn, md = _metrics(n), _metrics(d)
        out[name] = {k: (_r(mn[k] / md[k], 4) if mn[k] is not None and md[k] else None) for k in mn}
    return out


def time_section(
    runs: list[dict[str, Any]], *, model: str | None, model_notes: Sequence[str], device: str | None,
    status: str = STATUS_MEASURED, reason: str | None = None,
) -> dict[str, Any]:
    """replay.json's `time` object."""
    return {"status": status, "reason": reason, "clock": CLOCK_NOTE, "ttft": TTFT_NOTE, "device": device,
            "model": model, "model_notes": list(model_notes), "variants": list(VARIANTS), "runs": runs}


def not_run(reason: str) -> dict[str, Any]:
    return time_section([], model=None, model_notes=(), device=None, status=STATUS_NOT_RUN, reason=reason)
