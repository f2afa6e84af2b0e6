"""Where a stage's independent pieces of work run: here, in local worker processes, or on Ray.

Input: an `ExecutorOptions` (chosen at the CLI: `--executor`, `--workers`, `--ray-address`).
Output: an `Executor`, whose `map(fn, items)` yields `fn(item)` for every item **in the items'
order**, whatever order the pieces finish in, so a stage writes the same artifact, row for
row, whichever executor ran it.

Rules for what goes through `map`, so that every executor can run it:
- `fn` is a module-level function (picklable by reference), `items` and results are picklable
  and small enough to ship (paths and row ranges in, Arrow tables or numpy arrays out);
- `fn` reads no state of the caller: what it needs (a tokenizer spec, a cache folder) travels
  in the item. A worker may keep a per-process memo of something expensive it loads from that
  item (a tokenizer), keyed by the item's fields.
- At most `window` items are in flight, so memory is bounded by the window, not the input.
- A large input every piece reads (a simulation's block trace) goes through `share` once, and
  items carry the `Shared` handle: Ray puts it in its object store once instead of shipping it
  with every item; here it is the value itself.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as FuturesPool
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

EXECUTOR_LOCAL = "local"
EXECUTOR_RAY = "ray"
EXECUTORS = (EXECUTOR_LOCAL, EXECUTOR_RAY)


@dataclass(frozen=True)
class ExecutorOptions:
    kind: str = EXECUTOR_LOCAL  # "local": this machine; "ray": a Ray cluster
    workers: int = 0  # local worker processes; 0 = every core, 1 = in this process
    ray_address: str | None = None  # "auto", "ray://host:10001", ...; None starts a local Ray

    def __post_init__(self) -> None:
        assert self.kind in EXECUTORS, self.kind
        assert self.workers >= 0

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


class Shared(Generic[T]):
    """A value every piece may read (`Executor.share`); here, the value itself."""

    def __init__(self, value: T) -> None:
        self.value = value

    def get(self) -> T:
        return self.value


class Executor(ABC):
    """Runs `fn` over items, yielding results in the items' order (see the module docstring)."""

    name: str = ""
    # True when pieces run on other machines (Ray): a stage that keeps threads on this
    # machine's shared memory (the simulate grid) ships its pieces only then.
    distributed: bool = False

    @abstractmethod
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]: ...

    @property
    def parallelism(self) -> int:
        """How many pieces run at once (callers size their pieces from it)."""
        return 1

    def prestart(self, fn: Callable[[T], Any], item: T) -> None:
        """Run `fn(item)` once in each worker, now, without waiting (a worker loading what the
        pieces to come will need while this process does something else); its result and errors
        are dropped. Nothing where pieces run in this process or elsewhere."""

    def share(self, value: T) -> Shared[T]:
        """`value` for every piece to read through the handle's `get()` (module docstring)."""
        return Shared(value)

    def close(self) -> None:
        """Release workers; the executor is not used again."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InlineExecutor(Executor):
    """Every piece in this process, one after another (the reference the others must equal)."""

    name = "inline"

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        for item in items:
            yield fn(item)


class _PoolExecutor(Executor):
    """A concurrent.futures pool of `workers`, results in order, at most `window` pieces held."""

    def __init__(self, pool: FuturesPool, workers: int, window: int) -> None:
        assert workers >= 1
        self.workers, self.window, self._pool = workers, window, pool

    @property
    def parallelism(self) -> int:
        return self.workers

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        in_flight: deque[Future[R]] = deque()
        for item in items:
            in_flight.append(self._pool.submit(fn, item))
            if len(in_flight) >= self.window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ThreadExecutor(_PoolExecutor):
    """Threads of this process, for pieces whose work releases the GIL (Parquet reads, compiled
    kernels): no worker start-up, no pickling."""

    name = "threads"

    def __init__(self, workers: int, window: int | None = None) -> None:
        super().__init__(ThreadPoolExecutor(workers, thread_name_prefix="pc-advise-piece"), workers,
                         window or workers + 1)


def end_without_final_collection() -> None:
    """Let this process end without the interpreter's last garbage collection.

    At exit, after the atexit callbacks, the interpreter collects garbage over every object the
    process still holds, a pass that frees nothing the operating system would not: measured,
    0.3-0.45 s of a stage command's exit, and 0.25 s to close tokenize's workers. Registered
    first, `gc.freeze` runs as the last atexit callback (they run last-in first-out), after
    every other one (multiprocessing's joins, Ray's shutdown), and leaves that pass nothing to
    walk. Called where a process begins: the console script, each worker process."""
    atexit.register(gc.freeze)


class ProcessExecutor(_PoolExecutor):
    """Local worker processes (spawned, so no thread pool of the parent is forked half-held)."""

    name = "processes"

    def __init__(self, workers: int, window: int | None = None) -> None:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=end_without_final_collection)
        super().__init__(pool, workers, window or 2 * workers)

    def prestart(self, fn: Callable[[T], Any], item: T) -> None:
        # one task per worker: each takes one, since a worker busy loading takes no second
        for _ in range(self.workers):
            self._pool.submit(fn, item)


def open_executor(options: ExecutorOptions) -> Executor:
    """The executor `options` asks for (close it, or use it as a context manager)."""
    if options.kind == EXECUTOR_RAY:
        # Ray is optional: imported only when asked for (executor_ray imports nothing of this module)
        from advisor.executor_ray import RayExecutor

        Executor.register(RayExecutor)
        return RayExecutor(options.ray_address, options.workers or None)  # type: ignore[return-value]
    workers = options.resolved_workers()
    return InlineExecutor() if workers <= 1 else ProcessExecutor(workers)


@contextlib.contextmanager
def remote_executor(options: ExecutorOptions | None) -> Iterator[Executor | None]:
    """An open executor when `options` ask for one that spans machines (Ray), else None.

    A stage that keeps its own threads locally (the simulate grid) ships pieces only to the
    former. Held around several stages (`advisor.pipeline.run`, the CLI's commands), it keeps
    one Ray up for all of them: a RayExecutor opened meanwhile joins it, and leaves it running.
    """
    if options is None or options.kind != EXECUTOR_RAY:
        yield None
        return
    with open_executor(options) as executor:
        yield executor
