"""The step-time model: hand-computed steps (a lone prefill, a decode batch, a long-context
chunk), monotonicity, the old flat clock reproduced, calibration, the GPU catalog."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor.errors import AdvisorError
from advisor.sim.steptime import (
    DEFAULT_MBU,
    DEFAULT_MFU,
    DEFAULT_OVERHEAD_S,
    GpuSpec,
    StepTimeModel,
    gpu_spec,
    seconds_from_totals,
)

H100_FLOPS = 989e12  # dense BF16, H100 SXM datasheet
H100_BW = 3.35e12  # bytes/s
LLAMA8B_PARAMS = 8.03e9
LLAMA8B_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V x layers x kv heads x head dim x bf16 = 131,072
LLAMA8B_ATTN = 4 * 32 * 32 * 128  # 4 x layers x query heads x head dim = 524,288 FLOPs per pair


def llama8b_h100(**kw: object) -> StepTimeModel:
    return StepTimeModel.for_model("llama-3.1-8b", "h100", **kw)


def test_a_1000_token_prefill_of_llama_8b_on_h100_is_compute_bound() -> None:
    m = llama8b_h100()
    linear = 2 * LLAMA8B_PARAMS * 1000  # 1.606e13 FLOPs
    attention = LLAMA8B_ATTN * 1000 * (0 + 1000 / 2)  # 2.62e11: 1.6% of the linear term
    compute = (linear + attention) / (H100_FLOPS * 0.5)  # 1.632e13 / 4.945e14 = 33.0 ms
    memory = (LLAMA8B_PARAMS * 2 + 1000 * LLAMA8B_KV_PER_TOKEN) / (H100_BW * 0.7)  # 16.19 GB -> 6.9 ms
    assert compute == pytest.approx(0.033007, rel=1e-4) and memory == pytest.approx(0.006905, rel=1e-3)
    assert m.prefill_seconds(1000) == pytest.approx(compute + 0.001, rel=1e-12)  # + 1 ms overhead: 34.0 ms
    # the same prompt with 900 tokens cached computes only 100, and is memory-bound then
    assert m.prefill_seconds(100, 900) == pytest.approx(
        max((2 * LLAMA8B_PARAMS * 100 + LLAMA8B_ATTN * 100 * 950) / (H100_FLOPS * 0.5),
            (LLAMA8B_PARAMS * 2 + 1000 * LLAMA8B_KV_PER_TOKEN) / (H100_BW * 0.7)) + 0.001, rel=1e-12)
    assert m.prefill_seconds(100, 900) < m.prefill_seconds(1000) / 4


def test_a_256_request_decode_batch_at_2k_context_is_memory_bound() -> None:
    m = llama8b_h100()
    weights = LLAMA8B_PARAMS * 2  # 16.06 GB
    kv_read = 256 * 2048 * LLAMA8B_KV_PER_TOKEN  # 68.7 GB: the batch's KV outweighs the weights 4x
    kv_written = 256 * LLAMA8B_KV_PER_TOKEN
    memory = (weights + kv_read + kv_written) / (H100_BW * 0.7)  # 84.8 GB / 2.345 TB/s = 36.2 ms
    compute = (2 * LLAMA8B_PARAMS * 256 + LLAMA8B_ATTN * 256 * 2048) / (H100_FLOPS * 0.5)  # 8.9 ms
    assert memory == pytest.approx(0.03617, rel=1e-3) and compute < memory / 4
    assert m.decode_seconds([2048] * 256) == pytest.approx(memory + 0.001, rel=1e-12)
    # 64 requests: 16.06 + 17.18 GB -> 14.2 ms (+ 1 ms)
    assert m.decode_seconds([2048] * 64) == pytest.approx(
        (weights + 64 * 2049 * LLAMA8B_KV_PER_TOKEN) / (H100_BW * 0.7) + 0.001, rel=1e-12)


def test_a_long_context_chunk_is_dominated_by_attention() -> None:
    m = llama8b_h100()
    new, before = 2048, 100_000
    linear = 2 * LLAMA8B_PARAMS * new  # 3.29e13
    attention = LLAMA8B_ATTN * new * (before + new / 2)  # 1.085e14: 3.3x the linear term
    assert attention > 3 * linear
    # the two are equal at a mean context of 2N / 4LHd = 30,632 tokens for this model
    assert 2 * LLAMA8B_PARAMS / LLAMA8B_ATTN == pytest.approx(30_632, abs=1)
    assert m.prefill_seconds(new, before) == pytest.approx((linear + attention) / (H100_FLOPS * 0.5) + 0.001,
                                                           rel=1e-12)  # 285.9 ms + 1 ms


def test_tensor_parallel_divides_compute_weights_and_kv_heads() -> None:
    one, two = llama8b_h100(), llama8b_h100(tp=2)
    assert two.prefill_seconds(4000) - 0.001 == pytest.approx((one.prefill_seconds(4000) - 0.001) / 2, rel=1e-12)
    assert two.decode_seconds([1000] * 8) - 0.001 == pytest.approx((one.decode_seconds([1000] * 8) - 0.001) / 2,
                                                                    rel=1e-12)


def test_moe_prices_matmuls_with_active_parameters_and_reads_all_weights() -> None:
    g = kv.resolve_model("qwen3-30b-a3b")
    assert g.active_params == 3.3e9 and g.params == 30.5e9
    m = StepTimeModel(g, gpu_spec("h100"))
    assert m.coefficients.compute_per_token == pytest.approx(2 * 3.3e9 / (H100_FLOPS * 0.5))
    assert m.coefficients.memory_fixed == pytest.approx(30.5e9 * 2 / (H100_BW * 0.7))


MODELS = ["llama-3.1-8b", "llama-3.1-70b", "qwen3-30b-a3b", "gemma-2-9b", "deepseek-v2-lite"]
GPUS = ["h100", "a100-40gb", "l4", "mi300x"]
models = st.builds(lambda m, g: StepTimeModel.for_model(m, g), st.sampled_from(MODELS), st.sampled_from(GPUS))
chunks = st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 100_000)), max_size=6)
contexts = st.lists(st.integers(0, 100_000), max_size=300)


@given(models, chunks, contexts, st.integers(1, 20_000), st.integers(0, 20_000), st.data())
def test_more_cached_tokens_never_raise_step_time(m: StepTimeModel, others: list[tuple[int, int]],
                                                  dec: list[int], prompt: int, hit: int, data: st.DataObject) -> None:
    hit = min(hit, prompt)
    more = data.draw(st.integers(hit, prompt))
    assert (m.step_seconds([*others, (prompt - more, more)], dec)
            <= m.step_seconds([*others, (prompt - hit, hit)], dec))


@given(models, chunks, contexts, st.integers(0, 20_000), st.integers(0, 20_000), st.integers(0, 100_000))
def test_fewer_new_tokens_never_raise_and_more_context_never_lowers(
        m: StepTimeModel, others: list[tuple[int, int]], dec: list[int], new: int, fewer: int, ctx: int) -> None:
    fewer = min(fewer, new)
    assert m.step_seconds([*others, (fewer, ctx)], dec) <= m.step_seconds([*others, (new, ctx)], dec)
    assert m.step_seconds([*others, (new, ctx)], dec) <= m.step_seconds([*others, (new, ctx + 1000)], dec)
    assert m.step_seconds(others, dec) <= m.step_seconds(others, [*dec, ctx])  # one more request decoding
    longer = [c + 500 for c in dec]
    assert m.step_seconds(others, dec) <= m.step_seconds(others, longer)


@given(models, chunks, contexts)
def test_two_ranks_are_never_slower(m: StepTimeModel, prefill: list[tuple[int, int]], dec: list[int]) -> None:
    # compute halves; weights halve; KV per rank never grows (MLA's latent is replicated, not split)
    assert replace(m, tp=2).step_seconds(prefill, dec) <= m.step_seconds(prefill, dec)


@given(models, chunks, contexts)
def test_totals_formula_is_step_seconds(m: StepTimeModel, prefill: list[tuple[int, int]], dec: list[int]) -> None:
    tokens = sum(n for n, _ in prefill) + len(dec)
    pairs = sum(n * (c + n / 2) for n, c in prefill) + sum(dec)
    kv_read = sum(c for _, c in prefill) + sum(dec)
    assert seconds_from_totals(m.coefficients, tokens, pairs, kv_read) == pytest.approx(
        m.step_seconds(prefill, dec), rel=1e-12)


# --- the old flat clock ---
# advisor.sim.events.CostModel as of this module's writing (the clock it replaces), restated here
# so these tests outlive it: a step lasts `1 / decode_tps` plus the longest `(prompt - hit) /
# prefill_tps` among the prompts whose first token it samples; calibration is `_old_calibrated`.
def _old_calibrated(prefill_tps: float, decode_tps: float, n_tokens: np.ndarray, output_tokens: np.ndarray,
                    latency_s: np.ndarray, ttft_s: np.ndarray) -> tuple[float, float]:
    lat, ttft = np.asarray(latency_s, np.float64), np.asarray(ttft_s, np.float64)
    out, prompt = np.asarray(output_tokens, np.int64), np.asarray(n_tokens, np.int64)
    has_ttft = np.isfinite(ttft) & (ttft > 0) & (prompt > 0)
    if has_ttft.any():
        prefill_tps = float(np.median(prompt[has_ttft] / ttft[has_ttft]))
    first = np.where(np.isfinite(ttft), ttft, (prompt / prefill_tps))
    decoding = np.isfinite(lat) & (out > 1) & (lat - first > 0)
    if decoding.any():
        decode_tps = float(np.median((out[decoding] - 1) / (lat - first)[decoding]))
    return prefill_tps, decode_tps


@given(st.floats(100, 1e6), st.floats(1, 1000), st.lists(st.tuples(st.integers(0, 50_000), st.integers(0, 50_000)),
                                                          max_size=5), contexts)
def test_from_rates_repeats_the_old_step_formula_exactly(prefill_tps: float, decode_tps: float,
                                                         prompts: list[tuple[int, int]], dec: list[int]) -> None:
    """events.py's step: `step_s + max((prompt - hit) / prefill_tps)` over the prompts whose first
    token the step samples, with `step_s = 1 / decode_tps`; batch and context cost nothing."""
    m = StepTimeModel.from_rates(prefill_tps, decode_tps)
    prefill_s = 0.0
    for uncached, _hit in prompts:
        prefill_s = max(prefill_s, uncached / prefill_tps)
    old = 1.0 / decode_tps + prefill_s
    assert m.step_seconds(prompts, dec) == old  # bit for bit: chunks are (prompt - hit, hit)
    assert m.decode_tps == pytest.approx(decode_tps) and m.as_dict()["kind"] == "flat"


def _log(n: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    prompt = rng.integers(10, 6000, n)
    out = rng.integers(1, 400, n)
    ttft = prompt / 9000.0 + rng.random(n) * 0.05
    lat = ttft + (out - 1) / 40.0 + rng.random(n) * 0.1
    ttft[::5] = np.nan  # some without a TTFT
    return prompt, out, lat, ttft


def test_flat_calibration_is_cost_models() -> None:
    """Checked against CostModel.calibrated itself too, while it existed (same numbers)."""
    prompt, out, lat, ttft = _log()
    old_prefill_tps, old_decode_tps = _old_calibrated(10_000, 50, prompt, out, lat, ttft)
    new = StepTimeModel.from_rates(10_000, 50).calibrated(prompt, out, lat, ttft)
    assert new.flat_prefill_tps == old_prefill_tps and new.overhead_s == 1.0 / old_decode_tps
    assert "from 40 logged TTFTs" in new.basis
    # like CostModel, nothing without latency_s
    assert StepTimeModel.from_rates(10_000, 50).calibrated(prompt, out, None, ttft).flat_prefill_tps == 10_000


def _observed(truth: StepTimeModel, prompt: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each request alone: one prefill step, then O - 1 decode steps at contexts P .. P + O - 2."""
    ttft = np.array([truth.prefill_seconds(int(p)) for p in prompt])
    decode = np.array([sum(truth.decode_seconds([int(p) + k]) for k in range(int(o) - 1))
                       for p, o in zip(prompt, out, strict=True)])
    return ttft, ttft + decode


def test_calibration_recovers_known_efficiencies() -> None:
    truth = llama8b_h100(mfu=0.37, mbu=0.61)
    prompt = np.array([2000, 3000, 4500, 6000, 8000, 12, 30, 50])  # the short ones are memory-bound
    out = np.array([40, 2, 100, 7, 1, 60, 1, 25])
    ttft, lat = _observed(truth, prompt, out)
    fitted = llama8b_h100().calibrated(prompt, out, lat, ttft)
    assert fitted.mfu == pytest.approx(0.37, rel=1e-9) and fitted.mbu == pytest.approx(0.61, rel=1e-9)
    assert "mbu 0.61 from the median decode time of 6 logged requests" in fitted.basis
    assert "mfu 0.37 from the median TTFT of 5 logged requests" in fitted.basis  # not the 3 memory-bound
    # without TTFTs, decode is measured from a modelled TTFT and mfu stays assumed
    no_ttft = llama8b_h100(mfu=0.37).calibrated(prompt, out, lat, None)
    assert no_ttft.mfu == 0.37 and no_ttft.mbu == pytest.approx(0.61, rel=1e-9)
    assert "mfu 0.37 assumed" in no_ttft.basis
    # nothing logged: unchanged
    assert llama8b_h100().calibrated(prompt, out, None, None) == llama8b_h100()


def test_calibration_caps_an_efficiency_above_the_datasheet_peak() -> None:
    fast = llama8b_h100(mfu=1.0)
    prompt, out = np.array([4000, 5000]), np.array([1, 1])
    ttft, lat = _observed(replace(fast, overhead_s=0.0), prompt, out)  # faster than peak + overhead allows
    fitted = fast.calibrated(prompt, out, lat, ttft * 0.8)
    assert fitted.mfu == 1.0 and "capped at 1" in fitted.basis


# --- errors, catalog ---
def test_errors_name_the_fix() -> None:
    with pytest.raises(AdvisorError, match="pass e.g. 0.5"):
        llama8b_h100(mfu=1.5)
    with pytest.raises(AdvisorError, match="--model and --gpu"):
        StepTimeModel(kv.resolve_model("llama-3.1-8b"), None)
    with pytest.raises(AdvisorError, match="no compute figures"):
        gpu_spec("80")
    with pytest.raises(AdvisorError, match="name one of"):
        gpu_spec("tpu-v5e")
    with pytest.raises(AdvisorError, match="--prefill-tps"):
        StepTimeModel.from_rates(0, 50)
    bare = replace(kv.resolve_model("llama-3.1-8b"), q_heads=None)
    with pytest.raises(AdvisorError, match="resolve_model"):
        StepTimeModel(bare, gpu_spec("h100"))


def test_every_gpu_has_peaks_a_variant_and_a_datasheet_source() -> None:
    gpus = kv.catalog()["gpus"]
    for name, e in gpus.items():
        spec = gpu_spec(name)
        assert spec.source.startswith("https://") and spec.variant, name
        assert 50e12 < spec.bf16_flops < 2000e12 and 200e9 < spec.mem_bytes_per_s < 6000e9, name
        assert spec.memory_gib == kv.resolve_gpu(name) and e["memory_mib"] > 0 and e["name"]
    assert (gpu_spec("h100").bf16_flops, gpu_spec("h100").mem_bytes_per_s) == (989e12, 3.35e12)
    assert gpu_spec("NVIDIA-A100-40GB").mem_bytes_per_s == 1.555e12
    assert gpu_spec("a100").mem_bytes_per_s == gpu_spec("a100-80gb").mem_bytes_per_s == 2.039e12
    assert gpu_spec("amd-mi300x").bf16_flops == 1307e12 and gpu_spec("l4").mem_bytes_per_s == 0.3e12
    custom = GpuSpec("b200", 2250e12, 8e12, 180, "https://www.nvidia.com/en-us/data-center/dgx-b200/")
    assert StepTimeModel(kv.resolve_model("llama-3.1-8b"), custom).prefill_seconds(1000) < llama8b_h100().prefill_seconds(1000)


def test_every_catalog_model_has_query_heads_and_moe_active_parameters() -> None:
    for name in kv.catalog_names():
        g = kv.resolve_model(name)
        assert g.q_heads and g.q_heads >= (1 if g.mla_latent_dim else g.kv_heads), name
        assert g.active_params is None or g.active_params < g.params, name
    assert kv.resolve_model("mixtral-8x7b").active_params == 12.9e9


def test_local_config_gives_query_heads_and_an_moe_estimate(tmp_path: Path) -> None:
    cfg = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
               intermediate_size=512, vocab_size=1000, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    dense = kv.resolve_model(str(tmp_path))
    assert dense.q_heads == 8 and dense.active_params is None
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8, "num_experts_per_tok": 2}))
    moe = kv.resolve_model(str(tmp_path))
    assert moe.active_params is not None and moe.active_params < moe.params


def test_defaults_are_the_stated_assumptions() -> None:
    m = llama8b_h100()
    assert (m.mfu, m.mbu, m.overhead_s) == (DEFAULT_MFU, DEFAULT_MBU, DEFAULT_OVERHEAD_S) == (0.5, 0.7, 0.001)
    assert m.as_dict()["gpu_source"] == "https://www.nvidia.com/en-us/data-center/h100/"
    assert math.isinf(m.coefficients.flat_prefill_tps)
