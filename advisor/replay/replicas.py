"""Replay a multi-replica prediction: N vLLM engines, each request on the replica the simulator chose.

Inputs: the `ReplayView` (what is replayed), the configurations to confirm (block size and
usable blocks PER REPLICA, as replicas.parquet counts them), `ReplicaReplay` (the replica
count, the router and the router settings simulate ran with), `EngineOptions`, and either an
in-process model folder or one server URL per replica. Output: a `ReplayResult` with one
`ConfigResult` per replica and configuration (`replica`, `replicas`, `router` set), each
holding that replica's requests, predicted and measured hit tokens per request.

Sequential mode only: the simulator's sequential replica mode
(advisor.sim.replicas.simulate_replicas, mode "sequential": log order, one request at a time,
prefill only, N caches) decides each request's replica and predicts its hits there; every
replica is then one vLLM engine fed its requests in log order. In sequential mode replicas
share nothing (no clock, no queue), so running the engines one after another, each fresh, is
what N engines side by side would measure; it also holds one engine's memory at a time (an
in-process vLLM engine here takes ~4 s to start and a few hundred MB with the tiny model).
Measured per replica must equal predicted per replica, request by request, to the token.
Concurrent replicas would need one clock across engines stepping together: not replayed, and
the result says so.

Routes depend on the block size (prefix-hash keys, cache-aware lookups) and, for cache-aware,
the budget, so they are computed for each configuration replayed (a CPU stand-in at another
block size gets its own routes). Against servers, each URL is one replica; a server running
another budget than the one routed is predicted at its own budget, which keeps the routes only
if the simulator routes the same there (checked; otherwise the replica is not confirmable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from advisor.errors import AdvisorError
from advisor.replay.engine import with_stand_ins
from advisor.replay.plan import (
    CPU_BLOCK_MULTIPLE,
    ENGINE_INPROCESS,
    ConfigResult,
    EngineOptions,
    Predictor,
    ReplayConfig,
    ReplayResult,
    ReplayView,
    confirmability,
    merge_results,
    simulated_workload,
)
from advisor.schema import MODE_SEQUENTIAL
from advisor.sim.configuration import SimulateOptions
from advisor.sim.replicas import simulate_replicas
from advisor.sim.routing import (
    DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_HASH_BLOCKS,
    check_router,
)


@dataclass(frozen=True)
class ReplicaReplay:
    """What to replay: `replicas` engines behind `router`, with simulate's router settings."""

    replicas: int
    router: str
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS
    load_weight: float = DEFAULT_LOAD_WEIGHT

    def __post_init__(self) -> None:
        check_router(self.router)
        if self.replicas < 2:
            raise AdvisorError(f"a multi-replica replay needs at least 2 replicas, got {self.replicas}.")

    def sim_options(self) -> SimulateOptions:
        return SimulateOptions(prefix_hash_blocks=self.prefix_hash_blocks, router_load_weight=self.load_weight,
                               workers=1)


@dataclass(frozen=True)
class Routes:
    """One configuration's routes and prediction, per replayed request (view order)."""

    cfg: ReplayConfig
    replica: list[int]
    hits: list[int]

    def indices(self, r: int) -> list[int]:
        return [i for i, x in enumerate(self.replica) if x == r]


def route(w: ReplayView, cfg: ReplayConfig, rr: ReplicaReplay) -> Routes:
    """The simulator's sequential replica run of the replayed requests at `cfg`: each
    request's replica and its predicted hit tokens there."""
    sim_w = simulated_workload(w, cfg, EngineOptions(mode=MODE_SEQUENTIAL))
    if w.sessions is not None:
        sim_w = replace(sim_w, sessions=list(w.sessions))
    run = simulate_replicas(sim_w, cfg.block_size, cfg.num_blocks, replicas=rr.replicas, router=rr.router,
                            mode=MODE_SEQUENTIAL, options=rr.sim_options())
    return Routes(cfg, [int(x) for x in run.replica], [int(h) for h in run.config.hit_tokens])


def sub_view(w: ReplayView, idx: Sequence[int]) -> ReplayView:
    """The requests at `idx` (view order kept): one replica's share."""
    def take(xs: Sequence[Any] | None) -> Any:
        return None if xs is None else [xs[i] for i in idx]

    return replace(w, request_ids=take(w.request_ids), token_ids=take(w.token_ids), arrival_s=take(w.arrival_s),
                   output_tokens=take(w.output_tokens), cache_salts=take(w.cache_salts), loras=take(w.loras),
                   hash_ids=take(w.hash_ids), sessions=take(w.sessions))


def _predictor(w: ReplayView, routes: Routes, r: int, rr: ReplicaReplay) -> Predictor:
    """Replica r's prediction, for the configuration the engine or server runs."""
    mine = routes.indices(r)
    label = f"simulate_replicas (sequential, {rr.replicas} replicas, {rr.router})"

    def predict(_sub: ReplayView, cfg: ReplayConfig) -> tuple[list[int] | None, str]:
        at = routes if cfg == routes.cfg else route(w, cfg, rr)
        if [at.replica[i] for i in mine] != [r] * len(mine):
            return None, (f"not confirmable: at block size {cfg.block_size} x {cfg.num_blocks} blocks (the server's) "
                          f"the simulator routes these requests differently than at {routes.cfg.block_size} x "
                          f"{routes.cfg.num_blocks}; run every server with the configuration replayed")
        return [at.hits[i] for i in mine], label

    return predict


def _tag(res: ConfigResult, r: int, rr: ReplicaReplay, cfg: ReplayConfig) -> ConfigResult:
    res.replica, res.replicas, res.router = r, rr.replicas, rr.router
    if (res.block_size, res.num_blocks) != (cfg.block_size, cfg.num_blocks):  # a server's own budget
        res.extra = {**(res.extra or {}), "routed_at": [cfg.block_size, cfg.num_blocks]}
    return res


def _not_run(cfg: ReplayConfig, mode: str, reason: str, queries: int, rr: ReplicaReplay) -> ConfigResult:
    return ConfigResult(cfg.block_size, cfg.num_blocks, mode, False, reason, queries=queries,
                        replicas=rr.replicas, router=rr.router)


def replay_replicas(
    w: ReplayView, configs: Sequence[ReplayConfig], opts: EngineOptions, rr: ReplicaReplay,
    run_config: Callable[[ReplayConfig, list[ReplayView], list[Predictor]], ReplayResult], *,
    cpu_backend: bool = False,
) -> ReplayResult:
    """Every configuration through `rr.replicas` engines (module docstring), plus the CPU
    stand-in of a block size the CPU backend cannot run. `run_config(cfg, views, predictors)`
    replays each replica's view at `cfg` on its own engine or server (replicas that got no
    request are left out) and returns one `ConfigResult` per view, in order."""
    queries = sum(len(t) for t in w.token_ids)
    if opts.mode != MODE_SEQUENTIAL:
        reason = ("not run: a multi-replica replay runs in sequential mode only (each replica's engine on its "
                  "own); concurrent replicas need one clock across engines stepping together, which the replay "
                  "does not build. Replay with --replay-mode sequential")
        return ReplayResult(ENGINE_INPROCESS, None, None, w.synthetic,
                            [_not_run(c, opts.mode, reason, queries, rr) for c in configs])
    results: list[ReplayResult] = []
    rows: list[ConfigResult] = []
    notes: list[str] = []
    for cfg in with_stand_ins(configs, cpu_backend):
        why = confirmability(w, cfg, opts.mode, opts.max_output_tokens, cpu_backend)
        if why is not None:
            rows.append(_not_run(cfg, opts.mode, why, queries, rr))
            continue
        routes = route(w, cfg, rr)
        used = [r for r in range(rr.replicas) if routes.indices(r)]
        notes += [f"block size {cfg.block_size}, {cfg.num_blocks} blocks: the {rr.router} router sent no request to "
                  f"replica {r}, so nothing was replayed there" for r in range(rr.replicas) if r not in used]
        got = run_config(cfg, [sub_view(w, routes.indices(r)) for r in used],
                         [_predictor(w, routes, r, rr) for r in used])
        results.append(got)
        for r, c in zip(used, got.configs, strict=True):
            if cfg not in configs:
                c.extra = {**(c.extra or {}), "stand_in_for": [[x.block_size, x.num_blocks] for x in configs
                                                               if x.block_size % CPU_BLOCK_MULTIPLE]}
            rows.append(_tag(c, r, rr, cfg))
    if not results:
        return ReplayResult(ENGINE_INPROCESS, None, None, w.synthetic, rows, notes=notes)
    merged = merge_results(results)
    return ReplayResult(merged.engine, merged.vllm_version, merged.model, w.synthetic, rows,
                        notes=[*(merged.notes or []), *notes])
