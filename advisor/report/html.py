"""report.html: one self-contained page (inline CSS and SVG, no script, no network).

Input: a `ReportData`. Output: the page as a string (`render`). Every string that is not a
constant of this module goes through `esc` (html.escape, quotes included); prompt text sits in
<pre> blocks, escaped. A Content-Security-Policy meta tag forbids scripts and remote loads, so
even a missed escape could not run code.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from advisor.report import facts as fx
from advisor.report import timefacts as tf
from advisor.report import plots
from advisor.report.clusters import group_facts, group_points
from advisor.report.layout import LAYOUT_HEADER, layout_facts
from advisor.report.model import ReportData
from advisor.report.offload import offload_facts, offload_series, offload_verdict
from advisor.report.replicas import replica_facts, replica_series

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
PROMPT_CLIP = 2000  # characters of prompt text shown per cell; the artifacts hold all of it

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#ffffff;--soft:#f8fafc;--accent:#2563eb;
--ok:#047857;--okbg:#ecfdf5;--warn:#92400e;--warnbg:#fffbeb;--bad:#b91c1c;--badbg:#fef2f2}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);
font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1080px;margin:0 auto;padding:28px 32px 48px;background:var(--bg);
border-left:1px solid var(--line);border-right:1px solid var(--line);min-height:100vh}
header h1{font-size:26px;margin:0 0 4px;letter-spacing:-.01em}
header .sub{color:var(--muted);font-size:13.5px;margin:0}
h2{font-size:19px;margin:36px 0 10px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:15.5px;margin:22px 0 8px}
p{margin:8px 0}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px;margin:18px 0 8px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:var(--bg)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .value{font-size:19px;font-weight:650;margin:2px 0 4px;font-variant-numeric:tabular-nums}
.card .detail{font-size:12.5px;color:var(--muted)}
.card.ok{border-color:#a7f3d0;background:var(--okbg)} .card.ok .value{color:var(--ok)}
.card.warn{border-color:#fde68a;background:var(--warnbg)} .card.warn .value{color:var(--warn)}
.card.bad{border-color:#fecaca;background:var(--badbg)} .card.bad .value{color:var(--bad)}
.note{border-left:4px solid var(--line);background:var(--soft);padding:8px 12px;margin:10px 0;
color:#374151;font-size:14px}
.note.warn{border-color:#f59e0b;background:var(--warnbg)} .note.bad{border-color:#ef4444;background:var(--badbg)}
.note.ok{border-color:#10b981;background:var(--okbg)}
.missing{border:1px dashed #d1d5db;border-radius:6px;padding:10px 12px;color:var(--muted);font-size:14px}
pre,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:13px}
pre{background:#0f172a;color:#e2e8f0;padding:12px 14px;border-radius:6px;overflow:auto;white-space:pre-wrap;
word-break:break-word;margin:8px 0}
pre.prompt{background:var(--soft);color:var(--fg);border:1px solid var(--line);max-height:14em;margin:4px 0}
table{border-collapse:collapse;width:100%;margin:8px 0 4px;font-size:13.5px}
th,td{text-align:left;padding:6px 9px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--soft);font-weight:600;color:#374151}
.scroll{overflow-x:auto} table.compact{width:auto;min-width:40%}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.pick td{background:#eff6ff;font-weight:600}
figure{margin:14px 0 6px}
figure svg{width:100%;height:auto;display:block}
mark{background:#fde68a;color:inherit;padding:0 1px;border-radius:2px}
details{margin:6px 0} summary{cursor:pointer;color:var(--accent);font-size:14px;margin:4px 0}
figcaption{font-size:13px;color:var(--muted);margin-top:4px}
ul{margin:6px 0;padding-left:22px}
.detail{font-size:12px;color:var(--muted)} .muted{color:var(--muted)}
footer{margin-top:40px;padding-top:12px;border-top:1px solid var(--line);color:var(--muted);font-size:12.5px}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = (),
           pick: int | None = None, compact: bool = False) -> str:
    nums = set(numeric)
    head = "".join(f'<th{" class=n" if i in nums else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cells = "".join(f'<td{" class=n" if i in nums else ""}>{esc(c)}</td>' for i, c in enumerate(row))
        body.append(f'<tr{" class=pick" if k == pick else ""}>{cells}</tr>')
    cls = ' class="compact"' if compact else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _prose(text: Any) -> str:
    """Our own sentences: `backticked` names as <code>, everything escaped."""
    parts = ("" if text is None else str(text)).split("`")
    if len(parts) % 2 == 0:
        return esc(text)
    return "".join(f"<code>{esc(p)}</code>" if k % 2 else esc(p) for k, p in enumerate(parts))


def _prompt(text: Any) -> str:
    if text is None:
        return '<span class="muted">—</span>'
    s = str(text)
    more = len(s) - PROMPT_CLIP
    clipped = s[:PROMPT_CLIP] + (f"\n… ({more:,} more characters)" if more > 0 else "")
    return f'<pre class="prompt">{esc(clipped)}</pre>'


def _diverge(example: Mapping[str, Any], side: str) -> str:
    """One side of a breaker example: its context with the differing text marked."""
    text, context = example.get(f"{side}_text"), example.get(f"{side}_context")
    if not context:
        return _prompt(text)
    context = str(context)[:PROMPT_CLIP]
    at = context.find(str(text)) if text else -1
    if at < 0:
        return _prompt(context)
    end = at + len(str(text))
    return (f'<pre class="prompt">{esc(context[:at])}<mark>{esc(context[at:end])}</mark>'
            f"{esc(context[end:])}</pre>")


FOLD_ROWS = 12  # longer tables start folded (<details>, no script needed)


def _foldable(label: str, body: str, rows: int) -> str:
    if rows <= FOLD_ROWS:
        return body
    return f"<details><summary>Show {esc(label)}</summary>{body}</details>"


def _figure(svg: str | None, caption: str, missing: str) -> str:
    if svg is None:
        return f'<div class="missing">{esc(missing)}</div>'
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


def _missing(data: ReportData, *artifacts: str) -> str:
    note = fx.missing_note(data, *artifacts)
    if not note:
        return ""
    text, cmds = note
    return f'<div class="missing">{esc(text)}<pre>{esc(chr(10).join(cmds))}</pre></div>'


# --- sections --------------------------------------------------------------------------
def _summary(data: ReportData) -> str:
    cards = []
    rs = fx.replay_status(data)
    for f in fx.summary(data):
        level = rs.level if f.label == "Replay" else ""
        detail = _prose(f.detail) if f.prose else esc(f.detail)
        cards.append(f'<div class="card {level}"><div class="label">{esc(f.label)}</div>'
                     f'<div class="value">{esc(f.value)}</div><div class="detail">{detail}</div></div>')
    out = [f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>']
    rec = data.recommendation
    if rec is None:
        out.append(_missing(data, "recommendation.json") or '<div class="missing">No recommendation.</div>')
    else:
        if rec.get("vllm_serve"):
            out.append(f"<h3>{esc(fx.serve_heading(rec))}</h3><pre>{esc(rec['vllm_serve'])}</pre>")
    out.append(f'<p class="note">{esc(fx.tokenizer_note(data))}</p>')
    if data.redacted:
        out.append('<p class="note">Redacted: prompt text is replaced by its length and a short '
                   "SHA-256 prefix; numbers are unchanged.</p>")
    out.append("</section>")
    return "".join(out)


def _recommendation(data: ReportData) -> str:
    rec = data.recommendation
    out = ['<section id="recommendation"><h2>Recommendation</h2>']
    if rec is None:
        out.append(_missing(data, "recommendation.json"))
        return "".join(out) + "</section>"
    if rec.get("reasoning"):
        out.append("<h3>Why</h3><ul>" + "".join(f"<li>{_prose(r)}</li>" for r in rec["reasoning"]) + "</ul>")
    runner = rec.get("runner_up")
    out.append("<h3>Recommended" + (" vs runner-up" if runner else "") + "</h3>")
    header = ("", "recommended", "runner-up") if runner else ("", "recommended")
    rows = [r if runner else r[:2] for r in fx.config_rows(rec)]
    out.append(_table(header, rows, numeric=(1, 2), compact=True))
    if runner:
        out.append(f'<p><b>Why the runner-up lost:</b> {esc(runner.get("why_lost"))}</p>')
    if offload_verdict(rec):
        out.append(f'<div class="note">{esc(offload_verdict(rec))}</div>')
    if rec.get("constraints"):
        out.append("<h3>Constraints respected</h3><ul>"
                   + "".join(f"<li>{_prose(c)}</li>" for c in rec["constraints"]) + "</ul>")
    fixes = rec.get("prompt_fixes") or []
    if fixes:
        out.append(f"<h3>{esc(fx.fixes_heading(fixes))}</h3>")
        out.append(_table(("cache breaker", "hit rate gain", "what to change"),
                          [(f.get("breaker"), fx.points(f.get("hit_rate_gain")), f.get("description")) for f in fixes],
                          numeric=(1,)))
    cands = fx.candidate_rows(data)
    ncand = len(rec.get("candidates") or [])
    if cands:
        out.append(f"<h3>Candidates, ranked by prefill saved per GiB (first {len(cands)} of {ncand})</h3>")
        out.append(_foldable(f"{len(cands)} candidates", _table(fx.CANDIDATE_HEADER, cands, numeric=range(1, 7)),
                             len(cands)))
    if rec.get("cost_model"):
        cm = fx.cost_model_text(rec)
        out.append(f'<p class="note">Cost model: {esc(cm)}</p>')
    return "".join(out) + "</section>"


def _layout(data: ReportData) -> str:
    facts = layout_facts(data)
    if facts is None:
        return ""
    return ('<section id="kv-layout"><h2>KV cache layout</h2>' + f"<p>{esc(facts.sentence)}</p>"
            + _table(LAYOUT_HEADER, facts.rows, numeric=(2, 3, 4, 5)) + f'<p class="note">{esc(facts.simulated)}</p>'
            + "</section>")


def _time(data: ReportData) -> str:
    facts = tf.time_facts(data)
    if facts is None:
        return ""
    caption, rows, verdict = facts
    return ('<section id="time"><h2>What caching buys in time</h2>' + f"<p><strong>{esc(verdict)}</strong></p>"
            + _figure(plots.ttft_curve(data), "Predicted TTFT (p50 and p95, concurrent mode at the logged rate) at "
                      "the recommended block size as the KV cache grows; the dotted lines are caching off.",
                      "No concurrent rows with times to plot.")
            + f"<p>{esc(caption)}</p>" + _table(tf.TIME_HEADER, rows, numeric=(1, 2, 3)) + _overlap(data)
            + "</section>")


def _overlap(data: ReportData) -> str:
    overlap = tf.overlap_rows(data)
    if not overlap:
        return ""
    rows, why = overlap
    return ("<h3>High vs low overlap, on this log</h3>" + _table(tf.OVERLAP_HEADER, rows, numeric=(1, 2, 3, 4))
            + (f"<p>Breakers fixed: not predicted ({esc(why)}).</p>" if why else ""))


def _replicas(data: ReportData) -> str:
    facts = replica_facts(data)
    if facts is None:
        return ""
    out = ['<section id="replicas"><h2>Replicas and routers</h2>']
    d = facts.deployment
    if d is not None:
        out.append(f"<h3>Recommended deployment</h3><p><strong>{esc(d.headline)}</strong></p>")
        if d.serve:
            out.append(f"<pre>{esc(d.serve)}</pre>")
        out.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in d.lines) + "</ul>")
    series = replica_series(data)
    out.append(_figure(plots.replica_chart(data), series.caption if series else "", "No replica rows to plot."))
    out.append(f"<h3>Hit rate by router and replica count</h3><p><strong>{esc(facts.verdict)}</strong></p>"
               f"<p>{esc(facts.caption)}</p>" + _table(facts.header, facts.rows, numeric=range(1, len(facts.header))))
    if facts.price_rows:
        out.append(f"<h3>The load-balance price</h3><p>{esc(facts.price_caption)}</p>"
                   + _table(facts.price_header, facts.price_rows, numeric=(0, 2, 3, 4, 5, 6, 7), pick=facts.price_pick))
    return "".join(out) + "</section>"


def _offload(data: ReportData) -> str:
    facts = offload_facts(data)
    if facts is None:
        return ""
    series = offload_series(data)
    out = ['<section id="offload"><h2>CPU offload tier</h2>', f"<p><strong>{esc(facts.verdict)}</strong></p>",
           _figure(plots.offload_chart(data), series.caption if series else "", "No offload rows to plot."),
           f"<p>{esc(facts.caption)}</p>", _table(facts.header, facts.rows, numeric=range(1, len(facts.header))),
           f"<p>{esc(facts.inclusive)}</p>"]
    return "".join(out) + "</section>"


def _sweep(data: ReportData) -> str:
    out = ['<section id="sweep"><h2>Hit rate vs KV memory</h2>']
    if not data.sim:
        return "".join(out) + _missing(data, "sim.parquet") + "</section>"
    out.append(_figure(
        plots.hit_rate_curve(data),
        "Predicted prefix-cache hit rate (token-weighted, vLLM rules) for each block size as the KV "
        "cache grows (in GiB when the model is known, else in cached tokens = blocks x block size, which "
        "is proportional to memory); dashed lines are each block size's ceiling with an infinite cache; "
        "the star is the recommended configuration.",
        "No finite-memory rows in sim.parquet to plot.",
    ))
    caption, rows = fx.sweep_rows(data)
    out.append(f"<h3>The sweep</h3><p>{esc(caption)}</p>")
    out.append(_foldable(f"all {len(rows)} configurations of the plot", _table(fx.SWEEP_HEADER, rows, numeric=range(1, 8)),
                         len(rows)))
    pc = fx.policy_comparison(data)
    if pc:
        out.append("<h3>How far vLLM's eviction is from the best possible</h3>")
        out.append(f"<p>Block size {pc.block_size}, sequential mode, {esc(fx.window_text(pc.window))}. "
                   f"{esc(pc.verdict)}</p>")
        out.append(_table(pc.header, pc.rows, numeric=range(0, len(pc.header))))
    return "".join(out) + "</section>"


def _prompts(data: ReportData) -> str:
    out = ['<section id="prefixes"><h2>Shared prefixes and cache breakers</h2>']
    st = data.stats
    if st is None:
        return "".join(out) + _missing(data, "stats.json") + "</section>"
    out.append(_figure(
        plots.prefix_histogram(data),
        f"How many requests share how long a prefix with some earlier request (token granularity, "
        f"any cache size). {fx.num(st.get('requests'))} requests.",
        "No shared-prefix histogram in stats.json.",
    ))
    reuse = fx.reuse_sources_text(st)
    if reuse:
        out.append(f"<p>{_prose(reuse)}</p>")
    by_model = st.get("by_model") or {}
    if len(by_model) > 1:
        out.append("<h3>By model</h3>" + _table(
            ("model", "requests", "prompt tokens", "token ceiling"),
            [(m, fx.num(v.get("requests")), fx.num(v.get("prompt_tokens")), fx.pct(v.get("ceiling_rate")))
             for m, v in by_model.items()], numeric=(1, 2, 3))
                   + f"<p>{esc(fx.MULTI_MODEL_NOTE)}</p><pre>{esc(fx.MULTI_MODEL_SPLIT)}</pre>")
    tops = st.get("top_prefixes") or []
    out.append("<h3>Top shared prefixes</h3>")
    if not tops:
        out.append('<div class="missing">No shared prefixes found.</div>')
    else:
        rows = []
        for p in tops:
            rows.append(
                f'<tr><td class=n>{esc(p.get("rank"))}</td><td class=n>{esc(fx.num(p.get("tokens")))}</td>'
                f'<td class=n>{esc(fx.num(p.get("requests")))}</td><td class=n>{esc(fx.num(p.get("saved_tokens")))}</td>'
                f'<td>{_prompt(p.get("text_first"))}<div class="detail">…ends with</div>{_prompt(p.get("text_last"))}</td></tr>'
            )
        out.append("<table><thead><tr><th class=n>#</th><th class=n>tokens</th><th class=n>requests</th>"
                   "<th class=n>tokens saved</th><th>prefix text (start … end)</th></tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table>")
    breakers = st.get("breakers") or []
    out.append("<h3>Cache breakers</h3>")
    if st.get("breakers_note"):
        out.append(f'<p class="note">{esc(st["breakers_note"])}</p>')
    if not breakers and not st.get("breakers_note"):
        out.append("<p>No cache breakers found: near-identical prompts do not diverge early.</p>")
    for b in breakers:
        out.append(
            f'<div class="note warn"><b>{esc(b.get("label"))}</b> at token {esc(fx.num(b.get("position_token")))} '
            f'(block {esc(fx.num(b.get("position_block")))}): {esc(fx.num(b.get("requests_affected")))} requests, '
            f'{esc(fx.num(b.get("tokens_lost")))} tokens lost ({esc(fx.share(b.get("rate_lost")))} of all prompt tokens). '
            f'{esc(b.get("description"))}</div>'
        )
        ex = b.get("examples") or []
        if ex:
            rows = [f'<tr><td>{esc(e.get("a_request_id"))}<br>{esc(e.get("b_request_id"))}</td>'
                    f'<td>{_diverge(e, "a")}{_diverge(e, "b")}</td></tr>' for e in ex]
            out.append("<table><thead><tr><th>requests</th><th>where they diverge</th></tr></thead><tbody>"
                       + "".join(rows) + "</tbody></table>")
    return "".join(out) + "</section>"


def _timeline(data: ReportData) -> str:
    out = ['<section id="timeline"><h2>Requests over time</h2>']
    if not data.timeline:
        return "".join(out) + (_missing(data, "requests.parquet", "sim_requests.parquet", "prefixes.parquet")
                               or '<div class="missing">No per-request data.</div>') + "</section>"
    total = sum(p.n_tokens for p in data.timeline)
    hit = sum(p.hit_tokens for p in data.timeline)
    out.append(_figure(
        plots.timeline(data),
        f"Prompt tokens per time bin, split into {data.timeline_source} and tokens computed. "
        f"Overall {fx.pct(hit / total if total else None)} of {fx.num(total)} tokens."
        + ("" if data.timeline_has_time else " The log has no timestamps: x is the request's position."),
        "",
    ))
    return "".join(out) + "</section>"


def _clusters(data: ReportData) -> str:
    out = ['<section id="clusters"><h2>How the reuse is structured</h2>']
    g = group_facts(data)
    if g is None:
        return "".join(out) + (_missing(data, "clusters.parquet") or '<div class="missing">No requests.</div>') + "</section>"
    out.append(f"<p>{esc(g.headline)}</p>")
    if g.note:
        out.append(f'<div class="note warn">{esc(g.note)}</div>')
    if g.tree:
        out.append("<h3>Groups by shared prefix (top levels)</h3><pre>" + esc("\n".join(g.tree)) + "</pre>")
    points = group_points(data)
    out.append(_figure(plots.groups_chart(data), points.caption if points else "", ""))
    out.append(_table(g.header, g.rows, numeric=range(2, 8)))
    out.append(f"<p class=sub>{esc(g.caption)}</p>")
    for name, start, end in g.texts:
        out.append(f"<h3>Group {esc(name)}: its own prefix</h3>{_prompt(start)}"
                   + (f"<p class=sub>…</p>{_prompt(end)}" if end else ""))
    return "".join(out) + "</section>"


def _replay(data: ReportData) -> str:
    rs = fx.replay_status(data)
    out = ['<section id="replay"><h2>Replay through vLLM</h2>',
           f'<div class="note {rs.level}"><b>{esc(rs.headline)}.</b> {_prose(rs.detail)}</div>']
    if rs.commands:
        out.append(f"<pre>{esc(chr(10).join(rs.commands))}</pre>")
    rp = data.replay
    if not rp or not rp.get("configs"):
        return "".join(out) + "</section>"
    out.append(f"<p>Engine: {esc(rp.get('engine'))}, vLLM {esc(rp.get('vllm_version'))}; weights: "
               f"{esc(rp.get('model'))}"
               + ("; synthetic token ids (hash trace)" if rp.get("synthetic_tokens") else "") + ".</p>")
    out.append(_table(fx.REPLAY_HEADER, fx.replay_rows(rp), numeric=range(2, 9)))
    if rp.get("notes"):
        out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in rp["notes"]) + "</ul>")
    for c in rp["configs"]:
        mm = c.get("mismatches") or []
        if mm:
            out.append(f"<h3>Mismatched requests (block size {esc(c.get('block_size'))}, "
                       f"{esc(fx.num(c.get('num_blocks')))} blocks, {esc(c.get('mode'))})</h3>")
            out.append(_table(("request id", "predicted hit tokens", "measured hit tokens"),
                              [(m.get("request_id"), fx.num(m.get("predicted")), fx.num(m.get("measured")))
                               for m in mm], numeric=(1, 2)))
    return "".join(out) + "</section>"


def _inputs(data: ReportData) -> str:
    out = ['<section id="input"><h2>Input and run</h2>']
    ing = data.ingest
    if ing is None:
        out.append(_missing(data, "manifest.json") or '<div class="missing">No ingest counts.</div>')
    else:
        out.append(_table(("lines read", "accepted", "rejected"),
                          [(fx.num(ing.get("lines_read")), fx.num(ing.get("accepted")), fx.num(ing.get("rejected")))],
                          numeric=(0, 1, 2), compact=True))
        kinds = ing.get("by_kind") or {}
        if kinds:
            out.append("<p>Accepted by kind: " + esc(", ".join(f"{k} {fx.num(v)}" for k, v in kinds.items())) + ".</p>")
        out += [f"<p>{esc(line)}</p>" for line in fx.input_formats(ing)]
    if data.rejects:
        out.append("<h3>First rejected lines</h3>")
        out.append(_table(("line", "reason"), [(fx.num(a), b) for a, b in data.rejects], numeric=(0,)))
    if data.stage_times:
        out.append("<h3>Stage wall times</h3>")
        out.append(_table(("stage", "wall time"), [(s, fx.secs(t)) for s, t in data.stage_times], numeric=(1,),
                          compact=True))
        if note := fx.overlap_note(data.stages_overlapped):
            out.append(f"<p>{esc(note)}</p>")
    return "".join(out) + "</section>"


def render(data: ReportData) -> str:
    """The whole report page."""
    name = data.run_dir.rstrip("/").split("/")[-1] or data.run_dir
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Prefix-cache report: {esc(name)}</title><style>{CSS}</style></head><body><main>",
        f'<header><h1>Prefix-cache report: {esc(name)}</h1><p class="sub">Run folder {esc(data.run_dir)}'
        + (f" · input: {esc(data.input_kind)}" if data.input_kind else "") + "</p></header>",
        _summary(data), _recommendation(data), _layout(data), _time(data), _sweep(data), _offload(data), _replicas(data), _prompts(data), _timeline(data),
        _clusters(data), _replay(data), _inputs(data),
        f"<footer>Written by pc-advise {esc(data.tool_version)}. Hit rate = prefix-cache hit tokens / prompt "
        "tokens (vLLM's prefix_cache_hits / prefix_cache_queries). Block ceiling: the hit rate with an infinite "
        "cache at that block size; token ceiling: tokens shared with any earlier request at token granularity. "
        "This page runs no scripts and loads nothing from the network.</footer>",
        "</main></body></html>\n",
    ]
    return "\n".join(parts)
