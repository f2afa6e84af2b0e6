"""The report's "What caching buys in time": recommendation.json's `time` section as rows and sentences.

Input: a `ReportData` (its recommendation's `time`, computed by advisor/recommend/timing.py, and
replay.json's timed runs). Output: plain-text rows, a caption and a verdict that both renderers
show (each escapes for its own format), as advisor/report/facts.py does for the other sections.
A variant overloaded at the logged rate (its sustained rate below the log's arrival rate) has
its times marked and no on/off ratio: its queue grows with the log, so the ratio says nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from advisor.report.facts import num, pct, secs
from advisor.report.model import ReportData

TIME_HEADER = ("at the recommended configuration", "caching off", "caching on", "on vs off")


def _rate(x: Any) -> str:
    return "—" if x is None else f"{float(x):,.2f} req/s"


def _times(off: Any, on: Any) -> str:
    if not off or not on:
        return "—"
    r = float(off) / float(on)
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def clock_text(clock: Mapping[str, Any]) -> str:
    if clock.get("kind") == "roofline":
        return (f"roofline of {clock.get('model')} on {clock.get('gpu')} (tp {clock.get('tp')}; mfu "
                f"{clock.get('mfu'):g}, mbu {clock.get('mbu'):g}: {clock.get('basis')})")
    return f"flat rates ({clock.get('basis')})"


def time_facts(data: ReportData) -> tuple[str, list[tuple[str, ...]], str] | None:
    """(caption, rows, verdict) of recommendation.json's `time` section, or None."""
    t = (data.recommendation or {}).get("time")
    if not t:
        return None
    lr, sat = t["logged_rate"], t["saturated"]
    on, off = lr["on"], lr["off"]
    over = {name for name, yes in (t.get("overloaded") or {}).items() if yes}

    def at_logged_rate(what: str) -> tuple[str, str, str]:
        """(off, on, ratio) of a time at the logged rate: an overloaded engine's time is marked, and
        no ratio is given against it (its queue grows with the log's length: docs/simulate.md,
        section Step time)."""
        off_cell, on_cell = (secs(v[what]) + (" (overloaded)" if name in over else "")
                             for name, v in (("off", off), ("on", on)))
        ratio = "— (overloaded)" if over & {"off", "on"} else _times(off[what], on[what])
        return off_cell, on_cell, ratio

    rows = [(f"TTFT {p} at the logged rate", *at_logged_rate(f"ttft_{p}_s")) for p in ("p50", "p95", "p99")]
    rows += [(f"end-to-end {p} at the logged rate", *at_logged_rate(f"e2e_{p}_s")) for p in ("p50", "p95")]
    rows += [("prefill GPU time, whole log", secs(off["prefill_s"]), secs(on["prefill_s"]),
              _times(off["prefill_s"], on["prefill_s"])),
             ("hit rate, whole log", pct(off["hit_rate"]), pct(on["hit_rate"]), ""),
             ("highest sustained request rate (all waiting)", _rate(sat["off"]["throughput_rps"]),
              _rate(sat["on"]["throughput_rps"]),
              f"{t['saturated_throughput_gain']:.2f}x" if t.get("saturated_throughput_gain") else "—"),
             ("TTFT p95 at that load", secs(sat["off"]["ttft_p95_s"]), secs(sat["on"]["ttft_p95_s"]),
              _times(sat["off"]["ttft_p95_s"], sat["on"]["ttft_p95_s"]))]
    caption = (f"Predicted by concurrent mode at block size {t['block_size']}, {num(t['num_blocks'])} blocks, "
               f"{t.get('scheduling')} scheduling; each step priced by the {clock_text(t['clock'])}. "
               "Caching off is the same engine with no cache read.")
    if "off" in over and "on" not in over:
        verdict = (f"At the logged rate the engine without caching is overloaded (median TTFT "
                   f"{secs(off['ttft_p50_s'])} and growing with the log), with caching it is {secs(on['ttft_p50_s'])}.")
    else:
        verdict = (f"At the logged rate caching cuts median TTFT from {secs(off['ttft_p50_s'])} to "
                   f"{secs(on['ttft_p50_s'])}.")
    if t.get("saturated_throughput_gain"):
        verdict += (f" At full load the engine completes {_rate(sat['on']['throughput_rps'])} with caching and "
                    f"{_rate(sat['off']['throughput_rps'])} without ({t['saturated_throughput_gain']:.2f}x): at the "
                    f"same peak load, caching saves {t['replicas_saved_share']:.0%} of the replicas.")
    if over & {"off", "on"}:
        which = {"off": "without caching", "on": "with caching"}
        verdict += (f" The log arrives at {_rate(t['arrival_rps'])}, more than this engine sustains "
                    f"{' or '.join(which[k] for k in ('off', 'on') if k in over)}: at the logged rate its queue "
                    "grows for the whole "
                    "log, so those TTFT figures measure the log's length more than the engine. Compare the "
                    "sustained rates"
                    + (", or give --model and --gpu for a roofline clock." if (t.get("clock") or {}).get("kind")
                       != "roofline" else "; at this rate the log needs more replicas."))
    measured = measured_time_text(data)
    if measured:
        verdict += " " + measured
    return caption, rows, verdict


OVERLAP_HEADER = ("the same requests", "hit rate", "TTFT p50", "TTFT p95", "highest sustained rate")
_OVERLAP = (("on", "as logged, caching on"), ("off", "as logged, caching off"),
            ("sharing_removed", "sharing removed (each request its own cache salt)"),
            ("breakers_fixed", "cache breakers fixed (analyze's findings applied)"))


def overlap_rows(data: ReportData) -> tuple[list[tuple[str, ...]], str | None] | None:
    """High vs low overlap on the user's own log (recommendation.json's `time`): one row per
    variant predicted, and why the breakers-fixed one is missing when it is."""
    t = (data.recommendation or {}).get("time")
    if not t:
        return None
    lr, sat = t["logged_rate"], t["saturated"]
    over = t.get("overloaded") or {}
    mark = lambda k: " (overloaded)" if over.get(k) else ""  # noqa: E731
    rows = [(label, pct(lr[k]["hit_rate"]), secs(lr[k]["ttft_p50_s"]) + mark(k),
             secs(lr[k]["ttft_p95_s"]) + mark(k), _rate(sat[k]["throughput_rps"]))
            for k, label in _OVERLAP if k in lr and k in sat]
    fixed = t.get("breakers_fixed") or {}
    why = None if "breakers_fixed" in lr else (fixed.get("reason") or "analyze's findings were not available")
    return rows, why


def measured_time_text(data: ReportData) -> str | None:
    """One sentence per timed replay run (replay.json's `time`, `pc-advise replay --measure-time`):
    caching on vs off as measured through vLLM on the machine that ran it."""
    t = (data.replay or {}).get("time") or {}
    parts = []
    for run in t.get("runs") or []:
        r = (run.get("ratios") or {}).get("on_vs_off") or {}
        if r.get("ttft_p50") and r.get("requests_per_s"):
            parts.append(f"{run.get('mode')} ({run.get('arrivals') or 'one at a time'}): TTFT p50 x{r['ttft_p50']:.2f}, "
                         f"requests/s x{r['requests_per_s']:.2f}")
    if not parts:
        return None
    return (f"Measured through vLLM with caching on vs off on {t.get('device') or 'this machine'} ({t.get('model')}): "
            + "; ".join(parts) + " — the mechanism on that hardware, not the predicted GPU's times.")
