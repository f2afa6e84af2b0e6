"""The main view of a simulation: the one policy, mode and window that the recommendation
ranks and the report shows.

Inputs: sim.parquet rows (schema.SIM), as mappings or, for `select_view`, a polars frame;
optionally recommendation.json, whose `view` / `recommended` (and old top-level `mode`) name
a view.
Outputs: `choose_view` -> {"policy", "mode", "window"} (None without rows); `main_view` ->
that view's rows, by block size then budget, the ceiling row last; `select_view` -> the
recommend stage's view and its LRU rows; `describe` -> the reasoning's sentence on the view.

The one rule, key by key (policy, then mode, then window): the value the recommendation
names, when simulated, so the report shows what was recommended; else the first value of
`PREFERENCE` that has finite-budget rows, else the first that has any row, else the first
in sorted order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from advisor.errors import AdvisorError
from advisor.schema import (
    MODE_CONCURRENT,
    MODE_SEQUENTIAL,
    POLICY_LRU,
    WINDOW_COLD,
    WINDOW_WARM,
)

if TYPE_CHECKING:
    import polars as pl

PREFERENCE: dict[str, tuple[str, ...]] = {
    "policy": (POLICY_LRU,),  # vLLM's eviction
    # Logged arrivals with running requests holding their blocks is what a server sees.
    "mode": (MODE_CONCURRENT, MODE_SEQUENTIAL),
    # The steady state is what a long-running server sees; cold also counts the cache filling up.
    "window": (WINDOW_WARM, WINDOW_COLD),
}


def named_view(rec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The policy/mode/window a recommendation names; `view` wins over `recommended`."""
    rec = rec or {}
    named = {**(rec.get("recommended") or {}), **(rec.get("view") or {})}
    if rec.get("mode"):
        named.setdefault("mode", rec["mode"])
    return named


def choose_view(rows: Iterable[Mapping[str, Any]], rec: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """The view these rows are read in (module docstring); None when there are no rows."""
    named = named_view(rec)
    left = list(rows)
    view: dict[str, str] = {}
    for key, prefer in PREFERENCE.items():
        values = {str(r.get(key)) for r in left}
        if not values:
            return None
        want = named.get(key)
        view[key] = want if want in values else _preferred(left, key, prefer)
        left = [r for r in left if str(r.get(key)) == view[key]]
    return view


def _preferred(rows: Sequence[Mapping[str, Any]], key: str, prefer: tuple[str, ...]) -> str:
    finite = {str(r.get(key)) for r in rows if r.get("num_blocks") is not None}
    values = finite or {str(r.get(key)) for r in rows}
    return next(v for v in (*prefer, *sorted(values)) if v in values)


def main_view(sim: Sequence[Mapping[str, Any]], rec: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of the view `choose_view` picks, by block size, then budget (ceiling last)."""
    view = choose_view(sim, rec)
    if view is None:
        return []
    rows = [dict(r) for r in sim if all(str(r.get(k)) == v for k, v in view.items())]
    rows.sort(key=lambda r: (r["block_size"], r["num_blocks"] is None, r["num_blocks"] or 0))
    return rows


def select_view(sim: pl.DataFrame) -> tuple[dict[str, str], pl.DataFrame, pl.DataFrame]:
    """The recommend stage's view, its rows, and all LRU rows (the reserve reads every mode).

    Only LRU rows are ranked, since that is vLLM's policy; a view needs finite budgets.
    """
    lru = sim.filter(sim["policy"] == POLICY_LRU)
    if lru.height == 0:
        raise AdvisorError("sim.parquet has no lru rows: rerun `pc-advise simulate` (LRU is vLLM's policy).")
    if lru["num_blocks"].drop_nulls().len() == 0:
        raise AdvisorError(
            "sim.parquet has no finite-budget LRU rows to choose from: rerun `pc-advise simulate` "
            "with at least one memory budget (--num-blocks or --kv-cache-gib)."
        )
    view = choose_view(lru.select("policy", "mode", "window", "num_blocks").iter_rows(named=True))
    assert view is not None  # lru has rows
    rows = lru.filter((lru["mode"] == view["mode"]) & (lru["window"] == view["window"]))
    return view, rows, lru


def describe(view: Mapping[str, str]) -> str:
    """What the recommendation read, for its reasoning."""
    mode, window = view["mode"], view["window"]
    return (
        f"Hit rates here come from the {mode} simulation's {window} window ("
        + ("steady state after the warm-up; the cold figure counts the cache filling up" if window == WINDOW_WARM
           else "whole log, including the cache filling up")
        + ("; arrivals at logged times with running requests holding their blocks)" if mode == MODE_CONCURRENT
           else "; one request at a time, so memory for running requests is not modelled)")
    )
