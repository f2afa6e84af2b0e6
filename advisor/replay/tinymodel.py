"""A tiny, randomly initialised Llama for cache-confirmation replays.

Input: the vocabulary size the replayed token ids need and a cache folder.
Output: a Hugging Face model folder (config.json + safetensors) that vLLM can
load, built once per (vocab size, seed) and reused.

Prefix-cache hits depend only on the token ids, the block size and the block
budget, never on the weights, so a two-layer random model confirms the
simulator's prediction on any machine. Its geometry respects the CPU backend:
head_dim 32 (the CPU attention kernels accept 32, 64, 80, ...).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# Small on purpose: a 2-layer model with 2 KV heads of 32 dims keeps a KV block of
# 32 tokens at 32 * 2 * 2 * 2 * 32 * 4 bytes = 32 KiB, so thousands of blocks fit anywhere.
LAYERS = 2
HIDDEN = 64
HEADS = 2
KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE = 128
MIN_VOCAB = 256
DEFAULT_SEED = 0
MARKER = "pc_advise_tiny.json"


def vocab_for(max_token_id: int) -> int:
    """A vocabulary covering `max_token_id`, rounded up to a multiple of 256."""
    need = max(MIN_VOCAB, max_token_id + 1)
    return -(-need // 256) * 256


def describe(vocab_size: int) -> str:
    return f"tiny random Llama ({LAYERS} layers, head_dim {HEAD_DIM}, vocab {vocab_size})"


def tiny_model_dir(cache_dir: Path, vocab_size: int, seed: int = DEFAULT_SEED) -> Path:
    return Path(cache_dir) / "tiny-models" / f"llama-v{vocab_size}-s{seed}"


def ensure_tiny_model(cache_dir: Path, vocab_size: int, seed: int = DEFAULT_SEED) -> Path:
    """The folder of a tiny random Llama with `vocab_size` tokens, built on first use.

    Built in a temporary folder and renamed into place, so a concurrent or
    interrupted build never leaves a half-written model behind.
    """
    target = tiny_model_dir(cache_dir, vocab_size, seed)
    if (target / MARKER).exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(
            json.dumps({"vocab_size": vocab_size, "seed": seed, "what": describe(vocab_size)}) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MARKER).exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
