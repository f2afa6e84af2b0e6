"""How to deploy a replica layout: the per-replica `vllm serve` line, the router, its settings.

Inputs: the layout chosen by advisor.recommend.replicas (router, replica count, tensor-parallel
size, blocks per replica and KV bytes per GPU), the replicas.parquet row it was judged on,
`RecommendOptions`, the model geometry and GPU memory when known, and the router settings
simulate ran with. Output: recommendation.json's `replicas.recommended.deploy`.

The serve line is advisor.recommend.serve's at the layout's TP and budget. `least-loaded` is
what vLLM's own data parallelism does (`--data-parallel-size N`: for a dense model N
independent engines, each its own KV pool, vllm/v1/engine/core.py; its front end sends each
request to the engine with the fewest unfinished requests, vllm/v1/engine/core_client.py
`DPLBAsyncMPClient.get_core_engine_for_request`, read in 0.32 and 0.34); the other routers
run as N servers behind an outside router. `ROUTER_GUIDE` says, per router, what runs it and
where the real one differs from the simulated one (docs/replicas.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from advisor import kvmemory as kv
from advisor.recommend.options import RecommendOptions
from advisor.recommend.rank import Point
from advisor.recommend.serve import data_parallel_flags, serve_flags
from advisor.sim.routing import (
    CACHE_AWARE,
    LEAST_LOADED,
    PREFIX_HASH,
    ROUND_ROBIN,
    SESSION,
)

SINGLE_ENGINE = "single engine"  # the router of a one-replica layout: there is none


@dataclass(frozen=True)
class RouterSettings:
    """The router settings simulate ran with (its recorded options)."""

    prefix_hash_blocks: int = 1
    load_weight: float = 1.0


# Per router: what runs it, its key settings, and where the real one differs from the simulated one.
ROUTER_GUIDE: dict[str, dict[str, str]] = {
    ROUND_ROBIN: {
        "run": "any load balancer in round-robin mode in front of the servers, e.g. vLLM production-stack's "
               "router (vllm-router --routing-logic roundrobin)",
        "differs": "the simulated router rotates over the whole log in arrival order; a balancer with several "
                   "workers or retries rotates per worker: other replicas per request, the same even spread",
    },
    SESSION: {
        "run": "session-sticky routing on the log's session/user id: production-stack's vllm-router "
               "--routing-logic session --session-key HEADER (the header that carries the id), or a gateway's "
               "consistent hash on it",
        "differs": "production-stack places sessions on a hash ring, not blake2b mod N: sessions land on other "
                   "replicas, so the hits (which need only a session to stay on one replica) carry over but the "
                   "load spread can differ when sessions are few; requests without a session go to its "
                   "lowest-QPS replica (simulated: round-robin, counted as fallbacks)",
    },
    PREFIX_HASH: {
        "run": "a gateway rule that hashes the prompt's first K blocks (K x the block size in tokens) to a "
               "replica, e.g. a consistent hash on the shared system prompt",
        "differs": "production-stack's --routing-logic prefixaware is not this rule: it sends a request where "
                   "the longest matching prefix was sent before (a trie of routed prompts, evictions ignored), "
                   "closer to cache-aware with load weight 0; a gateway hashing text rather than token blocks "
                   "splits where the tokenizer does not",
    },
    CACHE_AWARE: {
        "run": "a KV-aware router: llm-d's inference scheduler (prefix-cache scorer plus queue and KV-usage "
               "scorers), NVIDIA Dynamo's KV router, or SGLang's / vllm-router's cache_aware policy",
        "differs": "the simulated router reads every replica's true cache at each arrival and scores cached "
                   "prefix tokens minus w x queued prompt tokens; real ones learn the caches from KV events with a "
                   "delay or guess them from what they routed, and weigh load their own way (llm-d: weighted "
                   "scorers; Dynamo: an overlap-versus-load weight; SGLang and vllm-router: a match threshold and "
                   "balance thresholds): set their weight to match w",
    },
    LEAST_LOADED: {
        "run": "vLLM's own data parallelism: one vllm serve ... --data-parallel-size N starts N engines (each its "
               "own KV pool) behind vLLM's front end, which balances them",
        "differs": "vLLM's balancer (0.32 and 0.34: DPLBAsyncMPClient) scores an engine by the larger of its own "
                   "in-flight requests and the coordinator's waiting + running snapshot (refreshed about every "
                   "100 ms), adds a penalty for waiting requests when the engine's KV cache is over half full, and "
                   "rotates where its scan starts, so ties spread round-robin; the simulated least-loaded sends ties "
                   "to the lowest-index replica, so where replicas are often idle it piles requests on replica 0 "
                   "(more hits, a high load spread) while vLLM spreads them: trust it only for a busy log. With an "
                   "MoE model vLLM's data parallelism steps the engines in lockstep (expert parallelism), which "
                   "is not simulated",
    },
}


def deploy(router: str, replicas: int, tp: int, row: dict[str, Any], num_blocks: int, gpu_kv_bytes: int | None,
           options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None, hash_trace: bool,
           longest_request: int | None, routing: RouterSettings) -> dict[str, Any]:
    """How to run `replicas` replicas of `tp` GPUs each, `num_blocks` usable blocks per replica
    (per GPU: `gpu_kv_bytes` of KV memory when known), behind `router` (SINGLE_ENGINE for one):
    the per-replica serve line, the router and its settings, and where the real router differs
    from the simulated one. `row`: the replicas.parquet row it was judged on."""
    point = Point(block_size=int(row["block_size"]), num_blocks=num_blocks, kv_gib=row.get("kv_gib"),
                  cost_gib=float(row.get("kv_gib") or 0.0), requests=int(row["requests"]), queries=int(row["queries"]),
                  hit_tokens=int(row["hit_tokens"]), hit_rate=float(row["hit_rate"]),
                  ceiling_hit_rate=float(row["hit_rate"]), marginal=0.0, score=0.0, fits_gpu=True)
    flags, _line, notes = serve_flags(point, replace(options, tensor_parallel_size=tp), geom, gpu_gib,
                                      hash_trace, None, concurrent=True, longest_request=longest_request,
                                      gpu_kv_bytes=gpu_kv_bytes)
    data_parallel = router == LEAST_LOADED
    flags = [*flags, *data_parallel_flags(replicas, data_parallel)]
    model = geom.serve_name if geom is not None and geom.serve_name else (options.model or "<MODEL>")
    out: dict[str, Any] = {
        "replicas": replicas, "tensor_parallel_size": tp, "gpus_used": replicas * tp,
        "router": router, "data_parallel": data_parallel and replicas > 1,
        "flags": flags, "vllm_serve": " ".join(["vllm serve", model, *flags]), "memory_notes": notes,
    }
    if replicas == 1:
        out["launch"] = "one vLLM server on all the GPUs: no router"
        return out
    guide = ROUTER_GUIDE[router]
    out["router_settings"] = _settings(router, point.block_size, routing)
    out["launch"] = (f"{guide['run']}; the line above starts all {replicas} engines, {tp} "
                     f"GPU{'s' if tp > 1 else ''} each"
                     if data_parallel else
                     f"{replicas} servers, each running the line above on {tp} GPU{'s' if tp > 1 else ''} "
                     f"of its own, behind {guide['run']}")
    out["differs_from_simulated"] = guide["differs"]
    return out


def _settings(router: str, block_size: int, routing: RouterSettings) -> dict[str, Any]:
    if router == PREFIX_HASH:
        return {"prefix_hash_blocks": routing.prefix_hash_blocks, "block_size": block_size,
                "hashed_tokens": routing.prefix_hash_blocks * block_size}
    if router == CACHE_AWARE:
        return {"load_weight": routing.load_weight,
                "score": "cached prefix tokens - load_weight x prompt tokens queued and not yet computed"}
    if router == SESSION:
        return {"key": "the log's session/user id (requests without one: round-robin)"}
    if router == LEAST_LOADED:
        return {"load": "requests running + waiting + sent and not yet arrived (a count, not tokens)"}
    return {}
