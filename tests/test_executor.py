"""Executors yield results in the items' order, whatever order the pieces finish in."""

from __future__ import annotations

import time

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
