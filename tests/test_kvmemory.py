"""KV geometry: catalog numbers by hand, local config.json, MLA, GPU budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor.errors import AdvisorError


def test_llama_31_8b_bytes_per_token_by_hand() -> None:
    g = kv.resolve_model("llama-3.1-8b")
    # 32 layers x 8 KV heads x 128 head dim x (K and V) x 2 bytes (bf16)
    assert kv.bytes_per_token(g) == 32 * 8 * 128 * 2 * 2 == 131072
    assert kv.bytes_per_block(g, 16) == 16 * 131072


def test_hf_repo_ids_and_suffixes_resolve_to_catalog() -> None:
    assert kv.resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert kv.resolve_model("Qwen/Qwen2.5-72B-Instruct").name == "qwen2.5-72b"
    assert kv.resolve_model("Llama-3.3-70B-Instruct").name == "llama-3.3-70b"


def test_qwen25_7b_and_gemma2_9b_by_hand() -> None:
    q = kv.resolve_model("qwen2.5-7b")
    assert kv.bytes_per_token(q) == 2 * 28 * 4 * 128 * 2
    g = kv.resolve_model("gemma-2-9b")
    # sliding-window layers are counted as full attention (documented simplification)
    assert kv.bytes_per_token(g) == 2 * 42 * 8 * 256 * 2
    assert g.sliding_window == 4096 and g.sliding_window_layers == 21


def test_deepseek_v3_mla_has_one_latent_no_x2_and_ignores_tp() -> None:
    g = kv.resolve_model("deepseek-v3")
    assert g.mla_latent_dim == 512 + 64
    assert kv.bytes_per_token(g) == 61 * 576 * 2
    assert kv.bytes_per_token(g, tp=8) == kv.bytes_per_token(g)
    assert g.weight_bytes == pytest.approx(671e9)  # FP8 weights: one byte each


def test_tensor_parallel_divides_kv_heads_and_replicates_when_exceeded() -> None:
    g = kv.resolve_model("llama-3.1-70b")  # 8 KV heads
    assert kv.bytes_per_token(g, tp=4) == kv.bytes_per_token(g) // 4
    assert kv.bytes_per_token(g, tp=16) == kv.bytes_per_token(g, tp=8)  # one head per rank at least


def test_every_catalog_entry_has_a_source_and_sane_numbers() -> None:
    for name in kv.catalog_names():
        g = kv.resolve_model(name)
        assert g.sources and g.sources[0].startswith("https://huggingface.co/")
        assert g.layers > 0 and g.params > 1e8 and 0 < kv.bytes_per_token(g) < 2 * 1024 * 1024


def _write_config(folder: Path, **cfg: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_local_config_folder_with_fallbacks(tmp_path: Path) -> None:
    # no num_key_value_heads -> attention heads; no head_dim -> hidden / heads; float16
    folder = _write_config(
        tmp_path / "tiny", num_hidden_layers=4, num_attention_heads=8, hidden_size=512,
        torch_dtype="float16", vocab_size=1000, intermediate_size=1024,
    )
    g = kv.resolve_model(str(folder))
    assert (g.layers, g.kv_heads, g.head_dim, g.dtype_bytes) == (4, 8, 64, 2)
    assert kv.bytes_per_token(g) == 2 * 4 * 8 * 64 * 2
    assert g.sources == (str(folder / "config.json"),)
    assert g.params > 0


def test_local_config_params_from_safetensors_index(tmp_path: Path) -> None:
    folder = _write_config(
        tmp_path / "m", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, hidden_size=128, torch_dtype="bfloat16",
    )
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2_000_000}, "weight_map": {}})
    )
    g = kv.resolve_model(str(folder / "config.json"))
    assert g.params == 1_000_000  # 2 MB of bf16
    assert kv.bytes_per_token(g) == 2 * 2 * 2 * 32 * 2


def test_local_mla_config(tmp_path: Path) -> None:
    folder = _write_config(
        tmp_path / "mla", num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=16,
        hidden_size=1024, kv_lora_rank=128, qk_rope_head_dim=32, torch_dtype="bfloat16",
    )
    g = kv.resolve_model(str(folder))
    assert g.mla_latent_dim == 160
    assert kv.bytes_per_token(g) == 3 * 160 * 2


def test_unknown_model_names_the_fix() -> None:
    with pytest.raises(AdvisorError, match="local model folder"):
        kv.resolve_model("no-such-model-xyz")


def test_weights_exceeding_the_gpu_raise_with_the_fix() -> None:
    g = kv.resolve_model("llama-3.1-70b")  # ~131 GiB of bf16 weights
    with pytest.raises(AdvisorError, match="tensor-parallel-size"):
        kv.kv_bytes_for_gpu(g, kv.resolve_gpu("h100"), 0.9)
    # sharded over 4 GPUs it fits
    assert kv.kv_bytes_for_gpu(g, kv.resolve_gpu("h100"), 0.9, tp=4) > 0


def test_kv_bytes_for_gpu_subtracts_weights_and_headroom() -> None:
    g = kv.resolve_model("llama-3.1-8b")
    got = kv.kv_bytes_for_gpu(g, 80.0, 0.9, headroom_gib=1.5)
    assert got == int(80 * 0.9 * kv.GIB - 8.03e9 * 2 - 1.5 * kv.GIB)


def test_gpu_names() -> None:
    assert kv.resolve_gpu("H100") == pytest.approx(81559 / 1024)
    assert kv.resolve_gpu("a100-40gb") == 40.0
    assert kv.resolve_gpu("24") == 24.0
    with pytest.raises(AdvisorError, match="GiB"):
        kv.resolve_gpu("voodoo5")


@given(
    kv_bytes=st.integers(0, 1 << 40),
    block_size=st.sampled_from([1, 16, 32, 64, 128, 512]),
    tp=st.sampled_from([1, 2, 4, 8]),
)
def test_blocks_round_trip_against_naive(kv_bytes: int, block_size: int, tp: int) -> None:
    g = kv.resolve_model("qwen3-8b")
    per_block = block_size * 2 * g.layers * max(1, g.kv_heads // tp) * g.head_dim * g.dtype_bytes
    n = kv.blocks_for_kv_bytes(g, block_size, kv_bytes, tp)
    assert n == max(0, kv_bytes // per_block - 1)
    # the inverse buys exactly n usable blocks
    assert kv.blocks_for_kv_bytes(g, block_size, kv.kv_bytes_for_blocks(g, block_size, n, tp), tp) == n


def test_multimodal_text_config_and_sliding_window_layers(tmp_path: Path) -> None:
    folder = _write_config(
        tmp_path / "g3", model_type="gemma3", torch_dtype="bfloat16",
        text_config={"num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "head_dim": 256, "hidden_size": 2048, "sliding_window": 1024,
                     "sliding_window_pattern": 6},
    )
    g = kv.resolve_model(str(folder))
    assert (g.layers, g.kv_heads, g.head_dim) == (12, 4, 256)
    assert g.sliding_window == 1024 and g.sliding_window_layers == 10  # 2 of 12 layers are global
    assert kv.bytes_per_token(g) == 2 * 12 * 4 * 256 * 2  # all layers counted as full attention


def test_qwen_style_disabled_sliding_window_is_ignored(tmp_path: Path) -> None:
    folder = _write_config(
        tmp_path / "q", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_size=256, sliding_window=131072, use_sliding_window=False,
    )
    g = kv.resolve_model(str(folder))
    assert g.sliding_window is None and g.sliding_window_layers == 0


def test_vllm_serve_batch_defaults_follow_the_gpu() -> None:
    """vLLM 0.32's EngineArgs.get_batch_defaults for the OpenAI server."""
    assert kv.vllm_batch_defaults("h100") == (1024, 8192)
    assert kv.vllm_batch_defaults("h200") == (1024, 8192)
    assert kv.vllm_batch_defaults("a100-80gb") == (256, 2048)  # A100s keep the small defaults
    assert kv.vllm_batch_defaults("l4") == (256, 2048)
    assert kv.vllm_batch_defaults(180) == (1024, 16384)
    assert kv.vllm_batch_defaults("80") == (1024, 8192)  # a bare size has no name to exclude A100s by
