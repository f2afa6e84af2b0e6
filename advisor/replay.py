"""Replay: confirm the simulator's prediction with a real vLLM engine.

Inputs: tokens.parquet and requests.parquet (token ids, timestamps, output
lengths, hash ids), the configurations to confirm (recommendation.json or
explicit block size / block count), and sim_requests.parquet for the predicted
per-request hits (computed here with `advisor.cache` when a configuration is
not in it). Output: the replay.json object (see `ReplayResult.as_json`).

The engine runs in process (`vllm.LLM`, prompts as `TokensPrompt`) with the
block size and the block budget pinned: `num_gpu_blocks_override` is the
usable block count plus vLLM's reserved null block. Prefix-cache hits depend
on token ids, block size and block count only, so without a user model a tiny
random Llama (advisor/tinymodel.py) does the replay on any machine.

Modes (DESIGN §5): `sequential` sends one request at a time in log order,
prefill-only (`max_tokens=1`: the one sampled token never gets a KV slot), and
must match the simulator to the token. `concurrent` feeds requests to the
engine at their logged arrival times (divided by `speedup`), each generating
its logged output length (`ignore_eos=True`), stepping `LLMEngine` directly so
requests really overlap; it must match within one percentage point.

This is the only module that imports vllm, and only inside the functions
that run the engine. The engine's multiprocessing mode is the caller's
choice (the CLI sets `VLLM_ENABLE_V1_MULTIPROCESSING=0` for a 4 s start).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from advisor.errors import AdvisorError
from advisor.schema import KIND_HASH_TRACE, MODE_CONCURRENT, MODE_SEQUENTIAL

STATUS_CONFIRMED = "confirmed"
STATUS_MISMATCH = "mismatch"
STATUS_NOT_RUN = "not_run"
STATUS_NOT_CONFIRMABLE = "not_confirmable"
ENGINE_INPROCESS = "vllm-inprocess"
ENGINE_SERVER = "vllm-server"
CONCURRENT_TOLERANCE_POINTS = 1.0  # DESIGN §5 fidelity contract
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


@dataclass(frozen=True)
class ReplayOptions:
    mode: str = MODE_SEQUENTIAL
    speedup: float = 1.0  # concurrent mode: arrival times divided by this
    max_output_tokens: int = 256  # concurrent mode: cap on logged output lengths
    replay_model: str | None = None  # a local model folder; None = tiny random Llama
    max_num_seqs: int = 256  # the engine's, and the concurrent prediction's
    limit: int | None = None  # replay only the first N requests (both modes are causal)
    # Concurrent mode's clock: the simulator's cost model (advisor.events.CostModel), so the
    # replay is independent of how fast this machine runs the model.
    prefill_tps: float = 10_000.0
    decode_tps: float = 50.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "speedup": self.speedup,
            "max_output_tokens": self.max_output_tokens, "replay_model": self.replay_model,
            "max_num_seqs": self.max_num_seqs, "limit": self.limit,
            "prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps,
        }


@dataclass(frozen=True)
class Workload:
    """What is replayed, in arrival order."""

    request_ids: list[str]
    token_ids: list[list[int]]
    arrival_s: list[float]  # offsets from the first request, seconds
    output_tokens: list[int | None]
    cache_salts: list[str | None]
    loras: list[str | None]
    synthetic: bool  # token ids synthesized from a hash trace
    hash_ids: list[list[int]] | None = None
    trace_block_size: int | None = None

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


def load_workload(requests: pa.Table, tokens: pa.Table, limit: int | None = None) -> Workload:
    """Join requests and tokens (same rows, same order) into what the engine replays."""
    if requests.num_rows != tokens.num_rows:
        raise AdvisorError(
            "requests.parquet and tokens.parquet have different row counts: rerun "
            "`pc-advise tokenize RUN_DIR --force`."
        )
    n = requests.num_rows if limit is None else min(limit, requests.num_rows)
    req = requests.slice(0, n).to_pydict()
    tok = tokens.slice(0, n).to_pydict()
    kinds = req["kind"]
    ts = [t if t is not None else float(i) for i, t in enumerate(req["timestamp"])]
    t0 = min(ts) if ts else 0.0
    hash_trace = n > 0 and all(k == KIND_HASH_TRACE for k in kinds)
    if any(k == KIND_HASH_TRACE for k in kinds) and not hash_trace:
        raise AdvisorError(
            "the log mixes hash-trace lines with text/token requests; replay them separately "
            "(split the log, or ingest with --format)."
        )
    tbs = None
    if hash_trace:
        tbs = int(req["trace_block_size"][0])
        token_ids = synthesize_trace_tokens(req["hash_ids"], req["input_length"], tbs)
    else:
        token_ids = [list(t) if t is not None else [] for t in tok["token_ids"]]
    return Workload(
        request_ids=list(req["request_id"]),
        token_ids=token_ids,
        arrival_s=[t - t0 for t in ts],
        output_tokens=list(req["output_tokens"]),
        cache_salts=list(req["cache_salt"]),
        loras=list(req["lora"]),
        synthetic=hash_trace,
        hash_ids=[list(h) for h in req["hash_ids"]] if hash_trace else None,
        trace_block_size=tbs,
    )


def output_lengths(w: Workload, mode: str, max_output_tokens: int) -> list[int]:
    """max_tokens per request: 1 (prefill-only) in sequential mode, else the logged length."""
    if mode == MODE_SEQUENTIAL:
        return [1] * len(w.token_ids)
    return [max(1, min(o or 1, max_output_tokens)) for o in w.output_tokens]


def max_model_len(w: Workload, mode: str, max_output_tokens: int) -> int:
    outs = output_lengths(w, mode, max_output_tokens)
    return max((len(t) + o for t, o in zip(w.token_ids, outs)), default=1)


# --- predictions ---
def predicted_hits(
    w: Workload, cfg: ReplayConfig, opts: ReplayOptions, sim_requests: pa.Table | None,
) -> tuple[list[int] | None, str]:
    """Per-request predicted hit tokens and where they came from (None, why: no prediction).

    Sequential predictions come from sim_requests.parquet when it holds the configuration,
    else from advisor.cache. Concurrent ones are always recomputed with
    `advisor.simulate.simulate_one` for the replay's own speedup, output cap and
    max_num_seqs (the simulate stage may have used others).
    """
    mode = opts.mode
    if mode == MODE_SEQUENTIAL and sim_requests is not None and sim_requests.num_rows:
        got = _from_sim_requests(w, cfg, mode, sim_requests)
        if got is not None:
            return got, "sim_requests.parquet"
    if mode == MODE_SEQUENTIAL:
        from advisor import cache

        lengths = [len(t) for t in w.token_ids]
        if w.synthetic and cfg.block_size == w.trace_block_size:
            # the trace's own hash ids, as the simulator saw them (checks the synthesis too)
            hashes = [cache.chain_trace_hash_ids(ids, n, cfg.block_size)
                      for ids, n in zip(w.hash_ids or [], lengths)]
        else:
            hashes = [cache.request_block_hashes(t, cfg.block_size, cache_salt=salt)
                      for t, salt in zip(w.token_ids, w.cache_salts)]
        hits = cache.sequential_hits_from_hashes(hashes, lengths, cfg.block_size, cfg.num_blocks)
        return [int(h) for h in hits], "advisor.cache (sequential, vLLM reference)"
    return _concurrent_prediction(w, cfg, opts)


def _from_sim_requests(
    w: Workload, cfg: ReplayConfig, mode: str, sim: pa.Table
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


def _concurrent_prediction(w: Workload, cfg: ReplayConfig, opts: ReplayOptions) -> tuple[list[int], str]:
    from advisor import simulate
    from advisor.workload import Workload as SimWorkload

    sw = SimWorkload.from_token_lists(
        w.token_ids, request_ids=w.request_ids, timestamps=w.arrival_s,
        output_tokens=output_lengths(w, MODE_CONCURRENT, opts.max_output_tokens),
        cache_salt=w.cache_salts,
    )
    sim_opts = simulate.SimulateOptions(
        speedup=opts.speedup, max_num_seqs=opts.max_num_seqs, prefill_tps=opts.prefill_tps,
        decode_tps=opts.decode_tps, use_logged_latency=False,
    )
    res = simulate.simulate_one(sw, cfg.block_size, cfg.num_blocks, mode=MODE_CONCURRENT,
                                options=sim_opts)
    return [int(h) for h in res.hit_tokens], "advisor.simulate.simulate_one (concurrent)"


# --- what can run here ---
def confirmability(
    w: Workload, cfg: ReplayConfig, mode: str, max_output_tokens: int, cpu_backend: bool
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
            "max_model_len (--limit to replay fewer requests, or a larger --num-blocks)"
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
        # instead of it do not make it confirmed
        primary = [c.status() for c in self.configs if c.mode == self.configs[0].mode][0]
        if primary == STATUS_CONFIRMED:
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
                reason += "; the simulator itself was confirmed at " + ", ".join(
                    f"block size {c.block_size} x {c.num_blocks} blocks ({c.mode})" for c in stand_ins)
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


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# --- the in-process engine ---
def _metric_counters() -> Callable[[Any], tuple[int, int]]:
    def read(llm: Any) -> tuple[int, int]:
        vals = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        return int(vals.get("vllm:prefix_cache_queries", 0)), int(vals.get("vllm:prefix_cache_hits", 0))

    return read


@contextlib.contextmanager
def _kernel_scan_guard() -> Iterator[None]:
    """Hide modules that break vLLM 0.32's engine start while it starts.

    At engine start vLLM's Triton kernel dispatcher walks every attribute of every
    module in sys.modules and calls `vars(value).get(...)`. llvmlite's `ffi.lib`
    (imported with numba, which advisor.fastsim uses) answers `vars()` with a
    non-mapping, so the engine fails to start in any process that simulated first
    (`pc-advise run`). Such modules are taken out of sys.modules for the
    duration of the start and put back after; the engine never uses them.
    """
    hidden: dict[str, Any] = {}
    for name, mod in list(sys.modules.items()):
        ns = getattr(mod, "__dict__", None)
        if not isinstance(ns, dict):
            continue
        for value in list(ns.values()):
            try:
                bad = hasattr(value, "__dict__") and not hasattr(vars(value), "get")
            except Exception:  # noqa: BLE001 - anything vars() cannot read would break vLLM too
                bad = True
            if bad:
                hidden[name] = mod
                break
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _open_llm(model: str, cfg: ReplayConfig, max_len: int, opts: ReplayOptions) -> Any:
    from vllm import LLM

    with _kernel_scan_guard():
        return _new_llm(LLM, model, cfg, max_len, opts)


def _new_llm(LLM: Any, model: str, cfg: ReplayConfig, max_len: int, opts: ReplayOptions) -> Any:
    return LLM(
        model=model,
        skip_tokenizer_init=True,  # prompts are token ids; outputs are not detokenized
        enable_prefix_caching=True,
        block_size=cfg.block_size,
        num_gpu_blocks_override=cfg.num_blocks + 1,  # + the null block vLLM reserves
        # Pinning the size also keeps the CPU backend from reserving most of the node's memory;
        # with the override set, this is only an upper bound that the pool never reaches.
        kv_cache_memory_bytes=64 << 20,
        max_model_len=max_len,
        max_num_seqs=opts.max_num_seqs,
        # Room for every waiting prompt in one step: the simulator has no token budget and
        # no chunked prefill, and a prompt cut into chunks would cache its blocks later.
        max_num_batched_tokens=max(max_len, min(max_len * opts.max_num_seqs, 1 << 16)),
        disable_log_stats=False,
        enforce_eager=True,
        seed=0,
    )


def _prompt(w: Workload, i: int) -> Any:
    from vllm.inputs import TokensPrompt

    p = TokensPrompt(prompt_token_ids=w.token_ids[i])
    if w.cache_salts[i]:
        p["cache_salt"] = w.cache_salts[i]
    return p


def _replay_sequential(llm: Any, w: Workload) -> list[int]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, detokenize=False)
    out = []
    for i in range(len(w.token_ids)):
        res = llm.generate([_prompt(w, i)], sp, use_tqdm=False)
        out.append(int(res[0].num_cached_tokens or 0))
    return out


def _replay_concurrent(llm: Any, w: Workload, opts: ReplayOptions) -> list[int]:
    """Step the engine, adding each request once its (compressed) arrival time has come.

    Time is virtual, on the simulator's cost model: each engine step advances the clock
    by one decode token (1 / decode_tps) plus the longest uncached prefill started in it
    (uncached / prefill_tps). The engine really batches the overlapping requests; only
    the clock that decides when the next ones arrive is the model's, not this machine's
    (a tiny model on a CPU runs at no production speed). Idle gaps are jumped over.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    outs = output_lengths(w, MODE_CONCURRENT, opts.max_output_tokens)
    arrivals = [a / opts.speedup for a in w.arrival_s]
    order = sorted(range(len(arrivals)), key=lambda k: (arrivals[k], k))
    cached: dict[str, int] = {}
    started: set[str] = set()
    clock, j, n = 0.0, 0, len(order)
    while j < n or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and j < n:
            clock = max(clock, arrivals[order[j]])
        while j < n and arrivals[order[j]] <= clock:
            i = order[j]
            sp = SamplingParams(max_tokens=outs[i], ignore_eos=True, detokenize=False)
            engine.add_request(f"r{i}", _prompt(w, i), sp)
            j += 1
        prefill = 0.0
        for ro in engine.step():
            if ro.request_id not in started:
                started.add(ro.request_id)
                uncached = len(w.token_ids[int(ro.request_id[1:])]) - int(ro.num_cached_tokens or 0)
                prefill = max(prefill, uncached / opts.prefill_tps)
            if ro.finished:
                cached[ro.request_id] = int(ro.num_cached_tokens or 0)
        clock += 1.0 / opts.decode_tps + prefill
    return [cached[f"r{i}"] for i in range(n)]


def with_stand_ins(configs: Sequence[ReplayConfig], cpu_backend: bool) -> list[ReplayConfig]:
    """`configs`, plus, for each block size the CPU backend cannot run, the nearest one it
    can with the same KV tokens (B=16 x N -> B=32 x N/2). The stand-in is its own row; the
    configuration asked for stays "not confirmable", never silently swapped."""
    out = list(configs)
    if not cpu_backend:
        return out
    for cfg in configs:
        if cfg.block_size % CPU_BLOCK_MULTIPLE:
            b = -(-cfg.block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
            stand_in = ReplayConfig(b, max(1, cfg.num_blocks * cfg.block_size // b))
            if all(c.block_size != b for c in out):
                out.append(stand_in)
    return out


def replay_inprocess(
    w: Workload, configs: Sequence[ReplayConfig], opts: ReplayOptions, model_dir: str,
    model_label: str, sim_requests: pa.Table | None,
) -> ReplayResult:
    """Run each configuration through a fresh in-process engine; compare with the prediction."""
    import vllm
    from vllm.platforms import current_platform

    cpu = bool(current_platform.is_cpu())
    read_counters = _metric_counters()
    results: list[ConfigResult] = []
    queries = sum(len(t) for t in w.token_ids)
    for cfg in with_stand_ins(configs, cpu):
        res = ConfigResult(cfg.block_size, cfg.num_blocks, opts.mode, False, None, queries=queries,
                           request_ids=w.request_ids)
        results.append(res)
        if cfg not in configs:
            stand_for = [c for c in configs if c.block_size % CPU_BLOCK_MULTIPLE]
            res.extra = {"stand_in_for": [[c.block_size, c.num_blocks] for c in stand_for]}
        why = confirmability(w, cfg, opts.mode, opts.max_output_tokens, cpu)
        pred, source = (None, "") if why else predicted_hits(w, cfg, opts, sim_requests)
        if why is None and pred is None:
            why = source
        if why is not None:
            res.reason = why
            continue
        res.per_request_predicted, res.prediction_source = pred, source
        res.predicted_hit_tokens = sum(pred or [])
        t = time.perf_counter()
        llm = _open_llm(model_dir, cfg, max_model_len(w, opts.mode, opts.max_output_tokens), opts)
        try:
            llm.reset_prefix_cache()
            q0, h0 = read_counters(llm)
            if opts.mode == MODE_SEQUENTIAL:
                per_req = _replay_sequential(llm, w)
            else:
                per_req = _replay_concurrent(llm, w, opts)
            q1, h1 = read_counters(llm)
        finally:
            del llm
            gc.collect()
        res.confirmable = True
        res.per_request_measured = per_req
        res.measured_hit_tokens = h1 - h0
        res.wall_s = round(time.perf_counter() - t, 3)
        res.extra = {**(res.extra or {}), "engine_queries": q1 - q0, "per_request_hit_tokens_sum": sum(per_req)}
        if q1 - q0 != queries:
            res.extra["note"] = (
                f"the engine counted {q1 - q0} queried tokens for {queries} replayed prompt tokens"
            )
    notes = []
    if w.synthetic:
        notes.append(
            "hash trace: token ids were synthesized from the hash ids (equal ids -> identical "
            f"{w.trace_block_size}-token blocks, distinct ids -> distinct blocks)"
        )
    return ReplayResult(ENGINE_INPROCESS, vllm.__version__, model_label, w.synthetic, results,
                        notes=notes)


def resolve_replay_model(w: Workload, replay_model: str | None, cache_dir: Path) -> tuple[str, str]:
    """(model folder, label for the report): the user's model, or the tiny random Llama."""
    if replay_model:
        p = Path(replay_model)
        if not (p / "config.json").exists():
            raise AdvisorError(
                f"--replay-model {replay_model}: no config.json there; give a local model "
                "folder (the replay never downloads), or omit it to replay with a tiny random model."
            )
        import json

        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if vocab is not None and w.max_token_id >= int(vocab):
            raise AdvisorError(
                f"--replay-model {replay_model}: its vocabulary has {vocab} tokens but the log's "
                f"token ids reach {w.max_token_id}; replay with the model whose tokenizer produced "
                "them, or omit --replay-model (a tiny random model covering the ids is built)."
            )
        return str(p), f"user model {p.name}"
    from advisor import tinymodel

    vocab = tinymodel.vocab_for(w.max_token_id)
    return str(tinymodel.ensure_tiny_model(cache_dir, vocab)), tinymodel.describe(vocab)


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
