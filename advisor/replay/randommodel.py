"""A catalog model's real architecture with random weights: `--replay-model random:<model>`.

Input: a spec, `random:<catalog name>` (advisor/data/models.json, e.g. llama-3.2-1b) or
`random:<local folder holding a config.json>`, the vocabulary the replayed token ids need,
a cache folder, and the memory this machine has (`MemoryLimits`, read by the caller).
Output: a Hugging Face model folder (config.json + safetensors) vLLM loads, built once
per (model, vocabulary, seed) with `transformers.AutoConfig.for_model` /
`AutoModelForCausalLM.from_config` and `save_pretrained`; nothing is downloaded.

Prefix-cache hits depend on token ids, block size and block count; time depends on the
shapes (layers, widths, heads, vocabulary, dtype), never on the weights' values. So a
random model of the real shape measures what the real model would, on any machine with
the memory for it, without a download. `MemoryLimits` guards that: a model whose weights
do not fit the free RAM (to build it) or the GPU (to serve it) is refused before
anything is allocated.

The catalog holds the KV geometry (layers, heads, head_dim, dtype, params); the fields a
whole model needs besides are in `ARCHITECTURES`, read from the same config.json pages
the catalog cites (its `source`); tests/test_replay_time.py checks that each entry's
parameter count matches the catalog's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor import kvmemory
from advisor.errors import AdvisorError
from advisor.replay.tinymodel import save_atomically

PREFIX = "random:"
DEFAULT_SEED = 0
MARKER = "pc_advise_random.json"
GIB = 1 << 30
# Building holds the weights once in RAM (safetensors writes them out without a copy);
# the margin covers the interpreter, torch and the writer's buffers.
BUILD_MARGIN_BYTES = 2 * GIB
# Serving on a GPU needs the weights plus activations and CUDA graphs (the KV pool is
# pinned separately and sized by the configuration replayed).
SERVE_MARGIN_BYTES = 4 * GIB

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}


def _llama(hidden: int, inter: int, rope: dict[str, Any], tied: bool) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": rope,
            "max_position_embeddings": 131072, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
            "bos_token_id": 128000, "eos_token_id": 128009}


def _qwen2(hidden: int, inter: int) -> dict[str, Any]:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "vocab_size": 152064, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
            "bos_token_id": 151643, "eos_token_id": 151645}


def _qwen3(hidden: int, inter: int) -> dict[str, Any]:
    return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "vocab_size": 151936, "rope_theta": 1000000.0,
            "max_position_embeddings": 40960, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
            "bos_token_id": 151643, "eos_token_id": 151645}


# What a whole model needs beyond the catalog's KV geometry, per catalog key (dense models
# that transformers and vLLM both build from a plain config; MoE, MLA and sliding-window
# models: give a local folder with their config.json instead).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(4096, 14336, _LLAMA31_ROPE, tied=False),
    "llama-3.1-70b": _llama(8192, 28672, _LLAMA31_ROPE, tied=False),
    "llama-3.1-405b": _llama(16384, 53248, _LLAMA31_ROPE, tied=False),
    "llama-3.2-1b": _llama(2048, 8192, _LLAMA32_ROPE, tied=True),
    "llama-3.2-3b": _llama(3072, 8192, _LLAMA32_ROPE, tied=True),
    "llama-3.3-70b": _llama(8192, 28672, _LLAMA31_ROPE, tied=False),
    "qwen2.5-7b": _qwen2(3584, 18944),
    "qwen2.5-14b": _qwen2(5120, 13824),
    "qwen2.5-32b": _qwen2(5120, 27648),
    "qwen2.5-72b": _qwen2(8192, 29568),
    "qwen3-8b": _qwen3(4096, 12288),
    "qwen3-14b": _qwen3(5120, 17408),
    "qwen3-32b": _qwen3(5120, 25600),
    "mistral-7b": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                   "intermediate_size": 14336, "vocab_size": 32768, "rope_theta": 1000000.0,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                   "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2},
}

WEIGHTS_NOTE = ("random weights of the real architecture: prefix-cache hits and time depend on the shapes "
                "(layers, widths, heads, vocabulary, dtype), not on the weights, so both measure what the "
                "real model would; the generated text is noise")


@dataclass(frozen=True)
class MemoryLimits:
    """Free memory on this machine, bytes: RAM (to build) and the GPU's (None: no GPU)."""

    ram_bytes: int
    gpu_bytes: int | None = None
    gpu_name: str | None = None


@dataclass(frozen=True)
class RandomModel:
    folder: Path
    label: str
    notes: tuple[str, ...]
    params: int
    config: dict[str, Any]


def is_random(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def config_fields(spec: str) -> tuple[str, dict[str, Any]]:
    """(name, config.json fields) for `random:<name or folder>`, before any vocabulary change.

    A catalog model's geometry comes from the catalog, the rest from `ARCHITECTURES`; a
    folder's config.json is taken as it is.
    """
    target = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    folder = Path(target).expanduser()
    if (folder / "config.json").exists():
        fields = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not fields.get("model_type"):
            raise AdvisorError(f"--replay-model {spec}: its config.json has no model_type; give a "
                               "Hugging Face config.json, or a catalog name after random:.")
        return folder.name, fields
    try:
        key: str | None = kvmemory.resolve_model(target).name
    except AdvisorError:
        key = None
    if key is None or key not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        what = f"{target!r} is not in the catalog" if key is None else f"{key} has no whole-model entry here"
        raise AdvisorError(f"--replay-model {spec}: {what}; use random:<one of {known}>, or "
                           "random:<a local folder holding the model's config.json>.")
    entry = kvmemory.catalog()["models"][key]
    fields = {**ARCHITECTURES[key], "num_hidden_layers": int(entry["num_hidden_layers"]),
              "num_attention_heads": int(entry["num_attention_heads"]),
              "num_key_value_heads": int(entry["num_key_value_heads"]), "head_dim": int(entry["head_dim"]),
              "torch_dtype": entry["dtype"]}
    return key, fields


def fields_for_log(spec: str, max_token_id: int) -> tuple[str, dict[str, Any], list[str]]:
    """`config_fields`, with the vocabulary widened (to a multiple of 256) when the replayed
    ids reach past it, and the notes replay.json carries about the model."""
    name, fields = config_fields(spec)
    notes = [WEIGHTS_NOTE]
    vocab = int(fields.get("vocab_size") or 0)
    if vocab and max_token_id >= vocab:
        widened = -(-(max_token_id + 1) // 256) * 256
        notes.append(f"vocabulary widened from {vocab:,} to {widened:,} tokens to cover the log's token ids "
                     f"(up to {max_token_id:,}; tokenize with this model's tokenizer to keep it): the embedding "
                     "and LM head are that much larger than the real model's")
        fields = {**fields, "vocab_size": widened}
    return name, fields, notes


def _dtype_name(fields: dict[str, Any]) -> str:
    return str(fields.get("torch_dtype") or fields.get("dtype") or "bfloat16")


def _config(fields: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = {k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")}
    kwargs["dtype"] = _dtype_name(fields)
    kwargs.pop("torch_dtype", None)
    return AutoConfig.for_model(fields["model_type"], **kwargs)


def count_params(fields: dict[str, Any]) -> int:
    """The exact parameter count of the model `fields` describe (built on the meta device:
    no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(fields))
    return int(sum(p.numel() for p in model.parameters()))


def _check_memory(spec: str, params: int, dtype: str, limits: MemoryLimits) -> None:
    need = params * kvmemory.DTYPE_BYTES.get(dtype, 2)
    gib = need / GIB
    if need + BUILD_MARGIN_BYTES > limits.ram_bytes:
        raise AdvisorError(
            f"--replay-model {spec}: its {params / 1e9:.2f}B parameters take {gib:.1f} GiB in {dtype}, and "
            f"building them needs {(need + BUILD_MARGIN_BYTES) / GIB:.1f} GiB of free RAM; this machine has "
            f"{limits.ram_bytes / GIB:.1f} GiB free. Pick a smaller model (e.g. random:llama-3.2-1b) or run "
            "on a machine with more memory.")
    if limits.gpu_bytes is not None and need + SERVE_MARGIN_BYTES > limits.gpu_bytes:
        raise AdvisorError(
            f"--replay-model {spec}: its weights take {gib:.1f} GiB in {dtype}, more than the "
            f"{limits.gpu_bytes / GIB:.1f} GiB free on {limits.gpu_name or 'the GPU'} leaves room for "
            f"(weights + {SERVE_MARGIN_BYTES // GIB} GiB); pick a smaller model, or serve it on a larger "
            "GPU (the replay runs on one).")


def random_model_dir(cache_dir: Path, name: str, fields: dict[str, Any], seed: int) -> Path:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "random-models" / f"{name}-{digest}-s{seed}"


def ensure_random_model(
    spec: str, cache_dir: Path, max_token_id: int, limits: MemoryLimits, seed: int = DEFAULT_SEED,
) -> RandomModel:
    """The folder of `spec`'s architecture with random weights, built on first use.

    The vocabulary is widened (to a multiple of 256) when the replayed ids reach past it
    (a log tokenized with another tokenizer): a note says so, since the embedding and the
    LM head then grow. Refuses (AdvisorError) when the weights would not fit `limits`.
    Built in a temporary folder and renamed into place, as the tiny model is.
    """
    name, fields, notes = fields_for_log(spec, max_token_id)
    dtype = _dtype_name(fields)
    params = count_params(fields)
    _check_memory(spec, params, dtype, limits)
    target = random_model_dir(cache_dir, name, fields, seed)
    label = f"{name} architecture with random weights ({params / 1e9:.2f}B parameters, {dtype})"
    if not (target / MARKER).exists():
        _build(fields, target, seed, label)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    return RandomModel(target, label, tuple(notes), params, config)


def _build(fields: dict[str, Any], target: Path, seed: int, label: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _dtype_name(fields)))
    save_atomically(model, target, MARKER, {"what": label, "seed": seed, "fields": fields})


def memory_limits() -> MemoryLimits:
    """This machine's free RAM (/proc/meminfo's MemAvailable, else physical pages) and, when
    torch sees a CUDA GPU, its free memory."""
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not ram:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu, gpu_name = None, None
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            gpu, gpu_name = int(free), torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no usable CUDA: the CPU limit alone applies
        pass
    return MemoryLimits(ram, gpu, gpu_name)
