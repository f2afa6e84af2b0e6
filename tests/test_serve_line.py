"""The printed `vllm serve` line starts an engine: --max-model-len fits the pool (vLLM's
start-up check), the memory flag pins exactly the recommended blocks. Stories with
hand-counted numbers, then a real CPU engine started with the flags the pipeline printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import advisor
from advisor import kvmemory as kv
from advisor.recommend.serve import max_model_len
from advisor.replay import tinymodel

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"


def geom(context: int | None = None) -> kv.ModelGeometry:
    return kv.ModelGeometry(name="m", layers=2, kv_heads=2, head_dim=8, dtype_bytes=2, mla_latent_dim=None,
                            params=1e6, sources=("test",), max_position_embeddings=context)


def test_max_model_len_is_the_longest_request_rounded_up_when_it_fits() -> None:
    # 1,000 tokens -> 1,024; 1,024 / 16 = 64 blocks <= 100 usable blocks: vLLM starts
    length, notes = max_model_len(1000, 16, 100, geom())
    assert length == 1024 and "1,000 tokens" in notes[0]


def test_max_model_len_is_capped_by_the_model_context() -> None:
    assert max_model_len(1000, 16, 100, geom(context=512))[0] == 512
    assert max_model_len(300, 16, 100, geom(context=4096))[0] == 512  # 300 -> 512, under the context


def test_max_model_len_shrinks_to_what_one_request_can_fill_and_says_so() -> None:
    # 64 blocks wanted, 50 usable: 50 x 16 = 800 tokens is the most vLLM lets start
    length, notes = max_model_len(1000, 16, 50, geom())
    assert length == 800
    assert any("rejects requests longer than 800" in n for n in notes)
    # exactly full: 1,024 tokens in 64 blocks is allowed
    assert max_model_len(1024, 16, 64, geom())[0] == 1024
    assert max_model_len(1025, 16, 64, geom())[0] == 1024  # 1,280 would need 80 blocks


def test_without_the_longest_request_no_length_is_printed() -> None:
    length, notes = max_model_len(None, 16, 100, None)
    assert length is None and "rerun `pc-advise simulate`" in notes[0]


def test_issue_example_llama_8b_on_h100_prints_a_length_that_fits(tmp_path: Path) -> None:
    """multiturn_chat with llama-3.1-8b on an H100: a small KV pool, so the serve line must
    carry a --max-model-len one request of which fits (the model's 131k context would not)."""
    res = advisor.run(SAMPLES / "multiturn_chat.jsonl", out=tmp_path / "run", model="llama-3.1-8b",
                      gpu="h100", replay=False, block_sizes=(16,), policies=("lru",))
    serve = res.stages["recommend"].counts["vllm_serve"]
    length = int(re.search(r"--max-model-len (\d+)", serve).group(1))
    pinned = int(re.search(r"--kv-cache-memory-bytes (\d+)", serve).group(1))
    g = kv.resolve_model("llama-3.1-8b")
    usable = kv.blocks_for_kv_bytes(g, 16, pinned)
    assert usable == res.stages["recommend"].counts["num_blocks"]
    assert -(-length // 16) <= usable  # vLLM's check: one max-length request fits
    assert length >= res.stages["simulate"].counts["longest_request_tokens"]


@pytest.mark.replay
def test_the_printed_flags_start_a_cpu_engine_with_the_predicted_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline on a sample log, sized for a tiny model on the CPU backend; the flags it
    prints start vLLM's engine, which reports the recommended block count (plus the null
    block)."""
    from vllm import LLM

    from advisor.replay.engine import (
        _kernel_scan_guard,  # numba's llvmlite breaks vLLM's start
    )

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    model = tinymodel.ensure_tiny_model(tmp_path / "cache", tinymodel.vocab_for(151_700))
    res = advisor.run(SAMPLES / "timestamp_system_prompt.jsonl", out=tmp_path / "run", model=str(model),
                      backend="cpu", replay=False, block_sizes=(32, 64), policies=("lru",),
                      cache_dir=tmp_path / "cache")
    rec = res.stages["recommend"].counts
    serve = rec["vllm_serve"]
    flag = lambda name: int(re.search(rf"--{name} (\d+)", serve).group(1))  # noqa: E731
    with _kernel_scan_guard():
        llm = LLM(model=str(model), skip_tokenizer_init=True, enable_prefix_caching=True,
                  block_size=flag("block-size"), kv_cache_memory_bytes=flag("kv-cache-memory-bytes"),
                  max_model_len=flag("max-model-len"), enforce_eager=True, seed=0)
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == rec["num_blocks"] + 1
