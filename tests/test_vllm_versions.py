"""advisor.vllm_versions: the per-version table, its rules with hand-checked values, the
version the user names (--vllm-version) reaching simulate, recommend, report and replay,
and the table's citations against the vLLM installed here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from advisor import kvmemory as kv
from advisor import vllm_versions as vv
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.recommend.options import RecommendOptions, resolve_options
from advisor.replay.stage import version_note
from advisor.report.facts import serve_heading
from advisor.sim.configuration import SimulateOptions

SAMPLE_TRACE = Path(__file__).resolve().parent.parent / "sample_logs" / "hash_trace_small.jsonl"


# --- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", vv.KNOWN_VERSIONS)
def test_batch_defaults_follow_the_gpu_tier(version: str) -> None:
    # (max_num_seqs, max_num_batched_tokens) of `vllm serve`, EngineArgs.get_batch_defaults
    assert kv.vllm_batch_defaults("h100", version) == (1024, 8192)  # 80 GiB
    assert kv.vllm_batch_defaults("h200", version) == (1024, 8192)  # 141 GiB: below 160
    assert kv.vllm_batch_defaults(180, version) == (1024, 16384)  # B200-class
    assert kv.vllm_batch_defaults("a100-80gb", version) == (256, 2048)  # A100s stay small
    assert kv.vllm_batch_defaults("80", version) == (1024, 8192)  # a bare size has no name
    assert kv.vllm_batch_defaults("l4", version) == (256, 2048)
    assert kv.vllm_batch_defaults(None, version) == (256, 2048)  # no device: vLLM's fallback


def test_gb10_leaves_the_large_tier_from_0_33() -> None:
    # 128 GiB of unified memory: 0.32 sized it up; 0.33 keeps it small (its capability 12.1).
    assert vv.batch_defaults("0.32", 128, "gb10") == (1024, 8192)
    assert vv.batch_defaults("0.33", 128, "gb10") == (256, 2048)
    assert vv.batch_defaults("0.34", 128, "nvidia-dgx-spark") == (256, 2048)
    assert vv.batch_defaults("0.34", 128, "") == (1024, 8192)


def test_default_block_size_per_version_and_backend() -> None:
    assert [vv.default_block_size(v) for v in ("0.32", "0.33", "0.34")] == [16, 16, 64]
    assert [vv.default_block_size(v, "cpu") for v in ("0.32", "0.33", "0.34")] == [128, 128, 128]
    for v in vv.KNOWN_VERSIONS:  # the defaults are valid sizes for their kernels
        b = vv.facts(v).block_size
        assert b.gpu % b.gpu_multiple == 0 and b.cpu % b.cpu_multiple == 0
    with pytest.raises(AdvisorError, match="use cuda or cpu"):
        vv.default_block_size("0.34", "tpu")


def test_memory_sizing_and_eagle_rules_per_version() -> None:
    assert (vv.facts("0.32").memory.gpu_memory_utilization, vv.facts("0.32").memory.after_warmup) == (0.92, False)
    assert (vv.facts("0.33").memory.gpu_memory_utilization, vv.facts("0.33").memory.after_warmup) == (0.92, False)
    assert (vv.facts("0.34").memory.gpu_memory_utilization, vv.facts("0.34").memory.after_warmup) == (1.0, True)
    assert "--kv-cache-memory-bytes" in vv.facts("0.34").memory.pinned_by
    assert vv.facts("0.32").eagle.drops_last_hit_block and not vv.facts("0.34").eagle.drops_last_hit_block
    assert all(vv.facts(v).scheduling.async_default_on_gpu and vv.facts(v).hybrid.default_on
               for v in vv.KNOWN_VERSIONS)


@pytest.mark.parametrize("text, want", [
    ("0.34", "0.34"), ("0.34.0", "0.34"), ("v0.34.1", "0.34"), (" 0.32.0+cpu ", "0.32"),
    ("0.33.0rc1", "0.33"), (None, vv.DEFAULT_VLLM_VERSION),
])
def test_version_strings_resolve_to_the_table(text: str | None, want: str) -> None:
    assert vv.resolve_vllm_version(text) == want


@pytest.mark.parametrize("text", ["0.35", "0.31.2", "1.0", "latest", ""])
def test_an_unknown_version_names_the_known_ones_and_the_assumption(text: str) -> None:
    with pytest.raises(AdvisorError) as e:
        vv.resolve_vllm_version(text)
    assert "0.32, 0.33, 0.34" in str(e.value)
    assert "0.34 (the newest known) is assumed" in str(e.value)


def test_the_default_is_the_newest_known() -> None:
    assert vv.DEFAULT_VLLM_VERSION == "0.34" == vv.KNOWN_VERSIONS[-1]


# --- options -----------------------------------------------------------------------------


def test_simulate_and_recommend_options_resolve_the_version() -> None:
    assert SimulateOptions().vllm_version == vv.DEFAULT_VLLM_VERSION
    assert SimulateOptions(vllm_version="v0.32.1").vllm_version == "0.32"
    with pytest.raises(AdvisorError, match="not one pc-advise knows"):
        SimulateOptions(vllm_version="0.31")
    # recommend takes what simulate ran with; a record without it (older run folders): the default
    assert resolve_options(RecommendOptions(), {"vllm_version": "0.32"}).vllm_version == "0.32"
    assert resolve_options(RecommendOptions(), {}).vllm_version == vv.DEFAULT_VLLM_VERSION
    assert resolve_options(RecommendOptions(vllm_version="0.33.2"), {"vllm_version": "0.32"}).vllm_version == "0.33"


def test_the_report_heading_and_the_replay_note_name_the_version() -> None:
    assert serve_heading({"vllm_version": "0.34"}) == "Run vLLM 0.34 with"
    assert serve_heading({}) == "Run vLLM with"  # recommendation.json written before the field
    assert version_note("0.34.0", "0.34") is None
    assert version_note(None, "0.34") is None and version_note("0.32.0", None) is None
    note = version_note("0.32.0", "0.34")
    assert note is not None and "runs vLLM 0.32.0" in note and "the recommended flags are for 0.34" in note
    assert "has not checked 0.35.0" in (version_note("0.35.0", "0.34") or "")


def test_cli_vllm_version_changes_the_serve_line_and_its_labels(tmp_path: Path) -> None:
    """A hash trace (512-token blocks) is served at the version's default block size, so the
    block size and the block count both follow --vllm-version; the note and the report say which."""
    runner = CliRunner()

    def run(version: str) -> tuple[dict, str, dict]:
        out = tmp_path / version
        res = runner.invoke(main, ["run", str(SAMPLE_TRACE), "-o", str(out), "--no-replay", "--vllm-version",
                                   version, "--modes", "sequential", "--policies", "lru", "-q"])
        assert res.exit_code == 0, res.output
        manifest = json.loads((out / "manifest.json").read_text())
        return (json.loads((out / "recommendation.json").read_text()), (out / "report.md").read_text(),
                manifest["stages"]["simulate"]["options"])

    for version, block_size in (("0.32", 16), ("v0.34.0", 64)):
        rec, report, simulated = run(version)
        minor = vv.resolve_vllm_version(version)
        assert simulated["vllm_version"] == rec["vllm_version"] == minor
        trace_blocks = rec["recommended"]["num_blocks"]
        blocks = math.ceil(trace_blocks * 512 / block_size)
        assert f"--block-size {block_size} --num-gpu-blocks-override {blocks + 1}" in rec["vllm_serve"]
        assert any(r.startswith(f"Flags for vLLM {minor} (--vllm-version)") for r in rec["reasoning"])
        assert f"Run vLLM {minor} with:" in report
    bad = runner.invoke(main, ["simulate", str(tmp_path / "0.32"), "--vllm-version", "0.29"])
    assert bad.exit_code == 1 and "not one pc-advise knows" in bad.output


# --- against vLLM ------------------------------------------------------------------------


def _installed_vllm() -> tuple[str, Path]:
    import vllm

    return vllm.__version__, Path(vllm.__file__).parent


@pytest.mark.oracle
def test_the_oracle_runs_against_the_vllm_ci_asked_for() -> None:
    """CI's second oracle pass sets PC_ADVISE_ORACLE_VLLM=0.34 and puts that vLLM first on
    PYTHONPATH; this fails if the oracle silently imported another one."""
    want = os.environ.get("PC_ADVISE_ORACLE_VLLM")
    if not want:
        pytest.skip("PC_ADVISE_ORACLE_VLLM is not set: the oracle runs against whichever vLLM is installed")
    version, where = _installed_vllm()
    assert version == want or version.startswith(want + "."), f"vLLM {version} from {where}, not {want}"


@pytest.mark.oracle
def test_the_table_cites_files_and_names_that_exist_in_the_installed_vllm() -> None:
    version, root = _installed_vllm()
    minor = vv.minor_version(version)
    if minor not in vv.TABLE:
        pytest.skip(f"vLLM {version} is not in advisor.vllm_versions' table")
    for source in vv.facts(minor).sources():
        path = root / source.path
        assert path.is_file(), f"{source} cited for {minor}: no such file in {root}"
        text = path.read_text(encoding="utf-8")
        for part in source.name.split("."):
            assert part in text, f"{source} cited for {minor}: {part!r} is not in {path}"
