"""Executors yield results in the items' order, whatever order the pieces finish in."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advisor.executor import (
    ExecutorOptions,
    InlineExecutor,
    ProcessExecutor,
    ThreadExecutor,
    open_executor,
)


def _slow_square(x: int) -> int:
    time.sleep(0.05 * (x % 3 == 0))  # the first of every three finishes last
    return x * x


def test_inline_runs_in_order() -> None:
    assert list(InlineExecutor().map(_slow_square, range(5))) == [0, 1, 4, 9, 16]


def test_processes_keep_the_items_order_past_the_window() -> None:
    with ProcessExecutor(2, window=3) as ex:
        assert list(ex.map(_slow_square, range(10))) == [x * x for x in range(10)]


def test_threads_keep_the_items_order_past_the_window() -> None:
    with ThreadExecutor(2, window=3) as ex:
        assert list(ex.map(_slow_square, range(10))) == [x * x for x in range(10)]


def test_one_worker_runs_here() -> None:
    assert isinstance(open_executor(ExecutorOptions(workers=1)), InlineExecutor)


def test_a_worker_error_reaches_the_caller() -> None:
    with ProcessExecutor(2) as ex, pytest.raises(ZeroDivisionError):
        list(ex.map(_divide_by, [1, 0, 2]))


def _divide_by(x: int) -> float:
    return 1 / x


# --- processes end without the interpreter's final collection ------------------------------
class _Loop:
    """A reference cycle that says when the garbage collector frees it."""

    def __del__(self) -> None:
        print("a loop was collected", flush=True)


def _leave_a_loop(_: int) -> int:
    loop = _Loop()
    loop.me = loop  # type: ignore[attr-defined]
    return os.getpid()


_SCRIPT = """
import sys
from advisor.executor import end_without_final_collection
sys.path.insert(0, {tests!r})
from test_executor import _leave_a_loop
if sys.argv[1] == "on":
    end_without_final_collection()
_leave_a_loop(0)
"""


@pytest.mark.parametrize("on", [True, False])
def test_a_process_ends_without_its_final_collection(on: bool) -> None:
    """The cycle left at exit is collected by the interpreter's last pass unless the process
    asked to end without it (then the operating system takes the memory back)."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=str(Path(__file__).parent)),
                          "on" if on else "off"], capture_output=True, text=True, check=True).stdout
    assert ("a loop was collected" in out) is not on


def test_worker_processes_end_without_their_final_collection(capfd: pytest.CaptureFixture[str]) -> None:
    with ProcessExecutor(1) as ex:
        pids = list(ex.map(_leave_a_loop, [0]))
    assert pids[0] != os.getpid()
    assert "a loop was collected" not in capfd.readouterr().out  # the worker has exited: joined above
