"""Replay through an in-process vLLM engine: the measuring half of the replay stage.

Input: a `ReplayView` (token ids in arrival order), the configurations to confirm,
`EngineOptions`, a model folder, and sim_requests.parquet (or None) for the predictions.
Output: a `ReplayResult` (replay.json). The engine-free half (what is replayed, the
predictions, results, `--check`) is advisor/replay/plan.py; the stage around both is
advisor/replay/stage.py.

The engine runs in process (`vllm.LLM`, prompts as `TokensPrompt`) with the
block size and the block budget pinned: `num_gpu_blocks_override` is the
usable block count plus vLLM's reserved null block. Prefix-cache hits depend
on token ids, block size and block count only, so without a user model a tiny
random Llama (advisor/replay/tinymodel.py) does the replay on any machine.

Modes (docs/design.md §5): `sequential` sends one request at a time in log order,
prefill-only (`max_tokens=1`: the one sampled token never gets a KV slot), and
must match the simulator to the token. `concurrent` feeds requests to the
engine at their logged arrival times (divided by `speedup`, on the simulator's
cost-model clock), each generating its logged output length (`ignore_eos=True`),
stepping `LLMEngine` directly so requests really overlap; it must match within
one percentage point.

This module and advisor/replay/measure.py (the timed replay, `--measure-time`) are the
only ones that import vllm, and only inside the functions that run the engine. The engine's multiprocessing mode is the caller's
choice (the replay stage sets `VLLM_ENABLE_V1_MULTIPROCESSING=0` for a 4 s start).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from advisor.errors import AdvisorError
from advisor.replay import randommodel, tinymodel
from advisor.replay.plan import (
    CPU_BLOCK_MULTIPLE,
    ENGINE_INPROCESS,
    ConfigResult,
    EngineOptions,
    ReplayConfig,
    ReplayResult,
    ReplayView,
    confirmability,
    engine_batched_tokens,
    max_model_len,
    output_lengths,
    predicted_hits,
)
from advisor.schema import MODE_CONCURRENT, MODE_SEQUENTIAL


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
    (imported with numba, which advisor.sim.fast.sequential uses) answers `vars()` with a
    non-mapping, so the engine fails to start in any process that simulated first
    (`pc-advise run`). Such modules are taken out of sys.modules for the
    duration of the start and put back after; the engine never uses them.
    """
    import warnings

    hidden: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching deprecated module attributes warns
        hidden = _unscannable_modules()
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _unscannable_modules() -> dict[str, Any]:
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
    return hidden


@contextlib.contextmanager
def engine_log_captured() -> Iterator[None]:
    """Send what the engine prints at start-up (warnings, progress bars, C++ logs) to a
    temporary file instead of the user's terminal. If the block fails, the log's last
    lines are attached to the exception as a note, so nothing needed to debug it is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException as e:
            sys.stderr.flush()
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-4000:].decode("utf-8", errors="replace").strip()
            if tail and hasattr(e, "add_note"):
                e.add_note("engine log (last lines):\n" + tail)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _open_llm(model: str, cfg: ReplayConfig, max_len: int, opts: EngineOptions, *,
              enable_prefix_caching: bool = True, enforce_eager: bool = True) -> Any:
    with engine_log_captured():
        from vllm import LLM

        with _kernel_scan_guard():
            return _new_llm(LLM, model, cfg, max_len, opts, enable_prefix_caching=enable_prefix_caching,
                            enforce_eager=enforce_eager)


def _new_llm(LLM: Any, model: str, cfg: ReplayConfig, max_len: int, opts: EngineOptions, *,
             enable_prefix_caching: bool = True, enforce_eager: bool = True) -> Any:
    """The replay's engine. `enable_prefix_caching=False` is the timed replay's baseline;
    `enforce_eager=False` (CUDA graphs, as `vllm serve` runs) only for timing on a GPU:
    hits do not depend on it, and eager starts faster."""
    return LLM(
        model=model,
        skip_tokenizer_init=True,  # prompts are token ids; outputs are not detokenized
        enable_prefix_caching=enable_prefix_caching,
        block_size=cfg.block_size,
        num_gpu_blocks_override=cfg.num_blocks + 1,  # + the null block vLLM reserves
        # Pinning the size also keeps the CPU backend from reserving most of the node's memory;
        # with the override set, this is only an upper bound that the pool never reaches.
        kv_cache_memory_bytes=64 << 20,
        max_model_len=max_len,
        max_num_seqs=opts.max_num_seqs,
        # Room for every waiting prompt in one step up to 64Ki tokens; the concurrent
        # prediction runs on the same budget (plan.engine_batched_tokens).
        max_num_batched_tokens=engine_batched_tokens(max_len, opts.max_num_seqs),
        disable_log_stats=False,
        enforce_eager=enforce_eager,
        seed=0,
    )


def _prompt(w: ReplayView, i: int) -> Any:
    from vllm.inputs import TokensPrompt

    p = TokensPrompt(prompt_token_ids=w.token_ids[i])
    if w.cache_salts[i]:
        p["cache_salt"] = w.cache_salts[i]
    return p


def _replay_sequential(llm: Any, w: ReplayView, tick: Callable[[int], None]) -> list[int]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, detokenize=False)
    out = []
    for i in range(len(w.token_ids)):
        if len(w.token_ids[i]) == 0:  # refused at tokenization (tokenize_error): vLLM would too
            out.append(0)
            continue
        res = llm.generate([_prompt(w, i)], sp, use_tqdm=False)
        out.append(int(res[0].num_cached_tokens or 0))
        tick(1)
    return out


def _replay_concurrent(llm: Any, w: ReplayView, opts: EngineOptions,
                       tick: Callable[[int], None]) -> list[int]:
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
            j += 1
            if len(w.token_ids[i]) == 0:  # refused at tokenization: never reaches the engine
                cached[f"r{i}"] = 0
                continue
            sp = SamplingParams(max_tokens=outs[i], ignore_eos=True, detokenize=False)
            engine.add_request(f"r{i}", _prompt(w, i), sp)
        prefill = 0.0
        for ro in engine.step():
            if ro.request_id not in started:
                started.add(ro.request_id)
                uncached = len(w.token_ids[int(ro.request_id[1:])]) - int(ro.num_cached_tokens or 0)
                prefill = max(prefill, uncached / opts.prefill_tps)
            if ro.finished:
                cached[ro.request_id] = int(ro.num_cached_tokens or 0)
                tick(1)
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


def cpu_backend() -> bool:
    """Whether vLLM runs on its CPU backend here (block sizes must be multiples of 32)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def runs_planned(w: ReplayView, configs: Sequence[ReplayConfig], opts: EngineOptions) -> int:
    """How many requests `replay_inprocess` will send (for a progress bar's length)."""
    cpu = cpu_backend()
    runnable = [c for c in with_stand_ins(configs, cpu)
                if confirmability(w, c, opts.mode, opts.max_output_tokens, cpu) is None]
    return len(runnable) * sum(1 for t in w.token_ids if len(t))


def _measure(llm: Any, w: ReplayView, opts: EngineOptions, res: ConfigResult, tick: Callable[[int], None],
             read_counters: Callable[[Any], tuple[int, int]]) -> None:
    """Replay `w` on `llm` (its prefix cache emptied first) into `res`: each request's
    num_cached_tokens and the difference of vLLM's prefix-cache counters."""
    llm.reset_prefix_cache()
    q0, h0 = read_counters(llm)
    per_req = _replay_sequential(llm, w, tick) if opts.mode == MODE_SEQUENTIAL else _replay_concurrent(llm, w, opts, tick)
    q1, h1 = read_counters(llm)
    res.confirmable = True
    res.per_request_measured = per_req
    res.measured_hit_tokens = h1 - h0
    res.extra = {**(res.extra or {}), "engine_queries": q1 - q0, "per_request_hit_tokens_sum": sum(per_req)}
    if q1 - q0 != res.queries:
        res.extra["note"] = f"the engine counted {q1 - q0} queried tokens for {res.queries} replayed prompt tokens"


def replay_inprocess(
    w: ReplayView, configs: Sequence[ReplayConfig], opts: EngineOptions, model_dir: str,
    model_label: str, sim_requests: pa.Table | None,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Run each configuration through a fresh in-process engine; compare with the prediction.

    `progress(n)` is called as requests finish (n of them), for a progress bar.
    """
    tick = progress or (lambda _n: None)
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
            _measure(llm, w, opts, res, tick, read_counters)
        finally:
            del llm
            gc.collect()
        res.wall_s = round(time.perf_counter() - t, 3)
    return ReplayResult(ENGINE_INPROCESS, vllm.__version__, model_label, w.synthetic, results,
                        notes=_synthetic_notes(w))


def _synthetic_notes(w: ReplayView) -> list[str]:
    if not w.synthetic:
        return []
    return ["hash trace: token ids were synthesized from the hash ids (equal ids -> identical "
            f"{w.trace_block_size}-token blocks, distinct ids -> distinct blocks)"]


def replay_replicas_inprocess(
    views: Sequence[ReplayView], cfg: ReplayConfig, opts: EngineOptions, model_dir: str, model_label: str,
    predictions: Sequence[tuple[list[int] | None, str]], max_len: int,
    progress: Callable[[int], None] | None = None, keep_alive: bool = True,
) -> ReplayResult:
    """One configuration through len(views) vLLM engines in this process (advisor.replay.replicas):
    engine r is fed views[r], one replica's requests in log order, and compared with
    predictions[r]. Every engine gets the same `max_len` (the longest request of the whole
    replay), as replicas of one deployment do.

    Engine r starts just before its replica is replayed and, with `keep_alive`, stays until
    every replica has run: N engines at once in one process (a later engine starts in about
    a second while an earlier one is alive, ~5 s after one was closed; memory: N engines).
    vLLM's Prometheus counters are process-wide and the engine started last owns them, so
    each replica's counters are read while its engine is the newest."""
    tick = progress or (lambda _n: None)
    import vllm

    read_counters = _metric_counters()
    alive: list[Any] = []
    results: list[ConfigResult] = []
    try:
        for view, (pred, source) in zip(views, predictions, strict=True):
            res = ConfigResult(cfg.block_size, cfg.num_blocks, opts.mode, False, None,
                               queries=sum(len(t) for t in view.token_ids), request_ids=view.request_ids)
            results.append(res)
            if pred is None:
                res.reason = source
                continue
            res.per_request_predicted, res.prediction_source = pred, source
            res.predicted_hit_tokens = sum(pred)
            t = time.perf_counter()
            llm = _open_llm(model_dir, cfg, max_len, opts)
            try:
                _measure(llm, view, opts, res, tick, read_counters)
            finally:
                if keep_alive:
                    alive.append(llm)
                else:
                    del llm
                    gc.collect()
            res.wall_s = round(time.perf_counter() - t, 3)
    finally:
        alive.clear()
        gc.collect()
    return ReplayResult(ENGINE_INPROCESS, vllm.__version__, model_label, any(v.synthetic for v in views), results,
                        notes=_synthetic_notes(views[0]) if views else [])


def resolve_replay_model(w: ReplayView, replay_model: str | None, cache_dir: Path) -> tuple[str, str]:
    """(model folder, label for the report): the user's model, a catalog architecture with
    random weights (`random:<model>`), or the tiny random Llama."""
    folder, label, _notes = resolve_model(w, replay_model, cache_dir)
    return folder, label


def resolve_model(w: ReplayView, replay_model: str | Path | None, cache_dir: Path, *,
                  timing: bool = False) -> tuple[str, str, list[str]]:
    """`resolve_replay_model` plus the notes replay.json should carry about the model
    (random weights; a widened vocabulary). `timing`: without a model given, the small
    compute-bound random Llama (tinymodel.TIMING) instead of the tiny one."""
    if replay_model and randommodel.is_random(str(replay_model)):
        with engine_log_captured():  # transformers' save progress bar
            built = randommodel.ensure_random_model(str(replay_model), cache_dir, w.max_token_id,
                                                    randommodel.memory_limits())
        return str(built.folder), built.label, list(built.notes)
    geometry = tinymodel.TIMING if timing else tinymodel.TINY
    return (*_resolve_plain(w, str(replay_model) if replay_model else None, cache_dir, geometry), [])


def _resolve_plain(w: ReplayView, replay_model: str | None, cache_dir: Path,
                   geometry: tinymodel.Geometry = tinymodel.TINY) -> tuple[str, str]:
    if replay_model:
        p = Path(replay_model)
        if not (p / "config.json").exists():
            raise AdvisorError(
                f"--replay-model {replay_model}: no config.json there; give a local model "
                "folder (the replay never downloads), random:<catalog model> for its architecture "
                "with random weights, or omit it to replay with a tiny random model."
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
    vocab = tinymodel.vocab_for(w.max_token_id)
    with engine_log_captured():  # transformers' save progress bar
        folder = tinymodel.ensure_tiny_model(cache_dir, vocab, geometry=geometry)
    return str(folder), tinymodel.describe(vocab, geometry)
