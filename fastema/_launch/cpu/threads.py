"""How many threads a parallel CPU kernel gets: the user's count, never the machine's.

numba's parallel kernels start one thread per core (``NUMBA_NUM_THREADS``) whatever the user gave
torch, so with several ranks a node, DataLoader workers or a loaded machine they oversubscribe the
cores (a diffusers UNet's step was 4-5x slower than diffusers' own loop). A launch takes, in order:

1. ``FASTEMA_NUM_THREADS`` (:data:`.config.CPU_THREADS`, read at import), the override;
2. ``torch.get_num_threads()`` where torch is imported (never imported from here): the count on the
   calling thread, what ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` gave torch, read at every
   launch, so a change between two updates holds from the second;
3. ``OMP_NUM_THREADS`` (the first of a nested list), read at import as OpenMP runtimes read it;
4. numba's own count on the calling thread (the launcher reads it:
   :func:`fastema._launch.cpu.pool.team`).

At most ``NUMBA_NUM_THREADS`` (the threads numba starts); one thread runs the serial twin. numba's
parallel regions take their team size from the calling thread's numba count, so :func:`run_on` sets
it for the launch and puts the caller's back: ``numba.get_num_threads()`` and torch's count stay
what the user set. Host cost: ~0.1 us to choose, ~1.5 us more where the count differs from numba's.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numba

from .. import config

__all__ = ["capped", "chosen", "run_on"]


def _omp_threads() -> int:
    """The thread count ``OMP_NUM_THREADS`` gives (the first of ``"4,2"``), 0 where unset; a value
    that is not a count is named in one warning and ignored (0)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    instead = "the CPU kernels follow torch's thread count where torch is imported, else numba's"
    return config.thread_count("OMP_NUM_THREADS", first, instead) or 0


_OMP = _omp_threads()
_MOST = max(1, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1)))   # the threads numba starts: no region gets more
_torch_threads: Any = None           # torch.get_num_threads, once torch is imported (kept from then on)


def _find_torch():
    """``torch.get_num_threads`` where torch is imported, else None."""
    global _torch_threads
    get = getattr(sys.modules.get("torch"), "get_num_threads", None)   # None too while torch is half-imported
    if callable(get):
        _torch_threads = get
    return _torch_threads


def chosen() -> int:
    """The count the user gave (steps 1-3 of the module's list), or 0 where none says."""
    n = config.CPU_THREADS
    if n is not None:
        return n
    get = _torch_threads or _find_torch()
    return get() if get is not None else _OMP


def capped(n: int) -> int:
    """``n`` threads as a launch takes them: at most ``NUMBA_NUM_THREADS``; 0 (the serial twin) for
    one."""
    n = min(n, _MOST)
    return n if n > 1 else 0


def run_on(fn, threads: int, args: tuple) -> None:
    """``fn(*args)`` (a parallel kernel, under the launcher's lock) with numba's thread count on the
    calling thread at ``threads``, the caller's own count put back after."""
    before = numba.get_num_threads()
    if before == threads:
        fn(*args)
        return
    numba.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        numba.set_num_threads(before)
