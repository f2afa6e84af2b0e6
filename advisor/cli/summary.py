"""The short table `pc-advise run` prints last: the answer, before the report is opened.

Reads the run folder's JSON artifacts (manifest, stats, recommendation, replay);
a stage that did not run is shown as such, never as a number.
"""

from __future__ import annotations

from typing import Any

import advisor.runfolder as rf
from advisor.runfolder import RunDir


def _json(run: RunDir, name: str) -> Any:
    p = run.path(name)
    if not p.exists():
        return None
    try:
        return run.read_json(name)
    except ValueError:
        return None


def summary_rows(run: RunDir) -> list[tuple[str, str]]:
    """(label, value) pairs, in reading order."""
    rows: list[tuple[str, str]] = []
    stages = run.manifest().get("stages", {})
    ing = stages.get("ingest", {}).get("counts")
    if ing:
        rows.append(("log lines", f"read {ing['lines_read']:,}, accepted {ing['accepted']:,}, "
                                  f"rejected {ing['rejected']:,}"))
    tok = stages.get("tokenize", {}).get("counts")
    if tok:
        rows.append(("prompt tokens", f"{tok['tokens']:,} ({tok['tokenizer'] or 'as logged: no tokenizer'})"))
    stats = _json(run, rf.STATS)
    if stats:
        rows.append(("token ceiling", f"{stats['ceiling_rate']:.1%} of prompt tokens share a "
                                      "prefix with an earlier request"))
        breakers = stats.get("breakers") or []
        if breakers:
            top = max(breakers, key=lambda b: b.get("rate_lost") or 0)
            rows.append(("top cache breaker", f"{top['label']} at token {top['position_token']}, "
                                              f"costs {top['rate_lost']:.1%} of prompt tokens"))
    rec = _json(run, rf.RECOMMENDATION)
    if rec:
        best = rec["recommended"]
        mem = (f"{best['kv_gib']:.2f} GiB KV" if best.get("kv_gib") is not None
               else f"{best['num_blocks']:,} blocks")
        bs = "block size fixed by the trace" if rec.get("input_kind") == "hash_trace" else f"--block-size {best['block_size']}"
        rows.append(("recommended", f"{bs}, {mem}"))
        rows.append(("predicted hit rate", f"{best['hit_rate']:.1%} (block ceiling "
                                           f"{best['ceiling_hit_rate']:.1%}; {best.get('mode', '?')}, "
                                           f"{best.get('window', '?')} window)"))
        rows.append(("prefill saved", f"{best['prefill_tokens_saved']:,} of {best['queries']:,} tokens"))
        rows.extend(_time_rows(rec.get("time")))
        rows.append(("run vLLM with", rec["vllm_serve"]))
    else:
        rows.append(("recommended", "no recommendation (simulate/recommend did not run)"))
    rep = _json(run, rf.REPLAY)
    if rep:
        rows.append(("replay", _replay_line(rep)))
    else:
        rows.append(("replay", "not run: the prediction is unconfirmed"))
    if run.path(rf.REPORT_HTML).exists():
        rows.append(("report", f"{run.path(rf.REPORT_HTML)} ({rf.REPORT_MD} beside it)"))
    return rows


def _ms(x: float | None) -> str:
    return "?" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s")


def _time_rows(t: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What caching buys in time (predicted), off -> on, and after the breaker fixes."""
    if not t:
        return []
    lr, sat = t["logged_rate"], t["saturated"]

    def line(k: str) -> str:
        overloaded = (t.get("overloaded") or {}).get(k)
        return (f"TTFT p50 {_ms(lr[k]['ttft_p50_s'])}, p95 {_ms(lr[k]['ttft_p95_s'])}; sustains "
                f"{sat[k]['throughput_rps']:.2f} req/s"
                + (f", below the log's {t['arrival_rps']:.2f} req/s: overloaded, its queue and TTFT grow with "
                   "the log" if overloaded else ""))

    clock = t.get("clock") or {}
    how = (f" (predicted: roofline of {clock.get('model')} on {clock.get('gpu')})" if clock.get("kind") == "roofline"
           else " (predicted on flat rates; --model and --gpu give a roofline)")
    rows = [("caching off", line("off") + how), ("caching on", line("on") + how)]
    if "breakers_fixed" in lr:
        rows.append(("breakers fixed", line("breakers_fixed") + f", hit rate {lr['breakers_fixed']['hit_rate']:.1%}"
                     + how))
    return rows


def _replay_line(rep: dict[str, Any]) -> str:
    parts = []
    for c in rep.get("configs", []):
        where = f"B={c['block_size']} x {c['num_blocks']:,} blocks, {c['mode']}"
        if c.get("measured_hit_rate") is None:
            parts.append(f"{where}: {c['status'].replace('_', ' ')}")
            continue
        stand_in = " (stand-in)" if c.get("stand_in_for") else ""
        parts.append(f"{where}{stand_in}: predicted {c['predicted_hit_rate']:.2%}, measured "
                     f"{c['measured_hit_rate']:.2%}, {c['status'].replace('_', ' ')}")
    head = rep["status"].replace("_", " ")
    if not parts:
        return head + (f": {rep['reason']}" if rep.get("reason") else "")
    return head + " -- " + "; ".join(parts)


def render_table(rows: list[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)
