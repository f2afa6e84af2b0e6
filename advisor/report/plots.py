"""Static figures of the report as inline SVG strings (matplotlib, no pyplot state).

Input: a `ReportData`. Output: one SVG string per figure, or None when its data is missing.
Text is drawn as paths (`svg.fonttype = "path"`) so the figures render the same with no fonts
installed; comments, metadata and the XML prolog are stripped; every id is prefixed per figure
so several SVGs can sit in one HTML page. No string from the logs is drawn.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # a renderer never needs a display
from matplotlib.backends.backend_svg import FigureCanvasSVG  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from advisor.recommend.view import main_view  # noqa: E402
from advisor.report.clusters import GroupPoints, group_points  # noqa: E402
from advisor.report.model import ReportData, TimelinePoint  # noqa: E402
from advisor.report.offload import OffloadSeries, offload_series  # noqa: E402
from advisor.report.replicas import ReplicaSeries, replica_series  # noqa: E402
from advisor.sim.routing import ROUTERS  # noqa: E402

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
HIT = "#059669"
MISS = "#cbd5e1"
RC = {
    "svg.fonttype": "path",
    "svg.hashsalt": "pc-advise",
    "font.family": "DejaVu Sans",
    "font.size": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.7,
    "axes.edgecolor": "#6b7280",
    "axes.labelcolor": "#111827",
    "xtick.color": "#374151",
    "ytick.color": "#374151",
    "legend.frameon": False,
    "axes.axisbelow": True,
}


def _figure(width: float = 10.0, height: float = 3.9) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasSVG(fig)
    return fig


_ID = re.compile(r'\bid="([^"]+)"')
_ID_REF = re.compile(r'(\bid="|"#|url\(#)([^")]+)([")])')


def to_svg(fig: Figure, prefix: str, label: str) -> str:
    """Serialise a figure to an inline-safe SVG element with ids unique to `prefix`."""
    buf = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    ids = set(_ID.findall(svg))
    # every id="X", "#X" and url(#X) of a defined X gets the prefix, in one pass (a chart of
    # thousands of markers has thousands of ids)
    svg = _ID_REF.sub(lambda m: (f"{m[1]}{prefix}-{m[2]}{m[3]}" if m[2] in ids else m[0]), svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{label}" ', 1)
    return re.sub(r"\n\s*\n", "\n", svg).strip()


def _render(draw: Any, prefix: str, label: str, *args: Any, height: float = 3.9) -> str:
    with matplotlib.rc_context(RC):
        fig = _figure(height=height)
        draw(fig, *args)
        return to_svg(fig, prefix, label)


# --- hit rate vs KV memory -------------------------------------------------------------
def _x(row: Mapping[str, Any], use_gib: bool) -> float | None:
    """KV memory in GiB, or (no model known) capacity in tokens: blocks x block size, which is
    proportional to memory for any one model, so block sizes stay comparable on one axis."""
    if use_gib:
        return float(row["kv_gib"]) if row.get("kv_gib") else None
    if row.get("num_blocks") is None:
        return None
    return float(row["num_blocks"]) * float(row["block_size"])


def _draw_curve(fig: Figure, view: Sequence[Mapping[str, Any]], rec: Mapping[str, Any], use_gib: bool) -> None:
    ax = fig.add_subplot()
    sizes = sorted({int(r["block_size"]) for r in view})
    lows, highs = [], []
    for i, bs in enumerate(sizes):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted((x, float(r["hit_rate"]) * 100) for r in view
                     if int(r["block_size"]) == bs and (x := _x(r, use_gib)) is not None)
        ceil = [float(r["ceiling_hit_rate"]) * 100 for r in view if int(r["block_size"]) == bs]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, ms=3.5, lw=1.6,
                    label=f"block size {bs}")
            lows.append(min(p[1] for p in pts))
        if ceil:
            ax.axhline(max(ceil), color=color, ls="--", lw=1, alpha=0.8)
            highs.append(max(ceil))
    r = rec.get("recommended") or {}
    rx = _x(r, use_gib) if r.get("block_size") is not None else None
    if rx and r.get("hit_rate") is not None:
        ax.plot([rx], [float(r["hit_rate"]) * 100], marker="*", ms=16, color="#111827",
                mec="white", mew=1.2, ls="none", zorder=5, label="recommended")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV cache memory (GiB, log scale)" if use_gib
                  else "KV cache capacity (tokens = blocks x block size, log scale)")
    ax.set_ylabel("prefix-cache hit rate (%)")
    lo = max(0.0, math.floor((min(lows or [0.0]) - 5) / 10) * 10)
    hi = min(100.0, math.ceil((max(highs or [100.0]) + 4) / 10) * 10)
    ax.set_ylim(lo, hi if hi > lo else lo + 10)
    if highs:  # one legend entry explains every dashed line (a label in the plot could sit on them)
        ax.plot([], [], ls="--", lw=1, color="#6b7280", label="ceiling (infinite cache)")
    ax.legend(loc="lower right", fontsize=8.5)


def _plain(v: float, _pos: Any = None) -> str:
    """Log-axis tick labels as plain numbers (0.2, 5, 1,000), not powers of ten."""
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}"


def hit_rate_curve(data: ReportData) -> str | None:
    view = main_view(data.sim, data.recommendation)
    finite = [r for r in view if r.get("num_blocks") is not None]
    if not finite:
        return None
    use_gib = all(r.get("kv_gib") is not None for r in finite)
    return _render(_draw_curve, "curve", "hit rate versus KV cache memory per block size",
                   view, data.recommendation or {}, use_gib)


# --- shared-prefix lengths -------------------------------------------------------------
def _draw_hist(fig: Figure, edges: Sequence[float], counts: Sequence[int]) -> None:
    ax = fig.add_subplot()
    labels = []
    for i in range(len(counts)):
        lo = edges[i] if i < len(edges) else None
        hi = edges[i + 1] if i + 1 < len(edges) else None
        labels.append(f"{_short(lo)}–{_short(hi)}" if hi is not None else f"≥{_short(lo)}")
    ax.bar(range(len(counts)), counts, color=PALETTE[0], width=0.8)
    ax.set_xticks(range(len(counts)), labels, rotation=40 if len(counts) > 6 else 0, ha="right" if len(counts) > 6 else "center")
    ax.set_xlabel("longest prefix shared with an earlier request (tokens)")
    ax.set_ylabel("requests")
    ax.grid(axis="x", visible=False)


def _short(x: Any) -> str:
    if x is None:
        return ""
    x = float(x)
    if math.isinf(x):
        return "∞"
    if x >= 10_000:
        return f"{x / 1000:.0f}k"
    return f"{x:.0f}"


def prefix_histogram(data: ReportData) -> str | None:
    hist = (data.stats or {}).get("shared_prefix_hist") or {}
    counts = list(hist.get("counts") or [])
    if not counts or not any(counts):
        return None
    return _render(_draw_hist, "hist", "distribution of shared-prefix lengths",
                   list(hist.get("edges") or []), counts, height=3.0)


# --- requests over time ----------------------------------------------------------------
def bin_timeline(points: Sequence[TimelinePoint], bins: int = 48) -> list[tuple[float, float, int, int]]:
    """(start, end, hit tokens, computed tokens) per equal-width bin over the x range."""
    if not points:
        return []
    lo = min(p.t for p in points)
    hi = max(p.t for p in points)
    n = max(1, min(bins, len(points)))
    width = (hi - lo) / n or 1.0
    acc = [[0, 0] for _ in range(n)]
    for p in points:
        k = min(n - 1, int((p.t - lo) / width))
        acc[k][0] += p.hit_tokens
        acc[k][1] += p.n_tokens - p.hit_tokens
    return [(lo + k * width, lo + (k + 1) * width, h, m) for k, (h, m) in enumerate(acc)]


def _draw_timeline(fig: Figure, binned: Sequence[tuple[float, float, int, int]], has_time: bool) -> None:
    ax = fig.add_subplot()
    x = [b[0] for b in binned]
    w = [(b[1] - b[0]) * 0.92 for b in binned]
    hit = [b[2] for b in binned]
    miss = [b[3] for b in binned]
    ax.bar(x, hit, width=w, align="edge", color=HIT, label="served from cache (hit)")
    ax.bar(x, miss, width=w, align="edge", bottom=hit, color=MISS, label="computed (miss)")
    ax.set_xlabel("time since the first request (s)" if has_time else "request position in the log")
    ax.set_ylabel("prompt tokens")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8.5)
    ax.grid(axis="x", visible=False)


def timeline(data: ReportData) -> str | None:
    if not data.timeline:
        return None
    return _render(_draw_timeline, "time", "prompt tokens over time, cache hits versus misses",
                   bin_timeline(data.timeline), data.timeline_has_time)


# --- reuse groups ----------------------------------------------------------------------
def _draw_groups(fig: Figure, g: GroupPoints) -> None:
    ax = fig.add_subplot()
    xs = [max(p[0], 1.0) for p in g.points]
    top = max(p[2] for p in g.points) or 1
    ax.scatter(xs, [p[1] for p in g.points], s=[12 + 150 * math.sqrt(p[2] / top) for p in g.points],
               color=PALETTE[0], alpha=0.55, linewidths=0)
    if g.budget_tokens:
        ax.axvline(g.budget_tokens, color="#6b7280", ls=":", lw=1.2)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    lo, hi = ax.get_xlim()  # within one decade the minor ticks are the only labels there are
    ax.xaxis.set_minor_formatter(plain if hi < lo * 10 else NullFormatter())
    ax.set_xlabel("p90 reuse distance (tokens an LRU cache must hold)")
    ax.set_ylabel("share of all hits (%)")
    ax.set_ylim(bottom=0)


def groups_chart(data: ReportData) -> str | None:
    g = group_points(data)
    if g is None:
        return None
    return _render(_draw_groups, "clus", "reuse groups: share of hits against reuse distance", g)


# --- TTFT versus KV memory --------------------------------------------------------------
def _draw_ttft(fig: Figure, on: Sequence[tuple[float, float, float]], off: tuple[float, float] | None,
               use_gib: bool) -> None:
    ax = fig.add_subplot()
    xs = [p[0] for p in on]
    ax.plot(xs, [p[1] * 1000 for p in on], "-o", color=PALETTE[0], ms=3.5, lw=1.6, label="caching on, p50")
    ax.plot(xs, [p[2] * 1000 for p in on], "-s", color=PALETTE[1], ms=3.5, lw=1.6, label="caching on, p95")
    if off is not None:
        ax.axhline(off[0] * 1000, color=PALETTE[0], ls=":", lw=1.2, label="caching off, p50")
        ax.axhline(off[1] * 1000, color=PALETTE[1], ls=":", lw=1.2, label="caching off, p95")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.set_xlabel("KV cache memory (GiB, log scale)" if use_gib
                  else "KV cache capacity (tokens = blocks x block size, log scale)")
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.legend(loc="best", fontsize=8.5)  # caching off's lines may run along the top


def ttft_curve(data: ReportData) -> str | None:
    """TTFT p50/p95 against KV memory at the recommended block size (concurrent mode, the
    recommendation's window), with caching off's as reference lines."""
    rec = data.recommendation or {}
    best = rec.get("recommended") or {}
    if not data.sim or best.get("block_size") is None:
        return None
    rows = [r for r in data.sim if r.get("mode") == "concurrent" and r.get("block_size") == best["block_size"]
            and r.get("window") == best.get("window", "cold") and r.get("num_blocks") is not None
            and r.get("ttft_p50_s") is not None]
    on_rows = [r for r in rows if r.get("policy") == "lru"]
    use_gib = all(r.get("kv_gib") is not None for r in on_rows)
    on = sorted((x, float(r["ttft_p50_s"]), float(r["ttft_p95_s"])) for r in on_rows
                if (x := _x(r, use_gib)) is not None and r["ttft_p50_s"] > 0)
    if len(on) < 2:
        return None
    off_rows = sorted((r for r in rows if r.get("policy") == "off"), key=lambda r: r["num_blocks"])
    off = (float(off_rows[-1]["ttft_p50_s"]), float(off_rows[-1]["ttft_p95_s"])) if off_rows else None
    return _render(_draw_ttft, "ttft", "time to first token versus KV cache memory", on, off, use_gib)


# --- hit rate versus replicas, per router -------------------------------------------------
def _draw_replicas(fig: Figure, series: ReplicaSeries) -> None:
    ax = fig.add_subplot()
    for router, pts in series.lines.items():
        # one color per router in every report; the one-engine layout in gray
        color = PALETTE[ROUTERS.index(router) % len(PALETTE)] if router in ROUTERS else PALETTE[-1]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "-", color=color, lw=1.6, label=router)
        ax.plot([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "o", color=color, ms=5, ls="none")
        out = [p for p in pts if not p[2]]
        if out:
            ax.plot([p[0] for p in out], [p[1] for p in out], "o", mfc="white", mec=color, mew=1.5, ms=6, ls="none")
    if series.best is not None:
        ax.plot([series.best[0]], [series.best[1]], marker="*", ms=16, color="#111827", mec="white", mew=1.2,
                ls="none", zorder=5, label="recommended")
    ax.set_xscale("log", base=2)
    ax.set_xticks([t[0] for t in series.ticks], [t[1] for t in series.ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{series.xlabel} (log scale)")
    ax.set_ylabel("prefix-cache hit rate, all replicas (%)")
    ys = [p[1] for pts in series.lines.values() for p in pts]
    lo = max(0.0, math.floor((min(ys) - 5) / 10) * 10)
    ax.set_ylim(lo, min(100.0, math.ceil((max(ys) + 5) / 10) * 10))
    ax.legend(loc="lower left", fontsize=8.5, ncol=2)


def replica_chart(data: ReportData) -> str | None:
    """Hit rate against the replica count (or the layouts of the GPUs given), one line per router."""
    series = replica_series(data)
    if series is None or not series.lines:
        return None
    return _render(_draw_replicas, "repl", "hit rate versus replicas, per router", series, height=3.6)


# --- the CPU offload tier: hit rate vs GPU KV memory, GPU alone and with each tier ------------
def _draw_offload(fig: Figure, series: OffloadSeries) -> None:
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(series.lines.items()):
        color = "#111827" if i == 0 else PALETTE[(i - 1) % len(PALETTE)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if i else "--o", color=color, ms=3.5,
                lw=2.0 if i == 0 else 1.5, label=label, zorder=4 if i == 0 else 3)
    if series.marked is not None:
        ax.axvline(series.marked, color="#6b7280", ls=":", lw=1.2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GPU KV cache memory (GiB, log scale)" if series.use_gib else "GPU KV blocks (log scale)")
    ax.set_ylabel("prefix-cache hit rate, GPU + CPU (%)")
    ys = [p[1] for pts in series.lines.values() for p in pts]
    ax.set_ylim(max(0.0, math.floor((min(ys) - 5) / 10) * 10), min(100.0, math.ceil((max(ys) + 5) / 10) * 10))
    ax.legend(loc="lower right", fontsize=8.5)


def offload_chart(data: ReportData) -> str | None:
    """The CPU offload tier's curves next to the GPU's (advisor.report.offload)."""
    series = offload_series(data)
    if series is None or not any(series.lines.values()):
        return None
    return _render(_draw_offload, "offl", "hit rate versus GPU memory, with and without a CPU offload tier", series,
                   height=3.6)
