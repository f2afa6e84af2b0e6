"""Decoding without transformers (advisor.tokens.decode): the texts equal the transformers
tokenizer's `decode`, and a folder where they might not falls back to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.tokens import decode as dec
from advisor.tokens.default_tokenizer import ensure_embedded
from advisor.tokens.stage import load_tokenizer


@pytest.fixture(scope="module")
def embedded(cache_dir: Path):
    return dec.load_decoder(None, cache_dir)


def test_the_embedded_tokenizer_decodes_without_transformers(cache_dir: Path) -> None:
    assert dec._backend_alone(ensure_embedded(cache_dir)) is not None


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 151_642), st.integers(151_643, 151_664)), max_size=60))
def test_ids_decode_as_transformers_decodes_them(embedded, qwen, ids: list[int]) -> None:
    assert embedded(ids) == qwen.decode(ids)
    assert embedded(np.asarray(ids, dtype=np.int32)) == qwen.decode(ids)


def test_a_prompt_round_trips(embedded, qwen) -> None:
    text = "<|im_start|>system\nYou are  helpful. Ünïcödé → 猫 🐈\t\n<|im_end|>\n<|im_start|>user\nhi"
    ids = qwen.encode(text, add_special_tokens=False)
    assert embedded(ids) == qwen.decode(ids) == text


def _copy(src: Path, dst: Path, **config: object) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_a_folder_that_cleans_up_spaces_falls_back_to_transformers(cache_dir: Path, tmp_path: Path) -> None:
    folder = _copy(ensure_embedded(cache_dir), tmp_path / "cleanup", clean_up_tokenization_spaces=True)
    assert dec._backend_alone(folder) is None
    ids = load_tokenizer(str(folder), cache_dir).encode("a , b .", add_special_tokens=False)
    assert dec.load_decoder(str(folder), cache_dir)(ids) == load_tokenizer(str(folder), cache_dir).decode(ids)


def test_a_config_added_token_missing_from_tokenizer_json_falls_back(cache_dir: Path, tmp_path: Path) -> None:
    src = ensure_embedded(cache_dir)
    listed = json.loads((src / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
    listed = {**listed, "151700": {"content": "<|extra|>", "special": True}}
    folder = _copy(src, tmp_path / "extra", added_tokens_decoder=listed)
    assert dec._backend_alone(folder) is None
