"""Token ids -> text, for the texts the reports show (prefixes, breakers, reuse groups).

`load_decoder(spec, cache_dir)` gives what the transformers tokenizer's `decode(ids)` gives
(special tokens kept). Loading transformers and its tokenizer class takes seconds, and
decoding needs neither: where the tokenizer is a folder whose `tokenizer.json` is the whole
of what decode uses, it is loaded with the `tokenizers` library alone. That holds when
`tokenizer_config.json` turns `clean_up_tokenization_spaces` off (the only text transformers'
fast decode changes after the backend's) and every added token it lists is in tokenizer.json
with the same text. Otherwise, or for a model name in the Hugging Face cache, the
transformers tokenizer decodes. tests/test_tokens.py checks both give the same text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from advisor.tokens.default_tokenizer import EMBEDDED_SPEC, ensure_embedded

Decode = Callable[[Sequence[int]], str]


def load_decoder(spec: str | None, cache_dir: Path) -> Decode:
    """A decode function for `spec` (as tokens.parquet records it); raises AdvisorError as
    `load_tokenizer` does when there is no such tokenizer."""
    folder = ensure_embedded(cache_dir) if spec is None or spec == EMBEDDED_SPEC else Path(spec).expanduser()
    backend = _backend_alone(folder) if folder.is_dir() else None
    if backend is not None:
        return lambda ids: backend.decode([int(i) for i in ids], skip_special_tokens=False)
    from advisor.tokens.stage import load_tokenizer

    tokenizer = load_tokenizer(spec, cache_dir)
    return lambda ids: tokenizer.decode([int(i) for i in ids])


def _backend_alone(folder: Path) -> Any | None:
    """The folder's tokenizers.Tokenizer when it decodes exactly as transformers would, else None."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("clean_up_tokenization_spaces") is not False or not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a tokenizer.json this tokenizers version cannot read: transformers decides
        return None
    added = {str(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
    listed = config.get("added_tokens_decoder") or {}
    if any(added.get(str(k)) != (v or {}).get("content") for k, v in listed.items()):
        return None
    return backend
