"""The block traces recommend re-simulates, each made once per stage.

Recommend runs the simulator again at the recommended block size: sequential runs to price
each prompt fix, and concurrent runs (two loads x caching on, off, sharing removed, breakers
fixed) for the time section. Each of those workloads used to be re-hashed from its token ids
for every run. A `Traces` memo makes each workload's trace (and, for concurrent mode, its
per-request block lists) once; the logged workload's trace is simulate's persisted block
stream (advisor.sim.blockstreams, read back memory-mapped) when the run folder has it.
What is simulated is unchanged: the same trace objects `simulate_one` would build itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from advisor.sim.configuration import block_trace, scheduler_requests
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import request_hashes
from advisor.workload import Workload

Prepared = tuple[np.ndarray, np.ndarray, np.ndarray]
StoredTrace = Callable[[int], "fasttrace.BlockTrace | None"]  # block size -> the logged stream, or None


class Traces:
    """Scheduler block traces per (workload, block size), made on first use.

    `base` is the logged workload; `stored(block_size)` gives its logged trace from the run
    folder (None: hash it). Workloads are told apart by identity: each rewrite or salted
    copy recommend makes is one object, held here while its trace is."""

    def __init__(self, base: Workload, stored: StoredTrace | None = None) -> None:
        self.base, self.stored = base, stored
        self._traces: dict[tuple[int, int], tuple[Workload, fasttrace.BlockTrace]] = {}
        self._prepared: dict[tuple[int, int], Prepared] = {}
        self._unshared: dict[int, Workload] = {}

    def unshared(self, workload: Workload) -> Workload:
        """`workload.with_own_salts()`, whose trace is known without hashing: with a salt of its
        own, no block of a request equals one of another's, and a request's chained blocks differ
        from each other, so the dense ids are simply 0, 1, 2, ... in order (what hashing would
        give, as a test checks)."""
        assert not workload.is_hash_trace
        out = workload.with_own_salts()
        self._unshared[id(out)] = out
        return out

    def trace(self, workload: Workload, block_size: int) -> fasttrace.BlockTrace:
        key = (id(workload), block_size)
        if key not in self._traces:
            logged = self.stored(block_size) if workload is self.base and self.stored is not None else None
            if id(workload) in self._unshared:
                full = int((workload.n_tokens // block_size).sum())
                logged = fasttrace.trace_from_ids(np.arange(full, dtype=np.int64), workload.n_tokens, block_size, full)
            trace = (fasttrace.repeat_requests(logged, workload.n) if logged is not None
                     else block_trace(workload, block_size))
            self._traces[key] = (workload, trace)
        return self._traces[key][1]

    def prepared(self, workload: Workload, block_size: int) -> Prepared:
        """concurrent mode's per-request block lists (advisor.sim.fast.events.request_hashes)."""
        key = (id(workload), block_size)
        if key not in self._prepared:
            trace, reqs = self.trace(workload, block_size), scheduler_requests(workload)
            self._prepared[key] = request_hashes(trace, reqs.n_tokens, reqs.output_tokens, trace.num_ids)
        return self._prepared[key]
