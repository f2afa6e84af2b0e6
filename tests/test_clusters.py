"""Request clusters: structure found by the data, stable under a seed, with own ceilings."""

from __future__ import annotations

import random

import numpy as np

from advisor.analyze.clusters import cluster_labels, features
from advisor.analyze.prefixes import (
    ceiling_per_request,
    prefix_pass,
    workload_from_lists,
)
from advisor.analyze.stage import AnalyzeOptions, analyze


def families(seed: int, sizes: tuple[int, ...], stamp: bool = False) -> tuple[list[list[int]], list[int]]:
    """Requests from len(sizes) apps: each app a long system prompt of its own + a question."""
    rng = random.Random(seed)
    systems = [[rng.randrange(10_000) for _ in range(300)] for _ in sizes]
    lists, truth = [], []
    order = [f for f, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(order)
    for f in order:
        head = [rng.randrange(10_000) for _ in range(4)] if stamp else []
        lists.append(head + systems[f] + [rng.randrange(10_000) for _ in range(rng.randrange(5, 40))])
        truth.append(f)
    return lists, truth


def same_partition(a: list[int], b: list[int]) -> bool:
    pairs = set(zip(a, b, strict=True))
    return len(pairs) == len(set(a)) == len(set(b))


def test_three_apps_give_three_clusters_matching_the_apps() -> None:
    lists, truth = families(1, (20, 12, 7))
    w = workload_from_lists(lists)
    labels, method = cluster_labels(features(w, 1024), seed=0, max_clusters=8)
    assert same_partition(labels.tolist(), truth)
    assert np.bincount(labels).tolist() == [20, 12, 7]  # numbered by size
    assert "k=3" in method


def test_a_cache_breaker_does_not_scatter_its_family() -> None:
    """Each request starts with 4 random tokens (a timestamp): no block is shared, yet the
    content features keep every app together."""
    lists, truth = families(2, (15, 15), stamp=True)
    labels, _ = cluster_labels(features(workload_from_lists(lists), 1024), seed=0, max_clusters=8)
    assert same_partition(labels.tolist(), truth)


def test_same_seed_same_clusters_and_order_independent_of_reruns() -> None:
    lists, _ = families(3, (10, 9, 8, 6))
    x = features(workload_from_lists(lists), 1024)
    a, _ = cluster_labels(x, seed=7, max_clusters=10)
    b, _ = cluster_labels(x, seed=7, max_clusters=10)
    assert a.tolist() == b.tolist()


def test_one_structure_stays_one_cluster() -> None:
    lists, _ = families(4, (25,))
    labels, method = cluster_labels(features(workload_from_lists(lists), 1024), seed=0, max_clusters=8)
    assert set(labels.tolist()) == {0}
    assert "one cluster" in method


def test_cluster_rows_carry_size_tokens_and_their_own_ceiling() -> None:
    lists, _ = families(5, (12, 6))
    w = workload_from_lists(lists)
    a = analyze(w, AnalyzeOptions(), lambda ids: " ".join(map(str, ids)))
    labels = np.array(a.prefixes.column("cluster").to_pylist())
    ceil = ceiling_per_request(w, prefix_pass(w, 16))
    rows = a.clusters.to_pylist()
    assert [r["requests"] for r in rows] == [12, 6]
    for r in rows:
        members = labels == r["cluster"]
        assert r["tokens"] == int(w.n_tokens[members].sum())
        assert r["shared_tokens"] == int(ceil[members].sum())
        assert r["ceiling"] == r["shared_tokens"] / r["tokens"]
        assert r["prefix_tokens"] == 288  # the 300-token system prompt's 18 full blocks
        assert r["prefix_text"].count(" ") == 287
        assert r["representative_id"] in np.array(w.request_ids)[members]


def test_empty_and_tiny_inputs_give_one_or_no_cluster() -> None:
    for n in (0, 1, 2, 3):
        lists = [[i, i + 1, i + 2] for i in range(n)]
        labels, _ = cluster_labels(features(workload_from_lists(lists), 1024), seed=0, max_clusters=8)
        assert labels.tolist() == [0] * n
