"""A tiny, randomly initialised Llama for cache-confirmation replays (and a small one for timing).

Input: the vocabulary size the replayed token ids need and a cache folder.
Output: a Hugging Face model folder (config.json + safetensors) that vLLM can
load, built once per (geometry, vocab size, seed) and reused.

Prefix-cache hits depend only on the token ids, the block size and the block
budget, never on the weights, so a two-layer random model confirms the
simulator's prediction on any machine. Its geometry respects the CPU backend:
head_dim 32 (the CPU attention kernels accept 32, 64, 80, ...).

`TIMING` is the default model of `replay --measure-time`: the tiny model does so
little arithmetic per token that an engine step's fixed costs (scheduling, input
preparation, sampling) hide what prefix caching saves, and a cached prefill can even
time slower than an uncached one on the CPU backend. Four layers of width 512 in
float32 (~17M parameters besides the embedding) make prefill compute-bound on a CPU,
so the timed variants show the mechanism; docs/replay.md has the figures.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


# Small on purpose: a 2-layer model with 2 KV heads of 32 dims keeps a KV block of
# 32 tokens at 32 * 2 * 2 * 2 * 32 * 4 bytes = 32 KiB, so thousands of blocks fit anywhere.
TINY = Geometry("tiny", layers=2, hidden=64, heads=2, kv_heads=2, head_dim=32, intermediate=128)
# Prefill compute-bound on a CPU (module docstring); a 32-token block is 32 * 4 * 2 * 8 * 64 * 4 = 512 KiB.
TIMING = Geometry("timing", layers=4, hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=2048)
MIN_VOCAB = 256
DEFAULT_SEED = 0
MARKER = "pc_advise_tiny.json"


def vocab_for(max_token_id: int) -> int:
    """A vocabulary covering `max_token_id`, rounded up to a multiple of 256."""
    need = max(MIN_VOCAB, max_token_id + 1)
    return -(-need // 256) * 256


def describe(vocab_size: int, geometry: Geometry = TINY) -> str:
    g = geometry
    if g == TINY:
        return f"tiny random Llama ({g.layers} layers, head_dim {g.head_dim}, vocab {vocab_size})"
    return (f"small random Llama for timing ({g.layers} layers, hidden {g.hidden}, {g.heads} heads of "
            f"{g.head_dim}, float32, vocab {vocab_size})")


def tiny_model_dir(cache_dir: Path, vocab_size: int, seed: int = DEFAULT_SEED, geometry: Geometry = TINY) -> Path:
    kind = "" if geometry == TINY else f"{geometry.name}-"
    return Path(cache_dir) / "tiny-models" / f"llama-{kind}v{vocab_size}-s{seed}"


def ensure_tiny_model(cache_dir: Path, vocab_size: int, seed: int = DEFAULT_SEED,
                      geometry: Geometry = TINY) -> Path:
    """The folder of a tiny random Llama with `vocab_size` tokens, built on first use.

    Built in a temporary folder and renamed into place, so a concurrent or
    interrupted build never leaves a half-written model behind.
    """
    target = tiny_model_dir(cache_dir, vocab_size, seed, geometry)
    g = geometry
    if (target / MARKER).exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=g.hidden,
        intermediate_size=g.intermediate,
        num_hidden_layers=g.layers,
        num_attention_heads=g.heads,
        num_key_value_heads=g.kv_heads,
        head_dim=g.head_dim,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    save_atomically(model, target, MARKER, {"vocab_size": vocab_size, "seed": seed, "what": describe(vocab_size, g)})
    return target


def save_atomically(model: Any, target: Path, marker: str, record: dict[str, Any]) -> None:
    """`model.save_pretrained` into `target` all at once: written beside it, the `marker`
    file (holding `record`) last, then renamed, so an interrupted build leaves no folder that
    looks finished; a concurrent build that got there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / marker).write_text(json.dumps(record) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
