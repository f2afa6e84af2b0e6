"""KV cache groups: vLLM's grouping and page arithmetic by hand, for catalog models and for tiny
config.json files written by transformers' own config classes (offline), and against vLLM's
grouping functions where vLLM is importable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from advisor import kvlayout as kl
from advisor import kvmemory as kv
from advisor.errors import AdvisorError

SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             vocab_size=1000)
PER_TOKEN_LAYER = 2 * 2 * 32 * 2  # K and V x 2 KV heads x head_dim 32 x bf16


def save(tmp_path: Path, config: transformers.PretrainedConfig, name: str) -> str:
    folder = tmp_path / name
    config.save_pretrained(folder)
    return str(folder)


def shape(layout: kl.KVLayout) -> list[tuple[str, int | None, tuple[int, ...]]]:
    return [(g.kind, g.window, g.layers) for g in layout.groups]


# --- catalog models by hand -------------------------------------------------------------------


def test_gemma3_27b_sliding_window_1024_on_5_of_6_layers() -> None:
    layout = kl.kv_layout("gemma-3-27b")
    full = tuple(range(5, 62, 6))  # layers 5, 11, ..., 59: every 6th
    sliding = [i for i in range(62) if i not in full]
    # 52 sliding layers, 10 full: groups of 10 layers; the sliding bucket splits into
    # cdiv(52, 10) = 6 groups taking sliding[j::6] (9, 9, 9, 9, 8, 8 layers); layer 0 slides, so they come first
    assert shape(layout) == [("sliding_window", 1024, tuple(sliding[j::6])) for j in range(6)] + [("full", None, full)]
    assert layout.layers_per_group == 10 and layout.hybrid_manager and layout.needs_hybrid_cache
    # one block id: 10 layers x 16 tokens x (K, V) x 16 KV heads x 128 x bf16 in every group's tensors
    assert layout.bytes_per_block(16) == 10 * 16 * 2 * 16 * 128 * 2 == 1_310_720
    # kvmemory today counts all 62 layers as full attention: 507,904 B per cached token
    assert kv.bytes_per_token(kv.resolve_model("gemma-3-27b")) == 507_904
    # a 32K-token prompt leaves 2048 full-attention blocks and 6 x cdiv(1023, 16) = 384 sliding ones
    assert layout.cached_blocks(32768, 16) == (64,) * 6 + (2048,)
    assert layout.cached_bytes_per_token(32768, 16) == 2432 * 1_310_720 / 32768 == 97_280  # 5.2x fewer
    assert layout.cached_bytes_per_token(1 << 20, 16) == 81_920 + 384 * 40 / 32  # -> 81,920: 6.2x on long prompts
    # while it runs, each sliding group holds the window: cdiv(32768, 16) - (32768 - 1024 + 1) // 16 blocks
    assert layout.held_blocks(32768, 16) == (64,) * 6 + (2048,)


def test_gpt_oss_20b_alternates_sliding_and_full() -> None:
    layout = kl.kv_layout("openai/gpt-oss-20b")
    assert shape(layout) == [("sliding_window", 128, tuple(range(0, 24, 2))), ("full", None, tuple(range(1, 24, 2)))]
    assert layout.sim_groups() == (("sliding_window", 128), ("full", None))
    assert layout.bytes_per_block(16) == 12 * 16 * 2 * 8 * 64 * 2 == 393_216
    assert kv.bytes_per_token(kv.resolve_model("gpt-oss-20b")) == 49_152  # 24 layers as full attention
    # 2048 full blocks + cdiv(127, 16) = 8 sliding blocks for a 32K prompt: 24,672 B/token, 2.0x fewer
    assert layout.cached_bytes_per_token(32768, 16) == 2056 * 393_216 / 32768 == 24_672


def test_llama4_scout_is_one_full_group_unless_chunked_local_is_allowed() -> None:
    default = kl.kv_layout("llama-4-scout")
    assert shape(default) == [("full", None, tuple(range(48)))] and not default.needs_hybrid_cache
    assert any("VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE" in n for n in default.notes)
    hybrid = kl.kv_layout("llama-4-scout", hybrid_manager=True)
    chunked = [i for i in range(48) if (i + 1) % 4]
    assert shape(hybrid) == ([("chunked_local", 8192, tuple(chunked[j::3])) for j in range(3)]
                             + [("full", None, tuple(range(3, 48, 4)))])


def test_qwen3_next_block_size_is_forced_so_a_page_holds_a_gated_deltanet_state() -> None:
    layout = kl.kv_layout("qwen3-next-80b-a3b")
    assert [(g.kind, len(g.layers)) for g in layout.groups] == [("mamba", 12)] * 3 + [("full", 12)]
    # state: conv (128*16*2 + 128*32) x 3 + SSM 32 x 128 x 128, bf16 = 1,097,728 B;
    # attention page per token: 2 x 2 KV heads x 256 x 2 = 2048 B -> 16 * cdiv(1097728, 16 * 2048) = 544
    assert layout.groups[0].spec.state_bytes == ((128 * 16 * 2 + 128 * 32) * 3 + 32 * 128 * 128) * 2 == 1_097_728
    assert [layout.block_size(b) for b in (16, 32, 64, 128, 1024)] == [544, 544, 576, 640, 1024]
    assert kv.resolve_model("qwen3-next-80b-a3b").forced_block_size == 544
    assert kl.kv_layout("qwen3-next-80b-a3b", tp=4).block_size(16) == 272  # 1 KV head, a quarter of the state
    assert layout.bytes_per_block(544) == 12 * 544 * 2048
    with pytest.raises(AdvisorError, match="Mamba"):
        from advisor.sim.hybrid import HybridPrefixCache

        HybridPrefixCache(layout.sim_groups(), 100, 544)


def test_mla_and_full_attention_models_are_one_group() -> None:
    for name, kind in (("deepseek-v3", "mla"), ("kimi-k2", "mla"), ("llama-3.1-8b", "full")):
        layout = kl.kv_layout(name)
        geom = kv.resolve_model(name)
        assert [g.kind for g in layout.groups] == [kind] and not layout.needs_hybrid_cache
        assert layout.bytes_per_block(64) == kv.bytes_per_block(geom, 64)  # what kvmemory says today


def test_disabling_the_hybrid_manager_caches_every_layer_as_full_attention() -> None:
    layout = kl.kv_layout("gemma-3-27b", hybrid_manager=False)
    assert shape(layout) == [("full", None, tuple(range(62)))]
    assert layout.bytes_per_block(16) == kv.bytes_per_block(kv.resolve_model("gemma-3-27b"), 16)


def test_every_catalog_model_has_a_layout_and_new_entries_say_where_their_numbers_came_from() -> None:
    for name in kv.catalog_names():
        assert kl.kv_layout(name).groups
        entry = kv.catalog()["models"][name]
        if "from_config" in entry:
            assert entry["source"].startswith("https://huggingface.co/") and entry["config_read"]


# --- local config.json files (transformers' config classes, saved offline) ----------------------


def test_gemma3_config_every_6th_layer_full(tmp_path: Path) -> None:
    cfg = transformers.Gemma3TextConfig(num_hidden_layers=12, sliding_window=64, **SMALL)
    layout = kl.kv_layout(save(tmp_path, cfg, "gemma3"))
    # 10 sliding, 2 full: groups of 2; the sliding bucket splits into 5 groups sliding[j::5]
    sliding = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert shape(layout) == [("sliding_window", 64, tuple(sliding[j::5])) for j in range(5)] + [("full", None, (5, 11))]
    assert layout.bytes_per_block(16) == 2 * 16 * PER_TOKEN_LAYER


def test_gemma2_gpt_oss_configs_alternate_from_a_sliding_layer_0(tmp_path: Path) -> None:
    for name, cfg in (("gemma2", transformers.Gemma2Config(num_hidden_layers=4, sliding_window=32, **SMALL)),
                      ("gpt_oss", transformers.GptOssConfig(num_hidden_layers=4, sliding_window=32, num_local_experts=2,
                                                            num_experts_per_tok=1, **SMALL))):
        layout = kl.kv_layout(save(tmp_path, cfg, name))
        assert shape(layout) == [("sliding_window", 32, (0, 2)), ("full", None, (1, 3))], name


def test_llama4_config_chunked_local_on_rope_layers(tmp_path: Path) -> None:
    cfg = transformers.Llama4TextConfig(num_hidden_layers=8, attention_chunk_size=64, num_local_experts=2, **SMALL)
    path = save(tmp_path, cfg, "llama4")
    assert shape(kl.kv_layout(path)) == [("full", None, tuple(range(8)))]
    assert shape(kl.kv_layout(path, hybrid_manager=True)) == [
        ("chunked_local", 64, (0, 4)), ("chunked_local", 64, (1, 5)), ("chunked_local", 64, (2, 6)), ("full", None, (3, 7))]


def test_mistral_and_qwen2_sliding_on_every_layer_is_one_sliding_group(tmp_path: Path) -> None:
    mistral = transformers.MistralConfig(num_hidden_layers=4, sliding_window=4096, **SMALL)
    qwen = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4096,
                                    max_window_layers=0, **SMALL)
    for name, cfg in (("mistral", mistral), ("qwen2", qwen)):
        layout = kl.kv_layout(save(tmp_path, cfg, name))
        assert shape(layout) == [("sliding_window", 4096, (0, 1, 2, 3))], name
        assert layout.needs_hybrid_cache and layout.bytes_per_block(16) == 4 * 16 * PER_TOKEN_LAYER
    plain = transformers.Qwen2Config(num_hidden_layers=4, **SMALL)  # use_sliding_window false: no window
    assert shape(kl.kv_layout(save(tmp_path, plain, "qwen2-plain"))) == [("full", None, (0, 1, 2, 3))]


def test_qwen2_sliding_on_some_layers_is_refused_as_vllm_does(tmp_path: Path) -> None:
    cfg = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64,
                                   max_window_layers=2, **SMALL)
    with pytest.raises(AdvisorError, match="max_window_layers"):
        kl.kv_layout(save(tmp_path, cfg, "qwen2-mixed"))


def test_nemotron_h_config_mamba2_state_and_block_size(tmp_path: Path) -> None:
    # hand-written after the public Nemotron-H config.json's fields (transformers 5 saves a different form)
    cfg = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hybrid_override_pattern": "M-M*-M*",
           "num_hidden_layers": 7, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 32, "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2,
           "conv_kernel": 4, "vocab_size": 1000, "intermediate_size": 256, "torch_dtype": "bfloat16"}
    (tmp_path / "nemotron_h").mkdir()
    (tmp_path / "nemotron_h" / "config.json").write_text(json.dumps(cfg))
    layout = kl.kv_layout(str(tmp_path / "nemotron_h"))
    # mamba layers 0, 2, 5 and full 3, 6: groups of 2 (3 is not under 1.5 x 2), mamba[j::2]
    assert [(g.kind, g.layers) for g in layout.groups] == [("mamba", (0, 5)), ("mamba", (2,)), ("full", (3, 6))]
    # conv: (8*16 + 2*2*16) x 3 in bf16 = 1152 B; SSM: 8 x 16 x 16 in float32 = 8192 B
    assert layout.groups[0].spec.state_bytes == 192 * 3 * 2 + 8 * 16 * 16 * 4 == 9344
    # attention: 2 x 2 x 32 x 2 = 256 B per token -> 16 * cdiv(9344, 16 * 256) = 48 tokens per block
    assert layout.block_size(16) == 48 and layout.bytes_per_block(48) == 2 * 48 * 256


def test_kv_cache_dtype_and_tensor_parallel_shrink_attention_pages() -> None:
    base = kl.kv_layout("gpt-oss-20b")
    assert kl.kv_layout("gpt-oss-20b", kv_cache_dtype="fp8").bytes_per_block(16) == base.bytes_per_block(16) // 2
    assert kl.kv_layout("gpt-oss-20b", tp=2).bytes_per_block(16) == base.bytes_per_block(16) // 2
    with pytest.raises(AdvisorError, match="kv-cache-dtype"):
        kl.kv_layout("gpt-oss-20b", kv_cache_dtype="int3")


# --- against vLLM's own grouping ---------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["gemma-3-27b", "gemma-3-1b", "gpt-oss-120b", "gemma-2-27b", "qwen3-next-80b-a3b"])
def test_groups_and_bytes_per_block_equal_vllms(name: str) -> None:
    pytest.importorskip("vllm.v1.core.kv_cache_utils", reason="vLLM is not importable")
    import torch
    try:  # 0.32
        from vllm.v1.core.kv_cache_utils import (
            _get_kv_cache_bytes_per_block,
            _get_kv_cache_groups_uniform_page_size,
        )
    except ImportError:  # 0.33+ moved the planning into its own module
        from vllm.v1.core.kv_cache_planning import (
            _get_kv_cache_bytes_per_block,
            _get_kv_cache_groups_uniform_page_size,
        )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        MambaSpec,
        SlidingWindowSpec,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = kl.kv_layout(name)
    B = layout.block_size(16)
    page = layout.page_bytes(B)
    specs = {}
    for g in sorted(layout.groups, key=lambda g: g.layers[0]):
        s = g.spec
        for i in g.layers:
            if s.kind == "mamba":  # one state tensor of the right size, padded to the attention page
                specs[i] = MambaSpec(shapes=((s.state_bytes // 2,),), dtypes=(torch.bfloat16,), block_size=B,
                                     page_size_padded=page)
            elif s.kind == "sliding_window":
                specs[i] = SlidingWindowSpec(block_size=B, num_kv_heads=s.kv_heads, head_size=s.head_dim,
                                             dtype=torch.bfloat16, sliding_window=s.window)
            else:
                specs[i] = FullAttentionSpec(block_size=B, num_kv_heads=s.kv_heads, head_size=s.head_dim,
                                             dtype=torch.bfloat16)
    ordered = {f"model.layers.{i}.attn": specs[i] for i in sorted(specs)}
    groups = _get_kv_cache_groups_uniform_page_size(ordered)
    assert [tuple(int(n.split(".")[2]) for n in g.layer_names) for g in groups] == [g.layers for g in layout.groups]
    assert _get_kv_cache_bytes_per_block(groups, KVCacheLayout.LBHNC) == layout.bytes_per_block(B)


def test_the_stage_notes_say_how_a_hybrid_model_is_simulated() -> None:
    """Gemma 3 27B: 52 of 62 layers slide over 1,024 tokens; the note says the grid runs vLLM's
    rules per group and, for an 8,000-token prompt, how much less memory a cached token takes
    than the full-attention count. Qwen3-Next's Mamba layers are not modelled, and the note says
    so. A full-attention model gets no note."""
    geom = kv.resolve_model("gemma-3-27b")
    note = kl.kv_layout("gemma-3-27b").hybrid_note(geom, 16, 8000)
    assert note is not None and "sliding_window (window 1024): 52 layers, full: 10 layers" in note
    assert "simulated with vLLM's rules per group" in note and "blocks of 1,310,720 B at block size 16" in note
    assert "8,000-token prompt keeps" in note
    short = kl.kv_layout("gemma-3-27b").hybrid_note(geom, 16, 500)  # within one window: no overstatement
    assert short is not None and "prompt keeps" not in short
    mamba = kl.kv_layout("qwen3-next-80b-a3b").hybrid_note(kv.resolve_model("qwen3-next-80b-a3b"), 16, 8000)
    assert mamba is not None and "approximate" in mamba and "not modelled" in mamba and "block size 544" in mamba
    assert kl.kv_layout("llama-3.1-8b").hybrid_note(kv.resolve_model("llama-3.1-8b"), 16, 8000) is None


def test_which_layouts_the_hybrid_simulator_runs() -> None:
    assert kl.kv_layout("gpt-oss-20b").hybrid_sim_groups() == (("sliding_window", 128), ("full", None))
    assert kl.kv_layout("gemma-3-27b").hybrid_sim_groups() == (("sliding_window", 1024),) * 6 + (("full", None),)
    assert kl.kv_layout("llama-3.1-8b").hybrid_sim_groups() is None  # one full-attention group: PrefixCache
    assert kl.kv_layout("llama-4-scout").hybrid_sim_groups() is None  # vLLM 0.32's default: no hybrid manager
    assert kl.kv_layout("llama-4-scout", hybrid_manager=True).hybrid_sim_groups() is not None
    assert kl.kv_layout("qwen3-next-80b-a3b").hybrid_sim_groups() is None  # Mamba: full-attention approximation


@pytest.mark.parametrize("name", kv.catalog_names())
def test_the_pool_geometry_gives_kvmemory_the_layouts_bytes_per_block(name: str) -> None:
    """kvmemory's pool arithmetic on `pool_geometry` is the layout's, at every block size vLLM
    runs; a geometry without a pool (a full-attention model) is unchanged."""
    layout = kl.kv_layout(name)
    geom = kv.resolve_model(name)
    pooled = layout.pool_geometry(geom)
    for requested in (16, 32, 64, 128):
        B = layout.block_size(requested)
        assert kv.bytes_per_block(pooled, B) == layout.bytes_per_block(B)
        assert kv.blocks_for_kv_bytes(pooled, B, 40 * kv.GIB) == layout.blocks_for_kv_bytes(40 * kv.GIB, B)
    if not layout.needs_hybrid_cache and layout.groups[0].kind != "mamba":
        assert kv.bytes_per_block(pooled, 16) == kv.bytes_per_block(geom, 16)


def test_admission_and_start_up_needs_by_hand() -> None:
    """gpt-oss-20b at B=16, window 128: a 4,096-token sequence takes 256 blocks in each group when
    computed in one step; with 2 x 2,048 tokens in flight the sliding group's admission is capped at
    cdiv(127 + 4,096, 16) + 1 = 265 blocks, which a longer one hits. vLLM's start-up check for
    --max-model-len 8,192: 12 full layers x 512 pages + 12 sliding layers x 265 pages."""
    layout = kl.kv_layout("gpt-oss-20b")
    assert layout.admission_blocks(4096, 16) == 512
    assert layout.admission_blocks(4096, 16, max_in_flight_tokens=4096) == 256 + 256
    assert layout.admission_blocks(8192, 16, max_in_flight_tokens=4096) == 512 + 265
    page = 16 * 2 * 8 * 64 * 2  # one layer, one block
    assert layout.startup_bytes(8192, 16, 4096) == 12 * 512 * page + 12 * 265 * page
    usable = 777  # (12 x 512 + 12 x 265) layer pages / 12 layers per block id
    assert layout.longest_startable(usable, 16, 4096, 1 << 20) == 8192
    assert layout.longest_startable(usable - 1, 16, 4096, 1 << 20) == 8176  # one block less in the full group


def test_the_report_gets_the_layout_in_words_and_numbers() -> None:
    d = kl.kv_layout("gpt-oss-20b").as_dict(16)
    assert d["hybrid"] and d["simulated_exactly"] and d["bytes_per_block"] == 393_216
    assert [(g["kind"], g["bytes_per_token"], g["pool_bytes_per_token"]) for g in d["groups"]] == [
        ("sliding_window", 24_576, 24_576), ("full", 24_576, 24_576)]
    assert "2 groups of up to 12 layers" in d["description"]
    q = kl.kv_layout("qwen3-next-80b-a3b").as_dict(16)
    assert q["block_size"] == 544 and q["requested_block_size"] == 16 and not q["simulated_exactly"]


# --- against vLLM's own start-up arithmetic ----------------------------------------------------


def vllm_layer_specs(layout: kl.KVLayout, B: int) -> dict[str, object]:
    """vLLM's per-layer KV cache specs for `layout` at block size B, in layer order."""
    import torch
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        SlidingWindowSpec,
    )

    page = layout.page_bytes(B)
    specs = {}
    for g in layout.groups:
        s = g.spec
        common = dict(block_size=B, num_kv_heads=s.kv_heads, head_size=s.head_dim,
                      dtype=torch.bfloat16 if s.dtype_bytes == 2 else torch.float8_e4m3fn)
        for i in g.layers:
            if s.kind == "mamba":
                specs[i] = MambaSpec(shapes=((s.state_bytes // 2,),), dtypes=(torch.bfloat16,), block_size=B,
                                     page_size_padded=page, mamba_cache_mode="align")
            elif s.kind == "sliding_window":
                specs[i] = SlidingWindowSpec(**common, sliding_window=s.window)
            elif s.kind == "chunked_local":
                specs[i] = ChunkedLocalAttentionSpec(**common, attention_chunk_size=s.window)
            else:
                specs[i] = FullAttentionSpec(**common)
    return {f"model.layers.{i}.attn": specs[i] for i in sorted(specs)}


def vllm_startup_bytes(layout: kl.KVLayout, B: int, max_model_len: int, max_in_flight_tokens: int) -> int:
    """vLLM's own `max_memory_usage_bytes` summed over the layers (check_enough_kv_cache_memory)."""
    from types import SimpleNamespace

    config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=max_model_len),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        cache_config=SimpleNamespace(mamba_cache_mode="align"), max_in_flight_tokens=max_in_flight_tokens)
    return sum(spec.max_memory_usage_bytes(config) for spec in vllm_layer_specs(layout, B).values())


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["gpt-oss-20b", "gemma-3-27b", "gemma-2-9b", "qwen3-next-80b-a3b"])
def test_start_up_bytes_equal_vllms(name: str) -> None:
    pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not importable")
    layout = kl.kv_layout(name)
    for requested, M, in_flight in ((16, 2048, 16384), (16, 40_000, 4096), (64, 131_072, 8192)):
        B = layout.block_size(requested)
        assert layout.startup_bytes(M, B, in_flight) == vllm_startup_bytes(layout, B, M, in_flight), (requested, M)
