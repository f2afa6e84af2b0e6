"""Prompt fixes: the cache breakers the analysis found, as changes to make to the prompts.

Input: stats.json as a dict (its `breakers`), or None when the analyze stage did not run.
Output: recommendation.json's `prompt_fixes` (largest hit-rate gain first) and the
reasoning line that names the top one or says why there is none.
"""

from __future__ import annotations

from typing import Any


def prompt_fixes(stats: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    if stats is None:
        return [], ("No stats.json (the analyze stage did not run), so no prompt fixes are suggested; "
                    "run `pc-advise analyze RUN_DIR` to find what breaks reuse.")
    fixes = []
    for br in stats.get("breakers") or []:
        gain = float(br.get("rate_lost") or 0.0)
        fixes.append({
            "breaker": br.get("label", "unknown"),
            "hit_rate_gain": round(gain, 6),
            "description": br.get("description", ""),
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
