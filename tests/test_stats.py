"""Prefix statistics: longest earlier prefix, the token ceiling, top prefixes, reuse sources,
and the `pc-advise analyze` command on a run folder written here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.analyze.prefixes import (
    AnalysisView,
    ceiling_per_request,
    from_workload,
    prefix_pass,
    workload_from_lists,
)
from advisor.analyze.stage import AnalyzeOptions, analyze
from advisor.cli import main
from advisor.workload import load_workload


def naive_shared(tokens: list[list[int]]) -> list[int]:
    """Longest common prefix with any earlier request, by brute force."""
    out = []
    for i, t in enumerate(tokens):
        best = 0
        for u in tokens[:i]:
            k = 0
            while k < min(len(t), len(u)) and t[k] == u[k]:
                k += 1
            best = max(best, k)
        out.append(best)
    return out


def decode_chars(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_two_requests_share_exactly_37_tokens() -> None:
    rng = random.Random(3)
    common = [rng.randrange(1000) for _ in range(37)]
    a = common + [5000 + i for i in range(60)]
    b = common + [7000 + i for i in range(45)]
    p = prefix_pass(workload_from_lists([a, b], request_ids=["a", "b"]), block_size=16)
    assert p.shared_tokens.tolist() == [0, 37]
    assert p.shared_blocks.tolist() == [0, 2]  # 37 tokens = 2 full 16-token blocks + 5
    assert p.best_match.tolist() == [-1, 0]


def test_identical_prompt_shares_everything_but_the_ceiling_recomputes_the_last_token() -> None:
    w = workload_from_lists([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    p = prefix_pass(w, block_size=2)
    assert p.shared_tokens.tolist() == [0, 5]
    assert ceiling_per_request(w, p).tolist() == [0, 4]


def test_different_models_never_share() -> None:
    w = workload_from_lists([[1] * 40, [1] * 40, [1] * 40], models=["m1", "m2", "m1"])
    p = prefix_pass(w, block_size=16)
    assert p.shared_tokens.tolist() == [0, 0, 40]
    assert p.best_match.tolist()[2] == 0


@settings(max_examples=60, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(0, 2), max_size=14), max_size=12),
    block=st.integers(1, 5),
)
def test_longest_earlier_prefix_matches_brute_force(lists: list[list[int]], block: int) -> None:
    w = workload_from_lists(lists)
    p = prefix_pass(w, block_size=block)
    naive = naive_shared(lists)
    if len(lists) <= 5:  # at most 4 earlier requests: every candidate is compared, exact
        assert p.shared_tokens.tolist() == naive
    # always: full blocks exact, the partial block at most undercounted (documented bound)
    assert (p.shared_tokens // block == np.array(naive, dtype=np.int64) // block).all()
    assert (p.shared_tokens <= np.array(naive, dtype=np.int64)).all()
    assert (p.shared_blocks == p.shared_tokens // block).all()
    for i, b in enumerate(p.best_match.tolist()):
        if p.shared_tokens[i]:
            # the named best match really shares that many tokens
            assert lists[b][: p.shared_tokens[i]] == lists[i][: p.shared_tokens[i]]


def test_top_prefix_is_the_shared_system_prompt_decoded() -> None:
    system = "You are a support bot.\nBe brief.\nAlways cite the policy.\n"
    system = system + "x" * (64 - len(system))  # exactly 4 blocks of 16 characters
    prompts = [system + f"question number {i} about refunds" for i in range(5)]
    a = analyze(workload_from_lists([chars(t) for t in prompts]), AnalyzeOptions(), decode_chars)
    top = a.stats["top_prefixes"][0]
    assert top["requests"] == 5
    assert top["tokens"] == 64 + 16  # the system prompt plus "question number " (16 chars)
    assert top["saved_tokens"] == 4 * top["tokens"]
    assert top["text_first"] == "You are a support bot."
    assert top["text_last"].startswith("xxxx") and top["text_last"].endswith("question number")
    assert top["clusters"] == sorted(set(a.prefixes.column("cluster").to_pylist()))


def test_reuse_sources_split_by_the_session_that_first_sent_the_blocks() -> None:
    system = list(range(100, 132))  # 32 tokens, 2 blocks
    a1 = system + list(range(1000, 1032))
    b1 = system + list(range(2000, 2032))
    a2 = a1 + list(range(3000, 3032))
    w = workload_from_lists([a1, b1, a2], sessions=["A", "B", "A"])
    a = analyze(w, AnalyzeOptions(analysis_block_size=16))
    src = a.stats["reuse_sources"]
    # b1 reuses the system prompt first sent by session A: cross-request, 32 tokens.
    # a2 reuses all of a1 (its own session sent every block of it first): 64 tokens.
    assert src["same_session_tokens"] == 64
    assert src["cross_request_tokens"] == 32
    assert src["same_session_share"] == 64 / 96
    assert a.prefixes.column("same_session").to_pylist() == [None, False, True]


def test_ceiling_overall_and_per_model_add_up() -> None:
    rng = random.Random(5)
    base = [rng.randrange(500) for _ in range(50)]
    lists = [base + [rng.randrange(500) for _ in range(rng.randrange(1, 30))] for _ in range(12)]
    models = ["m1" if i % 3 else "m2" for i in range(12)]
    a = analyze(workload_from_lists(lists, models=models), AnalyzeOptions())
    s = a.stats
    assert s["prompt_tokens"] == sum(map(len, lists))
    assert s["ceiling_tokens"] == sum(a.prefixes.column("ceiling_tokens").to_pylist())
    assert sum(m["requests"] for m in s["by_model"].values()) == 12
    assert s["ceiling_rate"] == s["ceiling_tokens"] / s["prompt_tokens"]
    assert sum(s["shared_prefix_hist"]["counts"]) == 12
    assert sum(c["requests"] for c in s["clusters"]["items"]) == 12


def test_empty_and_single_request_inputs() -> None:
    for lists in ([], [[1, 2, 3]]):
        a = analyze(workload_from_lists(lists), AnalyzeOptions())
        assert a.stats["requests"] == len(lists)
        assert a.stats["ceiling_tokens"] == 0
        assert a.stats["breakers"] == [] and a.stats["top_prefixes"] == []
        assert a.prefixes.num_rows == len(lists)
        assert a.clusters.num_rows == len(lists)  # one cluster when there is one request
        json.dumps(a.stats)  # serialisable as is


def hash_trace_workload(hash_lists: list[list[int]], lengths: list[int], unit: int = 512) -> AnalysisView:
    w = workload_from_lists([[0]] * len(hash_lists))
    offsets = np.zeros(len(hash_lists) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in hash_lists], out=offsets[1:])
    w.values = np.array([x for h in hash_lists for x in h], dtype=np.int64)
    w.offsets = offsets
    w.n_tokens = np.array(lengths, dtype=np.int64)
    w.hash_trace, w.unit_tokens = True, unit
    return w


def test_hash_trace_shares_whole_trace_blocks() -> None:
    w = hash_trace_workload([[0, 1, 2], [0, 1, 5, 6], [0, 1, 2]], [1300, 2000, 1300])
    a = analyze(w, AnalyzeOptions())
    assert a.prefixes.column("shared_tokens").to_pylist() == [0, 1024, 1300]
    assert a.prefixes.column("ceiling_tokens").to_pylist() == [0, 1024, 1299]
    assert a.stats["analysis_block_size"] == 512
    assert a.stats["breakers"] == [] and a.stats["breakers_note"]
    assert a.clusters.column("prefix_start_text").to_pylist() == [None] * a.clusters.num_rows


def write_hash_trace_run(root: Path) -> None:
    rows = [([0, 1, 2], 1300), ([0, 1, 3], 1400), ([0, 1, 2, 4], 1800), ([7, 8], 900)]
    n = len(rows)
    req = {f.name: [None] * n for f in schema.REQUESTS}
    req.update({
        "request_id": [f"L{i + 1}" for i in range(n)], "line": list(range(1, n + 1)),
        "timestamp": [float(i) for i in range(n)], "kind": ["hash_trace"] * n,
        "format": ["hash-trace"] * n, "hash_ids": [h for h, _ in rows],
        "input_length": [length for _, length in rows], "trace_block_size": [512] * n,
    })
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(req, schema=schema.REQUESTS), root / "requests.parquet")
    tok = {f.name: [None] * n for f in schema.TOKENS}
    tok.update({"request_id": req["request_id"], "n_tokens": req["input_length"]})
    pq.write_table(pa.table(tok, schema=schema.TOKENS), root / "tokens.parquet")


def test_cli_analyze_on_a_hash_trace_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_hash_trace_run(run)
    res = CliRunner().invoke(main, ["analyze", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["stages"]["analyze"]
    assert out["requests"] == 4 and out["prompt_tokens"] == 5400
    stats = json.loads((run / "stats.json").read_text())
    assert stats["ceiling_tokens"] == 1024 + 1536  # L2 shares 2 blocks, L3 shares 3
    for key in ("requests", "prompt_tokens", "ceiling_tokens", "ceiling_rate", "by_model",
                "shared_prefix_hist", "top_prefixes", "breakers", "reuse_sources", "clusters",
                "analysis_block_size", "tokenizer"):
        assert key in stats
    assert pq.read_table(run / "prefixes.parquet").schema.equals(schema.PREFIXES)
    assert pq.read_table(run / "clusters.parquet").schema.equals(schema.CLUSTERS)
    again = CliRunner().invoke(main, ["analyze", str(run), "--json"])
    assert json.loads(again.stdout)["stages"]["analyze"]["skipped"] is True


def test_cli_analyze_names_the_missing_stage(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert "pc-advise ingest" in res.output or "pc-advise tokenize" in res.output


def test_load_workload_reads_token_ids_across_row_groups(tmp_path: Path) -> None:
    rng = random.Random(9)
    lists = [[rng.randrange(100) for _ in range(rng.randrange(0, 30))] for _ in range(50)]
    lists[7] = None  # a row without token ids counts as empty
    n = len(lists)
    req = {f.name: [None] * n for f in schema.REQUESTS}
    req.update({"request_id": [f"r{i}" for i in range(n)], "line": list(range(1, n + 1)),
                "kind": ["tokens"] * n, "format": ["completion"] * n,
                "session_id": [f"s{i % 3}" for i in range(n)]})
    pq.write_table(pa.table(req, schema=schema.REQUESTS), tmp_path / "requests.parquet")
    tok = {f.name: [None] * n for f in schema.TOKENS}
    tok.update({"request_id": req["request_id"], "token_ids": lists,
                "n_tokens": [len(t) if t else 0 for t in lists]})
    pq.write_table(pa.table(tok, schema=schema.TOKENS), tmp_path / "tokens.parquet", row_group_size=7)
    w = from_workload(load_workload(tmp_path / "requests.parquet", tmp_path / "tokens.parquet"))
    assert not w.hash_trace and len(w) == n
    assert [w.units(i).tolist() for i in range(n)] == [t or [] for t in lists]
    assert w.sessions[:3] == ["s0", "s1", "s2"]


def test_cli_analyze_decodes_texts_with_the_run_tokenizer(tmp_path: Path) -> None:
    """A token run folder whose tokens.parquet names a tiny local tokenizer: the timestamp
    breaker and the top prefix come back as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(11)
    words = "refund order policy customer shipping invoice answer briefly cite".split()
    body = "\nYou are the billing assistant.\n" + " ".join(rng.choice(words) for _ in range(200))
    texts = [f"Now: 2026-11-{d:02d} {h:02d}:{m:02d}.{body}\nQ: {rng.choice(words)}"
             for d, h, m in ((rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59)) for _ in range(12))]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tok_dir)
    ids = [raw.encode(t).ids for t in texts]
    run = tmp_path / "run"
    run.mkdir()
    n = len(texts)
    req = {f.name: [None] * n for f in schema.REQUESTS}
    req.update({"request_id": [f"q{i}" for i in range(n)], "line": list(range(1, n + 1)),
                "kind": ["completion"] * n, "format": ["completion"] * n, "prompt": texts})
    pq.write_table(pa.table(req, schema=schema.REQUESTS), run / "requests.parquet")
    tok = {f.name: [None] * n for f in schema.TOKENS}
    tok.update({"request_id": req["request_id"], "token_ids": ids, "n_tokens": [len(i) for i in ids]})
    tok_schema = schema.TOKENS.with_metadata({b"pc_advise.tokenizer": str(tok_dir).encode()})
    pq.write_table(pa.table(tok, schema=tok_schema), run / "tokens.parquet")

    res = CliRunner().invoke(main, ["analyze", str(run), "--analysis-block-size", "2"])
    assert res.exit_code == 0, res.output
    stats = json.loads((run / "stats.json").read_text())
    assert stats["tokenizer"] == str(tok_dir) and stats["analysis_block_size"] == 2
    [b] = stats["breakers"]
    assert b["label"] == "timestamp" and b["requests_affected"] == 11
    assert all(e["a_text"] in e["a_context"] and "2026-11-" in e["a_context"] for e in b["examples"])
    # the prefix all 12 share, whole 2-token blocks of it, decoded
    assert "Now: 2026-11-".startswith(stats["top_prefixes"][0]["text_first"])
    assert stats["top_prefixes"][0]["text_first"].startswith("Now:")
