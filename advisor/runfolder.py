"""The run folder: artifact paths, atomic writes, and manifest.json.

A run folder holds every artifact of one analysis (docs/design.md §2). Every file is
written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written artifact. `manifest.json` records,
per stage, a fingerprint of its inputs and options; a stage whose fingerprint
is unchanged is skipped on rerun, and because each fingerprint covers the
checksums of the upstream artifacts, a change upstream invalidates everything
after it. The fingerprint also covers the tool's own code (`code_digest`), so an
upgrade, or an edit in a development checkout, reruns the stages it may change.

`RunDir.run_stage` is the bookkeeping every stage function goes through: fingerprint the
inputs and options, skip when fresh, otherwise run, time and record.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from advisor.errors import MissingStage
from advisor.version import __version__

# Artifact file names (docs/design.md §2).
REQUESTS = "requests.parquet"
REJECTS = "rejects.jsonl"
TOKENS = "tokens.parquet"
PREFIXES = "prefixes.parquet"
CLUSTERS = "clusters.parquet"
STATS = "stats.json"
SIM = "sim.parquet"
SIM_REQUESTS = "sim_requests.parquet"
REPLICAS = "replicas.parquet"
OFFLOAD = "offload.parquet"
RECOMMENDATION = "recommendation.json"
REPLAY = "replay.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline as the run folder sees it: what it reads and writes
    (`LOG` is the log itself). advisor.pipeline binds each to its function."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


LOG = "LOG"
# The pipeline in order: the one declaration of which stage reads and writes what.
STAGES = (
    StageSpec("ingest", (LOG,), (REQUESTS, REJECTS)),
    StageSpec("tokenize", (REQUESTS,), (TOKENS,)),
    StageSpec("analyze", (REQUESTS, TOKENS), (PREFIXES, CLUSTERS, STATS)),
    StageSpec("simulate", (REQUESTS, TOKENS), (SIM, SIM_REQUESTS, REPLICAS, OFFLOAD)),
    StageSpec("recommend", (SIM, STATS, REQUESTS, REPLICAS, OFFLOAD), (RECOMMENDATION,)),
    StageSpec("replay", (REQUESTS, TOKENS, RECOMMENDATION, SIM_REQUESTS), (REPLAY,)),
    StageSpec("report", (MANIFEST, REJECTS, STATS, PREFIXES, CLUSTERS, REQUESTS, SIM, SIM_REQUESTS,
                         RECOMMENDATION, REPLAY, REPLICAS, OFFLOAD), (REPORT_HTML, REPORT_MD)),
)
# Which stage writes which artifact, so a missing input can name the command to run.
PRODUCER = {artifact: s.name for s in STAGES for artifact in s.writes}

# Built assets kept between runs (the embedded tokenizer, the tiny replay model). The CLI
# honours PC_ADVISE_CACHE / XDG_CACHE_HOME and passes its choice down as `cache_dir`.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pc-advise"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_table(path: Path, table: pa.Table, schema: pa.Schema | None = None) -> None:
    """Write a whole table as Parquet (zstd), atomically."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The manifest is read, changed and written whole: two stages of one process (the pipeline runs
# analyze beside simulate) must not interleave that, or one's entry is lost.
_MANIFEST_WRITES = threading.Lock()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of the advisor package's source and data files (read once per process)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".json", ".jinja")
                       and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class StageOutcome:
    """What one stage call did: skipped (fresh) or ran, its wall time, its recorded counts."""

    stage: str
    skipped: bool
    wall_s: float
    counts: Mapping[str, Any] = field(default_factory=dict)


class Progress:
    """Progress of a long stage: `with progress.task(label, total) as advance: advance(n)`.

    The default reports nowhere; the CLI passes one that draws a bar on a terminal.
    """

    @contextlib.contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


NO_PROGRESS = Progress()


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder. Stateless: the manifest lives on disk."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    def require(self, name: str) -> Path:
        """The artifact's path, or a MissingStage error naming the command that writes it."""
        p = self.path(name)
        if not p.exists():
            stage = PRODUCER.get(name, "an earlier stage")
            raise MissingStage(
                f"{p} does not exist: run `pc-advise {stage}` for this run folder first "
                f"(or `pc-advise run LOGS -o {self.root}` for the whole pipeline)."
            )
        return p

    def read_table(self, name: str) -> pa.Table:
        return pq.read_table(self.require(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.require(name).read_text(encoding="utf-8"))

    # --- manifest ---
    def manifest(self) -> dict[str, Any]:
        p = self.path(MANIFEST)
        if not p.exists():
            return {"tool": "pc-advise", "version": __version__, "stages": {}}
        return json.loads(p.read_text(encoding="utf-8"))

    def fingerprint(
        self, stage: str, inputs: list[Path], options: Mapping[str, Any]
    ) -> tuple[str, dict[str, str]]:
        """Content hash of a stage's inputs and options, plus the per-input checksums."""
        sums = {str(p.name if p.parent == self.root else p): file_checksum(p) for p in inputs}
        blob = json.dumps(
            {"stage": stage, "version": __version__, "code": code_digest(), "inputs": sums, "options": options},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest(), sums

    def is_fresh(self, stage: str, key: str, outputs: list[str]) -> bool:
        """True when the stage ran with this fingerprint and all its outputs are present."""
        entry = self.manifest().get("stages", {}).get(stage)
        return (
            entry is not None
            and entry.get("key") == key
            and all(self.path(o).exists() for o in outputs)
        )

    def record(
        self,
        stage: str,
        key: str,
        input_sums: Mapping[str, str],
        options: Mapping[str, Any],
        wall_s: float,
        counts: Mapping[str, Any],
    ) -> None:
        with _MANIFEST_WRITES:  # stages on two threads (advisor.pipeline) each add their own entry
            self._record(stage, key, input_sums, options, wall_s, counts)

    def _record(self, stage: str, key: str, input_sums: Mapping[str, str], options: Mapping[str, Any],
                wall_s: float, counts: Mapping[str, Any]) -> None:
        m = self.manifest()
        m["tool"] = "pc-advise"
        m["version"] = __version__
        m.setdefault("stages", {})[stage] = {
            "key": key,
            "inputs": dict(input_sums),
            "options": dict(options),
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": dict(counts),
        }
        write_json(self.path(MANIFEST), m)


    def run_stage(
        self,
        stage: str,
        inputs: list[Path],
        options: Mapping[str, Any],
        outputs: list[str],
        body: Callable[[RunDir], Mapping[str, Any]],
        force: bool = False,
        fingerprintable: bool = True,
    ) -> StageOutcome:
        """Run `body` unless its inputs and options are unchanged since the last run, then
        record it. `fingerprintable=False` (a pipe as input) always runs: nothing to hash."""
        key, sums = self.fingerprint(stage, inputs, options) if fingerprintable else ("", {})
        if fingerprintable and not force and self.is_fresh(stage, key, outputs):
            prev = self.manifest()["stages"][stage]
            return StageOutcome(stage, True, 0.0, prev.get("counts", {}))
        with StageTimer() as t:
            counts = body(self)
        self.record(stage, key, sums, options, t.elapsed, counts)
        return StageOutcome(stage, False, t.elapsed, counts)

    def stage_counts(self, stage: str) -> dict[str, Any]:
        """The counts `stage` recorded (empty when it has not run)."""
        return dict(self.manifest().get("stages", {}).get(stage, {}).get("counts", {}))

    def stage_options(self, stage: str) -> dict[str, Any]:
        """The options `stage` last ran with, as recorded (empty when it has not run)."""
        return dict(self.manifest().get("stages", {}).get(stage, {}).get("options", {}))


class StageTimer:
    """Wall time of a stage, for the manifest."""

    def __enter__(self) -> StageTimer:
        self.start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
