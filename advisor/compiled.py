"""The project's JIT decorator, shared by the compiled simulators (advisor/sim/fast/) and
analyze's compiled sweeps.

`compiled` is numba's `njit(cache=True, nogil=True)` when numba is importable (it ships with
vLLM's CPU build), else the plain function; with NUMBA_DISABLE_JIT=1 numba itself returns
Python functions. `HAVE_NUMBA` says which, for callers that pick a numpy path without numba.
`nogil` lets the simulate grid run configurations on threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

try:  # numba ships with vLLM's CPU build; without it the loops run as Python.
    from numba import njit as _njit

    def compiled(fn: F) -> F:
        return _njit(cache=True, nogil=True)(fn)  # type: ignore[no-any-return]

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing

    def compiled(fn: F) -> F:
        return fn

    HAVE_NUMBA = False
