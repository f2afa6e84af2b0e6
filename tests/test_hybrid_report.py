"""The report's "KV cache layout" section (advisor.report.layout): the model's KV cache groups in
words and a table, in HTML and Markdown, from recommendation.json's `kv_layout`; nothing without
one (no --model), and nothing invented."""

from __future__ import annotations

from typing import Any

from advisor.kvlayout import kv_layout
from advisor.report import html, markdown
from advisor.report.layout import layout_facts
from advisor.report.model import ReportData


def data_with(layout: dict[str, Any] | None) -> ReportData:
    return ReportData(run_dir="/tmp/run", recommendation={"kv_layout": layout, "reasoning": []})


def test_gemma3_27b_layout_rows_by_kind_with_pool_bytes_per_token() -> None:
    """Gemma 3 27B at B=16: six sliding groups (52 layers) and one full group (10 layers); a block id
    costs 10 layers' pages (1,310,720 B), so a token costs 81,920 pool bytes in each group while it
    is in the group's window: 6 x 81,920 in the sliding groups, 81,920 in the full one."""
    facts = layout_facts(data_with(kv_layout("gemma-3-27b").as_dict(16)))
    assert facts is not None
    assert facts.rows == [("sliding window", "1,024", "6", "52", "491,520", "16"),
                          ("full attention", "—", "1", "10", "81,920", "16")]
    assert "7 groups of up to 10 layers" in facts.sentence
    assert "1,310,720 B" in facts.simulated and "exact" in facts.simulated


def test_a_mamba_hybrid_shows_the_block_size_vllm_runs_and_says_it_is_approximate() -> None:
    facts = layout_facts(data_with(kv_layout("qwen3-next-80b-a3b").as_dict(16)))
    assert facts is not None
    kinds = {r[0]: r for r in facts.rows}
    assert kinds["full attention"][-1] == "544"  # --block-size 16 runs at 544
    assert "per request (states)" in kinds["Mamba / linear attention (state)"][4]
    assert "which vLLM runs for --block-size 16" in facts.simulated and "approximate" in facts.simulated


def test_both_renderers_show_the_section_and_nothing_without_a_layout() -> None:
    data = data_with(kv_layout("gpt-oss-20b").as_dict(16))
    md = markdown.render(data)
    page = html.render(data)
    assert "## KV cache layout" in md and "| sliding window | 128 | 1 | 12 | 24,576 | 16 |" in md
    assert '<section id="kv-layout">' in page and "sliding window" in page
    empty = data_with(None)
    assert layout_facts(empty) is None
    assert "KV cache layout" not in markdown.render(empty) and "kv-layout" not in html.render(empty)
    assert layout_facts(ReportData(run_dir="/tmp/run")) is None
