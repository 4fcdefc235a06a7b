"""CPU launchers: one function per kernel family, ``op(group, stream, **args)`` (``stream``
is unused on the CPU), serial or parallel by the work's size (see :mod:`.config`).

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

from ..kernels import _cache, merge_cpu
from ..kernels import cpu as K
from . import config, threads

_NO_FLAG = np.zeros(1, np.int32)     # never written: passed when no guard is asked for


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


def _parallel(group, rows: int) -> bool:
    t = group.tables
    return PARALLEL and t.n * rows >= config.CPU_SERIAL_BELOW and t.chunks > 1 and team() > 0


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
    """The launchers take their kernel factories (``lerp_kernel``...) from ``module`` instead of
    :mod:`fastema.kernels.cpu` for the ``with`` block (a test's wrapper that notes each kernel
    call); put back after, however it ends."""
    global K
    saved, K = K, module
    try:
        yield
    finally:
        K = saved


_ZERO_KEY = np.uint32(0)
_HOST_KEY = numba.typeof(_ZERO_KEY)


class LerpLaunch:
    """One group's ``"lerp"`` launch with everything but the weights and the key bound once
    (:func:`fastema._launch.lerp_launcher`): the tables and the flag, and after the first call
    the compiled overload's own entry point for each (serial/parallel, weights type, key type),
    so a step calls no numba dispatcher (no per-call type resolution). A host weight tuple is
    cast to ``cast`` once per tuple object; its type is then fixed by its length. A key held on
    the device (an int64[1] array: a device plan's) is typed once per array object."""

    __slots__ = ("_head", "_flag", "_n", "_chunks", "_kinds", "_cast", "_w_in", "_w", "_wtype", "_k_in", "_k",
                 "_ktype", "_size", "_fns", "_calls", "_args")

    def __init__(self, group, flag, stochastic: bool, cast):
        t = group.tables
        self._head = t.args()
        self._flag = _NO_FLAG if flag is None else flag
        self._n, self._chunks = t.n, t.chunks
        self._kinds = (group.shadow_kind, group.src_kind, stochastic)
        self._cast = cast
        self._w_in: object = self      # no weights yet (never a weights object)
        self._k_in: object = self      # no key yet
        self._w: object = None
        self._k: object = _ZERO_KEY
        self._wtype: object = None
        self._ktype: object = _HOST_KEY
        self._calls: dict = {}         # (parallel, weights type, key type) -> the overload's entry point
        self._fns: list = [None, None]     # [serial, parallel] entry points for the types now

    def _weights(self, weights) -> None:
        self._w_in = weights
        if isinstance(weights, tuple):
            self._w = tuple(map(self._cast, weights))
            wtype: object = (self._cast, len(weights))
        else:                                           # a float32[K] array: its numba type
            self._w, wtype = weights, numba.typeof(weights)
        self._size = self._n * len(weights) if self._chunks > 1 else -1   # -1: one work item, always serial
        self._types(wtype, self._ktype)

    def _key(self, key) -> None:
        self._k_in = key
        if isinstance(key, int):
            self._k = np.uint32(key) if key else _ZERO_KEY
            self._types(self._wtype, _HOST_KEY)
        else:                                           # an int64[1] device array
            self._k = key
            self._types(self._wtype, numba.typeof(key))

    def _types(self, wtype, ktype) -> None:
        if (wtype, ktype) != (self._wtype, self._ktype):
            self._wtype, self._ktype = wtype, ktype
            self._fns = [self._calls.get((False, wtype, ktype)), self._calls.get((True, wtype, ktype))]
        self._args = (*self._head, self._w, self._flag, self._k)

    def __call__(self, weights, key=0) -> None:
        if weights is not self._w_in and (type(weights) is not tuple or weights != self._w_in):
            self._weights(weights)                      # (host weights equal to the last ones: kept)
        if key is not self._k_in:
            self._key(key)
        n = team() if PARALLEL and self._size >= config.CPU_SERIAL_BELOW else 0   # _parallel(group, rows)
        par = n > 0
        fn = self._fns[par]
        if fn is None:                                  # the first call: the dispatcher, then its entry point
            k = K.lerp_kernel(*self._kinds, par, self._ktype is not _HOST_KEY)
            run(k, par, *self._args)
            self._fns[par] = self._calls[(par, self._wtype, self._ktype)] = _entry_point(k, self._args)
        elif par:
            with _one_at_a_time:
                threads.run_on(fn, n, self._args)
        else:
            fn(*self._args)

    def once(self, weights, key=0) -> None:
        """One launch through the dispatcher (:func:`fastema._launch.launch`: no entry point looked up)."""
        self._weights(weights)
        self._key(key)
        par = PARALLEL and self._size >= config.CPU_SERIAL_BELOW and team() > 0
        run(K.lerp_kernel(*self._kinds, par, self._ktype is not _HOST_KEY), par, *self._args)


class BoundLaunch:
    """A launch whose arguments are bound once but for those given at each call (``run(*middle)``:
    placed between ``head`` and ``tail``, of fixed numba types), calling the compiled overload's
    entry point after the dispatcher's first call, per serial/parallel choice. ``kernel_of(parallel)``
    gives the dispatcher; ``size``: the work (elements times rows) that :data:`config.CPU_SERIAL_BELOW`
    compares, -1 for one work item (always serial)."""

    __slots__ = ("_kernel_of", "_head", "_tail", "_size", "_fns")

    def __init__(self, kernel_of, head: tuple, tail: tuple, size: int):
        self._kernel_of, self._head, self._tail, self._size = kernel_of, head, tail, size
        self._fns: list = [None, None]

    def __call__(self, *middle) -> None:
        args = (*self._head, *middle, *self._tail)
        n = team() if PARALLEL and self._size >= config.CPU_SERIAL_BELOW else 0
        par = n > 0
        fn = self._fns[par]
        if fn is None:                                  # the first call: the dispatcher, then its entry point
            k = self._kernel_of(par)
            run(k, par, *args)
            self._fns[par] = _entry_point(k, args)
        elif par:
            with _one_at_a_time:
                threads.run_on(fn, n, args)
        else:
            fn(*args)

    def once(self, *middle) -> None:
        """One launch through the dispatcher (:func:`fastema._launch.launch`: no entry point looked up)."""
        par = PARALLEL and self._size >= config.CPU_SERIAL_BELOW and team() > 0
        run(self._kernel_of(par), par, *self._head, *middle, *self._tail)


def _work(t, rows: int) -> int:
    return t.n * rows if t.chunks > 1 else -1


def plan_lerp_launch(group, plan: dict, gi: int, stochastic: bool) -> BoundLaunch:
    """``run(given)``: one ``update()`` call of a model EMA with its plan on the device, in one launch
    (``kernels.cpu.plan_lerp_kernel``; see :func:`fastema._launch.plan_lerp_launcher`)."""
    t = group.tables
    kinds = (group.shadow_kind, group.src_kind, stochastic)
    return BoundLaunch(lambda par: K.plan_lerp_kernel(*kinds, par),
                       (*t.args(), plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(gi)),
                       _work(t, len(plan["decays"])))


def copy_launch(group, to_shadow: bool, row_lo: int, row_hi: int, flag) -> BoundLaunch:
    """``run()``: the ``"copy"`` launch with every argument bound (see :func:`fastema._launch.copy_launcher`)."""
    t = group.tables
    kinds = (group.shadow_kind, group.src_kind, to_shadow)
    return BoundLaunch(lambda par: K.copy_kernel(*kinds, par), t.args(),
                       (row_lo, row_hi, _NO_FLAG if flag is None else flag), _work(t, row_hi - row_lo))


def plan_launch(group, plan: dict) -> BoundLaunch:
    """``run(given)``: a model EMA's plan step (``kernels.cpu.plan_kernel``; see
    :func:`fastema._launch.plan_launcher`)."""
    return BoundLaunch(lambda par: K.plan_kernel(), (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"]), -1)


def nonfinite_launch(group, flag) -> BoundLaunch:
    """``run()``: the ``"nonfinite"`` scan with every argument bound (see
    :func:`fastema._launch.nonfinite_launcher`)."""
    t = group.tables
    kind = group.src_kind
    return BoundLaunch(lambda par: K.nonfinite_kernel(kind, par), (t.seg_addr, t.seg_offset, t.chunk_seg,
                                                                   t.chunk_begin), (flag,), _work(t, 1))


def _entry_point(kernel, args):
    """The entry point of ``kernel``'s overload compiled for ``args``' types (no type resolution
    when called), or the dispatcher itself where numba does not show one."""
    try:
        entry = kernel.overloads[tuple(map(numba.typeof, args))].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return kernel
    return entry if callable(entry) else kernel


def _kinds(group, *more):
    return (group.shadow_kind, group.src_kind, *more)


def _prepare_lerp(group, *, flag=None, stochastic: bool = False, cast) -> LerpLaunch:
    return LerpLaunch(group, flag, stochastic, cast)


def _prepare_bema(group, *, flag=None) -> BoundLaunch:                       # run(alpha)
    t, kind = group.tables, group.shadow_kind
    return BoundLaunch(lambda par: K.bema_kernel(kind, par), t.args(), (_NO_FLAG if flag is None else flag,),
                       _work(t, 3))


def _prepare_plan(group, *, state, params, decays, w32, w64, flag, keys) -> BoundLaunch:   # run(given)
    return plan_launch(group, {"state": state, "params": params, "decays": decays, "w32": w32, "w64": w64,
                               "flag": flag, "keys": keys})


def _prepare_copy(group, *, to_shadow: bool, row_lo: int, row_hi: int, flag=None) -> BoundLaunch:
    return copy_launch(group, to_shadow, row_lo, row_hi, flag)


def _prepare_swap(group, *, mode: int, row: int) -> BoundLaunch:
    t, kinds = group.tables, _kinds(group, mode)
    return BoundLaunch(lambda par: K.swap_kernel(*kinds, par), t.args(), (row,), _work(t, 1))


def _prepare_window(group, *, ring_kind: int) -> BoundLaunch:      # run(ring_addr, slot, full, count, recompute)
    t, src_kind = group.tables, group.src_kind
    return BoundLaunch(lambda par: K.window_kernel(ring_kind, src_kind, par), t.args(), (), _work(t, 3))


class _Streams:
    """A metric-streams launch (``run(values, ...)``): serial or parallel by the values' size at each call
    (:data:`config.CPU_STREAMS_SERIAL_BELOW`), through the kernel's dispatcher."""

    __slots__ = ("_kernel_of",)

    def __init__(self, kernel_of):
        self._kernel_of = kernel_of

    def __call__(self, values, *rest) -> None:
        par = PARALLEL and values.size >= config.CPU_STREAMS_SERIAL_BELOW and team() > 0
        run(self._kernel_of(par), par, values, *rest)

    once = __call__


def _prepare_ema_streams(group, *, mode: int, skip: bool) -> _Streams:   # run(values, w0, c, per_stream, a, b, d)
    kind = group.src_kind
    return _Streams(lambda par: K.ema_kernel(kind, mode, skip, par))


def _prepare_sma_streams(group, *, skip: bool) -> _Streams:   # run(values, w0, c, ..., n, bad, slot)
    kind = group.src_kind
    return _Streams(lambda par: K.sma_kernel(kind, skip, par))


PREPARE = {"lerp": _prepare_lerp, "bema": _prepare_bema, "plan": _prepare_plan, "copy": _prepare_copy,
           "swap": _prepare_swap, "nonfinite": lambda group, *, flag: nonfinite_launch(group, flag),
           "window": _prepare_window, "ema_streams": _prepare_ema_streams, "sma_streams": _prepare_sma_streams}
"""``op -> prepare(group, **fixed)``: the CPU's launches (:func:`fastema._launch.prepare`)."""


def first_bad_weight(c: np.ndarray) -> int:
    """The index of the first per-stream sample weight in the host array ``c`` that
    :func:`ema_streams` / :func:`sma_streams` would count as 0 (NaN, inf, negative), or -1: the
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
