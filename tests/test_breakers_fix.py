"""What a prompt fix buys, from the simulator: each breaker's fix applied alone (analyze's
rewrite) and the log replayed through the simulator, checked against the simulator on the
same log generated without the breaker (tests/breaker_logs.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from breaker_logs import Log, generate

from advisor.analyze.breakers import find_breakers
from advisor.analyze.prefixes import prefix_pass
from advisor.recommend.fixes import Rewrites, price_fixes, prompt_fixes
from advisor.sim.configuration import simulate_one
from advisor.workload import Workload

BLOCK = 16


def workload(log: Log) -> Workload:
    v = log.view
    return Workload.from_token_lists([v.units(i).tolist() for i in range(len(v))], request_ids=v.request_ids,
                                     sessions=v.sessions)


def analysis(log: Log) -> tuple[dict, pa.Table]:
    v = log.view
    found = find_breakers(v, prefix_pass(v, BLOCK), log.vocab.decode, BLOCK)
    partner = {v.request_ids[f.b]: v.request_ids[f.a] for f in reversed(found.pairs)}
    prefixes = pa.table({"request_id": v.request_ids, "resembles_id": [partner.get(r) for r in v.request_ids]})
    return {"breakers": found.breakers, "analysis_block_size": BLOCK}, prefixes


def hit_rate(w: Workload, num_blocks: int | None) -> float:
    return simulate_one(w, BLOCK, num_blocks).totals()["hit_rate"]


@pytest.mark.parametrize(("kind", "num_blocks"), [("session id", None), ("tool order", None), ("timestamp", 400)])
def test_the_gain_of_a_fix_is_the_simulated_hit_rate_of_the_log_without_its_breaker(kind: str, num_blocks) -> None:  # noqa: ANN001
    log, held = generate(kind, 40), generate(kind, 40, held=True)
    stats, prefixes = analysis(log)
    fixes, _ = prompt_fixes(stats)
    priced, line = price_fixes(fixes, Rewrites(workload(log), prefixes, stats), BLOCK, num_blocks)
    [f] = priced
    base, without = hit_rate(workload(log), num_blocks), hit_rate(workload(held), num_blocks)
    assert f["hit_rate_before"] == round(base, 6)
    assert abs(f["hit_rate_after"] - without) <= 0.01 and f["hit_rate_gain"] > 0.05
    assert f["estimated_gain"] == round(stats["breakers"][0]["rate_lost"], 6)
    assert f["gain_source"].startswith("simulated in sequential mode at block size 16")
    assert line.startswith(f"Top prompt fix: {f['breaker']} (+{f['hit_rate_gain'] * 100:.1f} points of hit rate, "
                           "simulated in sequential mode")


def test_fixes_the_simulator_cannot_apply_keep_the_estimate_and_say_why() -> None:
    log = generate("session id", 40)
    stats, prefixes = analysis(log)
    stats["breakers"][0]["label"] = "something new"  # no rewrite is defined for it
    fixes, _ = prompt_fixes(stats)
    [f], line = price_fixes(fixes, Rewrites(workload(log), prefixes, stats), BLOCK, None)
    assert f["hit_rate_gain"] == f["estimated_gain"] and "cannot apply this fix" in f["gain_source"]
    assert "up to" in line and "cannot apply this fix" in line
    assert price_fixes([], Rewrites(workload(log), prefixes, stats), BLOCK, None) is None
    assert price_fixes(fixes, Rewrites(workload(log), None, stats), BLOCK, None) is None


def test_naming_every_breaker_is_the_all_fixes_rewrite_made_once() -> None:
    log = generate("timestamp", 30)
    stats, prefixes = analysis(log)
    rewrites = Rewrites(workload(log), prefixes, stats)
    assert len(stats["breakers"]) == 1
    alone, record = rewrites.applied(frozenset({0}))
    assert alone is not None and record["rewritten_requests"] > 0
    every, every_record = rewrites.applied()
    assert every is alone and every_record is record  # one rewrite, so one trace
    # and it is what rewriting with the breaker named gives when made on its own
    fresh, fresh_record = Rewrites(workload(log), prefixes, stats).applied(frozenset({0}))
    assert fresh_record == record
    assert all((fresh.tokens(i) == alone.tokens(i)).all() for i in range(alone.num_requests))


def test_a_simulated_loss_is_not_called_the_top_fix() -> None:
    from advisor.recommend.fixes import top_fix_line

    where = "simulated in sequential mode at block size 16, 5,169 blocks"
    loss = {"breaker": "varying text", "hit_rate_gain": -0.0016, "estimated_gain": 0.0004, "gain_source": where,
            "fix": "Move the varying text after the shared content."}
    line = top_fix_line(loss, where, 0.88, -0.003, 2)
    assert line.startswith("No prompt fix raises the hit rate: the best, varying text, changes it by -0.2 points")
    assert "all 2 fixes together: -0.3 points" in line and "+-" not in line and "Move the" not in line
    gain = {**loss, "hit_rate_gain": 0.05}
    assert top_fix_line(gain, where, 0.88, None, 1).startswith("Top prompt fix: varying text (+5.0 points of hit rate, ")
    estimate = {**loss, "hit_rate_gain": 0.03, "gain_source": "estimate: the simulator cannot apply this fix (x)"}
    assert top_fix_line(estimate, where, 0.88, None, 1).startswith("Top prompt fix: varying text (up to +3.0 points")
