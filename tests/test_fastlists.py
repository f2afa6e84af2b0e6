"""The array linked lists of advisor.sim.fast.lists against Python lists doing the same moves."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.sim.fast import lists as fl


def queue_order(nxt: np.ndarray, n: int) -> list[int]:
    out, b = [], int(nxt[n])
    while b != n + 1:
        out.append(b)
        b = int(nxt[b])
    return out


def ring_order(first_copy: np.ndarray, cnext: np.ndarray, h: int) -> list[int]:
    f = int(first_copy[h])
    if f < 0:
        return []
    out, b = [f], int(cnext[f])
    while b != f:
        out.append(b)
        b = int(cnext[b])
    return out


def test_a_new_queue_holds_every_block_in_order_both_ways() -> None:
    nxt, prv = fl.new_free_queue(5)
    assert queue_order(nxt, 5) == [0, 1, 2, 3, 4]
    assert [int(prv[b]) for b in (6, 4, 3, 2, 1, 0)] == [4, 3, 2, 1, 0, 5]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.sampled_from(["pop", "take", "front", "back"]), st.integers(0, 7)), max_size=40))
def test_queue_moves_match_a_python_list(n: int, moves: list[tuple[str, int]]) -> None:
    """Blocks leave by popping the head or from the middle; they come back at the head or the tail."""
    nxt, prv = fl.new_free_queue(n)
    model = list(range(n))
    for op, x in moves:
        if op == "pop" and model:
            fl.unlink(nxt, prv, int(nxt[n]))
            model.pop(0)
        elif op == "take" and model:
            b = model[x % len(model)]
            fl.unlink(nxt, prv, b)
            model.remove(b)
        elif op in ("front", "back"):
            out = [b for b in range(n) if b not in model]
            if out:
                b = out[x % len(out)]
                if op == "front":
                    fl.insert_after(nxt, prv, n, b)
                    model.insert(0, b)
                else:
                    fl.insert_before(nxt, prv, n + 1, b)
                    model.append(b)
        assert queue_order(nxt, n) == model
        assert [int(prv[b]) for b in [*model, n + 1]] == [n, *model]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 5)), max_size=40))
def test_rings_match_lists_of_copies_oldest_first(moves: list[tuple[bool, int, int]]) -> None:
    """Caching appends the newest copy; evicting any copy keeps the others in order, and
    `ring_unlink` names the new lookup copy exactly when the oldest one went."""
    first_copy, cnext, cprev = fl.new_rings(3, 6)
    model: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for cache, h, b in moves:
        owner = next((g for g, copies in model.items() if b in copies), None)
        if cache and owner is None:
            fl.ring_link(first_copy, cnext, cprev, h, b)
            model[h].append(b)
        elif not cache and owner is not None:
            was_first = model[owner][0] == b
            model[owner].remove(b)
            got = fl.ring_unlink(first_copy, cnext, cprev, owner, b)
            assert got == (model[owner][0] if was_first and model[owner] else -1)
        for g in model:
            assert ring_order(first_copy, cnext, g) == model[g]
    hashes = np.array([0, 1, 2], np.int64)
    out = np.zeros(3, np.int64)
    k = fl.ring_lookup(hashes, 3, first_copy, out)
    want = 0
    while want < 3 and model[want]:
        want += 1
    assert k == want and list(out[:k]) == [model[g][0] for g in range(k)]
