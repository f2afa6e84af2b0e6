"""Block streams: simulate hashes tokens.parquet row group by row group, in shards, and keeps the
dense block ids in the run folder (advisor.sim.blockstreams).

The reference is the in-memory path every other test runs: `load_workload` with all token ids,
`configuration.logged_block_traces` hashing them at once, `simulate_grid` over that. The streamed
path must give the same ids and offsets (whatever the shards), the same tables, and the same
files byte for byte; a rerun must read the streams instead of hashing, and a changed input must
hash again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.executor import ExecutorOptions
from advisor.runfolder import write_table
from advisor.sim import blockstreams
from advisor.sim.blockstreams import StreamInputs, open_streams
from advisor.sim.configuration import SimulateOptions, logged_block_traces
from advisor.sim.fast.trace import BlockTrace, Interner
from advisor.sim.grid import simulate_grid
from advisor.sim.stage import run_simulate
from advisor.workload import load_workload

SIZES = (4, 8, 16)
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- run folders ---
def write_run(root: Path, reqs: Sequence[Sequence[int]], rows_per_group: int = 3, **columns: Sequence[Any]) -> Path:
    """requests.parquet + tokens.parquet from the schemas, tokens in row groups of
    `rows_per_group` rows; `columns`: more request columns (lora, cache_salt, model, n, ...).
    An empty request is one tokenize refused: ids [], n_tokens 0."""
    n = len(reqs)
    ids = [f"req-{i}" for i in range(n)]
    requests = {name: [None] * n for name in schema.REQUESTS.names}
    requests.update(request_id=ids, line=list(range(1, n + 1)), kind=[schema.KIND_TOKENS] * n,
                    format=[schema.FORMAT_COMPLETION] * n, prompt_token_ids=[list(r) for r in reqs],
                    timestamp=[0.25 * i for i in range(n)], output_tokens=[1 + i % 5 for i in range(n)])
    requests.update({k: list(v) for k, v in columns.items()})
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(requests, schema=schema.REQUESTS), root / "requests.parquet")
    tokens = {name: [None] * n for name in schema.TOKENS.names}
    tokens.update(request_id=ids, token_ids=[list(r) for r in reqs], n_tokens=[len(r) for r in reqs])
    pq.write_table(pa.Table.from_pydict(tokens, schema=schema.TOKENS), root / "tokens.parquet",
                   row_group_size=rows_per_group)
    return root


def write_trace_run(root: Path, hash_ids: Sequence[Sequence[int]], lengths: Sequence[int], block_size: int) -> Path:
    n = len(hash_ids)
    ids = [f"t-{i}" for i in range(n)]
    requests = {name: [None] * n for name in schema.REQUESTS.names}
    requests.update(request_id=ids, line=list(range(1, n + 1)), kind=[schema.KIND_HASH_TRACE] * n,
                    format=["mooncake"] * n, hash_ids=[list(h) for h in hash_ids], input_length=list(lengths),
                    trace_block_size=[block_size] * n, timestamp=[float(i) for i in range(n)])
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(requests, schema=schema.REQUESTS), root / "requests.parquet", row_group_size=2)
    tokens = {name: [None] * n for name in schema.TOKENS.names}
    tokens.update(request_id=ids, n_tokens=list(lengths))
    pq.write_table(pa.Table.from_pydict(tokens, schema=schema.TOKENS), root / "tokens.parquet")
    return root


def inputs_of(run: Path) -> StreamInputs:
    lean = load_workload(run / "requests.parquet", run / "tokens.parquet", ids=False)
    return StreamInputs.of(lean, run / "requests.parquet", run / "tokens.parquet")


def same_trace(a: BlockTrace, b: BlockTrace) -> bool:
    return (a.block_size == b.block_size and a.num_ids == b.num_ids and np.array_equal(a.ids, b.ids)
            and np.array_equal(a.offsets, b.offsets) and np.array_equal(a.num_tokens, b.num_tokens))


# --- workloads: shared system prompts, resent histories, and every per-request column that matters ---
@st.composite
def logs(draw: st.DrawFn) -> tuple[list[list[int]], dict[str, list[Any]]]:
    systems = draw(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=20), min_size=1, max_size=3))
    reqs: list[list[int]] = []
    for _ in range(draw(st.integers(1, 24))):
        if reqs and draw(st.booleans()):  # the next turn resends an earlier request's history
            base = draw(st.sampled_from(reqs))
        else:
            base = draw(st.sampled_from(systems))
        reqs.append(list(base) + draw(st.lists(st.integers(1, 40), max_size=12)))
    n = len(reqs)
    for i in draw(st.sets(st.integers(0, n - 1), max_size=2)):  # refused at tokenization
        reqs[i] = []
    pick = lambda values: draw(st.lists(st.sampled_from(values), min_size=n, max_size=n))  # noqa: E731
    columns = {"lora": pick([None, None, "ad"]), "cache_salt": pick([None, None, "s1"]),
               "model": pick(["m1"]) if draw(st.booleans()) else pick(["m1", "m2"]),
               "n": pick([None, 1, 1, 3]), "prompt_logprobs": pick([None, None, None, 2]),
               "session_id": pick(["a", "b"])}
    return reqs, columns


# --- the intern table ---
@SOME
@given(st.lists(st.integers(0, 60), max_size=300), st.lists(st.integers(0, 300), max_size=6), st.booleans())
def test_interning_in_pieces_numbers_keys_by_first_appearance_as_at_once(raw: list[int], cuts: list[int],
                                                                         compiled: bool) -> None:
    keys = (np.asarray(raw, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(12345)
    first: dict[int, int] = {}
    expected = [first.setdefault(int(k), len(first)) for k in keys]
    interner = Interner(compiled)
    pieces = np.split(keys, sorted(c for c in cuts if c <= len(keys)))
    got = [int(i) for piece in pieces for i in interner.add(piece)]
    assert got == expected and interner.num_ids == len(first)


def test_the_compiled_table_grows_past_its_first_size_and_keeps_every_id() -> None:
    keys = np.arange(5000, dtype=np.uint64) * np.uint64(1 << 20)  # equal low bits: long probe runs
    interner = Interner()
    assert interner.add(keys[:3000]).tolist() == list(range(3000))
    assert interner.add(keys[::-1]).tolist() == list(range(3000, 5000)) + list(range(2999, -1, -1))
    assert interner.num_ids == 5000


# --- sharding equals hashing at once ---
@SOME
@given(logs(), st.integers(1, 5), st.integers(1, 80))
def test_streamed_shards_give_the_ids_and_offsets_of_hashing_at_once(tmp_path_factory: pytest.TempPathFactory,
                                                                     log: tuple[list[list[int]], dict[str, list[Any]]],
                                                                     rows_per_group: int, shard_tokens: int) -> None:
    reqs, columns = log
    run = write_run(tmp_path_factory.mktemp("run"), reqs, rows_per_group, **columns)
    full = load_workload(run / "requests.parquet", run / "tokens.parquet")
    expected = logged_block_traces(full, SIZES)
    streamed, counts = open_streams(inputs_of(run), SIZES, shard_tokens=shard_tokens)
    assert all(same_trace(streamed[bs], expected[bs]) for bs in SIZES)
    groups = -(-len(reqs) // rows_per_group)
    assert 1 <= counts.shards <= groups and counts.hashed == SIZES and counts.reused == ()


def test_worker_processes_hash_the_shards_to_the_same_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    system = rng.integers(0, 500, 40).tolist()
    reqs = [system + rng.integers(0, 500, int(rng.integers(0, 60))).tolist() for _ in range(60)]
    run = write_run(tmp_path / "run", reqs, rows_per_group=7, lora=[None, "x"] * 30)
    expected = logged_block_traces(load_workload(run / "requests.parquet", run / "tokens.parquet"), SIZES)
    streamed, counts = open_streams(inputs_of(run), SIZES, tmp_path / "blocks", ExecutorOptions(workers=2),
                                    shard_tokens=200)
    assert counts.shards >= 4
    assert all(same_trace(streamed[bs], expected[bs]) for bs in SIZES)


def test_a_hash_trace_streams_its_ids_from_requests_parquet(tmp_path: Path) -> None:
    ids = [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [9], [1, 2, 3, 5, 6]]
    lengths = [3 * 512, 2 * 512 + 100, 4 * 512, 300, 5 * 512]
    run = write_trace_run(tmp_path / "run", ids, lengths, 512)
    full = load_workload(run / "requests.parquet", run / "tokens.parquet")
    lean = load_workload(run / "requests.parquet", run / "tokens.parquet", ids=False)
    assert lean.is_hash_trace and not lean.has_ids and full.has_ids
    streamed, counts = open_streams(inputs_of(run), (512,), tmp_path / "blocks", shard_tokens=1)
    assert counts.shards == 3 and same_trace(streamed[512], logged_block_traces(full, (512,))[512])
    # request 2 shares blocks 1-3 with request 0 and adds its own; request 3's 300 tokens fill no block
    assert streamed[512].ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4]


# --- the stage: exact outputs, streams kept and read back ---
def grid_files(run: Path, options: SimulateOptions, out: Path) -> dict[str, bytes]:
    """Today's path written as the stage writes it: all ids held, hashed in memory."""
    full = load_workload(run / "requests.parquet", run / "tokens.parquet")
    if full.is_hash_trace:
        options = replace(options, block_sizes=(full.trace_block_size,))
    grid = simulate_grid(full, options, kv.resolve_model(options.model) if options.model else None)
    out.mkdir(parents=True, exist_ok=True)
    for name, table, sch in (("sim.parquet", grid.sim, schema.SIM), ("sim_requests.parquet", grid.sim_requests,
                                                                     schema.SIM_REQUESTS),
                             ("replicas.parquet", grid.replicas, schema.REPLICAS),
                             ("offload.parquet", grid.offload, schema.OFFLOAD)):
        write_table(out / name, table, sch)
    return {p.name: p.read_bytes() for p in out.glob("*.parquet")}


def stage_files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes()
            for name in ("sim.parquet", "sim_requests.parquet", "replicas.parquet", "offload.parquet")}


OPTIONS = SimulateOptions(block_sizes=(4, 16), workers=1, sweep_points=4, replicas=(1, 2),
                          routers=("round-robin", "prefix-hash"))


@FEW
@given(logs(), st.sampled_from([OPTIONS, replace(OPTIONS, model="llama-3.1-8b", offload_gib=(0, 0.001)),
                                replace(OPTIONS, speculative="eagle", vllm_version="0.32", reference_budgets=0)]))
def test_the_stage_writes_todays_files_byte_for_byte(tmp_path_factory: pytest.TempPathFactory,
                                                     log: tuple[list[list[int]], dict[str, list[Any]]],
                                                     options: SimulateOptions) -> None:
    reqs, columns = log
    if not any(len(r) >= 4 for r in reqs):
        reqs = reqs + [list(range(1, 9))]
        columns = {k: v + v[:1] for k, v in columns.items()}
    run = write_run(tmp_path_factory.mktemp("run"), reqs, 2, **columns)
    expected = grid_files(run, options, tmp_path_factory.mktemp("today"))
    run_simulate(run, options)
    assert stage_files(run) == expected


def test_a_hash_trace_stage_writes_todays_files(tmp_path: Path) -> None:
    run = write_trace_run(tmp_path / "run", [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [9]] * 3,
                          [3 * 16, 2 * 16 + 5, 4 * 16, 10] * 3, 16)
    expected = grid_files(run, SimulateOptions(workers=1), tmp_path / "today")
    outcome = run_simulate(run, SimulateOptions(workers=1))
    assert stage_files(run) == expected and outcome.counts["block_streams"]["hashed"] == [16]


class CountingShards:
    """Counts the shards hashed (a spy on blockstreams.hash_shard, run inline)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, ...]] = []
        real = blockstreams.hash_shard

        def spy(shard: blockstreams.Shard) -> dict[int, np.ndarray]:
            self.calls.append(shard.block_sizes)
            return real(shard)

        monkeypatch.setattr(blockstreams, "hash_shard", spy)


def chat_run(root: Path) -> Path:
    rng = np.random.default_rng(11)
    systems = [rng.integers(0, 300, 37).tolist(), rng.integers(0, 300, 70).tolist()]
    reqs, history = [], {}
    for i in range(40):
        c = int(rng.integers(0, 6))
        history[c] = history.get(c, systems[c % 2]) + rng.integers(0, 300, int(rng.integers(1, 30))).tolist()
        reqs.append(list(history[c]))
    return write_run(root, reqs, rows_per_group=8, cache_salt=[None] * 35 + ["s"] * 5)


def test_a_rerun_with_other_budgets_reads_the_streams_and_matches_a_fresh_run(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spy = CountingShards(monkeypatch)
    run = chat_run(tmp_path / "run")
    first = run_simulate(run, replace(OPTIONS, block_sizes=(16, 32)))
    assert first.counts["block_streams"]["hashed"] == [16, 32] and spy.calls == [(16, 32)]
    assert sorted(p.name for p in (run / "blocks").iterdir()) == ["b16.json", "b16.npy", "b32.json", "b32.npy"]
    spy.calls.clear()
    other = replace(OPTIONS, block_sizes=(16, 32), num_blocks=(30, 90), policies=("lru",), replicas=(1, 3))
    again = run_simulate(run, other)
    assert not again.skipped and spy.calls == []  # simulated again, hashed nothing
    assert again.counts["block_streams"] == {**first.counts["block_streams"], "hashed": [], "reused": [16, 32],
                                             "shards": 0}
    fresh = chat_run(tmp_path / "fresh")
    run_simulate(fresh, other)
    assert stage_files(run) == stage_files(fresh)
    # a new block size hashes that size only, in one pass
    spy.calls.clear()
    wider = run_simulate(run, replace(other, block_sizes=(16, 32, 64)))
    assert spy.calls == [(64,)] and wider.counts["block_streams"]["reused"] == [16, 32]


def test_an_edited_tokens_file_or_other_salts_hash_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = CountingShards(monkeypatch)
    run = chat_run(tmp_path / "run")
    options = replace(OPTIONS, block_sizes=(16,))
    run_simulate(run, options)
    tokens = pq.read_table(run / "tokens.parquet")
    edited = tokens["token_ids"].to_pylist()
    edited[3][0] += 1
    pq.write_table(tokens.set_column(1, "token_ids", pa.array(edited, pa.list_(pa.int32()))), run / "tokens.parquet",
                   row_group_size=8)
    spy.calls.clear()
    assert run_simulate(run, options).counts["block_streams"]["hashed"] == [16] and spy.calls == [(16,)]
    fresh = write_run(tmp_path / "fresh", edited, rows_per_group=8, cache_salt=[None] * 35 + ["s"] * 5)
    run_simulate(fresh, options)
    assert stage_files(run) == stage_files(fresh)
    # the same tokens under other salts are other blocks
    req = pq.read_table(run / "requests.parquet")
    pq.write_table(req.set_column(req.schema.get_field_index("cache_salt"), "cache_salt",
                                  pa.array([None] * 40, pa.string())), run / "requests.parquet")
    spy.calls.clear()
    assert run_simulate(run, options).counts["block_streams"]["hashed"] == [16] and spy.calls == [(16,)]


@pytest.mark.parametrize("damage", ["no_json", "other_key", "short_ids"])
def test_a_stream_that_cannot_be_trusted_is_hashed_again(tmp_path: Path, damage: str) -> None:
    run = chat_run(tmp_path / "run")
    inputs = inputs_of(run)
    blocks = tmp_path / "blocks"
    expected = {16: replace(open_streams(inputs, (16,), blocks)[0][16], ids=np.load(blocks / "b16.npy"))}
    if damage == "no_json":  # as a crash between the two files leaves it
        (blocks / "b16.json").unlink()
    elif damage == "other_key":
        meta = json.loads((blocks / "b16.json").read_text())
        (blocks / "b16.json").write_text(json.dumps({**meta, "key": "0" * 64}))
    else:
        ids = np.load(blocks / "b16.npy")
        np.save(blocks / "b16.npy", ids[:-1])
    got, counts = open_streams(inputs, (16,), blocks)
    assert counts.hashed == (16,) and same_trace(got[16], expected[16])
    assert open_streams(inputs, (16,), blocks)[1].reused == (16,)


def test_token_counts_that_disagree_with_the_ids_name_the_fix(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [[1, 2, 3, 4, 5], [1, 2, 3, 4]])
    tokens = pq.read_table(run / "tokens.parquet")
    pq.write_table(tokens.set_column(2, "n_tokens", pa.array([5, 7], pa.int64())), run / "tokens.parquet")
    with pytest.raises(AdvisorError, match="tokenize RUN_DIR --force"):
        open_streams(inputs_of(run), (4,))


def test_the_lean_workload_has_every_per_request_column_and_no_ids(tmp_path: Path) -> None:
    reqs = [[1, 2, 3, 4, 5], [], [1, 2, 3, 4, 6, 7]]
    run = write_run(tmp_path / "run", reqs, lora=[None, "a", None], cache_salt=["s", None, None], n=[1, 2, None],
                    model=["x", "y", "x"], prompt_logprobs=[None, None, 1], session_id=["u", "v", "u"])
    full = load_workload(run / "requests.parquet", run / "tokens.parquet")
    lean = load_workload(run / "requests.parquet", run / "tokens.parquet", ids=False)
    assert full.has_ids and not lean.has_ids and lean.token_values is None
    for name in ("n_tokens", "output_tokens", "timestamps", "n", "skip_prefix_cache"):
        assert np.array_equal(getattr(lean, name), getattr(full, name)), name
    for name in ("lora", "cache_salt", "sessions", "request_models", "models", "namespaces"):
        assert getattr(lean, name) == getattr(full, name), name
    assert lean.request_ids.equals(full.request_ids) and lean.n_tokens.tolist() == [5, 0, 6]
