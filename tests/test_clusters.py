"""Reuse groups: stories with hand-counted groups, order independence, and the stack distance
against a literal LRU stack."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stats import hash_trace_workload  # noqa: E402

from advisor.analyze.clusters import KIND_ONE_SHOT, KIND_SHARED, group_requests
from advisor.analyze.prefixes import prefix_pass, workload_from_lists
from advisor.analyze.reuse import (
    block_nodes,
    reuse_distances,
    reuse_distances_reference,
    reuse_tree,
)
from advisor.analyze.stage import AnalyzeOptions, analyze

B = 16


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10_000) for _ in range(n)]


def rag(seed: int, docs: int, questions: tuple[int, int], system: int = 64, doc_len: int = 96):
    """A RAG log: one system prompt, `docs` documents, each asked a few questions, interleaved.
    Returns token lists, the document of each request, and arrival seconds."""
    rng = random.Random(seed)
    sys_prompt = fresh(rng, system)
    bodies = [fresh(rng, doc_len) for _ in range(docs)]
    order = [d for d in range(docs) for _ in range(rng.randint(*questions))]
    rng.shuffle(order)
    lists = [sys_prompt + bodies[d] + fresh(rng, rng.randint(5, 30)) for d in order]
    return lists, order, [2.0 * i for i in range(len(order))]


def rows_by_id(a) -> dict[int, dict]:
    return {r["cluster"]: r for r in a.clusters.to_pylist()}


def same_partition(a: list, b: list) -> bool:
    pairs = set(zip(a, b, strict=True))
    return len(pairs) == len(set(a)) == len(set(b))


def test_documents_behind_one_system_prompt_are_one_group_each() -> None:
    """3 documents x 4 questions, in rounds d0 d1 d2 d0 d1 d2 ...: a system prompt of 4 blocks,
    documents of 6 blocks (64 + 96 = 160 tokens), a 20-token question (a 7th doc-block mixed
    with the question, never shared). Hand count: group 0 is the system prompt (no members of its
    own, 12 requests use it), groups 1-3 the documents, 4 members each, under it."""
    rng = random.Random(0)
    sys_prompt, docs = fresh(rng, 64), [fresh(rng, 96) for _ in range(3)]
    lists = [sys_prompt + docs[d] + fresh(rng, 20) for _ in range(4) for d in range(3)]
    w = workload_from_lists(lists)
    a = analyze(w, AnalyzeOptions(), times=np.arange(12, dtype=float) * 10)
    rows = rows_by_id(a)
    assert len(rows) == 4 and a.stats["clusters"]["count"] == 4
    top = rows[0]
    assert (top["parent"], top["depth"], top["requests"], top["prefix_requests"]) == (None, 1, 0, 12)
    assert (top["start_tokens"], top["prefix_tokens"]) == (0, 64)
    labels = a.prefixes.column("cluster").to_pylist()
    assert same_partition(labels, [i % 3 for i in range(12)])
    for g in (1, 2, 3):
        r = rows[g]
        assert (r["parent"], r["depth"], r["requests"], r["prefix_requests"]) == (0, 2, 4, 4)
        assert (r["start_tokens"], r["prefix_tokens"]) == (64, 160)
        # distinct blocks of the three requests since the last use: 4 + 3 x 6 + 3 tails = 25
        assert r["distance_p50_blocks"] == r["distance_p90_blocks"] == 25
    first_doc = rows[labels[0]]  # request 0 sends document 0 first: its group has 3 hits
    assert first_doc["reuses"] == 3 and first_doc["gap_p50_s"] == 30.0
    other = rows[labels[1]]  # request 1's first hit is the system prompt, last used 10 s before
    assert other["reuses"] == 4
    assert other["gap_p50_s"] == 30.0 and other["gap_p90_s"] == 30.0
    assert abs(sum(r["hit_share"] for r in rows.values()) - 1) < 1e-12


def test_two_tool_sets_under_one_system_prompt_form_parent_and_children() -> None:
    """System prompt (3 blocks) -> tool set A (4 blocks) or B (6 blocks) -> a unique task."""
    rng = random.Random(1)
    sys_prompt, tools_a, tools_b = fresh(rng, 48), fresh(rng, 64), fresh(rng, 96)
    lists = [sys_prompt + (tools_a if i % 3 else tools_b) + fresh(rng, 40) for i in range(9)]
    a = analyze(workload_from_lists(lists), AnalyzeOptions())
    rows = rows_by_id(a)
    assert [(r["parent"], r["depth"], r["requests"], r["prefix_requests"], r["start_tokens"], r["prefix_tokens"])
            for r in rows.values()] == [
        (None, 1, 0, 9, 0, 48),  # the system prompt, used by all 9
        (0, 2, 6, 6, 48, 112),  # tool set A: 6 requests
        (0, 2, 3, 3, 48, 144),  # tool set B: 3 requests
    ]
    labels = a.prefixes.column("cluster").to_pylist()
    assert labels == [2 if i % 3 == 0 else 1 for i in range(9)]


def test_questions_that_start_alike_stay_in_their_document() -> None:
    """2 documents x 4 questions; document 0's questions start in pairs with the same 16 tokens:
    two branches of 1 block of their own, below the 64 tokens a group needs, so they stay in the
    document's group; with no minimum they are two child groups of 2."""
    rng = random.Random(7)
    sys_prompt, docs, alike = fresh(rng, 64), [fresh(rng, 96) for _ in range(2)], [fresh(rng, 16) for _ in range(2)]
    lists = [sys_prompt + docs[d] + (alike[q // 2] if d == 0 else []) + fresh(rng, 24)
             for q in range(4) for d in range(2)]
    a = analyze(workload_from_lists(lists), AnalyzeOptions())
    assert same_partition(a.prefixes.column("cluster").to_pylist(), [i % 2 for i in range(8)])
    assert a.stats["clusters"]["count"] == 3
    fine = analyze(workload_from_lists(lists), AnalyzeOptions(min_group_tokens=0)).clusters.to_pylist()
    assert [(r["parent"], r["requests"], r["prefix_tokens"]) for r in fine] == [
        (None, 0, 64), (0, 4, 160), (0, 0, 160), (2, 2, 176), (2, 2, 176)]


def test_unique_requests_are_one_shots() -> None:
    rng = random.Random(2)
    lists = [fresh(rng, 50) for _ in range(5)]
    a = analyze(workload_from_lists(lists), AnalyzeOptions())
    (row,) = a.clusters.to_pylist()
    assert (row["kind"], row["requests"], row["depth"], row["parent"], row["reuses"]) == (KIND_ONE_SHOT, 5, 0, None, 0)
    assert a.prefixes.column("cluster").to_pylist() == [0] * 5
    s = a.stats["clusters"]
    assert (s["count"], s["one_shot_requests"]) == (0, 5)


def test_a_growing_session_is_one_group() -> None:
    """Turns that repeat the history nest in one unary chain: one group, every turn a member."""
    rng = random.Random(3)
    hist: list[int] = fresh(rng, 32)
    lists = []
    for _ in range(5):
        hist = hist + fresh(rng, 40)
        lists.append(list(hist))
    a = analyze(workload_from_lists(lists), AnalyzeOptions())
    (row,) = a.clusters.to_pylist()
    assert (row["kind"], row["requests"], row["reuses"]) == (KIND_SHARED, 5, 4)
    assert row["prefix_tokens"] == (len(lists[3]) // B) * B  # shared by turns 4 and 5


def test_empty_and_single_request_inputs() -> None:
    a = analyze(workload_from_lists([]), AnalyzeOptions())
    assert a.clusters.num_rows == 0 and a.stats["clusters"]["count"] == 0
    a = analyze(workload_from_lists([list(range(40))]), AnalyzeOptions())
    (row,) = a.clusters.to_pylist()
    assert row["kind"] == KIND_ONE_SHOT and row["requests"] == 1


def test_hash_trace_groups_follow_the_hash_ids() -> None:
    """Ids 0,1 are a prefix of 4 requests that branch into 2 (two of them) and 5,6 (two):
    a parent of 2 x 512 tokens and two children; request 3 shares nothing."""
    w = hash_trace_workload([[0, 1, 2], [0, 1, 5, 6], [0, 1, 2, 9], [7, 8], [0, 1, 5, 6]],
                            [1300, 2000, 1800, 900, 2048])
    a = analyze(w, AnalyzeOptions())
    rows = a.clusters.to_pylist()
    assert [(r["kind"], r["parent"], r["requests"], r["prefix_requests"], r["start_tokens"], r["prefix_tokens"])
            for r in rows[:1]] == [(KIND_SHARED, None, 0, 4, 0, 1024)]
    # the children tie on size; their number comes from the end block's hash
    assert sorted((r["parent"], r["requests"], r["start_tokens"], r["prefix_tokens"]) for r in rows[1:3]) == [
        (0, 2, 1024, 1300), (0, 2, 1024, 2000)]  # capped at the owner's prompt length
    assert (rows[3]["kind"], rows[3]["requests"]) == (KIND_ONE_SHOT, 1)
    assert all(r["prefix_start_text"] is None for r in rows)
    labels = a.prefixes.column("cluster").to_pylist()
    assert labels[0] == labels[2] != labels[1] == labels[4] and labels[3] == 3


def test_a_prefix_with_one_way_on_is_one_group() -> None:
    """Ids 0,1 continue (shared) only into 2: the request leaving after 1 joins that one chain."""
    w = hash_trace_workload([[0, 1, 2], [0, 1, 5, 6], [0, 1, 2, 9]], [1300, 2000, 1800])
    rows = analyze(w, AnalyzeOptions()).clusters.to_pylist()
    assert [(r["kind"], r["requests"], r["prefix_requests"], r["prefix_tokens"]) for r in rows] == [
        (KIND_SHARED, 3, 3, 1300)]


def test_rag_log_groups_match_the_documents_exactly() -> None:
    lists, docs, times = rag(4, docs=190, questions=(2, 5))
    w = workload_from_lists(lists)
    a = analyze(w, AnalyzeOptions(), times=np.array(times))
    labels = a.prefixes.column("cluster").to_pylist()
    assert same_partition(labels, docs)
    rows = rows_by_id(a)
    assert a.stats["clusters"]["count"] == 191 and a.stats["clusters"]["top_level"] == 1
    assert all(rows[g]["parent"] == 0 and rows[g]["prefix_tokens"] == 160 for g in set(labels))
    assert rows[0]["prefix_requests"] == len(lists)


def test_groups_and_numbers_do_not_depend_on_row_order() -> None:
    lists, docs, _ = rag(5, docs=12, questions=(1, 4))
    ids = [f"q{i}" for i in range(len(lists))]
    a = analyze(workload_from_lists(lists, request_ids=ids), AnalyzeOptions())
    perm = list(range(len(lists)))
    random.Random(9).shuffle(perm)
    b = analyze(workload_from_lists([lists[i] for i in perm], request_ids=[ids[i] for i in perm]), AnalyzeOptions())
    label_a = dict(zip(ids, a.prefixes.column("cluster").to_pylist(), strict=True))
    label_b = dict(zip(b.prefixes.column("request_id").to_pylist(), b.prefixes.column("cluster").to_pylist(),
                       strict=True))
    assert label_a == label_b  # same groups, numbered the same
    keys = ("cluster", "parent", "depth", "kind", "requests", "prefix_requests", "tokens", "start_tokens",
            "prefix_tokens")
    assert [{k: r[k] for k in keys} for r in a.clusters.to_pylist()] == [
        {k: r[k] for k in keys} for r in b.clusters.to_pylist()]
    again = analyze(workload_from_lists(lists, request_ids=ids), AnalyzeOptions(cluster_seed=7))
    assert again.clusters.equals(a.clusters)


def test_group_texts_are_the_start_and_end_of_the_own_part() -> None:
    rng = random.Random(6)
    sys_prompt, docs = fresh(rng, 64), [fresh(rng, 96) for _ in range(2)]
    lists = [sys_prompt + docs[i % 2] + fresh(rng, 20) for i in range(4)]
    a = analyze(workload_from_lists(lists), AnalyzeOptions(), lambda ids: " ".join(map(str, ids)))
    rows = rows_by_id(a)
    assert rows[0]["prefix_start_text"] == " ".join(map(str, sys_prompt[:48]))
    assert rows[0]["prefix_end_text"] == " ".join(map(str, sys_prompt[16:64]))
    doc = docs[0] if rows[1]["representative_id"] in ("r0", "r2") else docs[1]
    assert rows[1]["prefix_start_text"] == " ".join(map(str, doc[:48]))
    assert rows[1]["prefix_end_text"] == " ".join(map(str, doc[48:96]))


# --- properties --------------------------------------------------------------------------
prompts = st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=14), min_size=0, max_size=14)


@settings(max_examples=60, deadline=None)
@given(prompts)
def test_stack_distance_equals_a_literal_lru_stack(lists: list[list[int]]) -> None:
    p = prefix_pass(workload_from_lists(lists), 2)
    hash_lists = [p.hashes[p.hash_offsets[i] : p.hash_offsets[i + 1]].tolist() for i in range(len(lists))]
    assert reuse_distances(block_nodes(p.hashes, p.hash_offsets)).distance.tolist() == reuse_distances_reference(hash_lists)


@settings(max_examples=40, deadline=None)
@given(prompts, st.randoms(use_true_random=False))
def test_groups_are_prefix_tree_pieces_under_any_order(lists: list[list[int]], rnd: random.Random) -> None:
    w = workload_from_lists(lists)
    p = prefix_pass(w, 2)
    tree = reuse_tree(p.hashes, block_nodes(p.hashes, p.hash_offsets))
    chains = [p.hashes[p.hash_offsets[i] : p.hash_offsets[i + 1]].tolist() for i in range(len(lists))]
    for g in range(tree.num_groups):
        top, end = int(p.hashes[tree.top[g]]), int(p.hashes[tree.end[g]])
        users = [c for c in chains if top in c]
        assert len(users) == tree.users[g] >= 2
        assert all(c.index(top) == tree.top_depth[g] for c in users)
        assert sum(end in c for c in chains) == tree.end_users[g] >= 2
        if tree.parent[g] >= 0:  # the parent's whole prefix is this group's top's parent
            assert tree.parent[g] < g and tree.end_depth[tree.parent[g]] == tree.top_depth[g]
    for r, c in enumerate(chains):  # a member's deepest shared block is in its group
        shared = [h for h in c if sum(h in o for o in chains) >= 2]
        assert (tree.group[r] < 0) == (not shared)
    folded = reuse_tree(p.hashes, block_nodes(p.hashes, p.hash_offsets), min_own_blocks=2)
    into = dict(zip(tree.group.tolist(), folded.group.tolist(), strict=True))  # a coarser partition
    assert all(into[a] == b for a, b in zip(tree.group.tolist(), folded.group.tolist(), strict=True))
    assert all(folded.parent[g] < g for g in range(folded.num_groups))
    perm = list(range(len(lists)))
    rnd.shuffle(perm)
    q = prefix_pass(workload_from_lists([lists[i] for i in perm]), 2)
    again = reuse_tree(q.hashes, block_nodes(q.hashes, q.hash_offsets))
    assert again.group.tolist() == tree.group[perm].tolist()
    assert again.parent.tolist() == tree.parent.tolist()


def test_group_requests_keeps_every_request_once() -> None:
    lists, _, times = rag(7, docs=6, questions=(1, 3))
    lists += [fresh(random.Random(8), 30)]
    w = workload_from_lists(lists)
    g = group_requests(w, prefix_pass(w, B), np.array(times + [99.0]), None)
    assert int(g.table.column("requests").to_numpy().sum()) == len(lists)
    assert g.table.column("kind").to_pylist()[-1] == KIND_ONE_SHOT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")),
                                                       st.just(float("inf")), st.integers(0, 9).map(float))),
                max_size=80))
def test_group_quantiles_equal_numpy_group_by_group(pairs) -> None:
    """The one-sort per-group quantiles equal np.quantile(method="inverted_cdf") on each group's
    finite values (repeated values, a group of one, groups with none)."""
    from advisor.analyze.clusters import _group_quantiles, _quantiles

    groups = np.array([g for g, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    p50, p90 = _group_quantiles(groups, values, 7)
    for g in range(7):
        want = _quantiles(values[groups == g])
        got = tuple(None if np.isnan(x) else float(x) for x in (p50[g], p90[g]))
        assert got == want
