"""The CPU target's pool: how a kernel runs, serial or parallel, and the rules around numba's
threads.

The prepared launches are :mod:`.launch`'s (its ``PREPARE``); each runs its kernel through
:func:`run` (its first call, and one-off launches) or :func:`run_parallel` (a parallel entry point),
serial or parallel by the work's size (see :mod:`.config`). Also here: the checkpoint merge's
launch (:func:`merge`) and the smoother's host check of its weights (:func:`first_bad_weight`).

A parallel kernel runs on as many threads as the user gave torch (:func:`team`, :mod:`.threads`):
torch's count on the calling thread where torch is imported, else ``OMP_NUM_THREADS``, else numba's
own; the ``FASTEMA_NUM_THREADS`` environment variable (:data:`.config.CPU_THREADS`) overrides them.
One thread is the serial twin. numba's parallel regions take their team size from the calling
thread's numba setting, so a launch sets that for itself and puts back the caller's.

Two rules hold process-wide (docs/guides/processes.md):

- fastema's parallel kernels run one at a time (a lock around each parallel launch): an
  offloaded EMA folds on a worker thread while the training thread packs, and numba's
  ``workqueue`` threading layer, which is not thread-safe, kills the process on concurrent
  parallel launches ("Concurrent access has been detected"); the other layers would only
  oversubscribe the cores. Serial kernels take no lock.
- in a process forked after numba's OpenMP layer started, every kernel is the serial twin
  (:data:`PARALLEL` is False there): GNU OpenMP kills a forked child at its first parallel
  region ("Terminating: fork() called from a process already using GNU OpenMP"). The ``tbb``
  and ``workqueue`` layers survive a fork, and keep their parallel kernels in the child.

The kernels are compiled once per machine and loaded from numba's disk cache by every later
process (:mod:`fastema.kernels._cache`); where that cannot work, one warning at import says why.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import warnings
from collections.abc import Iterator

import numba
import numpy as np

from ...kernels import _cache, merge_cpu
from ...kernels import cpu as K
from .. import config
from . import threads


def _check_disk_cache() -> None:
    """One warning when the kernels cannot be shared between processes (each then compiles them,
    several seconds): numba's cache internals unknown, or no writable cache location."""
    K.bad_weight_kernel()                # builds (does not compile) one kernel: finds its cache location
    if not _cache.SHARED:
        warnings.warn(f"fastema: numba {numba.__version__}'s cache internals are not the ones fastema knows, so "
                      "every process compiles fastema's kernels again (seconds at the first update); use "
                      "numba 0.68 to share them between processes", RuntimeWarning, stacklevel=3)
    elif _cache.NOT_CACHED:
        warnings.warn(f"fastema: numba found no writable folder for its kernel cache ({_cache.NOT_CACHED[0]}), so "
                      "every process compiles fastema's kernels again (seconds at the first update); set "
                      "NUMBA_CACHE_DIR to a writable folder", RuntimeWarning, stacklevel=3)


_check_disk_cache()

PARALLEL = True                      # False in a child forked after numba's OpenMP layer started (serial twins)
_one_at_a_time = threading.Lock()    # held by each parallel launch
_pool_started = False                # numba's threading layer started by start_pool (or found started)


def start_pool() -> None:
    """Start numba's threading layer, if not yet started, on a short-lived thread of its own.

    numba's OpenMP layer starts by calling ``omp_set_num_threads(NUMBA_NUM_THREADS)`` and
    ``omp_set_nested(1)`` on the thread that starts it, in the GNU OpenMP that torch's intra-op
    pool uses too when torch is loaded (``torch.get_num_threads()`` became the core count
    whatever the user set). The thread count is the starting thread's own setting: started on a
    thread that then ends, it ends with it. Nesting is process-wide in some GNU OpenMP versions
    (torch's wheels'): each OpenMP library loaded before has its maximum of active levels put
    back. The caller's thread count, ``OMP_NUM_THREADS`` and nesting stay what they were; fastema's
    kernels pass their own thread count to every parallel region and never nest, so they need
    neither. Called before every parallel kernel is first compiled, loaded or run (:func:`run`)."""
    global _pool_started
    if _pool_started:
        return
    failed: list[BaseException] = []

    def start() -> None:
        try:
            numba.get_num_threads()      # numba's public call that starts the layer (once per process)
        except BaseException as err:     # handed to the caller's thread, raised there
            failed.append(err)

    with _one_at_a_time:
        if not _pool_started:
            levels = [(lib, lib.omp_get_max_active_levels()) for lib in _openmp_libraries()]
            starter = threading.Thread(target=start, name="fastema-numba-pool-start", daemon=True)
            starter.start()
            starter.join()
            for lib, before in levels:
                if lib.omp_get_max_active_levels() != before:
                    lib.omp_set_max_active_levels(before)
            if failed:
                raise failed[0]
            _pool_started = True


_OPENMP = re.compile(r"lib(g|i)?omp[0-9]*\.so")


def _openmp_libraries() -> list:
    """Every OpenMP runtime (GNU, LLVM, Intel) loaded in this process, as a ctypes handle (a new
    handle of a library already loaded: nothing is loaded); none where ``/proc`` is not there."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _OPENMP.search(line.rsplit("/", 1)[-1])}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_get_max_active_levels, lib.omp_set_max_active_levels     # both there (int -> int, int)
        except (OSError, AttributeError):
            continue
        libs.append(lib)
    return libs


def team() -> int:
    """The threads a parallel kernel launched now gets (2 or more), or 0: run its serial twin
    (:func:`.threads.chosen`; where nothing says, numba's count on the calling thread, read after
    :func:`start_pool` so that reading it changes no setting of the user's)."""
    n = threads.chosen()
    if not n:
        if not _pool_started:
            start_pool()
        n = numba.get_num_threads()
    return threads.capped(n)


def run(kernel, parallel: bool, *args) -> None:
    """Call ``kernel(*args)``: a parallel kernel after :func:`start_pool`, on :func:`team`'s threads
    and under the lock that runs fastema's parallel kernels one at a time (see the module's
    docstring)."""
    if parallel:
        if not _pool_started:
            start_pool()
        n = team() or 1                              # 1: the count fell to one since the caller chose
        with _one_at_a_time:
            threads.run_on(kernel, n, args)
    else:
        kernel(*args)


def run_parallel(entry, n: int, args: tuple) -> None:
    """A parallel kernel's entry point on ``n`` threads (``n`` from :func:`team`, the pool started),
    under the lock that runs fastema's parallel kernels one at a time."""
    with _one_at_a_time:
        threads.run_on(entry, n, args)


def _openmp_started() -> bool:
    """True once numba has loaded its OpenMP threading layer in this process (a parallel kernel
    was compiled, loaded from the cache or run)."""
    try:
        return numba.threading_layer() == "omp"
    except ValueError:                                   # no layer loaded yet: the child may load its own
        return False


def _after_fork_in_child() -> None:
    global PARALLEL, _one_at_a_time
    _one_at_a_time = threading.Lock()                    # a thread of the parent may have held it at the fork
    if _openmp_started():
        PARALLEL = False


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def serial_twins() -> Iterator[None]:
    """Every kernel the serial twin for the ``with`` block, as in a child forked after numba's
    OpenMP layer started (:data:`PARALLEL` False); put back after, however it ends."""
    global PARALLEL
    saved, PARALLEL = PARALLEL, False
    try:
        yield
    finally:
        PARALLEL = saved


@contextlib.contextmanager
def kernels_from(module) -> Iterator[None]:
    """The launches take their kernel factories (``lerp_kernel``...) from ``module`` instead of
    :mod:`fastema.kernels.cpu` for the ``with`` block (a test's wrapper that notes each kernel
    call); put back after, however it ends."""
    global K
    saved, K = K, module
    try:
        yield
    finally:
        K = saved


def first_bad_weight(c: np.ndarray) -> int:
    """The index of the first per-stream sample weight in the host array ``c`` that
    the smoother's kernel (``kernels.cpu.streams_kernel``) would count as 0 (NaN, inf, negative), or -1: the
    smoother refuses such an update on the host before anything changes (~0.2 us)."""
    return int(K.bad_weight_kernel()(c))


def merge(in_kind: int, out_kind: int, wide: bool, stochastic: bool, may_parallel: bool, count: int, out_addr: int,
          acc_addr: int, in_addr, weights, start: bool, finish: bool, key: int, first: int) -> None:
    """One piece of a checkpoint merge (``kernels.merge_cpu.merge_kernel``; the arguments are
    documented there): parallel over chunks when ``may_parallel`` and the piece is large
    (:data:`config.CPU_MERGE_SERIAL_BELOW`: the merge's reader thread shares the cores)."""
    par = may_parallel and PARALLEL and count >= config.CPU_MERGE_SERIAL_BELOW and team() > 0
    run(merge_cpu.merge_kernel(in_kind, out_kind, wide, stochastic, par), par, count, out_addr, acc_addr, in_addr,
        weights, start, finish, np.uint32(key), first, config.CPU_CHUNK)
