"""Replay, the engine-free half: what is replayed, what is predicted, what came out.

Inputs: requests.parquet and tokens.parquet (`load_workload`: token ids, arrival
times, output lengths; hash traces get synthesized token streams), the
configurations to confirm (`configs_to_confirm`: recommendation.json or explicit
block size / block count, plus extra sweep rows) and sim_requests.parquet
(`predicted_hits`: per-request predictions, computed with advisor.sim.cache /
advisor.sim.grid when a configuration is not in it). Output: `ReplayResult`, whose
`as_json()` is replay.json, and `check_failures` for `replay --check`.

No vllm here: advisor.replay (in-process engine) and advisor.replay.server (a
running server over HTTP) both measure, and both report through these types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from advisor import workload
from advisor.errors import AdvisorError
from advisor.schema import MODE_CONCURRENT, MODE_SEQUENTIAL
from advisor.sim.configuration import SCHEDULING_SYNC, SimulateOptions, simulate_one
from advisor.workload import Workload as SimWorkload

STATUS_CONFIRMED = "confirmed"
STATUS_MISMATCH = "mismatch"
STATUS_NOT_RUN = "not_run"
STATUS_NOT_CONFIRMABLE = "not_confirmable"
ENGINE_INPROCESS = "vllm-inprocess"
ENGINE_SERVER = "vllm-server"
CONCURRENT_TOLERANCE_POINTS = 1.0  # docs/design.md §5 fidelity contract
SYNTHETIC_VOCAB = 8192  # token ids drawn for hash-trace blocks: [2, SYNTHETIC_VOCAB)
MAX_LISTED_MISMATCHES = 50
CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention backend


@dataclass(frozen=True)
class ReplayConfig:
    block_size: int
    num_blocks: int  # usable blocks, as the simulator counts them (pinned - null block)

    @classmethod
    def parse_list(cls, text: str) -> list[ReplayConfig]:
        """'32:200,64:100' -> configurations; raises AdvisorError naming the format."""
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                b, n = part.split(":")
                out.append(cls(int(b), int(n)))
            except ValueError:
                raise AdvisorError(
                    f"--configs entry {part!r} is not BLOCK_SIZE:NUM_BLOCKS; "
                    "write e.g. --configs 32:200,64:100."
                ) from None
        return out


_SIMULATED = SimulateOptions(workers=1)  # the simulator's defaults, which a replay shares


@dataclass(frozen=True)
class EngineOptions:
    """How one replay runs (the replay stage resolves them from `ReplayOptions` and the
    simulate stage's record); the clock defaults are the simulator's own."""

    mode: str = MODE_SEQUENTIAL
    speedup: float = _SIMULATED.speedup  # concurrent mode: arrival times divided by this
    max_output_tokens: int = 256  # concurrent mode: cap on logged output lengths
    replay_model: str | None = None  # a local model folder; None = tiny random Llama
    max_num_seqs: int = _SIMULATED.max_num_seqs  # the engine's, and the concurrent prediction's
    # replay only the first N requests: both modes are causal, so their predictions are the
    # first N of the whole log's
    limit: int | None = None
    # Concurrent mode's clock: the simulator's flat clock (advisor.sim.steptime.StepTimeModel.from_rates), so the
    # replay is independent of how fast this machine runs the model.
    prefill_tps: float = _SIMULATED.prefill_tps
    decode_tps: float = _SIMULATED.decode_tps

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "speedup": self.speedup,
            "max_output_tokens": self.max_output_tokens, "replay_model": self.replay_model,
            "max_num_seqs": self.max_num_seqs, "limit": self.limit,
            "prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps,
        }


@dataclass(frozen=True)
class ReplayView:
    """What is replayed, in arrival order."""

    request_ids: list[str]
    token_ids: list[list[int]]
    arrival_s: list[float]  # offsets from the first request, seconds
    output_tokens: list[int | None]
    cache_salts: list[str | None]  # as simulated: with the model when the log names several (cache_namespaces)
    loras: list[str | None]
    synthetic: bool  # token ids synthesized from a hash trace
    hash_ids: list[list[int]] | None = None
    trace_block_size: int | None = None
    total_requests: int | None = None  # in the log; more than replayed under a limit
    # Requests vLLM treats apart (n > 1 completions, prompt logprobs) are replayed as plain
    # single requests: then sim_requests.parquet, which models them, is not this replay's
    # prediction (`predicted_hits` simulates the replay as sent instead).
    treated_apart: int = 0
    sessions: list[str | None] | None = None  # per request session id (the session router's key)

    @property
    def max_token_id(self) -> int:
        return max((max(t) for t in self.token_ids if t), default=0)

    @property
    def longest(self) -> int:
        return max((len(t) for t in self.token_ids), default=0)


def synthesize_trace_tokens(
    hash_ids: Sequence[Sequence[int]], input_lengths: Sequence[int], trace_block_size: int,
    vocab: int = SYNTHETIC_VOCAB,
) -> list[list[int]]:
    """Token streams reproducing a hash trace's structure.

    Each hash id gets its own `trace_block_size` tokens (seeded by the id, so equal
    ids give identical blocks and distinct ids distinct ones, up to a 1-in-vocab^B
    chance); a prompt's last id covers only `input_length - (n-1)*B` tokens.
    """
    blocks: dict[int, np.ndarray] = {}

    def block(h: int) -> np.ndarray:
        if h not in blocks:
            rng = np.random.default_rng([int(h) & 0xFFFFFFFFFFFFFFFF, 0x5EED])
            blocks[h] = rng.integers(2, vocab, size=trace_block_size, dtype=np.int64)
        return blocks[h]

    out = []
    for ids, length in zip(hash_ids, input_lengths):
        length = int(length)
        if not ids:
            out.append([])
            continue
        stream = np.concatenate([block(h) for h in ids])[:length]
        if len(stream) < length:  # fewer ids than input_length needs: pad with fresh tokens
            rng = np.random.default_rng([len(out), 0xFADE])
            stream = np.concatenate([stream, rng.integers(2, vocab, size=length - len(stream))])
        out.append(stream.astype(int).tolist())
    return out


def from_workload(sw: workload.Workload, limit: int | None = None) -> ReplayView:
    """What the engine replays: the simulator's view of the run folder (advisor.workload,
    the one reader of requests + tokens), as token lists, first `limit` requests."""
    total = sw.num_requests
    n = total if not limit else min(limit, total)
    arrivals = sw.timestamps[:n]
    arrivals = np.where(np.isfinite(arrivals), arrivals, np.arange(n, dtype=np.float64))
    t0 = float(arrivals.min()) if n else 0.0
    if sw.is_hash_trace:
        assert sw.trace_block_size is not None
        token_ids = synthesize_trace_tokens([sw.hash_ids(i).tolist() for i in range(n)], sw.n_tokens[:n].tolist(),
                                            sw.trace_block_size)
    else:
        token_ids = [sw.tokens(i).tolist() for i in range(n)]
    return ReplayView(
        request_ids=sw.request_ids.slice(0, n).to_pylist(),
        token_ids=token_ids,
        arrival_s=[float(t) - t0 for t in arrivals],
        output_tokens=[int(o) or None for o in sw.output_tokens[:n]],
        cache_salts=list(sw.cache_salt[:n]),
        loras=list(sw.lora[:n]),
        synthetic=sw.is_hash_trace,
        hash_ids=[sw.hash_ids(i).tolist() for i in range(n)] if sw.is_hash_trace else None,
        trace_block_size=sw.trace_block_size,
        total_requests=total,
        treated_apart=int(((sw.n[:n] > 1) | sw.skip_prefix_cache[:n]).sum()),
        sessions=list(sw.sessions[:n]) if len(sw.sessions) == total else None,
    )


def output_lengths(w: ReplayView, mode: str, max_output_tokens: int) -> list[int]:
    """max_tokens per request: 1 (prefill-only) in sequential mode, else the logged length."""
    if mode == MODE_SEQUENTIAL:
        return [1] * len(w.token_ids)
    return [max(1, min(o or 1, max_output_tokens)) for o in w.output_tokens]


def engine_batched_tokens(max_len: int, max_num_seqs: int) -> int:
    """The replay engine's max_num_batched_tokens: room for every waiting prompt in one step
    up to 64Ki tokens (beyond that vLLM chunks prompts; the concurrent prediction uses the
    same budget)."""
    return max(max_len, min(max_len * max_num_seqs, 1 << 16))


def max_model_len(w: ReplayView, mode: str, max_output_tokens: int) -> int:
    outs = output_lengths(w, mode, max_output_tokens)
    return max((len(t) + o for t, o in zip(w.token_ids, outs)), default=1)


# --- predictions ---
# (view, configuration) -> per-request predicted hit tokens (None: no prediction) and their source
Predictor = Callable[["ReplayView", "ReplayConfig"], "tuple[list[int] | None, str]"]


def predicted_hits(
    w: ReplayView, cfg: ReplayConfig, opts: EngineOptions, sim_requests: pa.Table | None,
) -> tuple[list[int] | None, str]:
    """Per-request predicted hit tokens and where they came from (None, why: no prediction).

    Sequential predictions come from sim_requests.parquet when it holds the configuration;
    otherwise, and always for concurrent mode (for the replay's own speedup, output cap and
    max_num_seqs, which the simulate stage may not have used), from the simulator's one
    engine dispatch, `advisor.sim.configuration.simulate_one`.
    """
    mode = opts.mode
    if mode == MODE_SEQUENTIAL and sim_requests is not None and sim_requests.num_rows and not w.treated_apart:
        got = _from_sim_requests(w, cfg, mode, sim_requests)
        if got is not None:
            return got, "sim_requests.parquet"
    sim_opts = None
    if mode == MODE_CONCURRENT:
        sim_opts = SimulateOptions(
            speedup=opts.speedup, max_num_seqs=opts.max_num_seqs, prefill_tps=opts.prefill_tps,
            decode_tps=opts.decode_tps, use_logged_latency=False, workers=1,
            scheduling=SCHEDULING_SYNC,  # vLLM's CPU engine turns async scheduling off
            max_num_batched_tokens=engine_batched_tokens(
                max_model_len(w, MODE_CONCURRENT, opts.max_output_tokens), opts.max_num_seqs),
        )
    res = simulate_one(simulated_workload(w, cfg, opts), cfg.block_size, cfg.num_blocks, mode=mode,
                       options=sim_opts)
    return [int(h) for h in res.hit_tokens], f"simulate_one ({mode})"


def simulated_workload(w: ReplayView, cfg: ReplayConfig, opts: EngineOptions) -> SimWorkload:
    """What the simulator predicts from: the replayed requests as replayed. A hash trace at
    its own block size keeps its hash ids (so the prediction also checks the synthesis)."""
    outputs = output_lengths(w, opts.mode, opts.max_output_tokens)
    if w.synthetic and cfg.block_size == w.trace_block_size:
        return SimWorkload.from_hash_trace(w.hash_ids or [], [len(t) for t in w.token_ids], cfg.block_size,
                                           timestamps=w.arrival_s, output_tokens=outputs)
    return SimWorkload.from_token_lists(w.token_ids, request_ids=w.request_ids, timestamps=w.arrival_s,
                                        output_tokens=outputs, cache_salt=w.cache_salts)


def _from_sim_requests(
    w: ReplayView, cfg: ReplayConfig, mode: str, sim: pa.Table
) -> list[int] | None:
    import pyarrow.compute as pc

    mask = pc.and_(
        pc.and_(pc.equal(sim["block_size"], cfg.block_size), pc.equal(sim["num_blocks"], cfg.num_blocks)),
        pc.equal(sim["mode"], mode),
    )
    rows = sim.filter(mask).to_pydict()
    by_id = dict(zip(rows["request_id"], rows["hit_tokens"]))
    if not all(r in by_id for r in w.request_ids):
        return None
    return [int(by_id[r]) for r in w.request_ids]


# --- what can run here ---
def confirmability(
    w: ReplayView, cfg: ReplayConfig, mode: str, max_output_tokens: int, cpu_backend: bool
) -> str | None:
    """None when this machine can replay `cfg`, else the reason it cannot."""
    if cpu_backend and cfg.block_size % CPU_BLOCK_MULTIPLE:
        return (
            f"not confirmable on this machine: vLLM's CPU backend needs a block size that is a "
            f"multiple of {CPU_BLOCK_MULTIPLE} (got {cfg.block_size}); replay on a GPU machine "
            "with `pc-advise replay RUN_DIR`"
        )
    if cfg.num_blocks < 1:
        return "not confirmable: the configuration has no usable block"
    need = max_model_len(w, mode, max_output_tokens)
    if cfg.num_blocks * cfg.block_size < need:
        return (
            f"not confirmable: {cfg.num_blocks} blocks x {cfg.block_size} tokens = "
            f"{cfg.num_blocks * cfg.block_size} tokens cannot hold the longest request "
            f"({need} tokens with its output); vLLM refuses to start with a budget below "
            "max_model_len (--replay-limit to replay fewer requests, or a larger --num-blocks)"
        )
    if any(w.loras):
        return "not confirmable: the log uses LoRA adapters, which the replay cannot load"
    return None


# --- results ---
@dataclass
class ConfigResult:
    block_size: int
    num_blocks: int
    mode: str
    confirmable: bool
    reason: str | None
    queries: int = 0
    predicted_hit_tokens: int | None = None
    measured_hit_tokens: int | None = None
    prediction_source: str | None = None
    per_request_measured: list[int] | None = None
    per_request_predicted: list[int] | None = None
    request_ids: list[str] | None = None
    wall_s: float | None = None
    extra: dict[str, Any] | None = None
    # one replica of a multi-replica replay (advisor.replay.replicas): its index, the count, the router
    replica: int | None = None
    replicas: int | None = None
    router: str | None = None

    def rate(self, hits: int | None) -> float | None:
        return None if hits is None or not self.queries else hits / self.queries

    @property
    def diff_points(self) -> float | None:
        p, m = self.rate(self.predicted_hit_tokens), self.rate(self.measured_hit_tokens)
        return None if p is None or m is None else 100.0 * (m - p)

    def mismatches(self) -> list[dict[str, Any]]:
        if self.per_request_measured is None or self.per_request_predicted is None:
            return []
        return [
            {"request_id": r, "predicted": p, "measured": m}
            for r, p, m in zip(self.request_ids or [], self.per_request_predicted,
                               self.per_request_measured)
            if p != m
        ]

    def status(self) -> str:
        if not self.confirmable or self.diff_points is None:
            return STATUS_NOT_CONFIRMABLE
        if self.mode == MODE_SEQUENTIAL:
            exact = self.predicted_hit_tokens == self.measured_hit_tokens and not self.mismatches()
            return STATUS_CONFIRMED if exact else STATUS_MISMATCH
        ok = abs(self.diff_points) <= CONCURRENT_TOLERANCE_POINTS
        return STATUS_CONFIRMED if ok else STATUS_MISMATCH

    def as_json(self) -> dict[str, Any]:
        mism = self.mismatches()
        d = {
            "block_size": self.block_size, "num_blocks": self.num_blocks, "mode": self.mode,
            "queries": self.queries,
            "predicted_hit_tokens": self.predicted_hit_tokens,
            "measured_hit_tokens": self.measured_hit_tokens,
            "predicted_hit_rate": self.rate(self.predicted_hit_tokens),
            "measured_hit_rate": self.rate(self.measured_hit_tokens),
            "diff_points": self.diff_points,
            "confirmable": self.confirmable, "reason": self.reason,
            "status": self.status(), "prediction_source": self.prediction_source,
            "mismatch_count": len(mism), "mismatches": mism[:MAX_LISTED_MISMATCHES],
            "wall_s": self.wall_s,
        }
        if self.replicas is not None:  # its requests: the ones the router sent to this replica
            d.update(replica=self.replica, replicas=self.replicas, router=self.router, request_ids=self.request_ids)
        d.update(self.extra or {})
        return d


@dataclass
class ReplayResult:
    engine: str
    vllm_version: str | None
    model: str | None
    synthetic_tokens: bool
    configs: list[ConfigResult]
    reason: str | None = None
    notes: list[str] | None = None

    def status(self) -> str:
        if not self.configs:
            return STATUS_NOT_RUN
        states = [c.status() for c in self.configs]
        if STATUS_MISMATCH in states:  # any measured disagreement shows
            return STATUS_MISMATCH
        # the configuration asked for first (the recommendation) decides; rows measured
        # instead of it do not make it confirmed. Replicas of one configuration are one row
        # each: all of them must be confirmed.
        first = self.configs[0]
        primary = [c.status() for c in self.configs if c.replica is not None and c.mode == first.mode
                   and (c.block_size, c.num_blocks) == (first.block_size, first.num_blocks)] or [first.status()]
        if all(p == STATUS_CONFIRMED for p in primary):
            return STATUS_CONFIRMED
        return STATUS_NOT_CONFIRMABLE

    def worst_diff_points(self) -> float | None:
        diffs = [abs(c.diff_points) for c in self.configs if c.confirmable and c.diff_points is not None]
        return max(diffs) if diffs else None

    def as_json(self) -> dict[str, Any]:
        reason = self.reason
        if reason is None and self.status() == STATUS_NOT_CONFIRMABLE:
            reason = "; ".join(sorted({c.reason for c in self.configs if c.reason}))
            stand_ins = [c for c in self.configs if c.status() == STATUS_CONFIRMED]
            if stand_ins:
                reason += "; the simulator itself was confirmed at " + ", ".join(dict.fromkeys(
                    f"block size {c.block_size} x {c.num_blocks} blocks ({c.mode}"
                    + (f", {c.replicas} replicas behind {c.router}" if c.replicas else "") + ")" for c in stand_ins))
        return {
            "status": self.status(), "reason": reason, "engine": self.engine,
            "vllm_version": self.vllm_version, "model": self.model,
            "synthetic_tokens": self.synthetic_tokens,
            "notes": self.notes or [],
            "configs": [c.as_json() for c in self.configs],
        }


def not_run(reason: str, engine: str = ENGINE_INPROCESS) -> dict[str, Any]:
    """replay.json when no replay happened (vLLM missing, --no-replay)."""
    return ReplayResult(engine, None, None, False, [], reason=reason).as_json()



# --- what to confirm, and the CI gate ---
def configs_to_confirm(
    recommendation: dict[str, Any] | None, block_size: int | None, num_blocks: int | None,
    extra: Sequence[ReplayConfig] = (),
) -> list[ReplayConfig]:
    """The explicit configuration (when given), else the recommended one; then `extra`."""
    out: list[ReplayConfig] = []
    if block_size is not None or num_blocks is not None:
        if block_size is None or num_blocks is None:
            raise AdvisorError("give both --block-size and --num-blocks (or neither, to replay "
                               "recommendation.json's configuration).")
        out.append(ReplayConfig(block_size, num_blocks))
    elif recommendation is not None:
        best = recommendation.get("recommended") or {}
        if best.get("block_size") is None or best.get("num_blocks") is None:
            raise AdvisorError("recommendation.json names no block size and block count; give "
                               "--block-size and --num-blocks to choose what to replay.")
        out.append(ReplayConfig(int(best["block_size"]), int(best["num_blocks"])))
    for c in extra:
        if c not in out:
            out.append(c)
    if not out:
        raise AdvisorError("nothing to replay: run `pc-advise recommend RUN_DIR` first, or give "
                           "--block-size and --num-blocks (and/or --configs 32:200,64:100).")
    return out


def modes_for(mode: str) -> list[str]:
    return [MODE_SEQUENTIAL, MODE_CONCURRENT] if mode == "both" else [mode]


def check_failures(replay_json: dict[str, Any], tolerance_points: float) -> list[str]:
    """Why `--check TOLERANCE` fails (empty: passes). Unconfirmed counts as a failure:
    a CI gate that passes when nothing was measured would prove nothing."""
    problems = []
    measured = [c for c in replay_json.get("configs", []) if c.get("diff_points") is not None]
    for c in measured:
        if abs(c["diff_points"]) > tolerance_points:
            problems.append(
                f"block size {c['block_size']}, {c['num_blocks']} blocks ({c['mode']}): measured "
                f"{c['measured_hit_rate']:.2%} vs predicted {c['predicted_hit_rate']:.2%} "
                f"({c['diff_points']:+.2f} points > {tolerance_points:g})"
            )
    if replay_json.get("status") in (STATUS_NOT_RUN, STATUS_NOT_CONFIRMABLE):
        problems.append(
            f"the configuration to confirm was not measured (status {replay_json.get('status')}: "
            f"{replay_json.get('reason') or 'no confirmable configuration'})"
        )
    return problems


def merge_results(results: Sequence[ReplayResult]) -> ReplayResult:
    """One replay.json out of several runs of the same engine (e.g. both modes)."""
    assert results
    first = results[0]
    notes: list[str] = []
    for r in results:
        notes.extend(n for n in (r.notes or []) if n not in notes)
    return ReplayResult(
        first.engine, first.vllm_version, first.model, first.synthetic_tokens,
        [c for r in results for c in r.configs],
        reason=first.reason, notes=notes,
    )
