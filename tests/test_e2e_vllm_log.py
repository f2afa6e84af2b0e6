"""End to end from vLLM's own server log: the prompt ids vLLM logged reach the simulator
untouched (no tokenizer is loaded), and the report says which format was read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from advisor.cli import main

LOG = Path(__file__).resolve().parent / "fixtures" / "vllm_server.log"


def test_the_pipeline_runs_on_the_ids_vllm_logged(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, [str(LOG), "-o", str(tmp_path), "--no-replay", "--json", "--log-year", "2026"],
                             env={"PC_ADVISE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    stages = json.loads(res.stdout)["stages"]
    assert stages["ingest"]["by_format"] == {"vllm-log": 13} and stages["ingest"]["rejected"] == 0
    tok = stages["tokenize"]
    assert tok["tokenizer"] is None and tok["by_kind"] == {"tokens": 13}  # no tokenizer was loaded
    assert not (tmp_path / "cache").exists()  # not even built

    logged = [json.loads(m.group(1)) for m in re.finditer(r"prompt_token_ids: (\[[\d, ]*\])", LOG.read_text())]
    tokens = pq.read_table(tmp_path / "tokens.parquet").to_pylist()
    assert [t["token_ids"] for t in tokens] == logged
    assert sum(t["n_tokens"] for t in tokens) == stages["simulate"]["prompt_tokens"] == sum(map(len, logged))

    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "vllm-log 13" in md
