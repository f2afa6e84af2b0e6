"""Cache breakers of every kind, shallow and past 4,000 tokens, against the same log with the
breaker held constant (tests/breaker_logs.py generates both).

The truth is computed, not assumed: the prefix pass's token ceiling of the log and of the
held log (advisor/analyze/prefixes.py). Each story checks that exactly one breaker is found,
with the label of its kind, at the first token where the log's prompts differ, affecting
exactly the requests whose ceiling the held log raises, and losing the ceiling difference
(within 1 point). The held log and a log with nothing varying report none.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pytest
from breaker_logs import KINDS, LABEL, Log, generate

from advisor.analyze.breakers import find_breakers
from advisor.analyze.hashing import common_prefix_len
from advisor.analyze.prefixes import (
    ceiling_per_request,
    prefix_pass,
    workload_from_lists,
)
from advisor.analyze.rewrite import fix_breakers
from advisor.report.model import _redact_stats

BLOCK = 16
DEPTHS = {"shallow": 40, "deep": 3800}  # words of policy before the breaker's slot


@functools.cache
def logs(kind: str, depth: str) -> tuple[Log, Log]:
    return generate(kind, DEPTHS[depth]), generate(kind, DEPTHS[depth], held=True)


def ceiling(log: Log) -> tuple[np.ndarray, float]:
    c = ceiling_per_request(log.view, prefix_pass(log.view, BLOCK))
    return c, float(c.sum() / log.view.n_tokens.sum())


def breakers(log: Log):  # noqa: ANN201
    return find_breakers(log.view, prefix_pass(log.view, BLOCK), log.vocab.decode, BLOCK)


def first_difference(log: Log) -> int:
    v = log.view
    return min(common_prefix_len(v.units(i), v.units(j)) for i in range(len(v)) for j in range(i))


@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_found_where_it_starts_and_priced_at_the_ceiling_difference(kind: str, depth: str) -> None:
    log, held = logs(kind, depth)
    [b] = breakers(log).breakers
    assert b["label"] == LABEL[kind]
    start = first_difference(log)
    assert b["position_token"] == start and b["position_block"] == start // BLOCK
    if depth == "deep":
        assert start > 4_000
    (c, rate), (c_held, rate_held) = ceiling(log), ceiling(held)
    assert b["requests_affected"] == int(np.count_nonzero(c_held - c >= 2 * BLOCK)) > 0
    assert abs(b["rate_lost"] - (rate_held - rate)) <= 0.01
    assert b["rate_lost"] == b["tokens_lost"] / int(log.view.n_tokens.sum())
    assert b["varies"] == ("per request" if kind in ("timestamp", "document") else "per session")
    ex = b["examples"][0]
    assert ex["a_diff"] != ex["b_diff"]
    assert ex["a_diff"][:40] in ex["a_context"] and ex["b_diff"][:40] in ex["b_context"]
    assert breakers(held).breakers == []


@pytest.mark.parametrize("kind", ["tool order", "schema key order", "JSON key order"])
def test_order_findings_name_what_moved_and_the_fix(kind: str) -> None:
    log, _ = logs(kind, "shallow")
    [b] = breakers(log).breakers
    a_order, b_order = b["orders"]
    assert sorted(a_order) == sorted(b_order) and a_order != b_order
    assert set(b_order) <= set(log.names) and set(b["moved"]) <= set(b_order) and b["moved"]
    assert all(name in b["description"] for name in b_order)
    if kind == "tool order":
        assert b["fix"] == f"Send the tools sorted by name: {', '.join(sorted(b_order))}."
    else:
        assert "sort_keys=True" in b["fix"]
    redacted = json.dumps(_redact_stats({"breakers": [b]}))  # report --redact: the names are prompt text
    assert not any(f'"{name}' in redacted or f" {name}" in redacted for name in log.names)


def test_the_profile_before_the_instructions_is_varying_text_not_a_timestamp() -> None:
    log, _ = logs("profile", "shallow")
    [b] = breakers(log).breakers
    assert b["label"] == "varying text" and "member since" in b["examples"][0]["a_context"]
    assert "after the shared content" in b["fix"]


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_a_log_with_nothing_varying_reports_none(depth: str) -> None:
    log, _ = logs("none", depth)
    assert breakers(log).breakers == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_rewrite_applies_each_fix(kind: str) -> None:
    """The log rewritten by the breaker's fix reaches the held log's ceiling (a value taken
    from the partner, an order, a normalized form); a long value (a document) is moved to
    the end of the prompt instead, and reaches the ceiling of the log a client would send with
    the document after the user's question; either way no breaker is left."""
    log, held = logs(kind, "shallow")
    if kind == "document":
        held = generate(kind, DEPTHS["shallow"], document_last=True)
    found = breakers(log)
    v = log.view
    diverge: dict[str, int] = {}
    partner: dict[str, str | None] = {rid: None for rid in v.request_ids}
    for f in found.pairs:
        partner.setdefault(v.request_ids[f.b], None)
        if partner[v.request_ids[f.b]] is None:
            partner[v.request_ids[f.b]], diverge[v.request_ids[f.b]] = v.request_ids[f.a], f.diverge
    prefixes = pa.table({"request_id": v.request_ids, "resembles_id": [partner[r] for r in v.request_ids]})
    lists = [v.units(i).tolist() for i in range(len(v))]
    fixed, record = fix_breakers(v.request_ids, lists, prefixes, {"breakers": found.breakers, "analysis_block_size": BLOCK})
    assert fixed is not None, record
    assert record["by_label"] == {LABEL[kind]: record["by_label"][LABEL[kind]]}
    after = Log(workload_from_lists(fixed, request_ids=v.request_ids, sessions=v.sessions), log.vocab, log.slot_start)
    (_, rate), (_, rate_held), (_, rate_fixed) = ceiling(log), ceiling(held), ceiling(after)
    if kind == "document":
        assert sorted(map(sorted, fixed)) == sorted(map(sorted, lists))  # the same tokens, moved
    assert abs(rate_fixed - rate_held) <= 0.01
    assert rate_fixed > rate
    assert breakers(after).breakers == []


@pytest.mark.parametrize(("kind", "depth"), [("tool order", "shallow"), ("JSON key order", "deep")])
def test_two_breakers_in_one_log_are_both_found_and_add_up_to_the_ceiling_difference(kind: str, depth: str) -> None:
    """A per-session id near the top as well: each breaker is priced given the ones before it
    are fixed, so together they lose what holding both constant gains."""
    log, held = logs(kind, depth)
    ids = {s: log.vocab.encode(f" ref {k * 7919 % 10007:05d}x{k}") for k, s in enumerate(sorted(set(log.view.sessions)))}

    def with_id(x: Log, constant: bool) -> Log:
        v = x.view
        lists = [v.units(i)[:20].tolist() + ids["s0" if constant else v.sessions[i]] + v.units(i)[20:].tolist()
                 for i in range(len(v))]
        return Log(workload_from_lists(lists, request_ids=v.request_ids, sessions=v.sessions), x.vocab, x.slot_start)

    both, neither = with_id(log, False), with_id(held, True)
    found = breakers(both).breakers
    assert sorted(b["label"] for b in found) == sorted([LABEL[kind], "varying text"])
    # the id varies from its number on (" ref" is the same), the other breaker as far on as the id is long
    assert {b["position_token"] for b in found} == {21, first_difference(log) + len(ids["s0"])}
    assert abs(sum(b["rate_lost"] for b in found) - (ceiling(neither)[1] - ceiling(both)[1])) <= 0.01
