"""The Ray executor: a stage's pieces as Ray tasks, on a local Ray or on a cluster.

Input: a Ray address (None: start a Ray on this machine with `workers` CPUs; "auto", a
head's "host:6379" or a client's "ray://host:10001": connect) and the in-flight window.
Output: an `advisor.executor.Executor` whose `map(fn, items)` submits `fn(item)` as Ray
tasks, at most `window` at once, and yields the results in the items' order.

Only a Ray this executor started is shut down by `close`; one already running in this
process (a test's, a notebook's) or a cluster it connected to is left running.

What the workers need: `fn` is pickled by reference, so every node imports `advisor`
(pc-advise installed at the same version: checked on the first piece of every map, which
fails with the fix named otherwise). Paths inside items (the logs ingest reads) must be
readable at the same path on every node (docs/scale.md). Large inputs shared by many
pieces go through `share` once (`ray.put`), not once per item.

Ray is imported here only, and this module only by `advisor.executor.open_executor`, so
pc-advise imports, runs and tests without Ray installed. It imports nothing of
advisor.executor (that lazy import would otherwise close a circle): `RayExecutor` and
`RayShared` have the methods of its `Executor` and `Shared`, and `open_executor` registers
`RayExecutor` as an `Executor`.
"""

from __future__ import annotations

import logging
import pickle
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from advisor.errors import AdvisorError
from advisor.version import __version__

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'pc-advise[ray]'"
_SHARED_MEMO: dict[str, Any] = {}  # per worker process: the last shared value it fetched


def import_ray() -> Any:
    """The `ray` module, or an AdvisorError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise AdvisorError(f"--executor ray needs Ray, which is not installed here ({e}); install it with "
                           f"{INSTALL_HINT}, or run without --executor ray") from None
    return ray


class RayShared(Generic[T]):
    """A value put in Ray's object store once, pickled; `get` in a task unpickles it once per
    worker process (memoised). Pickled rather than put as it is: Ray hands numpy arrays out
    read-only, and the compiled kernels would compile (and cache) a second, read-only
    signature of every function in every worker."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def get(self) -> T:
        key = self.ref.hex()
        if key not in _SHARED_MEMO:
            import ray

            _SHARED_MEMO.clear()  # keep one: a worker serves one stage at a time
            _SHARED_MEMO[key] = pickle.loads(ray.get(self.ref))
        return _SHARED_MEMO[key]


def _call(fn: Callable[[T], R], item: T, version: str | None) -> R:
    """One piece on a worker; `version`: the driver's pc-advise, checked on a map's first piece."""
    if version is not None and version != __version__:
        raise AdvisorError(f"a Ray worker runs pc-advise {__version__}, this machine {version}: install the same "
                           "version on every node")
    return fn(item)


class RayExecutor:
    """Pieces as Ray tasks (module docstring); an `advisor.executor.Executor`."""

    name = "ray"
    distributed = True

    def __init__(self, address: str | None = None, workers: int | None = None, window: int | None = None) -> None:
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            self._init(ray, address, workers)
        elif address is not None:  # joining the Ray of this process: the address must still answer
            self._connect_error(address, _check_reachable)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(cpus, 1)
        self.window = window or 2 * self.workers
        self._task = ray.remote(num_cpus=1, max_retries=0)(_call)

    def _init(self, ray: Any, address: str | None, workers: int | None) -> None:
        quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
                 "configure_logging": True}
        if address is None:  # "local": a new Ray here, whatever RAY_ADDRESS says
            ray.init(address="local", num_cpus=workers or None, **quiet)
            self._started = True
            return
        self._connect_error(address, _check_reachable)
        self._connect_error(address, lambda a: ray.init(address=a, **quiet))
        self._started = True  # connected by us: disconnect at close (the cluster keeps running)

    @staticmethod
    def _connect_error(address: str, connect: Callable[[str], Any]) -> None:
        """`connect(address)`, its failure turned into an AdvisorError naming the fix."""
        try:
            connect(address)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            raise AdvisorError(f"--ray-address {address}: no Ray cluster could be reached there ({_first_line(e)}); "
                               "start one (`ray start --head` on the head node) and pass its address "
                               "(`auto` on a node of the cluster, host:6379, or ray://host:10001), or leave "
                               "--ray-address out to start a Ray on this machine") from None

    @property
    def parallelism(self) -> int:
        return self.workers

    def share(self, value: T) -> RayShared[T]:
        return RayShared(self._ray.put(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        in_flight: deque[Any] = deque()
        version: str | None = __version__
        for item in items:
            in_flight.append(self._task.remote(fn, item, version))
            version = None
            if len(in_flight) >= self.window:
                yield self._get(in_flight.popleft())
        while in_flight:
            yield self._get(in_flight.popleft())

    def _get(self, ref: Any) -> Any:
        """A piece's result; a piece's own error is raised as itself (an AdvisorError stays one)."""
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, ModuleNotFoundError) and cause.name and cause.name.split(".")[0] == "advisor":
                raise AdvisorError("a Ray worker cannot import pc-advise: install it on every node of the cluster "
                                   f"(the same version, {__version__}); docs/scale.md") from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to a host:port address, so an unreachable one fails in seconds (Ray
    itself retries for minutes); "auto" and other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
