"""Prompt fixes: the cache breakers the analysis found, as changes to make to the prompts.

Input: stats.json as a dict (its `breakers`), or None when the analyze stage did not run;
for `price_fixes`, the workload, prefixes.parquet and the recommended configuration.
Output: recommendation.json's `prompt_fixes` (largest hit-rate gain first) and the reasoning
line that names the top one or says why there is none.

`prompt_fixes` alone gives each fix the analysis' token-granular estimate (`rate_lost`: what
an infinite, token-granular cache would gain). `price_fixes` replaces it with the simulator's
answer: the log is rewritten with that one fix applied (advisor.analyze.rewrite, `only`) and
replayed through the simulator in sequential mode at the recommended block size and budget,
as is the log with every fix applied; the gain is the hit-rate difference to the log as it is.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from advisor import schema
from advisor.analyze.rewrite import fix_breakers
from advisor.recommend.traces import StoredTrace, Traces
from advisor.sim.configuration import simulate_one
from advisor.workload import Workload

MAX_PRICED = 8  # fixes simulated one by one (the largest estimated losses); the rest keep the estimate


def prompt_fixes(stats: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    if stats is None:
        return [], ("No stats.json (the analyze stage did not run), so no prompt fixes are suggested; "
                    "run `pc-advise analyze RUN_DIR` to find what breaks reuse.")
    fixes = []
    for k, br in enumerate(stats.get("breakers") or []):
        gain = float(br.get("rate_lost") or 0.0)
        fixes.append({
            "breaker": br.get("label", "unknown"),
            "breaker_index": k,  # into stats.json's breakers
            "hit_rate_gain": round(gain, 6),
            "estimated_gain": round(gain, 6),
            "gain_source": "estimate: token-granular, infinite cache (analyze's tokens lost)",
            "description": br.get("description", ""),
            "fix": br.get("fix"),
            "position_token": br.get("position_token"),
            "requests_affected": br.get("requests_affected"),
            "tokens_lost": br.get("tokens_lost"),
        })
    fixes.sort(key=lambda f: -f["hit_rate_gain"])
    if not fixes:
        return [], "The analysis found no cache breakers: the prompts already share what they can."
    top = fixes[0]
    return fixes, (f"Top prompt fix: {top['breaker']} (up to +{top['hit_rate_gain'] * 100:.1f} points of hit rate, "
                   "token-granular estimate from the analysis; the block-level gain is at most that).")


class Rewrites:
    """The log's prompts with analyze's fixes applied (advisor.analyze.rewrite), each set of
    fixes rewritten once: the fixes' prices and the time section's "breakers fixed" share them."""

    def __init__(self, workload: Workload, prefixes: pa.Table | None, stats: dict[str, Any] | None,
                 stored: StoredTrace | None = None) -> None:
        self.workload, self.prefixes, self.stats = workload, prefixes, stats
        self.traces = Traces(workload, stored)  # each rewrite's block trace, made once (`stored`: the log's)
        self._done: dict[frozenset[int] | None, tuple[Workload | None, dict[str, Any]]] = {}

    @cached_property
    def _lists(self) -> tuple[list[str], list[np.ndarray]]:
        w = self.workload
        # views into the workload's one id array: fix_breakers replaces the rows it rewrites, copies none
        return w.request_ids.to_pylist(), [w.tokens(i) for i in range(w.num_requests)]

    def applied(self, only: frozenset[int] | None = None) -> tuple[Workload | None, dict[str, Any]]:
        """(the workload with the fixes `only` names applied — None: all of them — or None when
        they cannot be applied, the rewrite's record)."""
        if only is not None and only >= set(range(len((self.stats or {}).get("breakers") or []))):
            only = None  # every breaker named: the same rewrite as all of them, made once
        if only not in self._done:
            ids, lists = self._lists
            fixed, record = fix_breakers(ids, lists, self.prefixes, self.stats,
                                         only=set(only) if only is not None else None)
            self._done[only] = (self.workload.with_token_lists(fixed) if fixed is not None else None, record)
        return self._done[only]


def price_fixes(
    fixes: list[dict[str, Any]], rewrites: Rewrites, block_size: int, num_blocks: int | None,
) -> tuple[list[dict[str, Any]], str] | None:
    """The fixes with `hit_rate_gain` simulated (module docstring) and the reasoning line,
    or None when there is nothing to simulate (no fixes, a hash trace, no analysis)."""
    workload = rewrites.workload
    if not fixes or workload.is_hash_trace or rewrites.stats is None or rewrites.prefixes is None:
        return None

    def hit_rate(w: Workload) -> float:
        res = simulate_one(w, block_size, num_blocks, mode=schema.MODE_SEQUENTIAL, policy=schema.POLICY_LRU,
                           trace=rewrites.traces.trace(w, block_size))
        return float(res.totals()["hit_rate"])

    where = (f"simulated in sequential mode at block size {block_size}, "
             + (f"{num_blocks:,} blocks" if num_blocks is not None else "unlimited blocks"))
    base = hit_rate(workload)
    priced = sorted(fixes, key=lambda f: -f["estimated_gain"])
    out = []
    for n, f in enumerate(priced):
        f = dict(f)
        if n < MAX_PRICED:
            fixed, record = rewrites.applied(frozenset({int(f["breaker_index"])}))
            if fixed is None:
                f["gain_source"] = f"estimate: the simulator cannot apply this fix ({record['reason']})"
            else:
                after = hit_rate(fixed)
                f.update(hit_rate_gain=round(after - base, 6), hit_rate_after=round(after, 6),
                         hit_rate_before=round(base, 6), gain_source=where,
                         rewritten_requests=record["rewritten_requests"])
        else:
            f["gain_source"] = f"estimate: only the {MAX_PRICED} largest fixes are simulated one by one"
        out.append(f)
    out.sort(key=lambda f: -f["hit_rate_gain"])
    every, _ = rewrites.applied() if len(fixes) > 1 else (None, {})
    all_gain = hit_rate(every) - base if every is not None else None
    return out, top_fix_line(out[0], where, base, all_gain, len(fixes))


def top_fix_line(top: dict[str, Any], where: str, base: float, all_gain: float | None, n_fixes: int) -> str:
    """The reasoning line for the best fix: its simulated gain (`where`) from `base`, or
    analyze's estimate when it could not be simulated; when the best simulated gain is not a
    gain, it says that no fix raises the hit rate rather than calling a loss the top fix."""
    gain = float(top["hit_rate_gain"])
    both = f"; all {n_fixes} fixes together: {all_gain * 100:+.1f} points" if all_gain is not None else ""
    if top["gain_source"] != where:
        return (f"Top prompt fix: {top['breaker']} (up to {gain * 100:+.1f} points of hit rate, "
                f"{top['gain_source']}). {top.get('fix') or ''}").rstrip()
    if gain > 0:
        return (f"Top prompt fix: {top['breaker']} ({gain * 100:+.1f} points of hit rate, {where}, "
                f"from {base:.1%}{both}). {top.get('fix') or ''}").rstrip()
    return (f"No prompt fix raises the hit rate: the best, {top['breaker']}, changes it by {gain * 100:+.1f} "
            f"points when applied ({where}, from {base:.1%}{both}), against the analysis' estimate of "
            f"{float(top.get('estimated_gain') or 0.0) * 100:+.2f} points (tokens, an unlimited cache). "
            "The prompts are best left as they are.")
