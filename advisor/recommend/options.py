"""The recommend stage's options, and how they inherit what the simulate stage ran with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from advisor.sim.configuration import SimulateOptions
from advisor.vllm_versions import resolve_vllm_version


@dataclass(frozen=True)
class RecommendOptions:
    # None: what the simulate stage ran with (its recorded options), else SimulateOptions' default.
    model: str | None = None  # catalog name or local folder; None = memory in blocks only
    gpu: str | None = None  # catalog name or GiB
    gpu_memory_utilization: float | None = None
    headroom_gib: float | None = None  # None = kvmemory.DEFAULT_HEADROOM_GIB
    tensor_parallel_size: int | None = None
    prefill_tokens_per_s: float | None = None  # the TTFT gain's rate; the simulate stage's prefill_tps
    backend: str = "cuda"  # attention backend: its block sizes are allowed
    vllm_version: str | None = None  # the flags are for this version ("major.minor"); simulate's
    min_gain_per_gib: float = 0.001  # hit-rate share one more GiB must buy (memory's price)
    # GPUs to split into replicas (advisor.recommend.replicas); None: only the router is chosen,
    # at each simulated replica count
    gpus: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Options the simulate stage also has: recommend sizes memory as it was simulated.
_FROM_SIMULATE = {"model": "model", "gpu": "gpu", "gpu_memory_utilization": "gpu_memory_utilization",
                  "headroom_gib": "headroom_gib", "tensor_parallel_size": "tensor_parallel_size",
                  "prefill_tokens_per_s": "prefill_tps", "vllm_version": "vllm_version"}


def resolve_options(options: RecommendOptions, recorded: dict[str, Any]) -> RecommendOptions:
    """`options` with every None taken from the simulate stage's record, else its default."""
    defaults = SimulateOptions()
    filled = {mine: recorded.get(theirs, getattr(defaults, theirs))
              for mine, theirs in _FROM_SIMULATE.items() if getattr(options, mine) is None}
    if filled.get("gpu") is not None:
        filled["gpu"] = str(filled["gpu"])
    # "0.34.1" given here, or a run folder simulated before the option existed (no record):
    # the table's key, and the default for the latter.
    filled["vllm_version"] = resolve_vllm_version(filled.get("vllm_version", options.vllm_version))
    return replace(options, **filled)
