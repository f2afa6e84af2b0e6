"""report.md: the same numbers as report.html, as GitHub-flavoured Markdown.

Input: a `ReportData`. Output: the document as a string (`render`). No raw HTML comes from
the data: every dynamic string in running text or a table cell goes through `md_text`
(HTML-special characters as entities, Markdown control characters backslash-escaped, line
breaks flattened), and prompt text only ever appears inside fenced code blocks whose fence is
longer than any backtick run in the text. Figures live in report.html; their numbers are here
as tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from advisor.report import facts as fx
from advisor.report import timefacts as tf
from advisor.report.clusters import group_facts
from advisor.report.layout import LAYOUT_HEADER, layout_facts
from advisor.report.model import ReportData
from advisor.report.offload import offload_facts, offload_verdict
from advisor.report.replicas import replica_facts

PROMPT_CLIP = 2000

_MD_SPECIAL = re.compile(r"([\\`*_\[\]~#])")


def md_text(x: Any) -> str:
    """A string made inert for a Markdown paragraph or table cell."""
    s = "" if x is None else str(x)
    s = _MD_SPECIAL.sub(r"\\\1", s)  # first: the entities below contain '#'
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return " ".join(s.split())  # newlines and tabs would end a table row or start a block


def md_code(x: Any) -> str:
    """An inline code span (for names and paths in prose, not table cells): its content shows
    as written, and no backtick run in it can close the span early."""
    s = " ".join(("" if x is None else str(x)).split())
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    tick = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{tick}{pad}{s}{pad}{tick}"


def md_prose(x: Any) -> str:
    """Our own sentences (recommend's reasons, constraints): `backticked` names become code
    spans, the rest is made inert like md_text. An unpaired backtick stays plain text."""
    parts = ("" if x is None else str(x)).split("`")
    if len(parts) % 2 == 0:  # unpaired: no code spans
        return md_text(x)
    return "".join(md_code(p) if k % 2 else _spaced(p) for k, p in enumerate(parts))


def _spaced(p: str) -> str:
    """md_text, keeping one space where the text began or ended with whitespace."""
    core = md_text(p)
    if not core:
        return " " if p else ""
    return (" " if p[:1].isspace() else "") + core + (" " if p[-1:].isspace() else "")


def fenced(text: Any) -> str:
    """A fenced code block that no content can close early."""
    s = "" if text is None else str(text)
    more = len(s) - PROMPT_CLIP
    s = s[:PROMPT_CLIP] + (f"\n… ({more:,} more characters)" if more > 0 else "")
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{s}\n{fence}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    nums = set(numeric)
    head = "| " + " | ".join(md_text(h) or " " for h in header) + " |"
    align = "|" + "|".join("---:" if i in nums else "---" for i in range(len(header))) + "|"
    body = ["| " + " | ".join(md_text(c) for c in row) + " |" for row in rows]
    return "\n".join([head, align, *body])


def _missing(data: ReportData, *artifacts: str) -> str:
    note = fx.missing_note(data, *artifacts)
    if not note:
        return ""
    text, cmds = note
    return f"> {md_text(text)}\n\n" + _shell(cmds)


def _shell(cmds: Sequence[str]) -> str:
    return fenced("\n".join(cmds)).replace("text\n", "sh\n", 1)


def _summary(data: ReportData) -> list[str]:
    out = ["## Summary", ""]
    for f in fx.summary(data):
        detail = (md_prose(f.detail) if f.prose else md_text(f.detail)) if f.detail else ""
        out.append(f"- **{md_text(f.label)}:** {md_text(f.value)}" + (f" — {detail}" if detail else ""))
    out.append("")
    rec = data.recommendation
    if rec is None:
        out += [_missing(data, "recommendation.json") or "> No recommendation.", ""]
    else:
        if rec.get("vllm_serve"):
            out += [f"{md_text(fx.serve_heading(rec))}:", "", _shell([rec["vllm_serve"]]), ""]
    out += [md_text(fx.tokenizer_note(data)), ""]
    if data.redacted:
        out += ["Redacted: prompt text is replaced by its length and a short SHA-256 prefix; numbers are "
                "unchanged.", ""]
    return out


def _recommendation(data: ReportData) -> list[str]:
    out = ["## Recommendation", ""]
    rec = data.recommendation
    if rec is None:
        return out + [_missing(data, "recommendation.json"), ""]
    if rec.get("reasoning"):
        out += ["### Why", "", *[f"- {md_prose(r)}" for r in rec["reasoning"]], ""]
    runner = rec.get("runner_up")
    out += ["### Recommended" + (" vs runner-up" if runner else ""), ""]
    header = (" ", "recommended", "runner-up") if runner else (" ", "recommended")
    out += [table(header, [r if runner else r[:2] for r in fx.config_rows(rec)], numeric=(1, 2)), ""]
    if runner:
        out += [f"**Why the runner-up lost:** {md_text(runner.get('why_lost'))}", ""]
    if offload_verdict(rec):
        out += [md_text(offload_verdict(rec)), ""]
    if rec.get("constraints"):
        out += ["### Constraints respected", "", *[f"- {md_prose(c)}" for c in rec["constraints"]], ""]
    fixes = rec.get("prompt_fixes") or []
    if fixes:
        out += [f"### {fx.fixes_heading(fixes)}", "",
                table(("cache breaker", "hit rate gain", "what to change"),
                      [(f.get("breaker"), fx.points(f.get("hit_rate_gain")), f.get("description")) for f in fixes],
                      numeric=(1,)), ""]
    cands = fx.candidate_rows(data)
    ncand = len(rec.get("candidates") or [])
    if cands:
        out += [f"### Candidates, ranked by prefill saved per GiB (first {len(cands)} of {ncand})", "",
                table(fx.CANDIDATE_HEADER, cands, numeric=range(1, 7)), ""]
    if rec.get("cost_model"):
        out += ["Cost model: " + ", ".join(md_code(f"{k} = {'none' if v is None else v}")
                                           for k, v in (rec.get("cost_model") or {}).items()), ""]
    return out


def _layout(data: ReportData) -> list[str]:
    facts = layout_facts(data)
    if facts is None:
        return []
    return ["## KV cache layout", "", md_text(facts.sentence), "", table(LAYOUT_HEADER, facts.rows, numeric=(2, 3, 4, 5)),
            "", md_text(facts.simulated), ""]


def _time(data: ReportData) -> list[str]:
    facts = tf.time_facts(data)
    if facts is None:
        return []
    caption, rows, verdict = facts
    out = ["## What caching buys in time", "", md_text(verdict), "", md_text(caption), "",
           table(tf.TIME_HEADER, rows, numeric=(1, 2, 3)), ""]
    overlap = tf.overlap_rows(data)
    if overlap:
        rows, why = overlap
        out += ["### High vs low overlap, on this log", "", table(tf.OVERLAP_HEADER, rows, numeric=(1, 2, 3, 4)), ""]
        if why:
            out += [f"Breakers fixed: not predicted ({md_text(why)}).", ""]
    return out


def _replicas(data: ReportData) -> list[str]:
    facts = replica_facts(data)
    if facts is None:
        return []
    out = ["## Replicas and routers", ""]
    d = facts.deployment
    if d is not None:
        out += ["### Recommended deployment", "", f"**{md_text(d.headline)}**", ""]
        if d.serve:
            out += [_shell([d.serve]), ""]
        out += [f"- {md_text(line)}" for line in d.lines] + [""]
    out += ["### Hit rate by router and replica count", "", "The plot of hit rate against replicas is in report.html.",
            "", md_text(facts.verdict), "", md_text(facts.caption), "",
            table(facts.header, facts.rows, numeric=range(1, len(facts.header))), ""]
    if facts.price_rows:
        out += ["### The load-balance price", "", md_text(facts.price_caption), "",
                table(facts.price_header, facts.price_rows, numeric=(0, 2, 3, 4, 5, 6, 7)), ""]
    return out


def _offload(data: ReportData) -> list[str]:
    facts = offload_facts(data)
    if facts is None:
        return []
    return ["## CPU offload tier", "", f"**{md_text(facts.verdict)}**", "",
            "The plot of the tier's curves next to the GPU's is in report.html. " + md_text(facts.caption), "",
            table(facts.header, facts.rows, numeric=range(1, len(facts.header))), "", md_text(facts.inclusive), ""]


def _sweep(data: ReportData) -> list[str]:
    out = ["## Hit rate vs KV memory", ""]
    if not data.sim:
        return out + [_missing(data, "sim.parquet"), ""]
    caption, rows = fx.sweep_rows(data)
    out += ["The plot of this sweep is in report.html. " + md_text(caption), "",
            table(fx.SWEEP_HEADER, rows, numeric=range(1, 8)), ""]
    pc = fx.policy_comparison(data)
    if pc:
        out += ["### How far vLLM's eviction is from the best possible", "",
                md_text(f"Block size {pc.block_size}, sequential mode, {fx.window_text(pc.window)}. {pc.verdict}"), "",
                table(pc.header, pc.rows, numeric=range(0, len(pc.header))), ""]
    return out


def _prompts(data: ReportData) -> list[str]:
    out = ["## Shared prefixes and cache breakers", ""]
    st = data.stats
    if st is None:
        return out + [_missing(data, "stats.json"), ""]
    hist = st.get("shared_prefix_hist") or {}
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    if counts:
        rows = [(f"{fx.num(edges[i]) if i < len(edges) else '—'} – "
                 f"{fx.num(edges[i + 1]) if i + 1 < len(edges) else '…'}", fx.num(c)) for i, c in enumerate(counts)]
        out += ["Longest prefix each request shares with an earlier one (tokens):", "",
                table(("shared prefix (tokens)", "requests"), rows, numeric=(1,)), ""]
    reuse = fx.reuse_sources_text(st)
    if reuse:
        out += [md_prose(reuse), ""]
    by_model = st.get("by_model") or {}
    if len(by_model) > 1:
        out += ["### By model", "", table(
            ("model", "requests", "prompt tokens", "token ceiling"),
            [(m, fx.num(v.get("requests")), fx.num(v.get("prompt_tokens")), fx.pct(v.get("ceiling_rate")))
             for m, v in by_model.items()], numeric=(1, 2, 3)), "", md_text(fx.MULTI_MODEL_NOTE), "",
            _shell([fx.MULTI_MODEL_SPLIT]), ""]
    tops = st.get("top_prefixes") or []
    out += ["### Top shared prefixes", ""]
    if not tops:
        out += ["No shared prefixes found.", ""]
    else:
        out += [table(("#", "tokens", "requests", "tokens saved"),
                      [(p.get("rank"), fx.num(p.get("tokens")), fx.num(p.get("requests")), fx.num(p.get("saved_tokens")))
                       for p in tops], numeric=(0, 1, 2, 3)), ""]
        for p in tops:
            if p.get("text_first") is not None:
                out += [f"Prefix {md_text(p.get('rank'))}, start:", "", fenced(p.get("text_first")), ""]
            if p.get("text_last") is not None:
                out += [f"Prefix {md_text(p.get('rank'))}, end:", "", fenced(p.get("text_last")), ""]
    breakers = st.get("breakers") or []
    out += ["### Cache breakers", ""]
    if st.get("breakers_note"):
        out += [md_text(st["breakers_note"]), ""]
    if not breakers and not st.get("breakers_note"):
        out += ["No cache breakers found: near-identical prompts do not diverge early.", ""]
    if breakers:
        out += [table(("breaker", "at token", "at block", "requests", "tokens lost", "share lost", "description"),
                      [(b.get("label"), fx.num(b.get("position_token")), fx.num(b.get("position_block")),
                        fx.num(b.get("requests_affected")), fx.num(b.get("tokens_lost")), fx.share(b.get("rate_lost")),
                        b.get("description")) for b in breakers], numeric=range(1, 6)), ""]
        for b in breakers:
            for e in b.get("examples") or []:
                out += [f"Example of *{md_text(b.get('label'))}*: request {md_text(e.get('a_request_id'))} vs "
                        f"{md_text(e.get('b_request_id'))}", ""]
                for side in ("a", "b"):
                    text, context = e.get(f"{side}_text"), e.get(f"{side}_context")
                    if text is not None and context:
                        out += [f"Request {md_text(e.get(f'{side}_request_id'))} has {md_text(text)} here:", ""]
                    if context or text is not None:
                        out += [fenced(context or text), ""]
    return out


def _timeline(data: ReportData) -> list[str]:
    out = ["## Requests over time", ""]
    if not data.timeline:
        return out + [_missing(data, "requests.parquet", "sim_requests.parquet", "prefixes.parquet")
                      or "No per-request data.", ""]
    total = sum(p.n_tokens for p in data.timeline)
    hit = sum(p.hit_tokens for p in data.timeline)
    return out + [f"{fx.num(len(data.timeline))} requests, {fx.num(total)} prompt tokens; "
                  f"{md_text(data.timeline_source)}: {fx.num(hit)} tokens "
                  f"({fx.pct(hit / total if total else None)}). The plot over time is in report.html.", ""]


def _clusters(data: ReportData) -> list[str]:
    out = ["## How the reuse is structured", ""]
    g = group_facts(data)
    if g is None:
        return out + [_missing(data, "clusters.parquet") or "No requests.", ""]
    out += [md_text(g.headline), ""]
    if g.note:
        out += [f"> {md_text(g.note)}", ""]
    if g.tree:
        out += ["Groups by shared prefix (top levels):", "", fenced("\n".join(g.tree)), ""]
    out += [table(g.header, g.rows, numeric=range(2, 8)), "", md_text(g.caption), ""]
    for name, start, end in g.texts:
        out += [f"Group {md_text(name)}, start of its own prefix:", "", fenced(start), ""]
        if end:
            out += ["… and its end:", "", fenced(end), ""]
    return out


def _replay(data: ReportData) -> list[str]:
    rs = fx.replay_status(data)
    out = ["## Replay through vLLM", "", f"**{md_text(rs.headline)}.** {md_prose(rs.detail)}", ""]
    if rs.commands:
        out += [_shell(rs.commands), ""]
    rp = data.replay
    if not rp or not rp.get("configs"):
        return out
    out += [f"Engine: {md_text(rp.get('engine'))}, vLLM {md_text(rp.get('vllm_version'))}; weights: "
            f"{md_text(rp.get('model'))}" + ("; synthetic token ids (hash trace)" if rp.get("synthetic_tokens") else "")
            + ".", "", table(fx.REPLAY_HEADER, fx.replay_rows(rp), numeric=range(2, 9)), ""]
    out += [f"- {md_text(n)}" for n in rp.get("notes") or []] + ([""] if rp.get("notes") else [])
    for c in rp["configs"]:
        mm = c.get("mismatches") or []
        if mm:
            out += [f"### Mismatched requests (block size {md_text(c.get('block_size'))}, "
                    f"{fx.num(c.get('num_blocks'))} blocks, {md_text(c.get('mode'))})", "",
                    table(("request id", "predicted hit tokens", "measured hit tokens"),
                          [(m.get("request_id"), fx.num(m.get("predicted")), fx.num(m.get("measured"))) for m in mm],
                          numeric=(1, 2)), ""]
    return out


def _inputs(data: ReportData) -> list[str]:
    out = ["## Input and run", ""]
    ing = data.ingest
    if ing is None:
        out += [_missing(data, "manifest.json") or "No ingest counts.", ""]
    else:
        out += [table(("lines read", "accepted", "rejected"),
                      [(fx.num(ing.get("lines_read")), fx.num(ing.get("accepted")), fx.num(ing.get("rejected")))],
                      numeric=(0, 1, 2)), ""]
        kinds = ing.get("by_kind") or {}
        if kinds:
            out += ["Accepted by kind: " + md_text(", ".join(f"{k} {fx.num(v)}" for k, v in kinds.items())) + ".", ""]
        for line in fx.input_formats(ing):
            out += [md_text(line), ""]
    if data.rejects:
        out += ["### First rejected lines", "", table(("line", "reason"), [(fx.num(a), b) for a, b in data.rejects],
                                                      numeric=(0,)), ""]
    if data.stage_times:
        out += ["### Stage wall times", "",
                table(("stage", "wall time"), [(s, fx.secs(t)) for s, t in data.stage_times], numeric=(1,)), ""]
        if note := fx.overlap_note(data.stages_overlapped):
            out += [note, ""]
    return out


def render(data: ReportData, include_timings: bool = True) -> str:
    """The whole Markdown report. `include_timings=False` drops wall times (for golden files)."""
    if not include_timings:
        from dataclasses import replace

        data = replace(data, stage_times=(), stages_overlapped=())
    name = data.run_dir.rstrip("/").split("/")[-1] or data.run_dir
    lines = [f"# Prefix-cache report: {md_text(name)}", "",
             f"Run folder {md_code(data.run_dir)}" + (f", input: {md_text(data.input_kind)}" if data.input_kind else "")
             + ".", ""]
    for section in (_summary, _recommendation, _layout, _time, _sweep, _offload, _replicas, _prompts, _timeline, _clusters, _replay, _inputs):
        lines += section(data)
    lines += ["---", "",
              "Hit rate = prefix-cache hit tokens / prompt tokens (vLLM's prefix_cache_hits / "
              "prefix_cache_queries). Block ceiling: the hit rate with an infinite cache at that block size; "
              "token ceiling: tokens shared with any earlier request at token granularity. Written by pc-advise.",
              ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
