"""The printed `vllm serve` line starts an engine: --max-model-len fits the pool (vLLM's
start-up check), the memory flag pins exactly the recommended blocks. Stories with
hand-counted numbers, then a real CPU engine started with the flags the pipeline printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
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


@pytest.mark.replay
def test_the_replica_deployment_lines_pass_vllms_start_up_rules(tmp_path: Path) -> None:
    """The per-replica `vllm serve` lines advisor.recommend.replicas prints, for 4 GPUs as
    2 x TP2 (the tiny model's 2 attention heads allow TP2): least-loaded adds vLLM's own
    `--data-parallel-size 2`, round-robin does not; vLLM's argument parser and engine config
    (the checks `vllm serve` runs before loading weights) accept both and size what they say.
    TP3 on the same model is refused by the same check, so the check can fail."""
    import shlex

    import polars as pl
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from advisor.recommend.options import RecommendOptions
    from advisor.recommend.replicas import recommend_replicas
    from advisor.schema import REPLICAS

    model = tinymodel.ensure_tiny_model(tmp_path / "cache", tinymodel.vocab_for(1000))
    g = kv.resolve_model(str(model))
    base = {"block_size": 32, "num_blocks": 400, "kv_gib": None, "replicas": 2, "mode": "concurrent", "requests": 10,
            "queries": 1000, "hit_tokens": 0, "hit_rate": 0.0, "ttft_p95_s": 0.1, "load_spread": 1.0}

    def line(router: str) -> str:
        rows = pl.from_arrow(pa.Table.from_pylist([{**base, "router": router}], schema=REPLICAS))
        out = recommend_replicas(rows, {"block_size": 32, "num_blocks": 400},
                                 RecommendOptions(model=str(model), gpus=4, headroom_gib=0.1), geom=g, gpu_gib=2.0,
                                 longest_request=900)
        return out["recommended"]["deploy"]["vllm_serve"]

    def config(serve: str) -> Any:
        words = shlex.split(serve)
        assert words[:3] == ["vllm", "serve", str(model)]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(model), *words[3:]])
        return AsyncEngineArgs.from_cli_args(args).create_engine_config()

    dp, rr = line("least-loaded"), line("round-robin")
    assert "--data-parallel-size 2" in dp and "--data-parallel-size" not in rr
    pinned = int(re.search(r"--kv-cache-memory-bytes (\d+)", dp).group(1))
    assert pinned == kv.kv_bytes_for_blocks(g, 32, 400, 2)
    cfg = config(dp)
    assert (cfg.parallel_config.data_parallel_size, cfg.parallel_config.tensor_parallel_size) == (2, 2)
    assert cfg.cache_config.block_size == 32 and cfg.cache_config.kv_cache_memory_bytes == pinned
    assert cfg.parallel_config.world_size_across_dp == 4  # the 4 GPUs given
    assert config(rr).parallel_config.data_parallel_size == 1
    with pytest.raises(Exception, match="divisible|divide"):
        config(dp.replace("--tensor-parallel-size 2", "--tensor-parallel-size 3"))


@pytest.mark.replay
def test_the_offloading_flags_pass_vllms_start_up_rules_and_size_the_simulated_tier(tmp_path: Path) -> None:
    """A serve line with the CPU offload tier recommended (advisor.recommend.offload sets `gib`):
    vLLM's argument parser and engine config accept it, turn it into the OffloadingConnector
    with `cpu_bytes_to_use` = GiB x 2^30, and vLLM's own CPUOffloadingSpec over the model's KV
    cache group counts the chunks the simulator gave the tier (advisor.sim.offload_grid)."""
    import shlex

    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
        build_offloading_config,
    )
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

    from advisor.recommend.options import RecommendOptions, resolve_options
    from advisor.recommend.rank import Point
    from advisor.recommend.serve import serve_flags
    from advisor.sim.offload_grid import tier_chunks

    model = tinymodel.ensure_tiny_model(tmp_path / "cache", tinymodel.vocab_for(1000))
    g = kv.resolve_model(str(model))
    best = Point(32, 400, None, 1.0, 10, 1000, 500, 0.5, 0.9, 0.0, 1.0, True)
    options = resolve_options(RecommendOptions(model=str(model), headroom_gib=0.1), {})
    _, serve, _ = serve_flags(best, options, g, 2.0, False, {"gib": 2.5}, False, 900)
    assert "--kv-offloading-size 2.5 --kv-offloading-backend native" in serve
    words = shlex.split(serve)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(model), *words[3:]])
    cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert cfg.cache_config.kv_offloading_size == 2.5 and cfg.cache_config.kv_offloading_backend == "native"
    assert cfg.kv_transfer_config.kv_connector == "OffloadingConnector"
    assert cfg.kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"] == 2.5 * (1 << 30)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=g.kv_heads, head_size=g.head_dim, dtype=torch.bfloat16)
    groups = [KVCacheGroupSpec([f"layers.{i}" for i in range(g.layers)], spec)]
    offloading = build_offloading_config(cfg, KVCacheConfig(num_blocks=401, kv_cache_tensors=[], kv_cache_groups=groups))
    assert CPUOffloadingSpec(offloading).num_chunks == tier_chunks(g, 32, 2.5, 1) > 0


# --- hybrid models (issue #12): the pool's blocks, the block size vLLM runs, its start-up check ---


def _hybrid_checks(res: Any, model: str, in_flight: int) -> tuple[int, int, int]:
    """The serve line of a hybrid model's pipeline run, held to vLLM's rules; returns the block
    size, the usable blocks and --max-model-len it printed."""
    import json

    from advisor.kvlayout import kv_layout

    rec = res.stages["recommend"].counts
    serve = rec["vllm_serve"]
    flag = lambda name: int(re.search(rf"--{name} (\d+)", serve).group(1))  # noqa: E731
    layout = kv_layout(model)
    B, pinned, length = flag("block-size"), flag("kv-cache-memory-bytes"), flag("max-model-len")
    assert layout.block_size(B) == B  # vLLM runs the block size it is given
    bpb = layout.bytes_per_block(B)
    # the pool: one block id spans one group's layers; the flag buys exactly the recommended blocks
    assert pinned == (rec["num_blocks"] + 1) * bpb and rec["kv_gib"] == round(pinned / kv.GIB, 3)
    assert length >= res.stages["simulate"].counts["longest_request_tokens"]
    assert layout.startup_bytes(length, B, in_flight) <= rec["num_blocks"] * bpb  # vLLM starts
    full = json.loads((res.run_dir / "recommendation.json").read_text())
    assert full["kv_layout"]["block_size"] == B and full["kv_layout"]["bytes_per_block"] == bpb
    assert any("hybrid in vLLM" in r for r in full["reasoning"])
    return B, rec["num_blocks"], length


def test_gpt_oss_20b_on_h100_gets_the_hybrid_pool_and_a_line_vllm_starts(tmp_path: Path) -> None:
    """The issue's example: both modes (concurrent on the hybrid reference engine), a budget in
    the hybrid pool's 393,216-B blocks, --max-model-len by vLLM's per-layer start-up check."""
    res = advisor.run(SAMPLES / "multiturn_chat.jsonl", out=tmp_path / "run", model="gpt-oss-20b", gpu="h100",
                      replay=False, block_sizes=(16,), policies=("lru",), sweep_points=4, reference_budgets=2)
    B, _, _ = _hybrid_checks(res, "gpt-oss-20b", 2 * 8192)  # H100: 8,192 tokens a step, two steps in flight
    assert B == 16
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(res.run_dir / "sim.parquet").to_pylist() if r["num_blocks"] is not None]
    assert rows and all(r["kv_gib"] == pytest.approx((r["num_blocks"] + 1) * 393_216 / kv.GIB) for r in rows)


def test_gemma_3_27b_gets_the_hybrid_pool_and_a_line_vllm_starts(tmp_path: Path) -> None:
    res = advisor.run(SAMPLES / "multiturn_chat.jsonl", out=tmp_path / "run", model="gemma-3-27b", replay=False,
                      block_sizes=(16, 32), policies=("lru",), modes=("sequential",), sweep_points=4)
    _hybrid_checks(res, "gemma-3-27b", 2 * 2048)  # no GPU named: vLLM's 2,048-token fallback


@pytest.mark.oracle
def test_the_hybrid_start_up_check_is_vllms_own(tmp_path: Path) -> None:
    """vLLM's `max_memory_usage_bytes` per layer (its start-up check), summed, against the
    length the line prints and the next length up: the printed one fits, a longer one may not."""
    pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not importable")
    from advisor.kvlayout import kv_layout
    from tests.test_kvlayout import vllm_startup_bytes

    layout = kv_layout("gpt-oss-20b")
    for usable in (300, 1293, 5000):
        length = layout.longest_startable(usable, 16, 16384, 131_072)
        assert vllm_startup_bytes(layout, 16, length, 16384) <= usable * layout.bytes_per_block(16)
        if length < 131_072:
            assert vllm_startup_bytes(layout, 16, length + 1, 16384) > usable * layout.bytes_per_block(16)
