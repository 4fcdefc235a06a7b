"""The CPU's prepared launches: one launch of one op over one group, its fixed arguments bound once.

:data:`PREPARE` is the CPU's table of prepare functions (:func:`fastema._launch.prepare`; their
keyword signatures are the op table's, :mod:`.op`). A launch reads its group's tables at each call
(``group.tables``: one identity test, the tables' arguments taken again only where they were
replaced), so a launch kept by its group never goes stale when the sources move; after its first
call it calls the compiled overload's own entry point, per serial/parallel choice, with no numba
dispatcher (no per-call type resolution). Serial or parallel by the work's size
(:data:`.config.CPU_SERIAL_BELOW`), on :func:`.pool.team`'s threads (the pool, the lock and the
fork rules are :mod:`.pool`'s).
"""
from __future__ import annotations

import operator
from typing import Any

import numba
import numpy as np

from .. import config
from ..op import Kernel
from . import pool as P  # the pool: PARALLEL, team, run, run_parallel, and the kernel factories K

_NO_FLAG = np.zeros(1, np.int32)     # never written: passed when no guard is asked for
_ZERO_KEY = np.uint32(0)
_HOST_KEY = numba.typeof(_ZERO_KEY)

_TABLES = operator.methodcaller("args")         # a launch over the tables: n, shadows, sources, offsets, chunks
_SCANNED = operator.methodcaller("scanned")     # a scan of the sources (no shadow)


class CpuLerp(Kernel):
    """One group's ``"lerp"`` launch with everything but the weights and the key bound once: the
    flag, the kinds, and after the first call the compiled overload's own entry point for each
    (serial/parallel, weights type, key type). The tables are the group's at each call. A host
    weight tuple is cast to ``cast`` once per tuple object; its type is then fixed by its length. A
    key held on the device (an int64[1] array: a device plan's) is typed once per array object."""

    __slots__ = ("_group", "_t", "_head", "_flag", "_n", "_chunks", "_kinds", "_cast", "_w_in", "_w", "_wtype",
                 "_k_in", "_k", "_ktype", "_size", "_fns", "_calls", "_args")

    def __init__(self, group, flag, stochastic: bool, cast):
        self._group = group
        self._flag = _NO_FLAG if flag is None else flag
        self._kinds = (group.shadow_kind, group.src_kind, stochastic)
        self._cast = cast
        self._w_in: Any = self         # no weights yet (never a weights object)
        self._k_in: object = self      # no key yet
        self._w: object = None
        self._k: object = _ZERO_KEY
        self._wtype: object = None
        self._ktype: object = _HOST_KEY
        self._size = -1
        self._calls: dict = {}         # (parallel, weights type, key type) -> the overload's entry point
        self._fns: list = [None, None]     # [serial, parallel] entry points for the types now
        self._follow(group.tables)

    def _follow(self, t) -> None:
        """The group's tables are ``t`` (at construction, and where a call finds them replaced)."""
        self._t, self._head = t, t.args()
        self._n, self._chunks = t.n, t.chunks
        if self._w_in is not self:
            self._size = self._n * len(self._w_in) if self._chunks > 1 else -1
        self._args = (*self._head, self._w, self._flag, self._k)

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
        if self._group.tables is not self._t:
            self._follow(self._group.tables)            # the sources moved: the group's new tables
        if weights is not self._w_in and (type(weights) is not tuple or weights != self._w_in):
            self._weights(weights)                      # (host weights equal to the last ones: kept)
        if key is not self._k_in:
            self._key(key)
        n = P.team() if P.PARALLEL and self._size >= config.CPU_SERIAL_BELOW else 0
        par = n > 0
        fn = self._fns[par]
        if fn is None:                                  # the first call: the dispatcher, then its entry point
            k = P.K.lerp_kernel(*self._kinds, par, self._ktype is not _HOST_KEY)
            P.run(k, par, *self._args)
            self._fns[par] = self._calls[(par, self._wtype, self._ktype)] = _entry_point(k, self._args)
        elif par:
            P.run_parallel(fn, n, self._args)
        else:
            fn(*self._args)

    def once(self, weights, key=0) -> None:
        """One launch through the dispatcher (:func:`fastema._launch.launch`: no entry point looked
        up)."""
        self._weights(weights)
        self._key(key)
        par = P.PARALLEL and self._size >= config.CPU_SERIAL_BELOW and P.team() > 0
        P.run(P.K.lerp_kernel(*self._kinds, par, self._ktype is not _HOST_KEY), par, *self._args)


class CpuLaunch(Kernel):
    """A launch whose arguments are bound once but for those given at each call (``run(*middle)``,
    between ``head`` and ``tail``, of fixed numba types; first, what ``tables_of`` takes of the
    group's tables, none where None), calling the compiled overload's entry point after the
    dispatcher's first call, per serial/parallel choice. ``kernel_of(parallel)`` gives the
    dispatcher; ``rows``: the rows the work spans (its size, elements times rows, is what
    :data:`config.CPU_SERIAL_BELOW` compares; one chunk, or no tables: always serial)."""

    __slots__ = ("_group", "_t", "_front", "_kernel_of", "_head", "_tail", "_rows", "_size", "_fns", "_tables_of")

    def __init__(self, group, kernel_of, head: tuple, tail: tuple, rows: int, tables_of=_TABLES):
        self._group, self._kernel_of, self._head, self._tail, self._rows = group, kernel_of, head, tail, rows
        self._tables_of = tables_of
        self._fns: list = [None, None]
        self._follow(group.tables)

    def _follow(self, t) -> None:
        self._t = t
        # what comes before ``middle``: what tables_of takes of the tables (none where None), then head
        self._front = self._head if self._tables_of is None else (*self._tables_of(t), *self._head)
        self._size = t.n * self._rows if self._tables_of is not None and t.chunks > 1 else -1

    def __call__(self, *middle) -> None:
        if self._group.tables is not self._t:
            self._follow(self._group.tables)            # the sources moved: the group's new tables
        args = (*self._front, *middle, *self._tail)
        n = P.team() if P.PARALLEL and self._size >= config.CPU_SERIAL_BELOW else 0
        par = n > 0
        fn = self._fns[par]
        if fn is None:                                  # the first call: the dispatcher, then its entry point
            k = self._kernel_of(par)
            P.run(k, par, *args)
            self._fns[par] = _entry_point(k, args)
        elif par:
            P.run_parallel(fn, n, args)
        else:
            fn(*args)

    def once(self, *middle) -> None:
        """One launch through the dispatcher (:func:`fastema._launch.launch`: no entry point looked
        up)."""
        if self._group.tables is not self._t:
            self._follow(self._group.tables)
        par = P.PARALLEL and self._size >= config.CPU_SERIAL_BELOW and P.team() > 0
        P.run(self._kernel_of(par), par, *self._front, *middle, *self._tail)


def _entry_point(kernel, args):
    """The entry point of ``kernel``'s overload compiled for ``args``' types (no type resolution
    when called), or the dispatcher itself where numba does not show one."""
    try:
        entry = kernel.overloads[tuple(map(numba.typeof, args))].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return kernel
    return entry if callable(entry) else kernel


def _flag(flag):
    return _NO_FLAG if flag is None else flag


class CpuStreams(Kernel):
    """A metric-streams launch (``run(values, ...)``): serial or parallel by the values' size at
    each call (:data:`config.CPU_STREAMS_SERIAL_BELOW`), through the kernel's dispatcher."""

    __slots__ = ("_kernel_of",)

    def __init__(self, kernel_of):
        self._kernel_of = kernel_of

    def __call__(self, values, *rest) -> None:
        par = P.PARALLEL and values.size >= config.CPU_STREAMS_SERIAL_BELOW and P.team() > 0
        P.run(self._kernel_of(par), par, values, *rest)

    once = __call__


# ------------------------------------------------------------ the prepare functions (the op table's signatures)

def _lerp(group, *, flag=None, stochastic=False, cast) -> CpuLerp:                    # run(weights, key=0)
    return CpuLerp(group, flag, stochastic, cast)


def _plan_lerp(group, *, state, params, decays, w32, w64, flag, keys, done, gi, stochastic=False) -> CpuLaunch:
    kinds = (group.shadow_kind, group.src_kind, stochastic)                           # run(given)
    return CpuLaunch(group, lambda par: P.K.plan_lerp_kernel(*kinds, par), (state, params, decays),
                       (w32, w64, flag, keys, done, np.int64(gi)), len(decays))


def _bema(group, *, flag=None) -> CpuLaunch:                                           # run(alpha)
    kind = group.shadow_kind
    return CpuLaunch(group, lambda par: P.K.bema_kernel(kind, par), (), (_flag(flag),), 3)


def _plan(group, *, state, params, decays, w32, w64, flag, keys) -> CpuLaunch:        # run(given)
    return CpuLaunch(group, lambda par: P.K.plan_kernel(), (state, params, decays), (w32, w64, flag, keys), 1,
                       tables_of=None)


def _copy(group, *, to_shadow, row_lo, row_hi, flag=None) -> CpuLaunch:                # run()
    kinds = (group.shadow_kind, group.src_kind, to_shadow)
    return CpuLaunch(group, lambda par: P.K.copy_kernel(*kinds, par), (), (row_lo, row_hi, _flag(flag)),
                       row_hi - row_lo)


def _swap(group, *, mode, row) -> CpuLaunch:                                           # run()
    kinds = (group.shadow_kind, group.src_kind, mode)
    return CpuLaunch(group, lambda par: P.K.swap_kernel(*kinds, par), (), (row,), 1)


def _nonfinite(group, *, flag) -> CpuLaunch:                                           # run()
    kind = group.src_kind
    return CpuLaunch(group, lambda par: P.K.nonfinite_kernel(kind, par), (), (flag,), 1, tables_of=_SCANNED)


def _window(group, *, ring_kind) -> CpuLaunch:               # run(ring_addr, slot, full, count, recompute)
    src_kind = group.src_kind
    return CpuLaunch(group, lambda par: P.K.window_kernel(ring_kind, src_kind, par), (), (), 3)


def _streams(group, *, parts, skip, weighted) -> CpuStreams:  # run(values, w0, c, ..., slot, filled, widen)
    kind = group.src_kind
    return CpuStreams(lambda par: P.K.streams_kernel(kind, parts, skip, weighted, par))


PREPARE = {"lerp": _lerp, "plan_lerp": _plan_lerp, "bema": _bema, "plan": _plan, "copy": _copy, "swap": _swap,
           "nonfinite": _nonfinite, "window": _window, "streams": _streams}
"""``op -> prepare(group, **fixed)``: the CPU's launches (:func:`fastema._launch.prepare`)."""
