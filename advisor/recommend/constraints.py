"""What limits the recommendation before any ranking: block sizes and running requests.

Inputs: the view's sim rows and all LRU rows (polars, schema.SIM), the backend, the model
geometry and KV cache layout (advisor.kvlayout) when known, whether the input was a hash trace,
and the vLLM version the flags are for.
Outputs: `allowed_block_sizes` -> the block sizes that may be recommended; `running_reserve`
-> the blocks running requests pin per block size. Each also returns the
recommendation.json `constraints` lines that say why.
"""

from __future__ import annotations

import polars as pl

from advisor import kvmemory as kv
from advisor import vllm_versions as vv
from advisor.errors import AdvisorError
from advisor.kvlayout import KVLayout
from advisor.schema import MODE_CONCURRENT

BACKEND_BLOCK_MULTIPLE = {"cuda": 16, "cpu": 32}  # FlashAttention/Triton; vLLM CPU backend


def allowed_block_sizes(
    view: pl.DataFrame, backend: str, geom: kv.ModelGeometry | None, hash_trace: bool,
    layout: KVLayout | None = None, vllm_version: str | None = None,
) -> tuple[list[int], list[str]]:
    """The simulated block sizes vLLM would accept, and the constraints that say which and why.

    With a Mamba hybrid's `layout`, only the sizes vLLM runs as given (`KVLayout.block_size(b)
    == b`): it raises a smaller --block-size until an attention page holds a state, so a smaller
    one would not be what runs. Without a layout, the geometry's `forced_block_size`."""
    sizes = sorted(int(b) for b in view["block_size"].unique().to_list())
    allowed = list(sizes)
    constraints: list[str] = []
    if hash_trace:
        constraints.append(
            f"hash trace: the block size is fixed by the trace ({', '.join(map(str, sizes))} tokens per hash); "
            "only the memory budget is recommended"
        )
    else:
        mult = BACKEND_BLOCK_MULTIPLE.get(backend)
        if mult is None:
            raise AdvisorError(f"unknown --backend {backend!r}: use one of {', '.join(BACKEND_BLOCK_MULTIPLE)}.")
        why = ""
        if backend == "cuda" and geom is not None and geom.mla_latent_dim is not None:
            mult = 64  # vLLM 0.32's FlashMLA kernel pages hold 64 tokens (CUTLASS MLA on Blackwell: 128)
            why = " (MLA model: FlashMLA's page; on Blackwell's CUTLASS MLA use a multiple of 128)"
        dropped = [b for b in allowed if b % mult]
        allowed = [b for b in allowed if b % mult == 0]
        constraints.append(f"backend {backend}: --block-size must be a multiple of {mult}{why}"
                           + (f" (dropped {', '.join(map(str, dropped))})" if dropped else ""))
        if layout is not None and layout.has_mamba:
            raised = [b for b in allowed if layout.block_size(b) != b]
            allowed = [b for b in allowed if layout.block_size(b) == b]
            constraints.append(
                f"{layout.name} is a Mamba hybrid: vLLM raises --block-size to at least "
                f"{layout.block_size(1)} so an attention page holds one state (Platform._align_hybrid_block_size)"
                + (f"; {', '.join(map(str, raised))} would not run as given" if raised else ""))
            if vv.facts(vllm_version).version != vv.facts("0.32").version:
                constraints.append(
                    f"the block size is vLLM 0.32's rule: vLLM {vv.facts(vllm_version).version} also aligns it to "
                    "the Mamba prefill checkpoint (not modelled); check the 'Setting attention block size' line "
                    "vLLM logs at start-up")
        elif geom is not None and geom.forced_block_size:
            allowed = [b for b in allowed if b == geom.forced_block_size]
            constraints.append(f"{geom.name} is a hybrid model: vLLM forces --block-size {geom.forced_block_size}")
    if not allowed:
        raise AdvisorError(
            f"no simulated block size ({', '.join(map(str, sizes))}) is allowed by the {backend} backend: "
            f"rerun `pc-advise simulate` with block sizes that are multiples of "
            f"{BACKEND_BLOCK_MULTIPLE.get(backend)}."
        )
    return allowed, constraints


def running_reserve(lru: pl.DataFrame, allowed: list[int]) -> tuple[dict[int, int], str]:
    """Blocks that running requests pin at the logged concurrency, per allowed block size.

    Read from every concurrent row, whatever the view's window: the peak is a property of the
    load, and a budget below it would preempt or queue requests.
    """
    reserve: dict[int, int] = {}
    conc = lru.filter((pl.col("mode") == MODE_CONCURRENT) & pl.col("num_blocks").is_not_null())
    for b in allowed:
        rows = conc.filter(pl.col("block_size") == b)
        if rows.height:
            reserve[b] = int(rows["peak_blocks_in_use"].max())  # type: ignore[arg-type]
    if not reserve:
        return reserve, "no concurrent simulation: memory for running requests is not checked"
    return reserve, (
        "running requests at the logged concurrency pin up to "
        + ", ".join(f"{n:,} blocks at B={b}" for b, n in sorted(reserve.items()))
        + "; smaller budgets would preempt or queue them and are not recommended"
    )
