"""Option sets of the commands, one decorator per stage.

Each stage command carries its own set; `run` carries them all, so an option
means the same thing wherever it appears. Defaults are read from the stages' options
dataclasses (one default per option, kept there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from advisor.analyze.stage import AnalyzeOptions
from advisor.executor import EXECUTOR_LOCAL, EXECUTORS
from advisor.ingest.stage import IngestOptions
from advisor.ingest.tables import parse_columns
from advisor.kvmemory import DEFAULT_HEADROOM_GIB
from advisor.recommend.options import RecommendOptions
from advisor.replay.stage import ReplayOptions
from advisor.schema import FORMATS
from advisor.sim.cache import EAGLE_METHODS, SPECULATIVE_METHODS
from advisor.sim.configuration import SimulateOptions
from advisor.sim.routing import (
    DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_HASH_BLOCKS,
    ROUND_ROBIN,
    ROUTERS,
)
from advisor.vllm_versions import DEFAULT_VLLM_VERSION, KNOWN_VERSIONS


def _d(cls: type, name: str) -> Any:
    """The default of one option: its options dataclass holds it, the CLI shows it."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _csv(values: tuple[Any, ...]) -> str:
    return ",".join(map(str, values))


# --- shared options (decorators, applied to each stage command and to `run`) ---
def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)
    f = click.option("--force", is_flag=True, help="Rerun stages even when unchanged.")(f)
    return f


def executor_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where ingest, tokenize and simulate run their pieces (advisor.executor; docs/scale.md)."""
    f = _option_once(f, "--ray-address", default=None, metavar="ADDR",
                     help="--executor ray: the cluster to run on (auto on one of its nodes, HOST:6379, or "
                     "ray://HOST:10001) [default: start a Ray on this machine with --workers CPUs].")
    f = _option_once(f, "--executor", type=click.Choice(EXECUTORS), default=EXECUTOR_LOCAL, show_default=True,
                     help="Where ingest (a folder's files), tokenize (row batches) and simulate (block hashing, "
                     "the grid's configurations) run their pieces: this machine, or Ray (pip install "
                     "'pc-advise[ray]'). The outputs are the same.")
    return f


def ingest_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="Force one input format instead of detecting it per line.",
    )(f)
    f = click.option(
        "--trace-block-size", type=int, default=_d(IngestOptions, "trace_block_size"), show_default=True,
        help="Tokens per hash id in block-hash traces (Mooncake: 512).",
    )(f)
    f = click.option(
        "--rate", type=float, default=_d(IngestOptions, "rate"), show_default=True,
        help="Arrival rate (requests/s) assumed for lines without a timestamp.",
    )(f)
    f = click.option(
        "--max-line-mb", type=float, default=_d(IngestOptions, "max_line_bytes") / (1 << 20), show_default=True,
        help="Lines longer than this are rejected (not read into memory).",
    )(f)
    f = click.option(
        "--columns", type=_ColumnMap(), default=None,
        help="Parquet/CSV tables: which column holds what, as target=column pairs, e.g. "
        "body=request_json,timestamp=ts (body: a column of JSON request bodies) or messages=msgs,model=m "
        "[default: columns named like request fields].",
    )(f)
    f = click.option(
        "--max-log-len", type=click.IntRange(min=1), default=None,
        help="vLLM server logs: the --max-log-len the server ran with; requests whose logged ids may be "
        "cut by it are rejected [default: inferred from cut JSON bodies].",
    )(f)
    f = click.option(
        "--log-year", type=click.IntRange(1970, 9999), default=None,
        help="vLLM server logs: the year of the first line (vLLM's line prefix has none) [default: 2000].",
    )(f)
    return f


class _ColumnMap(click.ParamType):
    """`target=column,...` (advisor.ingest.tables.parse_columns)."""

    name = "target=column[,...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_columns(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def tokenize_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--tokenizer", default=None,
        help="Local tokenizer folder or a model name already in the HF cache "
        "(default: the embedded Qwen2.5 tokenizer).",
    )(f)
    f = click.option(
        "--workers", type=int, default=None,
        help="Threads: for the tokenizer, and in `run` for the simulate grid too (default: all cores).",
    )(f)
    return f


class _CommaList(click.ParamType):
    """A comma-separated list of numbers (`16,32,64`)."""

    def __init__(self, kind: type, choices: tuple[str, ...] | None = None) -> None:
        self.kind = kind
        self.choices = choices
        self.name = f"{kind.__name__}[,{kind.__name__}...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(self.kind(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx)
        if self.choices and any(i not in self.choices for i in items):
            self.fail(f"{value!r}: each must be one of {', '.join(self.choices)}", param, ctx)
        return items


def _option_once(f: Callable[..., Any], *decls: str, **kw: Any) -> Callable[..., Any]:
    """Add an option unless another decorator of the same command already has that flag."""
    taken = {o for p in getattr(f, "__click_params__", []) for o in getattr(p, "opts", [])}
    if any(d in taken for d in decls if d.startswith("-")):
        return f
    return click.option(*decls, **kw)(f)


def analyze_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--analysis-block-size", type=int, default=_d(AnalyzeOptions, "analysis_block_size"), show_default=True,
        help="Block size (tokens) for the block counts and top prefixes of the analysis "
        "(hash traces use their own trace block size).",
    )(f)
    f = click.option(
        "--max-clusters", type=int, default=_d(AnalyzeOptions, "max_clusters"), show_default=True,
        help="Reuse groups listed in stats.json (the data decides how many there are; clusters.parquet keeps all).",
    )(f)
    f = click.option(
        "--cluster-seed", type=int, default=_d(AnalyzeOptions, "cluster_seed"), show_default=True,
        help="No effect: reuse groups use no randomness (kept so older command lines still run).",
    )(f)
    return f


def simulate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the simulate stage (applied to `simulate` and to `run`)."""
    specs: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def o(_f: Any, *decls: str, **kw: Any) -> None:
        specs.append((decls, kw))

    o(f, "--block-sizes", type=_CommaList(int), default=None,
      help=f"Block sizes to simulate [default: {_csv(_d(SimulateOptions, 'block_sizes'))}; a hash trace: its own].")
    o(f, "--num-blocks", type=_CommaList(int), default=None,
      help="KV budgets in usable blocks (replaces the default sweep).")
    o(f, "--budget-tokens", type=_CommaList(int), default=None,
      help="KV budgets in tokens, i.e. tokens // block size blocks (replaces the sweep).")
    o(f, "--kv-cache-gib", type=_CommaList(float), default=None,
      help="KV budgets in GiB per GPU; needs --model (replaces the sweep).")
    o(f, "--model", default=None,
      help="Catalog name (e.g. llama-3.1-8b) or local HF folder/config.json: KV bytes per block.")
    o(f, "--gpu", "--gpu-memory-gib", "gpu", default=None,
      help="GPU memory (GiB or a name: h100, a100-40gb, ...); with --model adds its KV budget.")
    o(f, "--vllm-version", default=None, metavar="VERSION",
      help=f"The vLLM version you run ({', '.join(KNOWN_VERSIONS)}; 0.34.1 or v0.34 work too): sets the "
      "batch defaults simulated on --gpu and the serve flags recommended (its default --block-size) "
      f"[default: {DEFAULT_VLLM_VERSION}, the newest known].")
    o(f, "--gpu-memory-utilization", type=float, default=None,
      help=f"vLLM's --gpu-memory-utilization [default: {_d(SimulateOptions, 'gpu_memory_utilization')}, vLLM 0.32's].")
    o(f, "--tensor-parallel-size", type=int, default=None,
      help="GPUs the model is sharded over (KV heads and weights split).")
    o(f, "--headroom-gib", type=float, default=None,
      help=f"Activation/runtime memory per GPU besides weights and KV [default: {DEFAULT_HEADROOM_GIB}].")
    o(f, "--policies", type=_CommaList(str, ("lru", "fifo", "belady")), default=None,
      help="Eviction policies: lru (vLLM) and the references fifo, belady [default: all].")
    o(f, "--modes", type=_CommaList(str, ("sequential", "concurrent")), default=None,
      help="sequential (one request at a time, prefill only) and/or concurrent [default: both].")
    o(f, "--warmup", default=_d(SimulateOptions, "warmup"), show_default=True,
      help="Warm-up not counted in the warm window: a share (50%), requests (500), seconds (30s).")
    o(f, "--speedup", type=float, default=None,
      help=f"Concurrent mode: divide logged inter-arrival times by this [default: {_d(SimulateOptions, 'speedup'):g}].")
    o(f, "--prefill-tps", type=float, default=None,
      help=f"Cost model: uncached prompt tokens per second per request [default: {_d(SimulateOptions, 'prefill_tps'):g}].")
    o(f, "--decode-tps", type=float, default=None,
      help=f"Cost model: output tokens per second per running request [default: {_d(SimulateOptions, 'decode_tps'):g}].")
    o(f, "--logged-latency/--no-logged-latency", "use_logged_latency", default=_d(SimulateOptions, "use_logged_latency"), show_default=True,
      help="Calibrate the cost model's prefill and decode rates from the log's latency_s/ttft_s "
      "where present.")
    o(f, "--max-num-seqs", type=int, default=None,
      help="Concurrent mode: most requests running at once (vLLM's flag) [default: 256; with --gpu, "
      "vllm serve's default on that GPU: 256 or 1024].")
    o(f, "--max-num-batched-tokens", type=int, default=None,
      help="Concurrent mode: tokens scheduled per engine step (vLLM's flag) [default: vllm serve's "
      "default on --gpu: 2048, 8192 or 16384; without --gpu, 2048].")
    o(f, "--clock", type=click.Choice(["roofline", "flat"]), default=None,
      help="Concurrent mode's step clock: roofline (each step priced from the model's FLOPs and bytes on "
      "the GPU's datasheet peaks) or flat (--prefill-tps/--decode-tps) [default: roofline with --model "
      "and a named --gpu, else flat].")
    o(f, "--mfu", type=float, default=None,
      help=f"Roofline clock: share of the GPU's peak FLOP/s a step reaches [default: {_d(SimulateOptions, 'mfu')}; "
      "fitted from logged TTFTs when the log has them].")
    o(f, "--mbu", type=float, default=None,
      help=f"Roofline clock: share of the GPU's memory bandwidth a step reaches [default: {_d(SimulateOptions, 'mbu')}; "
      "fitted from logged latencies when the log has them].")
    o(f, "--scheduling", type=click.Choice(["sync", "async"]), default=None,
      help="Concurrent mode's scheduler: async (vLLM's AsyncScheduler, its default on GPUs) or sync "
      "(its Scheduler, as a CPU engine runs) [default: async with --gpu, else sync].")
    o(f, "--speculative", type=click.Choice(SPECULATIVE_METHODS), default=None, metavar="METHOD",
      help="The speculative-decoding method vLLM runs (--speculative-config's method: "
      f"{', '.join(SPECULATIVE_METHODS)}); {', '.join(EAGLE_METHODS)} make vLLM 0.32 drop the last "
      "block of every cache hit (0.33+ hash the next token instead: not modelled) [default: none].")
    o(f, "--sweep-points", type=int, default=None,
      help=f"Budgets in the default sweep per block size [default: {_d(SimulateOptions, 'sweep_points')}].")
    o(f, "--reference-budgets", type=int, default=None,
      help=f"Budgets per block size the fifo/belady reference lines run at; 0 = all [default: {_d(SimulateOptions, 'reference_budgets')}].")
    o(f, "--workers", type=int, default=None,
      help="Threads for the grid's configurations (default: all cores).")
    o(f, "--replicas", type=_CommaList(int), default=None,
      help="vLLM engines behind a router, each with the budget's blocks, at the reference budgets, in "
      "each mode of --modes; counts above 1 write replicas.parquet [default: 1].")
    o(f, "--router", "routers", type=_CommaList(str, ROUTERS), default=None,
      help=f"Routers in front of --replicas engines: {', '.join(ROUTERS)} [default: {ROUND_ROBIN}].")
    o(f, "--prefix-hash-blocks", type=int, default=None,
      help=f"prefix-hash router: full blocks hashed to pick a replica [default: {DEFAULT_PREFIX_HASH_BLOCKS}].")
    o(f, "--router-load-weight", type=float, default=None,
      help="cache-aware router: score = cached prefix tokens - WEIGHT x uncomputed prompt tokens queued "
      f"on the replica [default: {DEFAULT_LOAD_WEIGHT:g}].")
    o(f, "--offload-gib", type=_CommaList(float), default=None,
      help="vLLM's CPU KV offload tier (--kv-offloading-size, GiB over all TP ranks; 0 = none) simulated at "
      "every budget, sequential mode; a list sweeps (0,16,64,256) and writes offload.parquet; needs --model.")
    for decls, kw in reversed(specs):  # click lists options in reverse order of application
        f = _option_once(f, *decls, **kw)
    return f


def recommend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options only `recommend` reads (applied to `run` too)."""
    f = click.option(
        "--gpus", type=click.IntRange(min=1), default=None,
        help="GPUs to split into replicas: with --replicas simulated (and --model, --gpu) the replica count, "
        "tensor-parallel size and router that save the most prefill are recommended [default: the router only, "
        "at each simulated replica count].",
    )(f)
    f = click.option(
        "--backend", type=click.Choice(["cuda", "cpu"]), default=_d(RecommendOptions, "backend"), show_default=True,
        help="Attention backend: its block sizes are allowed (cuda: multiples of 16, cpu: of 32).",
    )(f)
    f = click.option(
        "--min-gain-per-gib", type=float, default=_d(RecommendOptions, "min_gain_per_gib") * 100, show_default=True,
        help="Hit-rate points one more GiB of KV memory must buy to be worth it (memory's price).",
    )(f)
    f = click.option(
        "--prefill-tokens-per-s", type=float, default=None,
        help="Prefill throughput for the TTFT gain (default: the simulate stage's --prefill-tps).",
    )(f)
    return f


def recommend_model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Model/GPU options of the `recommend` command alone: under `run` the simulate stage's
    options of the same names are used, and `recommend RUN_DIR` falls back to what the
    simulate stage recorded in manifest.json."""
    f = click.option("--model", default=None,
                     help="Catalog name (e.g. llama-3.1-8b) or local HF folder/config.json.")(f)
    f = click.option("--gpu", "--gpu-memory-gib", "gpu", default=None,
                     help="GPU memory: GiB or a name (h100, h200, a100-40gb, l40s, l4, ...).")(f)
    f = click.option("--gpu-memory-utilization", type=float, default=None,
                     help="vLLM's --gpu-memory-utilization ceiling (default: the simulate stage's).")(f)
    f = click.option("--tensor-parallel-size", type=int, default=None,
                     help="GPUs the model is sharded over (KV heads and weights split).")(f)
    f = click.option("--headroom-gib", type=float, default=None,
                     help=f"Activation/runtime memory per GPU besides weights and KV [default: {DEFAULT_HEADROOM_GIB}].")(f)
    return f


def report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the report stage (applied to `report` and to `run`)."""
    f = click.option("--redact", is_flag=True,
                     help="Replace prompt text in the reports with its length and a short hash "
                     "(for logs that cannot be shown); numbers are unchanged.")(f)
    return f


def replay_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the replay stage (applied to `replay` and to `run`)."""
    f = click.option("--replay-mode", type=click.Choice(["sequential", "concurrent", "both"]),
                     default=_d(ReplayOptions, "replay_mode"), show_default=True,
                     help="sequential: one request at a time, prefill-only, exact to the token; "
                     "concurrent: logged arrival times and output lengths, within 1 point.")(f)
    f = click.option("--replay-model", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Local model folder to replay with (default: a tiny random Llama; "
                     "hits depend on token ids, not weights).")(f)
    f = click.option("--max-output-tokens", "replay_max_output_tokens", type=int,
                     default=_d(ReplayOptions, "replay_max_output_tokens"), show_default=True,
                     help="Concurrent replay: cap on logged output lengths "
                     "(each output token is one engine step, ~20 ms with the tiny model on a CPU).")(f)
    f = click.option("--replay-limit", type=int, default=_d(ReplayOptions, "replay_limit"), show_default=True,
                     help="Replay only the first N requests, 0 = all (both modes are causal: "
                     "the prediction for them is the whole log's first N).")(f)
    f = click.option("--replay-url", default=None,
                     help="Replay against a running vLLM OpenAI server (http://HOST:PORT) "
                     "instead of an in-process engine; several, comma separated, are one replica each "
                     "(each request to the replica the simulated router chose).")(f)
    f = click.option("--api-key-env", default=None,
                     help="Name of the environment variable holding the server's API key "
                     "(the key is never printed or stored).")(f)
    f = click.option("--concurrency", "replay_concurrency", type=int, default=_d(ReplayOptions, "replay_concurrency"), show_default=True,
                     help="Server replay: requests in flight at most.")(f)
    f = click.option("--assume-config", is_flag=True,
                     help="Server replay: trust that the server runs the configuration being "
                     "confirmed when its /metrics does not say.")(f)
    return f
