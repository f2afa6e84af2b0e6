"""Step time of one vLLM engine: a roofline per step, for a model x GPU x tensor-parallel size.

Inputs: a `kvmemory.ModelGeometry`, a `GpuSpec` (dense BF16 peak and memory bandwidth from the
GPU catalog, advisor/data/models.json), the tensor-parallel size, and what one engine step
computes: the prompt chunks it prefills, as (new tokens, tokens already in the KV cache before
them), and the context length of each request it decodes one token for. Output: the step's
seconds (`StepTimeModel.step_seconds`). docs/simulate.md "Step time" has the figures and checks.

What it is. One engine step is one forward pass over every token scheduled in it. Each of the
`tp` ranks does 1/tp of the arithmetic and reads 1/tp of the weights and its own share of the KV
cache; the step lasts as long as the slower of the two, plus a fixed host overhead:

    compute_s = (2 * N * T + 4 * L * H * d * A) / (peak_flops * mfu * tp)
    memory_s  = (W / tp + b_tp * (R + T)) / (bandwidth * mbu)
    step_s    = max(compute_s, memory_s) + overhead_s

T: tokens computed (each chunk's new tokens, plus one per decoding request). A: attention
query-key pairs: a chunk of n new tokens after c cached ones contributes n * (c + n/2) (each new
token sees the c before it and, causally, half the chunk on average); a decoding request with
context c contributes c. The 4 is two matmuls (QK^T, PV) times two FLOPs per multiply-add.
R: KV tokens read (each chunk's c, each decoding request's c); T more are written.
N: parameters a token passes through (the catalog's `active_params` for an MoE, else all);
L, H, d: layers, query heads, head dim; W: weight bytes; b_tp: KV bytes per token on one rank
(`kvmemory.bytes_per_token`). `mfu` and `mbu` are the fractions of the datasheet peaks a real
engine reaches on compute-bound and memory-bound work: stated assumptions (0.5, 0.7), or fitted
from a log (`calibrated`). Analytical simulators of LLM serving price work the same way at
finer grain: per operator, from profiles (Vidur) or from a hardware description (LLMCompass);
this prices a whole step with two efficiencies, which is what a log can calibrate.

What it leaves out, each erring the way it says:
- MoE: weights are all read every step (true once a batch touches every expert; small-batch
  decode reads less); the matmul FLOPs use the active count where the catalog has one.
- Tensor-parallel communication (an all-reduce per layer) is not priced: tp > 1 is optimistic.
- CUDA-graph padding of decode batches, sampling, activation traffic, kernel-launch gaps beyond
  the fixed overhead; FP8 matmuls (priced at the BF16 peak) and quantized weights' compute.
- MLA (DeepSeek): attention is priced as H heads of the latent width, the absorbed form vLLM
  decodes with; its prefill uses the uncompressed form, cheaper per pair, so long MLA prefills
  are overstated. Sliding-window layers attend to the whole context here (as kvmemory counts).
- 2 * N counts the embedding and output matrices for every token (vLLM computes logits only for
  sampled positions): about 13% too many FLOPs for llama-3.1-8b, less for larger models; a
  calibrated mfu absorbs it.

`from_rates` is the old flat clock (advisor.sim.events.CostModel) in this type: a step costs
`1 / decode_tps` plus its longest prefill chunk over `prefill_tps`, whatever the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from advisor import kvmemory
from advisor.errors import AdvisorError
from advisor.kvmemory import ModelGeometry

# Assumptions, each overridable and fitted by `calibrated` where a log carries latencies.
# mfu: dense prefill GEMMs on Hopper reach 60-75% of the datasheet peak in isolation; a whole
# step (attention, norms, activations, sampling in between) less: 0.5 is a middle figure.
# mbu: a well-tuned decode step streams weights at 70-85% of peak bandwidth; 0.7 errs slow.
# overhead: vLLM v1's host work per step (schedule, prepare inputs, launch CUDA graphs,
# sample, detokenize) that does not overlap the GPU: roughly 0.5-2 ms; 1 ms.
DEFAULT_MFU = 0.5
DEFAULT_MBU = 0.7
DEFAULT_OVERHEAD_S = 1e-3
# calibration leaves out requests within 1% of the compute/memory ridge, where the other term
# could explain their time as well (and float rounding decides which side they fall)
_RIDGE = 1.01


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's peaks: dense BF16 tensor-core FLOP/s (no sparsity), memory bandwidth in bytes/s,
    memory in GiB, and where the figures come from (a vendor datasheet)."""

    name: str
    bf16_flops: float
    mem_bytes_per_s: float
    memory_gib: float
    source: str
    variant: str = ""  # the form factor the figures are for (SXM, PCIe, ...)
    # The host link as the datasheet (`source`) states it: PCIe GB/s, both directions together
    # (H100/H200 "PCIe Gen5: 128GB/s", A100 "PCIe Gen4: 64GB/s"); None where it states none.
    pcie_gbps: float | None = None

    @property
    def host_link_bytes_per_s(self) -> float | None:
        """Peak bytes per second one way (GPU to host, or host to GPU): half the datasheet's
        two-way figure. What KV offloading's stores and loads each move at, at best."""
        return None if self.pcie_gbps is None else self.pcie_gbps * 1e9 / 2

    def __post_init__(self) -> None:
        if not (self.bf16_flops > 0 and self.mem_bytes_per_s > 0):
            raise AdvisorError(f"GPU {self.name!r} needs a positive peak FLOP/s and bandwidth: "
                               f"give the datasheet figures.")


def gpu_spec(spec: str) -> GpuSpec:
    """The catalog's figures for a GPU name (h100, a100-40gb, NVIDIA-L40S, mi300x, ...)."""
    key = kvmemory.gpu_key(str(spec))
    gpus = kvmemory.catalog()["gpus"]
    if key is None or "bf16_tflops" not in gpus[key]:
        raise AdvisorError(
            f"no compute figures for GPU {spec!r} (a size in GiB gives its memory only): name one "
            f"of {', '.join(sorted(gpus))}, or build a GpuSpec from its datasheet.")
    e = gpus[key]
    return GpuSpec(name=key, bf16_flops=float(e["bf16_tflops"]) * 1e12,
                   mem_bytes_per_s=float(e["hbm_gbps"]) * 1e9, memory_gib=kvmemory.resolve_gpu(key),
                   source=str(e["source"]), variant=str(e.get("variant", "")),
                   pcie_gbps=float(e["pcie_gbps"]) if "pcie_gbps" in e else None)


class StepCoefficients(NamedTuple):
    """The model as plain floats, so a compiled loop can price steps without Python objects:
    `seconds_from_totals` is the whole formula. Roofline: flat_prefill_tps is inf. Flat
    (from_rates): the four roofline terms are 0, overhead_s is 1 / decode_tps."""

    compute_per_token: float  # seconds per token computed (2N / (peak * mfu * tp))
    compute_per_pair: float  # seconds per attention query-key pair (4LHd / (peak * mfu * tp))
    memory_fixed: float  # seconds to read one rank's weights (W / tp / (bandwidth * mbu))
    memory_per_kv_token: float  # seconds per KV token read or written on one rank
    overhead_s: float
    flat_prefill_tps: float  # the flat clock's prefill rate for the longest chunk (inf: none)


def seconds_from_totals(c: StepCoefficients, tokens: float, pairs: float, kv_read: float,
                        longest_chunk: float = 0.0) -> float:
    """Step seconds from a step's totals (module docstring): tokens computed T, attention pairs A,
    KV tokens read R, and the longest prefill chunk (used by the flat clock only)."""
    compute = c.compute_per_token * tokens + c.compute_per_pair * pairs
    memory = c.memory_fixed + c.memory_per_kv_token * (kv_read + tokens)
    # a division, not a product with 1 / rate, so the flat clock repeats CostModel's float sums
    return max(compute, memory) + c.overhead_s + longest_chunk / c.flat_prefill_tps


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per engine step for one model on one GPU type (module docstring).

    Built by `for_model` / the constructor (roofline) or `from_rates` (the old flat clock).
    `basis` says where mfu and mbu (or the rates) came from, for the run's notes."""

    geometry: ModelGeometry | None
    gpu: GpuSpec | None
    tp: int = 1
    mfu: float = DEFAULT_MFU
    mbu: float = DEFAULT_MBU
    overhead_s: float = DEFAULT_OVERHEAD_S
    flat_prefill_tps: float | None = None  # set by from_rates only: the flat clock
    basis: str = "stated mfu and mbu, not fitted to a log"

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise AdvisorError(f"tensor-parallel size must be >= 1, got {self.tp}: pass 1 or more.")
        for name, v in (("mfu", self.mfu), ("mbu", self.mbu)):
            if not 0 < v <= 1:
                raise AdvisorError(f"{name} must be in (0, 1], got {v}: it is a fraction of the GPU's "
                                   f"peak; pass e.g. {DEFAULT_MFU if name == 'mfu' else DEFAULT_MBU}.")
        if self.overhead_s < 0:
            raise AdvisorError(f"step overhead must be >= 0 s, got {self.overhead_s}.")
        if self.flat:
            assert self.flat_prefill_tps is not None and self.flat_prefill_tps > 0 and self.overhead_s > 0
            return
        if self.geometry is None or self.gpu is None:
            raise AdvisorError("a step-time model needs a model and a GPU (--model and --gpu), or "
                               "the flat rates (StepTimeModel.from_rates).")
        if not self.geometry.q_heads:
            raise AdvisorError(f"model {self.geometry.name!r} has no attention-head count: resolve it "
                               f"with kvmemory.resolve_model (a catalog name or a config.json).")

    @classmethod
    def for_model(cls, model: str, gpu: str, tp: int = 1, **kw: Any) -> StepTimeModel:
        """A roofline model from a catalog name / config.json path and a GPU catalog name."""
        return cls(kvmemory.resolve_model(model), gpu_spec(gpu), tp, **kw)

    @classmethod
    def from_rates(cls, prefill_tps: float, decode_tps: float, basis: str = "") -> StepTimeModel:
        """The old flat clock: a step lasts `1 / decode_tps` (the overhead) plus its longest
        prefill chunk's new tokens over `prefill_tps`; batch size and context cost nothing."""
        if not (prefill_tps > 0 and decode_tps > 0):
            raise AdvisorError(f"prefill and decode rates must be > 0, got {prefill_tps}, {decode_tps}: "
                               f"pass e.g. --prefill-tps 10000 --decode-tps 50.")
        return cls(None, None, overhead_s=1.0 / decode_tps, flat_prefill_tps=float(prefill_tps),
                   basis=basis or f"flat rates: {prefill_tps:g} prefill tokens/s, {decode_tps:g} steps/s")

    @property
    def flat(self) -> bool:
        return self.flat_prefill_tps is not None

    @property
    def decode_tps(self) -> float:
        """Flat clock only: steps per second."""
        assert self.flat
        return 1.0 / self.overhead_s

    def _unit(self) -> tuple[float, float, float, float]:
        """(per token, per pair, weights, per KV token) seconds at mfu = mbu = 1, one rank."""
        g, gpu = self.geometry, self.gpu
        assert g is not None and gpu is not None and g.q_heads
        active = g.active_params if g.active_params else g.params
        flops = gpu.bf16_flops * self.tp
        return (2.0 * active / flops, 4.0 * g.layers * g.q_heads * g.head_dim / flops,
                g.weight_bytes / self.tp / gpu.mem_bytes_per_s,
                kvmemory.bytes_per_token(g, self.tp) / gpu.mem_bytes_per_s)

    @cached_property
    def coefficients(self) -> StepCoefficients:
        if self.flat:
            assert self.flat_prefill_tps is not None
            return StepCoefficients(0.0, 0.0, 0.0, 0.0, self.overhead_s, self.flat_prefill_tps)
        tok, pair, weights, kv = self._unit()
        return StepCoefficients(tok / self.mfu, pair / self.mfu, weights / self.mbu, kv / self.mbu,
                                self.overhead_s, math.inf)

    def step_seconds(self, prefill_chunks: Iterable[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        """Seconds of one engine step. `prefill_chunks`: (new tokens, tokens before them in the
        KV cache: cached hits plus earlier chunks) per request computing prompt tokens in it;
        `decode_contexts`: context length (tokens whose KV it attends to) per request decoding
        one token in it."""
        tokens = pairs = kv_read = 0.0
        longest = 0
        for new, before in prefill_chunks:
            assert new >= 0 and before >= 0
            tokens += new
            pairs += new * (before + new / 2)
            kv_read += before
            longest = max(longest, new)
        contexts = float(sum(decode_contexts))
        tokens += len(decode_contexts)
        return seconds_from_totals(self.coefficients, tokens, pairs + contexts, kv_read + contexts, longest)

    def prefill_seconds(self, tokens: int, context_before: int = 0) -> float:
        """One request's prompt (`tokens` new after `context_before` cached) alone in a step:
        its modelled TTFT when it fits the token budget and nothing else runs."""
        return self.step_seconds([(tokens, context_before)], [])

    def decode_seconds(self, batch_contexts: Sequence[int]) -> float:
        """One decode step of a batch, one request per context length."""
        return self.step_seconds([], batch_contexts)

    def calibrated(self, n_tokens: np.ndarray, output_tokens: np.ndarray,
                   latency_s: np.ndarray | None, ttft_s: np.ndarray | None) -> StepTimeModel:
        """The model the log implies, where it carries latencies (else unchanged); `basis` says
        what was fitted from how many requests. Arrays are per request: prompt tokens, output
        tokens, end-to-end latency and TTFT in seconds (NaN where not logged).

        Roofline: mbu first, from requests with a latency and more than one output token: the
        median of what makes their O - 1 decode steps, each alone (batch of one), last
        `latency - ttft` (a modelled TTFT where none is logged); requests whose decode the
        compute term explains are left out. Then mfu from the median of what makes a prompt
        alone in one step last its logged TTFT, over requests whose TTFT exceeds the memory
        term (the others are memory-bound and say nothing about compute). Logged times include
        queueing and batching, so both are lower bounds; a value above 1 is capped at 1 (the
        log is faster than the datasheet peak: check --gpu and the weight dtype).
        Flat: the old CostModel.calibrated's rule exactly (and, like it, nothing without latency_s).
        """
        prompt = np.asarray(n_tokens, np.float64)
        out = np.asarray(output_tokens, np.float64)
        nan = np.full(len(prompt), np.nan)
        lat = np.asarray(latency_s, np.float64) if latency_s is not None else nan
        ttft = np.asarray(ttft_s, np.float64) if ttft_s is not None else nan
        if self.flat:
            return self._calibrated_flat(prompt, out, lat, ttft) if latency_s is not None else self
        model, notes = self, []
        implied = self._implied_mbu(prompt, out, lat, ttft)
        if len(implied):
            mbu, note = _median_fraction(implied)
            model = replace(model, mbu=mbu)
            notes.append(f"mbu {mbu:.3g} from the median decode time of {len(implied)} logged requests{note}")
        implied = model._implied_mfu(prompt, ttft)
        if len(implied):
            mfu, note = _median_fraction(implied)
            model = replace(model, mfu=mfu)
            notes.append(f"mfu {mfu:.3g} from the median TTFT of {len(implied)} logged requests{note}")
        if not notes:
            return self
        kept = [f"{k} {getattr(model, k):g} assumed" for k in ("mbu", "mfu") if not any(n.startswith(k) for n in notes)]
        return replace(model, basis="; ".join(notes + kept) + " (lower bounds: logged times include queueing)")

    def _implied_mbu(self, prompt: np.ndarray, out: np.ndarray, lat: np.ndarray, ttft: np.ndarray) -> np.ndarray:
        """Per usable request, the mbu that makes its O - 1 decode steps alone last its decode time."""
        tok, pair, weights, kv = self._unit()
        alone = np.maximum((tok * prompt + pair * prompt * prompt / 2) / self.mfu,
                           (weights + kv * prompt) / self.mbu) + self.overhead_s  # prefill_seconds(P)
        first = np.where(np.isfinite(ttft), ttft, alone)
        steps = out - 1
        ctx = prompt + (steps - 1) / 2  # mean context over the decode steps: P, P + 1, ..., P + O - 2
        with np.errstate(invalid="ignore"):
            busy = (lat - first) - steps * self.overhead_s
            compute = steps * (tok + pair * ctx) / self.mfu
            ok = np.isfinite(busy) & (steps > 0) & (busy > 0) & (compute * _RIDGE < busy)
        return steps[ok] * (weights + kv * (ctx[ok] + 1)) / busy[ok]

    def _implied_mfu(self, prompt: np.ndarray, ttft: np.ndarray) -> np.ndarray:
        """Per usable request, the mfu that makes its prompt alone in one step last its TTFT."""
        tok, pair, weights, kv = self._unit()
        with np.errstate(invalid="ignore"):
            busy = ttft - self.overhead_s
            ok = np.isfinite(busy) & (prompt > 0) & (busy > (weights + kv * prompt) / self.mbu * _RIDGE)
        p = prompt[ok]
        return (tok * p + pair * p * p / 2) / busy[ok]

    def _calibrated_flat(self, prompt: np.ndarray, out: np.ndarray, lat: np.ndarray,
                         ttft: np.ndarray) -> StepTimeModel:
        prefill_tps, decode_tps, notes = self.flat_prefill_tps, self.decode_tps, []
        assert prefill_tps is not None
        has_ttft = np.isfinite(ttft) & (ttft > 0) & (prompt > 0)
        if has_ttft.any():
            prefill_tps = float(np.median(prompt[has_ttft] / ttft[has_ttft]))
            notes.append(f"prefill {prefill_tps:.4g} tokens/s from {int(has_ttft.sum())} logged TTFTs")
        first = np.where(np.isfinite(ttft), ttft, prompt / prefill_tps)
        decoding = np.isfinite(lat) & (out > 1) & (lat - first > 0)
        if decoding.any():
            decode_tps = float(np.median((out[decoding] - 1) / (lat - first)[decoding]))
            notes.append(f"decode {decode_tps:.4g} steps/s from {int(decoding.sum())} logged latencies")
        if not notes:
            return self
        return StepTimeModel.from_rates(prefill_tps, decode_tps, basis="flat rates: " + "; ".join(notes))

    def as_dict(self) -> dict[str, Any]:
        """What priced the steps, for the run's notes."""
        if self.flat:
            return {"kind": "flat", "prefill_tps": self.flat_prefill_tps, "decode_tps": self.decode_tps,
                    "basis": self.basis}
        assert self.geometry is not None and self.gpu is not None
        return {"kind": "roofline", "model": self.geometry.name, "gpu": self.gpu.name, "tp": self.tp,
                "bf16_flops": self.gpu.bf16_flops, "mem_bytes_per_s": self.gpu.mem_bytes_per_s,
                "gpu_source": self.gpu.source, "mfu": self.mfu, "mbu": self.mbu,
                "overhead_s": self.overhead_s, "basis": self.basis}


def _median_fraction(values: np.ndarray) -> tuple[float, str]:
    """The median of implied efficiencies, capped at 1, and a note when capped."""
    m = float(np.median(values))
    if m > 1:
        return 1.0, " (capped at 1: the log beats the datasheet peak; check --gpu and the weight dtype)"
    return m, ""


__all__ = ["DEFAULT_MFU", "DEFAULT_MBU", "DEFAULT_OVERHEAD_S", "GpuSpec", "gpu_spec", "StepCoefficients",
           "seconds_from_totals", "StepTimeModel"]
