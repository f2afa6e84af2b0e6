"""Measured time, the engine-free half: the variants replayed and what their timings come to.

Inputs: a `ReplayView` (what the replay sends), and for variant (c) analyze's findings:
prefixes.parquet (`resembles_id`, `diverge_token` per request) and stats.json (`breakers`
with `label` and `position_block`, `analysis_block_size`, `options.lead_tokens`). Output:
the variants (`variants`), each one's per-request timings summarised (`summarise`), the
ratios between them (`ratios`), and replay.json's `time` object (`time_section`; its keys
are listed in advisor/replay/stage.py's docstring). advisor/replay/measure.py runs the engine.

The four variants send the same requests with the same arrivals and output lengths:

- `as_logged` (a): the log as it is, prefix caching on;
- `caching_off` (a-off): the same, `enable_prefix_caching=False`;
- `sharing_removed` (b): every request with its own `cache_salt`, so no request can reuse
  another's blocks (lengths and arrivals unchanged): the log with no overlap;
- `breakers_fixed` (c): caching on, each request analyze paired with an earlier
  near-identical one rewritten so that the breaker's differing span equals the earlier
  request's. Only where the rewrite is the fix the breaker's label names and is safe at
  the token level: a short varying value (`timestamp`, `uuid/id`, `whitespace`: the span,
  at most `MAX_VALUE_SPAN` tokens, takes the earlier request's value, as "round it" or
  "move it out" would make them equal), or a pure reordering (`tool order`, `reordered
  content`: the aligned region is the same tokens in another order, and takes the earlier
  request's order, as sorting would). Per-user text and unknown breakers are not rewritten
  (their fix moves text within the prompt's structure, which a token splice cannot do
  faithfully). When nothing can be rewritten, (c) is `not_run` with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

# find_breakers' alignment window (a multiple of lead_tokens), so (c) aligns as analyze did
from advisor.analyze.breakers import _ALIGN_WINDOW_FACTOR as ALIGN_WINDOW_FACTOR
from advisor.analyze.breakers import align_pair
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

VALUE_LABELS = ("timestamp", "uuid/id", "whitespace")
ORDER_LABELS = ("tool order", "reordered content")
MAX_VALUE_SPAN = 64  # tokens: a date, an id or a run of whitespace is far shorter

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
    not}). Requests are rewritten in arrival order against their (already rewritten) partner,
    so a family of near-identical prompts converges on its first member's text."""
    if stats is None or prefixes is None:
        return None, {"reason": "analyze has not run (no stats.json / prefixes.parquet), so there are no "
                                "breaker findings to apply; run `pc-advise analyze RUN` first"}
    if w.synthetic:
        return None, {"reason": "a hash trace has no token content: breakers cannot be found or fixed"}
    breakers = stats.get("breakers") or []
    if not breakers:
        return None, {"reason": "analyze found no cache breaker in this log: there is nothing to fix, so (c) "
                                "would be (a)"}
    opts = stats.get("options") or {}
    block = int(stats.get("analysis_block_size") or opts.get("analysis_block_size") or 16)
    window = ALIGN_WINDOW_FACTOR * int(opts.get("lead_tokens") or 1024)
    labels_at: dict[int, set[str]] = {}
    for b in breakers:
        labels_at.setdefault(int(b["position_block"]), set()).add(str(b["label"]))
    rows = prefixes.select(["request_id", "resembles_id", "diverge_token"]).to_pylist()
    partner = {r["request_id"]: (r["resembles_id"], r["diverge_token"]) for r in rows if r["resembles_id"]}
    index = {rid: i for i, rid in enumerate(w.request_ids)}
    tokens = list(w.token_ids)
    applied: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    # A rewritten prompt's old head -> its new head, by head length: later requests that
    # carried the same head (the next turns of a conversation, the rest of a task) get the
    # same fix, as they would from a client that fixed its prompt.
    heads: dict[int, dict[tuple[int, ...], list[int]]] = {}
    inherited = 0
    for i, rid in enumerate(w.request_ids):
        own = tokens[i]
        for length in sorted(heads, reverse=True):
            new_head = heads[length].get(tuple(own[:length])) if len(own) > length else None
            if new_head is not None:
                tokens[i] = new_head + list(own[length:])
                inherited += 1
                break
        if rid not in partner or tokens[i] is not own:
            continue
        a_id, diverge = partner[rid]
        a = index.get(a_id)
        labels = labels_at.get(int(diverge) // block, set()) if diverge is not None else set()
        if a is None or a >= i:
            skipped["its partner is not among the replayed requests"] += 1
        elif len(labels) != 1:
            skipped["no single breaker label at its divergence"] += 1
        else:
            label = next(iter(labels))
            new, cut_old, cut_new, why = _rewrite(np.asarray(tokens[a], dtype=np.int64),
                                                  np.asarray(own, dtype=np.int64), label, window)
            if new is None:
                skipped[why] += 1
            else:
                tokens[i] = new
                heads.setdefault(cut_old, {})[tuple(own[:cut_old])] = new[:cut_new]
                applied[label] += 1
    if not applied:
        found = ", ".join(sorted({str(b["label"]) for b in breakers}))
        why = "; ".join(f"{n} requests: {r}" for r, n in skipped.most_common()) or "no request pairs"
        return None, {"reason": f"analyze's breakers ({found}) give no rewrite this replay can apply safely ({why})"}
    before = sum(len(t) for t in w.token_ids)
    after = sum(len(t) for t in tokens)
    return replace(w, token_ids=tokens), {
        "method": "each paired request's differing span takes its earlier partner's tokens (value breakers), "
                  "or its reordered region takes the partner's order (order breakers); later requests that "
                  "began with the same rewritten head get the same rewrite (same_head_requests)",
        "rewritten_requests": sum(applied.values()) + inherited, "by_label": dict(applied),
        "same_head_requests": inherited,
        "skipped": dict(skipped), "prompt_tokens_before": before, "prompt_tokens_after": after,
    }


def _rewrite(a: np.ndarray, b: np.ndarray, label: str, window: int) -> tuple[list[int] | None, int, int, str]:
    """(b rewritten against its partner a, the length of b's head replaced, the length of
    the head that replaced it, ""), or (None, 0, 0, why not)."""
    p, qa, rb, end = align_pair(a, b, window)
    if label in VALUE_LABELS:
        if qa == p and rb == p:
            return None, 0, 0, f"{label}: common content does not resume after the divergence"
        if max(qa - p, rb - p) > MAX_VALUE_SPAN:
            return None, 0, 0, f"{label}: differing span longer than {MAX_VALUE_SPAN} tokens"
        return np.concatenate([a[:qa], b[rb:]]).tolist(), rb, qa, ""
    if label in ORDER_LABELS:
        if end <= p or end > len(a) or not np.array_equal(np.sort(a[p:end]), np.sort(b[p:end])):
            return None, 0, 0, f"{label}: the aligned region is not a pure reordering of the partner's"
        return np.concatenate([a[:end], b[end:]]).tolist(), end, end, ""
    return None, 0, 0, f"{label}: its fix moves text within the prompt, which a token rewrite cannot do faithfully"


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
