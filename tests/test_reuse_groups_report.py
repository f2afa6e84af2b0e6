"""Reuse groups downstream: the recommendation's note on groups the budget cannot keep, and the
report section (tree, table, folded rows) in HTML and Markdown."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner
from test_clusters import rag  # noqa: E402
from test_recommend import _run_dir  # noqa: E402

import advisor.runfolder as rf
from advisor import schema
from advisor.analyze.prefixes import workload_from_lists
from advisor.analyze.stage import AnalyzeOptions, analyze
from advisor.cli import main
from advisor.recommend.groups import reuse_group_advice
from advisor.report import html, markdown
from advisor.report.clusters import LISTED, group_facts
from advisor.report.model import build


def _row(cluster: int, share: float, p90_blocks: float | None, **kw) -> dict:
    base = {"cluster": cluster, "parent": None, "depth": 1, "kind": "shared", "requests": 10,
            "prefix_requests": 10, "tokens": 1000, "shared_tokens": 500, "ceiling": 0.5, "hit_share": share,
            "reuses": 9, "distance_p90_blocks": p90_blocks}
    return {**base, **kw}


BEST = {"block_size": 16, "num_blocks": 1000, "kv_gib": 2.0}  # 16,000 tokens, 2 GiB


def test_note_names_the_hot_groups_the_budget_loses_and_the_memory_that_keeps_them() -> None:
    rows = [_row(0, 0.45, 2000.0), _row(1, 0.30, 100.0), _row(2, 0.25, 50.0)]
    adv = reuse_group_advice(rows, 16, BEST)
    assert adv["groups"] == [0, 1] and adv["hit_share"] == 0.75  # two groups carry half the hits
    assert adv["budget_tokens"] == 16_000
    assert adv["beyond"] == [{"cluster": 0, "hit_share": 0.45, "distance_p90_tokens": 32_000}]
    assert adv["needed_tokens"] == 32_000 and adv["needed_gib"] == 4.0  # 2 GiB per 16,000 tokens
    assert "#0" in adv["note"] and "32,000 tokens" in adv["note"] and "4.00 GiB" in adv["note"]


def test_no_note_when_the_budget_keeps_them_or_the_reuse_is_spread_out() -> None:
    kept = reuse_group_advice([_row(0, 0.6, 900.0), _row(1, 0.4, 10.0)], 16, BEST)
    assert kept["beyond"] == [] and kept["note"] is None
    spread = reuse_group_advice([_row(g, 0.04, 5000.0) for g in range(25)], 16, BEST)
    assert len(spread["groups"]) == 13 and spread["note"] is None  # 13 groups to reach half: not "a few"
    assert reuse_group_advice([_row(0, 0.0, None, kind="one-shot")], 16, BEST) is None


def test_an_interleaved_rag_log_gets_the_note_at_a_small_budget() -> None:
    """3 documents asked in rounds: each reuse comes back after 25 distinct blocks (400 tokens)."""
    rng = random.Random(0)
    sys_prompt, docs = [rng.randrange(9999) for _ in range(64)], [[rng.randrange(9999) for _ in range(96)]
                                                                 for _ in range(3)]
    lists = [sys_prompt + docs[d] + [rng.randrange(9999) for _ in range(20)] for _ in range(4) for d in range(3)]
    rows = analyze(workload_from_lists(lists), AnalyzeOptions()).clusters.to_pylist()
    small = reuse_group_advice(rows, 16, {"block_size": 16, "num_blocks": 20, "kv_gib": None})
    assert [b["distance_p90_tokens"] for b in small["beyond"]] == [400, 400]  # the 2 groups that carry half
    assert small["needed_tokens"] == 400 and small["needed_gib"] is None and small["note"]
    large = reuse_group_advice(rows, 16, {"block_size": 16, "num_blocks": 25, "kv_gib": None})
    assert large["beyond"] == [] and large["note"] is None


def test_recommend_stage_writes_the_note_into_recommendation_json(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    rf.write_table(run / rf.CLUSTERS, pa.Table.from_pylist(
        [_row(0, 0.7, 1e6), _row(1, 0.3, 10.0)], schema=schema.CLUSTERS))
    rf.write_json(run / rf.STATS, {"clusters": {"block_tokens": 16}, "analysis_block_size": 16, "breakers": []})
    res = CliRunner().invoke(main, ["recommend", str(run), "--model", "llama-3.1-8b", "--gpu", "h100"])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / rf.RECOMMENDATION).read_text())
    assert doc["reuse_groups"]["beyond"][0]["cluster"] == 0
    assert doc["reuse_groups"]["needed_gib"] > doc["recommended"]["kv_gib"]
    assert doc["reuse_groups"]["note"] in doc["reasoning"]
    rf.write_table(run / rf.CLUSTERS, pa.Table.from_pylist([_row(0, 1.0, 10.0)], schema=schema.CLUSTERS))
    res = CliRunner().invoke(main, ["recommend", str(run), "--model", "llama-3.1-8b", "--gpu", "h100"])
    doc = json.loads((run / rf.RECOMMENDATION).read_text())
    assert doc["reuse_groups"]["note"] is None


def _report(rows: list[dict], rec: dict | None = None):
    stats = {"analysis_block_size": 16, "clusters": {"block_tokens": 16, "count": len(rows)}}
    return build("run", stats=stats, clusters=rows, recommendation=rec)


def test_section_shows_the_tree_the_listed_groups_and_folds_the_rest() -> None:
    lists, _, times = rag(3, docs=30, questions=(2, 4))
    lists.append(list(range(100_000, 100_040)))  # a one-shot
    a = analyze(workload_from_lists(lists), AnalyzeOptions(), lambda ids: " ".join(map(str, ids)),
                times=np.array(times + [times[-1] + 1]))
    rows = a.clusters.to_pylist()
    rec = {"recommended": {"block_size": 16, "num_blocks": 100, "kv_gib": 0.5},
           "reuse_groups": reuse_group_advice(rows, 16, {"block_size": 16, "num_blocks": 100, "kv_gib": 0.5})}
    data = _report(rows, rec)
    g = group_facts(data)
    assert g.headline.startswith("31 reuse groups (1 at the top level)")
    assert "1 one-shot request shares no block" in g.headline
    assert g.tree[0].startswith("- #0: 64-token prefix (+64 of its own)")
    assert sum(line.startswith("  - #") for line in g.tree) == 4  # the top-level group's first children
    assert g.tree[-1].startswith("  - … 26 more")
    assert [r[0] for r in g.rows[:LISTED]] != [] and g.rows[LISTED][0] == "other (19 groups)"
    assert g.rows[-1][0] == "one-shot"
    page, doc = html.render(data), markdown.render(data)
    for text in ("How the reuse is structured", "other (19 groups)", "- #0: 64-token prefix"):
        assert text in page and text in doc
    assert 'aria-label="reuse groups: share of hits against reuse distance"' in page
    assert g.texts and g.texts[0][1] in doc  # the decoded start of the top group's own prefix


def test_section_with_no_groups_says_so() -> None:
    data = _report([])
    assert group_facts(data) is None
    assert "How the reuse is structured" in markdown.render(data)



def _hash_trace_run(root: Path, logged: bool) -> None:
    """Requests 0 and 2 share ids 0,1 (10 s apart); 1 and 3 share 5,6 (also 10 s apart)."""
    rows = [([0, 1, 2], 0.0), ([5, 6, 7], 5.0), ([0, 1, 3], 10.0), ([5, 6, 8], 15.0)]
    n = len(rows)
    req = {f.name: [None] * n for f in schema.REQUESTS}
    req.update({"request_id": [f"L{i}" for i in range(n)], "line": list(range(1, n + 1)),
                "timestamp": [t for _, t in rows], "timestamp_logged": [logged] * n, "kind": ["hash_trace"] * n,
                "format": ["hash-trace"] * n, "hash_ids": [h for h, _ in rows], "input_length": [1536] * n,
                "trace_block_size": [512] * n})
    root.mkdir(parents=True)
    pq.write_table(pa.table(req, schema=schema.REQUESTS), root / rf.REQUESTS)
    tok = {f.name: [None] * n for f in schema.TOKENS}
    tok.update({"request_id": req["request_id"], "n_tokens": req["input_length"]})
    pq.write_table(pa.table(tok, schema=schema.TOKENS), root / rf.TOKENS)


def test_gaps_come_from_logged_times_only(tmp_path: Path) -> None:
    """Ingest places requests without a timestamp at --rate (timestamp_logged false): no gap then.
    Stack distance: 3 distinct blocks of request 0 + 3 of request 1 = 6 at each reuse."""
    for logged, gap in ((True, 10.0), (False, None)):
        run = tmp_path / str(logged)
        _hash_trace_run(run, logged)
        res = CliRunner().invoke(main, ["analyze", str(run)])
        assert res.exit_code == 0, res.output
        assert "2 reuse groups (2 at the top level)" in res.output
        rows = pq.read_table(run / rf.CLUSTERS).to_pylist()
        assert [(r["requests"], r["gap_p50_s"], r["distance_p90_blocks"]) for r in rows] == [(2, gap, 6.0)] * 2
