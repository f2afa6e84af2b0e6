"""KV-cache memory: model geometry, bytes per block, and blocks for a GPU budget.

Inputs: a model spec (a name in the built-in catalog `advisor/data/models.json`,
or a local Hugging Face model folder / config.json) and a GPU (a name in the
same catalog or a size in GiB). Outputs: `ModelGeometry`, bytes per token and
per block, and how many usable blocks a KV budget buys (docs/design.md §5 capacity).

The arithmetic mirrors vLLM v1 (`vllm/v1/kv_cache_interface.py`,
`vllm/v1/core/kv_cache_utils.py`, read on 0.32.0):

- A full-attention layer's page holds K and V for `block_size` tokens:
  `block_size * kv_heads * (head_dim + head_dim) * dtype_bytes`; one block id
  spans every layer, so bytes per block is that page times the layer count.
- An MLA layer (DeepSeek-V2/V3) stores one latent of `kv_lora_rank +
  qk_rope_head_dim` values per token: no x2, and it is not split across
  tensor-parallel ranks (every rank holds the whole latent).
- Per tensor-parallel rank, full attention holds `max(1, kv_heads // tp)` heads
  (vLLM replicates KV heads when tp exceeds them).
- vLLM pads pages only when layer types with different page sizes share one
  pool (hybrid models) or for DeepSeek-V4's MLA alignment; for the uniform
  models this module handles there is no rounding, and `num_blocks =
  kv_bytes // bytes_per_block` exactly, of which one (the null block) is never
  handed out. `blocks_for_kv_bytes` returns the usable count (pool minus null
  block), which is what the simulator's `num_blocks` means.

Hybrid models (sliding window, chunked local, Mamba): vLLM's hybrid KV cache manager groups
the layers (advisor.kvlayout) and one block id then spans the pages of one group's layers,
not of every layer; each group takes its own blocks for a token. `bytes_per_token` still
counts every layer as full attention (what vLLM allocates with the hybrid manager off, and the
KV bytes a step reads); the pool arithmetic (`bytes_per_block`, `blocks_for_kv_bytes`,
`kv_bytes_for_blocks`) is the hybrid pool's once the geometry carries the group size
(`ModelGeometry.pool_layers`, set by `KVLayout.pool_geometry`). A geometry straight from
`resolve_model` has none: every layer in one group. The number of sliding layers is kept on
the geometry so a report can state it.

KV memory for a GPU (`kv_bytes_for_gpu`): vLLM gives the KV cache what is left
of `total * --gpu-memory-utilization` after the weights and the peak of a
profiling forward pass (activations for `max_num_batched_tokens`, sampler,
CUDA graphs, non-torch allocations such as cuBLAS/NCCL workspaces). The last
part cannot be known offline; `DEFAULT_HEADROOM_GIB` is a stated estimate
(overridable) of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from advisor import vllm_versions
from advisor.errors import AdvisorError

GIB = 1 << 30
MIB = 1 << 20

# Activation / runtime headroom per GPU, GiB. vLLM's profile run on 7B-70B dense
# models at the default max_num_batched_tokens (8192) peaks at roughly 1-3 GiB
# of activations plus CUDA-graph and non-torch memory; 2 GiB is a middle estimate.
# Override it (`headroom_gib`) with the figure vLLM logs at startup
# ("... GiB for activation peak memory") when you have one.
DEFAULT_HEADROOM_GIB = 2.0

# vLLM's default --gpu-memory-utilization in 0.32 (vllm/config/cache.py).
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.92

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}


@dataclass(frozen=True)
class ModelGeometry:
    """What a model's KV cache costs per token, and what its weights cost."""

    name: str
    layers: int
    kv_heads: int  # 1 for MLA
    head_dim: int  # for MLA: the latent width (kv_lora_rank + qk_rope_head_dim)
    dtype_bytes: int  # KV-cache element size (the model dtype unless --kv-cache-dtype says otherwise)
    mla_latent_dim: int | None
    params: float  # parameters held in GPU memory (all experts of an MoE)
    sources: tuple[str, ...]
    weight_dtype_bytes: float | None = None  # None: same as dtype_bytes
    sliding_window: int | None = None
    sliding_window_layers: int = 0  # counted as full attention (module docstring)
    forced_block_size: int | None = None  # hybrid models where vLLM fixes the block size
    notes: tuple[str, ...] = field(default_factory=tuple)
    serve_name: str | None = None  # what `vllm serve` takes: HF repo id or local folder
    max_position_embeddings: int | None = None  # the model's context (vLLM's derived max_model_len)
    q_heads: int | None = None  # attention (query) heads, for advisor.sim.steptime's attention FLOPs
    active_params: float | None = None  # parameters one token passes through (MoE: < params); None: params
    # Layers' pages one block id spans in vLLM's pool: a hybrid model's KV cache group size
    # (advisor.kvlayout `KVLayout.pool_geometry`); None: every layer (one full-attention group).
    pool_layers: int | None = None

    @property
    def weight_bytes(self) -> float:
        per = self.weight_dtype_bytes if self.weight_dtype_bytes is not None else self.dtype_bytes
        return self.params * per

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype_bytes": self.dtype_bytes,
            "mla_latent_dim": self.mla_latent_dim,
            "params": self.params,
            "weight_gib": round(self.weight_bytes / GIB, 3),
            "bytes_per_token": bytes_per_token(self),
            "sliding_window": self.sliding_window,
            "sliding_window_layers": self.sliding_window_layers,
            "forced_block_size": self.forced_block_size,
            "pool_layers": self.pool_layers,
            "serve_name": self.serve_name,
            "max_position_embeddings": self.max_position_embeddings,
            "sources": list(self.sources),
            "notes": list(self.notes),
        }


# --- arithmetic ---
def bytes_per_token(geom: ModelGeometry, tp: int = 1) -> int:
    """KV bytes one token occupies on one tensor-parallel rank, all layers."""
    if tp < 1:
        raise AdvisorError(f"tensor-parallel size must be >= 1, got {tp}: pass --tensor-parallel-size 1 or more.")
    if geom.mla_latent_dim is not None:
        return geom.layers * geom.mla_latent_dim * geom.dtype_bytes
    heads = max(1, geom.kv_heads // tp)
    return 2 * geom.layers * heads * geom.head_dim * geom.dtype_bytes


def bytes_per_block(geom: ModelGeometry, block_size: int, tp: int = 1) -> int:
    """Bytes one block id costs in vLLM's pool on one rank: its page in every layer, or, for a
    hybrid model's geometry (`pool_layers`), in the layers of one KV cache group (module
    docstring); no alignment padding."""
    if block_size < 1:
        raise AdvisorError(f"block size must be >= 1, got {block_size}.")
    if geom.pool_layers is None:
        return block_size * bytes_per_token(geom, tp)
    return block_size * (bytes_per_token(geom, tp) // geom.layers) * geom.pool_layers


def blocks_for_kv_bytes(geom: ModelGeometry, block_size: int, kv_bytes: int, tp: int = 1) -> int:
    """Usable blocks (vLLM's `kv_bytes // bytes_per_block` minus the null block), >= 0."""
    return max(0, int(kv_bytes) // bytes_per_block(geom, block_size, tp) - 1)


def kv_bytes_for_blocks(geom: ModelGeometry, block_size: int, num_blocks: int, tp: int = 1) -> int:
    """KV bytes per rank that give exactly `num_blocks` usable blocks (null block included)."""
    return (int(num_blocks) + 1) * bytes_per_block(geom, block_size, tp)


def kv_gib_for_blocks(geom: ModelGeometry, block_size: int, num_blocks: int, tp: int = 1) -> float:
    return kv_bytes_for_blocks(geom, block_size, num_blocks, tp) / GIB


def kv_bytes_for_gpu(
    geom: ModelGeometry,
    gpu_gib: float,
    utilization: float,
    headroom_gib: float | None = None,
    tp: int = 1,
) -> int:
    """KV bytes per rank: gpu_gib x utilization - weights/tp - headroom.

    Raises AdvisorError naming the fixes when nothing is left for the KV cache.
    """
    if not 0 < utilization <= 1:
        raise AdvisorError(
            f"--gpu-memory-utilization must be in (0, 1], got {utilization}: pass e.g. 0.9."
        )
    headroom = DEFAULT_HEADROOM_GIB if headroom_gib is None else headroom_gib
    budget = gpu_gib * utilization * GIB
    weights = geom.weight_bytes / tp
    left = budget - weights - headroom * GIB
    if left <= 0:
        raise AdvisorError(
            f"{geom.name} needs {weights / GIB:.1f} GiB of weights per GPU plus {headroom:.1f} GiB "
            f"activation headroom, but {gpu_gib:g} GiB x {utilization:g} utilization gives only "
            f"{budget / GIB:.1f} GiB: use a larger GPU (--gpu), raise --gpu-memory-utilization, "
            f"shard the model (--tensor-parallel-size), lower --headroom-gib, or give the KV "
            f"budget directly (--kv-cache-gib / --num-blocks)."
        )
    return int(left)


def utilization_for_kv_bytes(
    geom: ModelGeometry, gpu_gib: float, kv_bytes: int, headroom_gib: float | None = None, tp: int = 1
) -> float:
    """The --gpu-memory-utilization that leaves `kv_bytes` for the KV cache (may exceed 1)."""
    headroom = DEFAULT_HEADROOM_GIB if headroom_gib is None else headroom_gib
    need = kv_bytes + geom.weight_bytes / tp + headroom * GIB
    return need / (gpu_gib * GIB)


# --- catalog ---
@lru_cache(maxsize=1)
def catalog() -> dict[str, Any]:
    """The built-in catalog (advisor/data/models.json): models, aliases, gpus."""
    text = resources.files("advisor").joinpath("data/models.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def catalog_names() -> list[str]:
    return sorted(catalog()["models"])


def _catalog_key(spec: str) -> str | None:
    cat = catalog()
    models = cat["models"]
    aliases = {_norm(k): v for k, v in cat["aliases"].items()}
    s = _norm(spec)
    candidates = [s, s.split("/")[-1]]
    for c in list(candidates):
        for suffix in ("-instruct", "-it", "-chat", "-base"):
            if c.endswith(suffix):
                candidates.append(c[: -len(suffix)])
        if c.startswith("meta-llama-"):
            candidates.append(c[len("meta-"):])
    for c in candidates:
        if c in models:
            return c
        if c in aliases:
            return str(aliases[c])
    return None


def _from_catalog(key: str) -> ModelGeometry:
    e = catalog()["models"][key]
    mla = None
    if e.get("kv_lora_rank") is not None:
        mla = int(e["kv_lora_rank"]) + int(e["qk_rope_head_dim"])
    wd = e.get("weight_dtype")
    notes = (e["note"],) if e.get("note") else ()
    return ModelGeometry(
        name=key,
        layers=int(e["num_hidden_layers"]),
        kv_heads=1 if mla else int(e["num_key_value_heads"]),
        head_dim=mla if mla else int(e["head_dim"]),
        dtype_bytes=DTYPE_BYTES[e["dtype"]],
        mla_latent_dim=mla,
        params=float(e["params"]),
        sources=(e["source"],),
        weight_dtype_bytes=float(DTYPE_BYTES[wd]) if wd else None,
        sliding_window=e.get("sliding_window"),
        sliding_window_layers=int(e.get("sliding_window_layers", 0)),
        forced_block_size=e.get("forced_block_size"),
        notes=notes,
        serve_name=e.get("hf_repo"),
        max_position_embeddings=e.get("max_position_embeddings"),
        q_heads=e.get("num_attention_heads"),
        active_params=float(e["active_params"]) if e.get("active_params") else None,
    )


def resolve_model(spec: str) -> ModelGeometry:
    """A catalog name / HF repo id, or a local model folder or config.json."""
    p = Path(spec).expanduser()
    if p.exists():
        return geometry_from_config_path(p)
    key = _catalog_key(spec)
    if key is not None:
        return _from_catalog(key)
    raise AdvisorError(
        f"unknown model {spec!r}: pass a local model folder or config.json, or one of the "
        f"built-in names: {', '.join(catalog_names())}."
    )


def gpu_key(spec: str) -> str | None:
    """The catalog's key for a GPU name (h100, NVIDIA-A100-40GB, amd-mi300x, ...), or None."""
    s = _norm(str(spec))
    gpus = catalog()["gpus"]
    for c in (s, s.removeprefix("nvidia-"), s.removeprefix("amd-"), s.replace("-sxm", "").replace("-pcie", "")):
        c = c.removeprefix("nvidia-").removeprefix("amd-")
        if c in gpus:
            return c
        c2 = re.sub(r"-?(\d+)gb$", r"-\1gb", c)
        if c2 in gpus:
            return c2
    return None


def resolve_gpu(spec: str | float) -> float:
    """GPU memory in GiB: a number (GiB) or a catalog name such as h100, a100-40gb, l40s."""
    if isinstance(spec, (int, float)):
        return float(spec)
    s = _norm(str(spec))
    try:
        return float(s.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        pass
    gpus = catalog()["gpus"]
    key = gpu_key(s)
    if key is not None:
        return gpus[key]["memory_mib"] * MIB / GIB
    raise AdvisorError(
        f"unknown GPU {spec!r}: give its memory in GiB (e.g. --gpu 80) or one of: "
        f"{', '.join(sorted(gpus))}."
    )


def vllm_batch_defaults(gpu: str | float | None, vllm_version: str | None = None) -> tuple[int, int]:
    """`vllm serve`'s default (max_num_seqs, max_num_batched_tokens) on this GPU (a catalog
    name or GiB; None: no GPU known) under `vllm_version` (None: the newest known), by the
    rule in advisor.vllm_versions (vLLM's EngineArgs.get_batch_defaults). A GPU given as a
    number of GiB has no name, so an 80 GiB A100 must be named (a100-80gb)."""
    if gpu is None:
        return vllm_versions.batch_defaults(vllm_version, None)
    return vllm_versions.batch_defaults(vllm_version, resolve_gpu(gpu), _norm(str(gpu)))


# --- local config.json ---
def geometry_from_config_path(path: Path) -> ModelGeometry:
    folder = path if path.is_dir() else path.parent
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise AdvisorError(f"{path} has no config.json: pass the model folder that holds it.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdvisorError(f"cannot read {cfg_path} as JSON ({e}): pass the model's config.json.") from e
    name = folder.name if path.is_dir() else (cfg.get("_name_or_path") or folder.name or "model")
    geom = replace(geometry_from_config(cfg, name=str(name), source=str(cfg_path)), serve_name=str(folder))
    measured = _params_from_weights(folder, geom)
    if measured is not None:
        geom = replace(geom, params=measured[0], sources=(*geom.sources, measured[1]),
                       notes=tuple(n for n in geom.notes if not n.startswith("params estimated")))
    return geom


def geometry_from_config(cfg: dict[str, Any], name: str, source: str) -> ModelGeometry:
    """Geometry from a Hugging Face config dict (text_config of multimodal models is used)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    c = {**cfg, **text} if text else cfg

    def need(key: str) -> int:
        if c.get(key) is None:
            raise AdvisorError(f"{source} lacks {key!r}: pass a decoder model's config.json.")
        return int(c[key])

    layers = need("num_hidden_layers")
    heads = need("num_attention_heads")
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or need("hidden_size") // heads)
    dtype_name = str(c.get("torch_dtype") or c.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    dtype_bytes = DTYPE_BYTES.get(dtype_name.removeprefix("torch."), 2)
    notes: list[str] = []
    if dtype_name.removeprefix("torch.") in ("float32", "float"):
        # vLLM's dtype "auto" downcasts a float32 checkpoint to the platform's first 16-bit
        # dtype (ModelConfig._resolve_auto_dtype), so its weights and KV cache take 2 bytes.
        dtype_bytes = 2
        notes.append("float32 config: vLLM's --dtype auto runs it in 16 bits, so 2 bytes per KV element")
    mla = None
    if c.get("kv_lora_rank") and c.get("qk_rope_head_dim") is not None:
        mla = int(c["kv_lora_rank"]) + int(c["qk_rope_head_dim"])
        kv_heads, head_dim = 1, mla
        notes.append("MLA: one latent per token per layer")
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    types = c.get("layer_types") or c.get("layers_block_type") or []
    sliding = sum(1 for t in types if "sliding" in str(t))
    if window and not types:
        pattern = c.get("sliding_window_pattern")
        if pattern:  # every pattern-th layer is global (Gemma 3)
            sliding = layers - layers // int(pattern)
        elif str(c.get("model_type", "")).startswith("gemma2"):
            sliding = layers // 2
        else:
            sliding = layers  # Mistral-style: every layer windowed
    forced = None
    if any(t in ("mamba", "mamba2", "linear_attention", "ssm") for t in map(str, types)):
        notes.append(
            "hybrid (Mamba/linear-attention) model: vLLM sets the attention block size itself "
            "to fit the state page; counted here as attention layers only"
        )
        layers = sum(1 for t in types if "attention" in str(t) and "linear" not in str(t)) or layers
    weight_dtype_bytes = None
    q = c.get("quantization_config") or {}
    if q:
        bits = q.get("bits") or q.get("weight_bits")
        if bits:
            weight_dtype_bytes = float(bits) / 8
        elif "fp8" in str(q.get("quant_method", "")):
            weight_dtype_bytes = 1.0
    params = _estimate_params(c, layers, heads, kv_heads, head_dim)
    active = None
    top_k = c.get("num_experts_per_tok") or c.get("moe_topk")
    if top_k and params > 0:  # MoE: a token passes through top_k routed experts (+ shared ones)
        k = int(top_k)
        active = _estimate_params({**c, "num_local_experts": k, "num_experts": k, "n_routed_experts": k},
                                  layers, heads, kv_heads, head_dim)
    notes.append("params estimated from config dimensions (no weight index found)")
    return ModelGeometry(
        name=name, layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes,
        mla_latent_dim=mla, params=params, sources=(source,), weight_dtype_bytes=weight_dtype_bytes,
        sliding_window=int(window) if window and sliding else None,
        sliding_window_layers=sliding if window else 0, forced_block_size=forced,
        notes=tuple(notes),
        max_position_embeddings=int(c["max_position_embeddings"]) if c.get("max_position_embeddings") else None,
        q_heads=heads, active_params=active,
    )


def _estimate_params(c: dict[str, Any], layers: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """Rough parameter count of a decoder: embeddings + attention + (gated) MLP x experts."""
    hidden = int(c.get("hidden_size") or heads * head_dim)
    inter = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 4 * hidden)
    experts = int(c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 1)
    shared = int(c.get("n_shared_experts") or 0)
    vocab = int(c.get("vocab_size") or 0)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter * (experts + shared)
    emb = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    return float(emb + layers * (attn + mlp))


def _params_from_weights(folder: Path, geom: ModelGeometry) -> tuple[float, str] | None:
    """Parameter count from the safetensors index's total_size (bytes / weight dtype)."""
    per = geom.weight_dtype_bytes if geom.weight_dtype_bytes is not None else geom.dtype_bytes
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            total = json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"]
            return float(total) / per, str(index)
        except (OSError, KeyError, ValueError, TypeError):
            return None
    single = folder / "model.safetensors"
    if single.exists():
        return single.stat().st_size / per, str(single)
    return None


def describe_budget(geom: ModelGeometry, block_size: int, num_blocks: int, tp: int = 1) -> str:
    gib = kv_gib_for_blocks(geom, block_size, num_blocks, tp)
    return (f"{num_blocks:,} blocks x {block_size} tokens x {bytes_per_block(geom, block_size, tp) // block_size:,} B/token "
            f"= {gib:.2f} GiB per GPU ({geom.name})")


__all__ = [
    "GIB", "DEFAULT_HEADROOM_GIB", "VLLM_DEFAULT_GPU_MEMORY_UTILIZATION", "ModelGeometry",
    "bytes_per_token", "bytes_per_block", "blocks_for_kv_bytes", "kv_bytes_for_blocks",
    "kv_gib_for_blocks", "kv_bytes_for_gpu", "utilization_for_kv_bytes", "resolve_model",
    "resolve_gpu", "gpu_key", "geometry_from_config", "geometry_from_config_path", "catalog", "catalog_names",
]
