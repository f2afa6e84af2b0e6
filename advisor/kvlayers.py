"""Which layer of a model caches what, read from its Hugging Face config as vLLM's model code
assigns it: the cache kind (and window) per layer, and a Mamba layer's state bytes.

Input: a config dict (`text_config` merges a multimodal model's text part in); output: plain
values that advisor.kvlayout groups into vLLM's KV cache groups. A base module: it imports only
advisor.kvmemory and advisor.errors.
"""

from __future__ import annotations

from typing import Any

from advisor import kvmemory
from advisor.errors import AdvisorError


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def _window(c: dict[str, Any]) -> int | None:
    w = c.get("sliding_window")
    return int(w) if w else None  # vLLM reads sliding_window 0 as none (ModelConfig.__post_init__)


def layer_kinds(c: dict[str, Any]) -> list[tuple[str, int | None]]:
    """`(kind, window)` per layer of a (text) config, as vLLM 0.32's model code assigns them;
    kind "none" for layers without a cache (an MLP-only layer of Nemotron-H)."""
    n = int(c["num_hidden_layers"])
    mt = str(c.get("model_type", ""))
    w = _window(c)
    if c.get("kv_lora_rank"):
        return [("mla", None)] * n
    if mt == "nemotron_h" and c.get("hybrid_override_pattern"):  # vLLM reads the pattern (nemotron_h.py)
        kinds = {"M": ("mamba", None), "*": ("full", None)}
        return [kinds.get(ch, ("none", None)) for ch in str(c["hybrid_override_pattern"])]
    if mt == "gpt_oss":  # OAIAttention: sliding_window only on even layers
        return [("sliding_window", w) if i % 2 == 0 and w else ("full", None) for i in range(n)]
    if mt.startswith("llama4"):
        interval = int(c.get("no_rope_layer_interval") or 4)
        rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        chunk = c.get("attention_chunk_size")
        return [("chunked_local", int(chunk)) if rope[i] and chunk else ("full", None) for i in range(n)]
    types = c.get("layer_types") or c.get("layers_block_type")
    if mt == "qwen3_next" and not types:
        interval = int(c.get("full_attention_interval") or 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    if mt == "gemma2" and not types:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if mt in ("gemma3", "gemma3_text") and not types:
        p = int(c.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        w = w if c.get("use_sliding_window") else None
        mwl = int(c.get("max_window_layers") or 28)
        types = types or ["sliding_attention" if w and i >= mwl else "full_attention" for i in range(n)]
        if len(set(types)) > 1:
            raise AdvisorError(f"{mt} with a sliding window on only some layers (max_window_layers={mwl}): "
                               "vLLM refuses it (Qwen2Model); set max_window_layers to 0 or num_hidden_layers.")
    if types:
        named = {"sliding_attention": ("sliding_window", w), "chunked_attention": ("chunked_local",
                 int(c["attention_chunk_size"]) if c.get("attention_chunk_size") else None),
                 "full_attention": ("full", None), "attention": ("full", None),
                 "linear_attention": ("mamba", None), "mamba": ("mamba", None)}
        return [named.get(str(t), ("none", None)) for t in types][:n]
    return [("sliding_window", w) if w else ("full", None)] * n  # CacheConfig.sliding_window for every layer


def _divide(a: int, tp: int, what: str) -> int:
    if a % tp:
        raise AdvisorError(f"{what} ({a}) is not divisible by the tensor-parallel size {tp}: vLLM refuses it.")
    return a // tp


def mamba_state_bytes(c: dict[str, Any], tp: int, model_dtype_bytes: int) -> int:
    """Conv + SSM state bytes of one sequence in one layer on one rank (vLLM's MambaSpec page,
    unpadded), for the Mamba hybrids whose state shapes are read here."""
    mt = str(c.get("model_type", ""))
    if mt == "qwen3_next":  # gated_delta_net_state_shape; both states in the model dtype ("auto")
        kh, vh = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
        kd, vd = int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"])
        conv = _divide(kd * kh * 2 + vd * vh, tp, "linear conv dim") * (int(c["linear_conv_kernel_dim"]) - 1)
        ssm = _divide(vh, tp, "linear_num_value_heads") * vd * kd
        return (conv + ssm) * model_dtype_bytes
    if mt == "nemotron_h":  # mamba2_state_shape; SSM state float32 unless the config says (NemotronHForCausalLMConfig)
        heads, hd, state = int(c["mamba_num_heads"]), int(c["mamba_head_dim"]), int(c["ssm_state_size"])
        groups = int(c["n_groups"])
        groups += 0 if groups % tp == 0 else tp - groups  # extra_groups_for_head_shards
        conv = _divide(heads * hd + 2 * groups * state, tp, "mamba conv dim") * (int(c["conv_kernel"]) - 1)
        ssm_bytes = kvmemory.DTYPE_BYTES.get(str(c.get("mamba_ssm_cache_dtype") or "float32"), 4)
        return conv * model_dtype_bytes + _divide(heads, tp, "mamba_num_heads") * hd * state * ssm_bytes
    raise AdvisorError(f"the Mamba state shape of model_type {mt!r} is not read here (only qwen3_next and "
                       "nemotron_h): pass --block-size as vLLM logs it at startup and size the KV memory from vLLM's log.")
