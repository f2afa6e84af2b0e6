"""The one data object every report renderer reads: `ReportData`, gathered from a run folder.

Inputs (each optional; a missing one is listed in `ReportData.missing` with the stage that
writes it): manifest.json, rejects.jsonl, stats.json, clusters.parquet, prefixes.parquet,
requests.parquet (request_id, timestamp), sim.parquet, sim_requests.parquet,
recommendation.json, replay.json.
Output: a frozen `ReportData` of plain Python values (no frames), already redacted when asked,
so `html.render` and `markdown.render` are pure `ReportData -> str` steps.

`load(root, redact)` is the I/O edge; `build(...)` is the pure part and what tests call.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import advisor.runfolder as rf
from advisor.recommend.view import main_view
from advisor.version import __version__

# How many rows of each long list the report carries (the artifacts hold all of them).
MAX_REJECTS = 10
MAX_CLUSTERS = 20
MAX_TIMELINE_POINTS = 200_000  # a plot of binned tokens needs no more than this

# Artifacts the report reads, in the order its sections use them.
INPUTS = (
    rf.MANIFEST, rf.REJECTS, rf.STATS, rf.PREFIXES, rf.CLUSTERS, rf.REQUESTS,
    rf.SIM, rf.SIM_REQUESTS, rf.RECOMMENDATION, rf.REPLAY, rf.REPLICAS, rf.OFFLOAD,
)
# Artifacts whose absence the report does not mention (written only when asked for).
OPTIONAL = (rf.REPLICAS, rf.OFFLOAD)


@dataclass(frozen=True)
class TimelinePoint:
    """One request on the time axis: arrival (s, or line order), prompt and cached tokens."""

    t: float
    n_tokens: int
    hit_tokens: int


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows. Strings from the logs are raw here; renderers escape."""

    run_dir: str
    tool_version: str = __version__
    redacted: bool = False
    missing: Mapping[str, str] = field(default_factory=dict)  # artifact -> stage writing it
    stage_times: Sequence[tuple[str, float]] = ()  # (stage, wall seconds) in pipeline order
    stages_overlapped: Sequence[str] = ()  # stages whose runs overlapped another's (analyze beside simulate)
    ingest: Mapping[str, Any] | None = None  # manifest counts of ingest
    rejects: Sequence[tuple[int, str]] = ()  # first (line, reason)
    tokenizer: str | None = None
    input_kind: str | None = None  # "tokens" | "hash_trace"
    stats: Mapping[str, Any] | None = None
    clusters: Sequence[Mapping[str, Any]] = ()
    sim: Sequence[Mapping[str, Any]] = ()  # rows of sim.parquet
    timeline: Sequence[TimelinePoint] = ()
    timeline_source: str | None = None  # what hit_tokens in the timeline mean
    timeline_has_time: bool = False  # False: x is the request's position in the log
    recommendation: Mapping[str, Any] | None = None
    replay: Mapping[str, Any] | None = None
    replicas: Sequence[Mapping[str, Any]] = ()  # rows of replicas.parquet (N engines behind routers)
    offload: Sequence[Mapping[str, Any]] = ()  # rows of offload.parquet (the CPU offload tier)

    def to_json(self) -> str:
        """The whole object as JSON, so a report can be saved and re-rendered (`from_json`)."""
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> ReportData:
        d = json.loads(text)
        d["timeline"] = [TimelinePoint(**p) for p in d.get("timeline") or []]
        d["stage_times"] = [tuple(x) for x in d.get("stage_times") or []]
        d["rejects"] = [tuple(x) for x in d.get("rejects") or []]
        return cls(**d)


# --- redaction -------------------------------------------------------------------------
def redact_text(text: str | None) -> str | None:
    """A stand-in that keeps a text's length and identity but none of its content."""
    if text is None:
        return None
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"[redacted: {len(text):,} chars, sha256 {digest}]"


_TEXT_KEY = re.compile(r"(^text|_text$|_context$|_diff$|^description$|^fix$)")


def _scrub(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with every prompt-derived text field redacted; ids, labels and numbers stay.

    Descriptions are redacted too: they may quote the text that differs.
    """
    return {k: redact_text(v) if isinstance(v, str) and _TEXT_KEY.search(k) else v for k, v in row.items()}


def _redact_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(stats)
    out["top_prefixes"] = [_scrub(p) for p in stats.get("top_prefixes") or []]
    out["breakers"] = [
        {**_scrub(b), "examples": [_scrub(e) for e in b.get("examples") or []],
         "moved": [redact_text(x) for x in b.get("moved") or []], "orders": None}  # tool / key names
        for b in stats.get("breakers") or []
    ]
    if isinstance(stats.get("clusters"), Mapping):
        cl = dict(stats["clusters"])
        cl["items"] = [_scrub(c) for c in cl.get("items") or [] if isinstance(c, Mapping)]
        out["clusters"] = cl
    return out


def _redact_recommendation(rec: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out["prompt_fixes"] = [_scrub(f) for f in rec.get("prompt_fixes") or []]
    return out


# --- the pure part ---------------------------------------------------------------------
def _ordered_stage_times(manifest: Mapping[str, Any]) -> list[tuple[str, float]]:
    stages = manifest.get("stages") or {}
    return [(s, float(stages[s].get("wall_s", 0.0))) for s in (spec.name for spec in rf.STAGES) if s in stages]


def _overlapped_stages(manifest: Mapping[str, Any]) -> list[str]:
    """The stages whose recorded run overlapped another stage's by more than the one-second
    resolution of `finished_at` (`pc-advise run` runs analyze beside simulate), in pipeline order."""
    stages = manifest.get("stages") or {}
    spans = {}
    for name in (spec.name for spec in rf.STAGES):
        entry = stages.get(name) or {}
        try:
            end = calendar.timegm(time.strptime(str(entry["finished_at"]), "%Y-%m-%dT%H:%M:%SZ"))
        except (KeyError, ValueError):
            continue
        spans[name] = (end - float(entry.get("wall_s", 0.0)), float(end))
    return [a for a, (s0, e0) in spans.items()
            if any(b != a and min(e0, e1) - max(s0, s1) > 1.0 for b, (s1, e1) in spans.items())]


def build_timeline(
    request_ids: Sequence[str],
    timestamps: Sequence[float | None],
    n_tokens: Mapping[str, int],
    hit_tokens: Mapping[str, int],
) -> tuple[list[TimelinePoint], bool]:
    """Requests in log order with their prompt and cached tokens; x is time when all have one."""
    has_time = bool(timestamps) and all(t is not None for t in timestamps)
    pts: list[TimelinePoint] = []
    step = max(1, len(request_ids) // MAX_TIMELINE_POINTS)
    for i in range(0, len(request_ids), step):
        rid = request_ids[i]
        if n_tokens.get(rid) is None:
            continue
        t = float(timestamps[i]) if has_time else float(i)  # type: ignore[arg-type]
        pts.append(TimelinePoint(t, int(n_tokens[rid]), int(hit_tokens.get(rid) or 0)))
    if has_time and pts:
        t0 = min(p.t for p in pts)
        pts = [TimelinePoint(p.t - t0, p.n_tokens, p.hit_tokens) for p in pts]
    return pts, has_time


def build(
    run_dir: str,
    *,
    manifest: Mapping[str, Any] | None = None,
    rejects: Sequence[Mapping[str, Any]] = (),
    stats: Mapping[str, Any] | None = None,
    clusters: Sequence[Mapping[str, Any]] = (),
    sim: Sequence[Mapping[str, Any]] = (),
    timeline: Sequence[TimelinePoint] = (),
    timeline_source: str | None = None,
    timeline_has_time: bool = False,
    recommendation: Mapping[str, Any] | None = None,
    replay: Mapping[str, Any] | None = None,
    missing: Mapping[str, str] | None = None,
    redact: bool = False,
    replicas: Sequence[Mapping[str, Any]] = (),
    offload: Sequence[Mapping[str, Any]] = (),
) -> ReportData:
    """Assemble (and, with `redact`, scrub) the report's data from already-read artifacts."""
    manifest = manifest or {}
    stages = manifest.get("stages") or {}
    ingest = (stages.get("ingest") or {}).get("counts")
    tokenizer = ((stages.get("tokenize") or {}).get("counts") or {}).get("tokenizer")
    if stats and stats.get("tokenizer"):
        tokenizer = stats["tokenizer"]
    input_kind = (recommendation or {}).get("input_kind")
    if input_kind is None and ingest and (ingest.get("by_kind") or {}).get("hash_trace"):
        input_kind = "hash_trace" if len(ingest["by_kind"]) == 1 else None
    first = [(int(r.get("line", 0)), str(r.get("reason", ""))) for r in list(rejects)[:MAX_REJECTS]]
    if not first and ingest:
        first = [(int(a), str(b)) for a, b in (ingest.get("first_rejects") or [])[:MAX_REJECTS]]
    # every group (the tree and the folded rows need them all); the texts of the first MAX_CLUSTERS
    # by hit share only, since the report shows no more
    cl = sorted((dict(c) for c in clusters), key=lambda c: c.get("cluster", 0))
    shown = {c.get("cluster") for c in sorted(cl, key=lambda c: -float(c.get("hit_share") or 0))[:MAX_CLUSTERS]}
    cl = [c if c.get("cluster") in shown else {k: v for k, v in c.items() if not k.endswith("_text")} for c in cl]
    if redact:
        stats = _redact_stats(stats) if stats else stats
        recommendation = _redact_recommendation(recommendation) if recommendation else recommendation
        cl = [_scrub(c) for c in cl]
    return ReportData(
        run_dir=run_dir,
        redacted=redact,
        missing=dict(missing or {}),
        stage_times=_ordered_stage_times(manifest),
        stages_overlapped=_overlapped_stages(manifest),
        ingest=ingest,
        rejects=first,
        tokenizer=tokenizer,
        input_kind=input_kind,
        stats=stats,
        clusters=cl,
        sim=[dict(r) for r in sim],
        timeline=list(timeline),
        timeline_source=timeline_source,
        timeline_has_time=timeline_has_time,
        recommendation=recommendation,
        replay=replay,
        replicas=[dict(r) for r in replicas],
        offload=[dict(r) for r in offload],
    )


# --- the I/O edge ----------------------------------------------------------------------
def _read_rejects(path: Path, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(out) >= limit:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append({"line": obj.get("line", 0), "reason": obj.get("reason", "")})
    return out


def _timeline_from_run(run: rf.RunDir, rec: Mapping[str, Any] | None, sim_view: list[dict[str, Any]]):
    """Per-request tokens and hits of the recommended configuration (else the token ceiling)."""
    if not run.path(rf.REQUESTS).exists():
        return [], None, False
    req = pq.read_table(run.path(rf.REQUESTS), columns=["request_id", "timestamp"])
    ids = req.column("request_id").to_pylist()
    ts = req.column("timestamp").to_pylist()
    n_tokens: dict[str, int] = {}
    hits: dict[str, int] = {}
    source = None
    recd = (rec or {}).get("recommended") or {}
    if run.path(rf.SIM_REQUESTS).exists() and recd.get("block_size") is not None:
        mode = sim_view[0]["mode"] if sim_view else recd.get("mode")
        flt = [("block_size", "=", int(recd["block_size"]))] + ([("mode", "=", str(mode))] if mode else [])
        t = pq.read_table(run.path(rf.SIM_REQUESTS), filters=flt)
        nb = t.column("num_blocks").to_pylist()
        for want in (recd.get("num_blocks"), None):  # the recommended budget, else the ceiling
            rows = [i for i, b in enumerate(nb) if b == want]
            if rows:
                sub = t.take(rows)
                for rid, n, h in zip(*(sub.column(c).to_pylist() for c in ("request_id", "n_tokens", "hit_tokens"))):
                    n_tokens[rid] = n
                    hits[rid] = h
                source = (
                    f"predicted cache hits of the recommended configuration (block size "
                    f"{recd.get('block_size')}, {want:,} blocks, {mode or 'simulated'} mode)"
                    if want is not None else
                    f"predicted hits with an infinite cache at block size {recd.get('block_size')} (the block ceiling)"
                )
                break
    if not n_tokens and run.path(rf.PREFIXES).exists():
        names = pq.read_schema(run.path(rf.PREFIXES)).names
        # ceiling_tokens (when analyze fills it) keeps vLLM's last-token rule; shared_tokens does not
        cols = ["request_id", "n_tokens", "shared_tokens"] + (["ceiling_tokens"] if "ceiling_tokens" in names else [])
        t = pq.read_table(run.path(rf.PREFIXES), columns=cols)
        ceil = t.column("ceiling_tokens").to_pylist() if "ceiling_tokens" in names else [None] * t.num_rows
        for rid, n, s, c in zip(*(t.column(c).to_pylist() for c in cols[:3]), ceil):
            n_tokens[rid] = n
            hits[rid] = s if c is None else c
        if n_tokens:
            source = "tokens shared with an earlier request (the infinite-cache ceiling, not a prediction)"
    if not n_tokens:
        return [], None, False
    pts, has_time = build_timeline(ids, ts, n_tokens, hits)
    return pts, source, has_time


def load(root: Path, redact: bool = False) -> ReportData:
    """Read whatever artifacts the run folder has and build the report's data from them."""
    run = rf.RunDir(Path(root))
    missing = {name: rf.PRODUCER[name] for name in INPUTS
               if name in rf.PRODUCER and name not in OPTIONAL and not run.path(name).exists()}

    def opt_json(name: str) -> Any:
        return run.read_json(name) if run.path(name).exists() else None

    manifest = opt_json(rf.MANIFEST)
    rec = opt_json(rf.RECOMMENDATION)
    sim = pq.read_table(run.path(rf.SIM)).to_pylist() if run.path(rf.SIM).exists() else []
    clusters = pq.read_table(run.path(rf.CLUSTERS)).to_pylist() if run.path(rf.CLUSTERS).exists() else []
    rejects = _read_rejects(run.path(rf.REJECTS), MAX_REJECTS) if run.path(rf.REJECTS).exists() else []
    timeline, source, has_time = _timeline_from_run(run, rec, main_view(sim, rec))
    return build(
        str(run.root),
        manifest=manifest,
        rejects=rejects,
        stats=opt_json(rf.STATS),
        clusters=clusters,
        sim=sim,
        timeline=timeline,
        timeline_source=source,
        timeline_has_time=has_time,
        recommendation=rec,
        replay=opt_json(rf.REPLAY),
        missing=missing,
        redact=redact,
        replicas=pq.read_table(run.path(rf.REPLICAS)).to_pylist() if run.path(rf.REPLICAS).exists() else [],
        offload=pq.read_table(run.path(rf.OFFLOAD)).to_pylist() if run.path(rf.OFFLOAD).exists() else [],
    )
