"""Memory arithmetic and the `vllm serve` line for the chosen point.

Inputs: `RecommendOptions`, the model geometry and GPU memory when known, the ranked
points (advisor.recommend.rank).
Outputs: `gpu_kv_budget` -> the GPU's KV bytes per GPU; `offload_past_gpu` ->
recommendation.json's `offload` when the curve still pays past the GPU; `serve_flags` ->
the flags, the `vllm serve` command line, and notes on how the memory flag was chosen.
"""

from __future__ import annotations

import math
from typing import Any

from advisor import kvmemory as kv
from advisor.recommend.options import RecommendOptions
from advisor.recommend.rank import Point, rank_key

MODEL_PLACEHOLDER = "<MODEL>"


def headroom(options: RecommendOptions) -> float:
    return kv.DEFAULT_HEADROOM_GIB if options.headroom_gib is None else options.headroom_gib


def gpu_kv_budget(
    options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
) -> tuple[int | None, list[str], list[str]]:
    """KV bytes per GPU once weights and headroom are paid (None when unknown), the
    constraint that shows the sum, and a note when the GPU cannot be checked."""
    if geom is not None and gpu_gib is not None:
        tp = options.tensor_parallel_size
        kv_bytes = kv.kv_bytes_for_gpu(geom, gpu_gib, options.gpu_memory_utilization, options.headroom_gib, tp)
        return kv_bytes, [
            f"GPU: {gpu_gib:.1f} GiB x {options.gpu_memory_utilization:g} - {geom.weight_bytes / tp / kv.GIB:.1f} GiB "
            f"weights - {headroom(options):.1f} GiB activation headroom = {kv_bytes / kv.GIB:.1f} GiB for KV per GPU"
        ], []
    if gpu_gib is not None:
        return None, [], ["--gpu given without --model: weights unknown, so the GPU's KV budget is not checked"]
    return None, [], []


def offload_past_gpu(
    points: list[Point], best: Point, gpu_kv_bytes: int | None, tp: int,
) -> tuple[dict[str, Any] | None, list[str]]:
    """CPU KV offloading when a larger budget of the chosen block size scores better than
    the best that fits the GPU; with the reasoning line that says so."""
    beyond = [p for p in points if p.block_size == best.block_size and not p.fits_gpu and p.score > best.score]
    if not beyond or gpu_kv_bytes is None:
        return None, []
    far = max(beyond, key=rank_key)
    extra = max(0.0, (far.cost_gib - gpu_kv_bytes / kv.GIB) * tp)
    out = {"gib": round(math.ceil(extra * 10) / 10, 1), "hit_rate": round(far.hit_rate, 6),
           "block_size": far.block_size, "num_blocks": far.num_blocks}
    return out, [
        f"The curve still pays past the GPU: {far.num_blocks:,} blocks would reach {far.hit_rate:.1%} "
        f"(+{(far.hit_rate - best.hit_rate) * 100:.1f} points, {far.marginal:,.0f} tokens/GiB at the margin); "
        f"vLLM 0.32's CPU KV offloading (--kv-offloading-size {out['gib']} GiB, total over TP ranks, "
        "--kv-offloading-backend native) holds the rest. The simulator counts offloaded blocks like GPU "
        "blocks; a CPU hit still costs a transfer, so the real gain is somewhat lower."
    ]


def serve_flags(
    best: Point, options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
    hash_trace: bool, offload: dict[str, Any] | None, concurrent: bool,
) -> tuple[list[str], str, list[str]]:
    """The flags, the `vllm serve` line, and notes on how the memory flag was chosen."""
    tp = options.tensor_parallel_size
    flags = ["--enable-prefix-caching"]  # the default in vLLM 0.32; stated so a config diff shows it
    if not hash_trace:
        flags.append(f"--block-size {best.block_size}")
    memory_flag, notes = _memory_flag(best, options, geom, gpu_gib, hash_trace, concurrent)
    flags.append(memory_flag)
    if tp > 1:
        flags.append(f"--tensor-parallel-size {tp}")
    if offload is not None:
        flags.append(f"--kv-offloading-size {offload['gib']}")
        flags.append("--kv-offloading-backend native")
    if geom is not None and geom.serve_name:
        model = geom.serve_name
    else:
        model = options.model or MODEL_PLACEHOLDER
    return flags, " ".join(["vllm serve", model, *flags]), notes


def _memory_flag(
    best: Point, options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
    hash_trace: bool, concurrent: bool,
) -> tuple[str, list[str]]:
    """The flag that sizes the KV cache: utilization with a GPU, bytes with a model only,
    blocks without a model."""
    tp = options.tensor_parallel_size
    need = kv.kv_bytes_for_blocks(geom, best.block_size, best.num_blocks, tp) if geom is not None else None
    if geom is not None and gpu_gib is not None and need is not None:
        util = kv.utilization_for_kv_bytes(geom, gpu_gib, need, options.headroom_gib, tp)
        util = min(options.gpu_memory_utilization, math.ceil(util * 100) / 100)
        if not concurrent:
            # Running requests were not simulated: do not shrink the pool below what vLLM would take.
            return f"--gpu-memory-utilization {options.gpu_memory_utilization:.2f}", [
                f"The prefix cache needs {need / kv.GIB:.2f} GiB per GPU (--gpu-memory-utilization {util:.2f} "
                f"would give it); the flag keeps {options.gpu_memory_utilization:.2f} because the sequential "
                "simulation does not size the memory running requests need. To pin the cache exactly, use "
                f"--kv-cache-memory-bytes {need}."
            ]
        return f"--gpu-memory-utilization {util:.2f}", [
            f"--gpu-memory-utilization {util:.2f} gives the KV cache {need / kv.GIB:.2f} GiB per GPU "
            f"(or pin it exactly with --kv-cache-memory-bytes {need}). That is the least memory "
            "that buys this hit rate at the logged load; on a GPU that serves nothing else, "
            f"{options.gpu_memory_utilization:.2f} costs nothing and leaves room for bursts."
        ]
    if need is not None:
        return f"--kv-cache-memory-bytes {need}", []
    if not hash_trace:
        return f"--num-gpu-blocks-override {best.num_blocks + 1}", []  # vLLM counts the null block
    blocks16 = -(-best.num_blocks * best.block_size // 16)
    return f"--num-gpu-blocks-override {blocks16 + 1}", [
        f"The trace's {best.num_blocks:,} blocks of {best.block_size} tokens are "
        f"{blocks16:,} blocks at vLLM's default --block-size 16 (plus the null block)."
    ]
