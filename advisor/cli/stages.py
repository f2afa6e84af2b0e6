"""What the commands say about each stage, and the command-line values each stage is given.

`stage_kwargs` turns parsed click values into the flat options of `advisor.pipeline` (the
names of the stages' options dataclasses; a value not given is left out, so the dataclass
default applies). `print_outcome` prints one stage's line from its recorded counts. This
is the only layer that reads the environment (cache folder, API key) and passes plain
values down.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from advisor import pipeline
from advisor.cli.console import Console
from advisor.errors import AdvisorError
from advisor.executor import EXECUTOR_LOCAL, EXECUTOR_RAY, ExecutorOptions
from advisor.runfolder import (
    DEFAULT_CACHE_DIR,
    REJECTS,
    REPORT_HTML,
    REPORT_MD,
    Progress,
    RunDir,
    StageOutcome,
)

# click's names for options whose library name differs (or whose unit does).
_RENAMED = {"fmt": "format", "configs": "replay_configs"}


def cache_dir() -> Path:
    """Where built assets (the embedded tokenizer, the tiny replay model) are kept."""
    base = os.environ.get("PC_ADVISE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "pc-advise" if base else DEFAULT_CACHE_DIR


def stage_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Parsed click values -> `pipeline.run`'s flat options (None: not given)."""
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if value is None:
            continue
        if key == "max_line_mb":
            out["max_line_bytes"] = int(value * (1 << 20))
        elif key == "min_gain_per_gib":  # points per GiB on the command line, a share inside
            out[key] = float(value) / 100
        else:
            out[_RENAMED.get(key, key)] = value
    known = pipeline.option_names()
    return {k: v for k, v in out.items() if k in known}


def executor_for(opts: dict[str, Any]) -> ExecutorOptions | None:
    """--executor, --ray-address and --workers -> the stages' `ExecutorOptions` (None: this machine,
    where each stage sizes its own workers from its options)."""
    kind, address = opts.get("executor") or EXECUTOR_LOCAL, opts.get("ray_address")
    if address is not None and kind != EXECUTOR_RAY:
        raise AdvisorError(f"--ray-address {address} is for --executor ray: add --executor ray, or leave "
                           "--ray-address out to run on this machine")
    if kind == EXECUTOR_LOCAL:
        return None
    return ExecutorOptions(kind, max(opts.get("workers") or 0, 0), address)


def options_for(stage: str, opts: dict[str, Any]) -> Any:
    """The options object of one stage command."""
    return pipeline.stage_options(**stage_kwargs(opts))[stage]


def set_tokenizer_threads(opts: dict[str, Any]) -> None:
    # The Rust tokenizer sizes its thread pool from this once, at first use.
    if opts.get("workers"):
        os.environ["RAYON_NUM_THREADS"] = str(opts["workers"])


def api_key(opts: dict[str, Any]) -> str | None:
    """The server's API key from the environment variable --api-key-env names."""
    name = opts.get("api_key_env")
    if opts.get("replay_url") is None or not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise AdvisorError(f"--api-key-env {name}: that environment variable is empty or unset; "
                           "export the key under that name.")
    return key


class BarProgress(Progress):
    """A click progress bar on a terminal's stderr; nothing when quiet or piped."""

    def __init__(self, quiet: bool) -> None:
        self.hidden = quiet or not sys.stderr.isatty()

    @contextlib.contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        with click.progressbar(length=total, label=label, file=sys.stderr, hidden=self.hidden) as bar:
            yield bar.update


# --- one line (and its notes) per stage ---
def print_outcome(con: Console, run: RunDir, outcome: StageOutcome) -> None:
    c = outcome.counts
    if outcome.stage == "replay" and c.get("status") == "not_run":
        con.say(f"replay: not run: {c.get('reason')}")
        con.result["replay"] = dict(c)
        return
    line, notes = _PRINTERS[outcome.stage](run, c)
    con.stage(outcome, line)
    for note in notes:
        con.say(f"  {note}")
    if c.get("check_passed") is not None:
        con.say(f"replay --check {c['check_passed']}: passed")


def _ingest(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    notes = []
    if c.get("by_format"):
        notes.append("accepted by format: " + ", ".join(f"{k} {v}" for k, v in c["by_format"].items()))
    if c.get("rejects_by_cause"):
        notes.append("rejected by cause: " + ", ".join(f"{k} {v}" for k, v in c["rejects_by_cause"].items()))
    files = c.get("files") or []
    if files:
        kinds = ", ".join(f"{k} {v}" for k, v in (c.get("by_file_kind") or {}).items())
        notes.append(f"{len(files)} files read ({kinds}), merged in time order")
    notes += [f"left out: {why}" for why in c.get("refused_files") or []]
    skipped = sum((c.get("skipped_lines") or {}).values())
    if skipped:
        notes.append(f"{skipped} lines skipped (no request: " + ", ".join(
            f"{k} {v}" for k, v in c["skipped_lines"].items()) + ")")
    notes += c.get("notes") or []
    notes += [f"rejected line {line}: {reason}" for line, reason in c.get("first_rejects", [])[:5]]
    if c["rejected"]:
        notes.append(f"all rejects with their raw lines: {run.path(REJECTS)}")
    if c.get("duplicate_ids"):
        notes.append(f"{c['duplicate_ids']} repeated request ids got a '#n' suffix "
                     "(the logged id is kept in logged_id)")
    if c.get("synthesized_timestamps"):
        rate = run.stage_options("ingest").get("rate")
        notes.append(f"{c['synthesized_timestamps']} requests had no timestamp: placed in line order "
                     f"at --rate {rate:g}/s")
    return f"read {c['lines_read']}, accepted {c['accepted']}, rejected {c['rejected']}", notes


def _tokenize(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    notes = []
    if c.get("outputs_from_text"):
        notes.append(f"{c['outputs_from_text']} reply lengths counted from logged reply text "
                     "(no usage count logged)")
    if c.get("media_requests"):
        notes.append(f"{c['media_requests']} requests with image/audio/video parts: their text is counted, "
                     "the media's own tokens are not (tokens.parquet column media_parts)")
    if c.get("errors"):
        notes.append(f"{c['errors']} requests vLLM would refuse (kept with 0 tokens, reason in "
                     "tokens.parquet column tokenize_error):")
        notes += [f"line {line} ({rid}): {reason}" for rid, line, reason in c.get("first_errors", [])[:5]]
    seg = c.get("segments") or {}
    if seg.get("used") and seg.get("segments"):
        notes.append(f"segment cache: {seg['hit_rate']:.1%} of {seg['segments']:,} text segments "
                     f"({seg['token_hit_rate']:.1%} of their tokens) reused, {seg['encoded']:,} encoded")
    if seg.get("whole_prompt_reason"):
        notes.append(f"every prompt encoded whole (no segment cache): {seg['whole_prompt_reason']}")
    elif seg.get("completions_whole_reason") and c.get("by_kind", {}).get("completion"):
        notes.append(f"completion prompts encoded whole: {seg['completions_whole_reason']}")
    return (f"{c['rows']} requests, {c['tokens']:,} prompt tokens "
            f"({c['tokenizer'] or 'no text: no tokenizer needed'})"), notes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _analyze(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    return (f"ceiling {c['ceiling_rate']:.1%} of {c['prompt_tokens']:,} prompt tokens, "
            f"{_plural(c['breakers'], 'cache breaker')}, {_plural(c['clusters'], 'reuse group')}"
            + (f" ({c['top_level_clusters']:,} at the top level)" if c.get("top_level_clusters") is not None else "")
            + (f", {_plural(c['one_shot_requests'], 'one-shot request')}" if c.get("one_shot_requests") else "")
            ), c.get("notes", [])


def _simulate(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    ceil = ", ".join(f"B={b}: {v:.1%}" for b, v in c.get("ceiling_by_block_size", {}).items())
    return (f"{c['configs']} configurations over {c['requests']} requests "
            f"({c['prompt_tokens']:,} prompt tokens); infinite-cache ceiling, whole log: {ceil}"), c.get("notes", [])


def _recommend(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    mem = f"{c['kv_gib']:.2f} GiB" if c.get("kv_gib") is not None else f"{c['num_blocks']:,} blocks"
    view = ", ".join(v for v in (c.get("mode"), f"{c['window']} window" if c.get("window") else None) if v)
    return (f"--block-size {c['block_size']}, {mem}: hit rate {c['hit_rate']:.1%} "
            f"(block ceiling {c['ceiling_hit_rate']:.1%}" + (f"; {view})" if view else ")")), (
                [c["vllm_serve"]] + ([c["replicas"]] if c.get("replicas") else []))


def _replay(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    notes = []
    for b, n, mode, status, pred, meas, *replica in c.get("configs", []):
        where = f"block size {b}, {n} blocks, {mode}" + (f", {replica[0]}" if replica and replica[0] else "")
        if pred is not None and meas is not None:
            notes.append(f"{where}: predicted {pred:.2%}, measured {meas:.2%} -> {status}")
        else:
            notes.append(f"{where}: {status}")
    for mode, arrivals, p50, ttft_ratio, rps_ratio in c.get("time", []):
        shown = ", ".join(f"{name} {v * 1000:.1f} ms" for name, v in zip(("on", "off", "unshared", "fixed"), p50)
                          if v is not None)
        ratio = f"; on/off TTFT x{ttft_ratio:.2f}, requests/s x{rps_ratio:.2f}" if ttft_ratio and rps_ratio else ""
        notes.append(f"time, {mode} ({arrivals}): TTFT p50 {shown or 'not measured'}{ratio}")
    return f"{c['status']} ({c['engine']})", notes


def _report(run: RunDir, c: dict[str, Any]) -> tuple[str, list[str]]:
    missing = c.get("missing") or []
    return (f"{run.path(REPORT_HTML)} and {REPORT_MD}" + (" (redacted)" if c.get("redacted") else "")
            + (f"; not available: {', '.join(missing)}" if missing else "")), []


_PRINTERS = {"ingest": _ingest, "tokenize": _tokenize, "analyze": _analyze, "simulate": _simulate,
             "recommend": _recommend, "replay": _replay, "report": _report}
