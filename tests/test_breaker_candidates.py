"""The breaker search's candidate pairs: the array computation equals the readable loop."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.analyze.candidates import candidate_pairs, candidate_pairs_reference
from advisor.analyze.prefixes import prefix_pass, workload_from_lists


def _prompts(seed: int, n: int, pieces: int, sessions: int, models: int):
    """Prompts made of a few shared pieces with changed values between them: near-repeats,
    reorderings, conversations that resend their history, and prompts of their own."""
    rng = random.Random(seed)
    bank = [[rng.randrange(50, 400) for _ in range(rng.randrange(5, 90))] for _ in range(pieces)]
    prompts, session_of, model_of = [], [], []
    history: dict[int, list[int]] = {}
    for _ in range(n):
        s = rng.randrange(sessions) if sessions else None
        if s is not None and s in history and rng.random() < 0.5:
            body = history[s] + [rng.randrange(400, 500) for _ in range(rng.randrange(1, 40))]
        else:
            picks = rng.sample(range(pieces), k=rng.randrange(1, min(pieces, 5) + 1))
            body = []
            for k in picks:
                body += bank[k] + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 4))]
        if s is not None:
            history[s] = body
        prompts.append(body or [1])
        session_of.append(f"s{s}" if s is not None else None)
        model_of.append(f"m{rng.randrange(models)}")
    return prompts, session_of, model_of


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 60), st.integers(1, 8), st.integers(0, 4), st.integers(1, 3),
       st.sampled_from([1, 4, 16]), st.sampled_from([2, 8, 32]))
def test_candidate_pairs_equal_the_reference(seed, n, pieces, sessions, models, block, min_tokens):
    prompts, session_of, model_of = _prompts(seed, n, pieces, sessions, models)
    w = workload_from_lists(prompts, sessions=session_of, models=model_of)
    p = prefix_pass(w, block)
    assert candidate_pairs(w, p, min_tokens) == candidate_pairs_reference(w, p, min_tokens)


def test_a_near_repeat_pairs_with_the_request_it_repeats():
    """Hand-built: request 2 repeats request 0's body after a changed head; request 1 is unrelated."""
    body = list(range(100, 180))
    prompts = [[1, 2, 3] + body, list(range(300, 360)), [9, 9, 9] + body]
    w = workload_from_lists(prompts)
    pairs, chunked = candidate_pairs(w, prefix_pass(w, 4), 8)
    assert [r for _, r in pairs] == [2] and pairs[0][0][0] == 0
    assert (pairs, chunked) == candidate_pairs_reference(w, prefix_pass(w, 4), 8)
