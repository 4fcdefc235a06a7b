"""CUDA launches bound once per group: the per-step path (issue 23 item 1, issue 37 D1-D3, C4, C7).

numba-cuda's dispatcher, at every launch, types the arguments, picks the compiled overload and
marshals every argument (``_Kernel._prepare_args``: an array is 5 + 2 ndim values), then cuda.core
packs them into a new parameter block and launches (measured on an H100: 170-590 us of host time
per update). A group's launch changes little from step to step: the tables are the same device
arrays, the flag and a device plan's weight and key arrays too. A bound launch (:class:`LerpLaunch`,
:class:`BoundLaunch`):

- lets the dispatcher make its first launch (compiling if needed) and keeps the overload it ran,
  found in the dispatcher's ``overloads`` by the arguments' numba types (no callback on numba's
  shared, lru-cached launch configuration, which another thread could be launching through: C7);
- marshals each argument once with numba-cuda's own ``_prepare_args`` and packs the values once
  into one parameter block (:class:`_Block`: each value in the C type cuda.core's ``ParamHolder``
  gives it); per step only an argument that is a new object (host weights, a stochastic-rounding
  key) is marshalled again, and its values are written into the block in place (D2);
- launches with ``cuLaunchKernel`` and the block's address, with no context push and pop where
  the device's primary context is current already (one ``cuCtxGetCurrent``; torch keeps it
  current), else inside ``cuda.gpus[device]`` (D1). Every CUDA call of a binding (the first launch,
  loading the kernel's module) runs inside its device's context (C4).

An argument of another numba type than the kept overload's goes through the dispatcher again. The
numba-cuda internals used are checked once (:func:`cached_launch_available`); where they differ
(another numba-cuda than 0.30) every launch goes through the dispatcher, with one warning, and so
does every launch under FASTEMA_CUDA_LAUNCH=dispatcher and in the Numba CUDA simulator.
"""
from __future__ import annotations

import ctypes
import functools
import operator

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from . import config
from . import cuda as C

_NUMBA_CUDA_KNOWN = ("0.30.",)
_ZERO_KEY = np.uint32(0)


@functools.cache
def cached_launch_available() -> bool:
    """True when the cached launch path can run here: a real GPU (not the simulator), the numba-cuda
    internals it uses present, and FASTEMA_CUDA_LAUNCH not set to ``dispatcher``."""
    import os

    if C.SIMULATOR or os.environ.get("FASTEMA_CUDA_LAUNCH", "cached") == "dispatcher":
        return False
    try:
        import importlib.metadata as md

        from numba.cuda import dispatcher as D

        version = md.version("numba-cuda")
        driver = C._driver()
        ok = (version.startswith(_NUMBA_CUDA_KNOWN) and hasattr(D._Kernel, "_prepare_args")
              and hasattr(D._Kernel, "argument_types") and hasattr(D, "CUDADispatcher")
              and all(hasattr(driver, f) for f in ("cuLaunchKernel", "cuCtxGetCurrent", "CUfunction", "CUstream")))
    except Exception:                                     # noqa: BLE001 - any difference: the dispatcher
        version, ok = "unknown", False
    if not ok:
        import warnings

        warnings.warn(f"fastema: numba-cuda {version}'s launch internals are not the ones fastema knows (0.30), so "
                      f"every CUDA launch goes through numba's dispatcher (tens to hundreds of us of host time a "
                      f"call)", RuntimeWarning, stacklevel=3)
    return ok


# ---------------------------------------------------------------- the driver calls (the fake GPU replaces them)

def _current_context() -> int:
    """The handle of the CUDA context current on this thread (0: none)."""
    d = C._driver()
    err, ctx = d.cuCtxGetCurrent()
    return 0 if err else int(ctx)


@functools.cache
def _primary_context(index: int) -> int:
    """The handle of device ``index``'s primary context (retained once by numba; not pushed)."""
    return int(cuda.gpus[index].get_primary_context().handle)


@functools.lru_cache(maxsize=64)
def _driver_stream(raw: int):
    return C._driver().CUstream(raw)


def _function(cufunc):
    """The driver handle a launch takes for numba's loaded kernel ``cufunc`` (a CUkernel, as CUfunction)."""
    return C._driver().CUfunction(int(cufunc.handle))


def _driver_launch(func, blocks: int, threads: int, stream, params: int) -> None:
    """``cuLaunchKernel`` with the parameter block at address ``params``; raises on an error."""
    d = C._driver()
    err, = d.cuLaunchKernel(func, blocks, 1, 1, threads, 1, 1, 0, stream, params, 0)
    if err:
        from numba.cuda.cudadrv.driver import CudaAPIError

        raise CudaAPIError(int(err), f"cuLaunchKernel: {err!r}")


@functools.cache
def _sm_count(index: int) -> int:
    """Device ``index``'s multiprocessor count (0 where it cannot be read: no cap from it)."""
    try:
        return int(cuda.gpus[index].MULTIPROCESSOR_COUNT)
    except Exception:                                     # noqa: BLE001 - the simulator, an odd device
        return 0


# ---------------------------------------------------------------- the parameter block

_CTYPES = {np.bool_: ctypes.c_bool, np.int8: ctypes.c_int8, np.int16: ctypes.c_int16, np.int32: ctypes.c_int32,
           np.int64: ctypes.c_int64, np.uint8: ctypes.c_uint8, np.uint16: ctypes.c_uint16,
           np.uint32: ctypes.c_uint32, np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float,
           np.float64: ctypes.c_double}


def _plain(v):
    """The value a slot is set to: a ctypes value's, a NumPy scalar's, or ``v``."""
    if isinstance(v, ctypes._SimpleCData):
        return v.value
    if isinstance(v, np.generic):
        return v.item()
    return v


def _c_value(v):
    """``v`` (a value numba-cuda's ``_prepare_args`` gives) in the C type cuda.core's ``ParamHolder``
    packs it in: a Python int (a pointer, a size; a bool too) as intptr_t, a float as double, a ctypes
    value as its own type, a NumPy scalar as its C type."""
    if isinstance(v, ctypes._SimpleCData):
        return type(v)(v.value)
    if isinstance(v, int):
        return ctypes.c_ssize_t(v)
    if isinstance(v, float):
        return ctypes.c_double(v)
    t = _CTYPES.get(type(v))
    if t is not None:
        return t(v.item())
    if isinstance(v, np.float16):
        return ctypes.c_uint16(int(v.view(np.uint16)))
    raise TypeError(f"fastema: no C type for a kernel argument value {v!r} ({type(v).__name__})")


class _Block:
    """One launch's kernel parameters, packed once: a C value per marshalled value (``slots``) and
    the array of their addresses that ``cuLaunchKernel`` reads (at ``address``). ``patch`` writes
    new values in place (the same C types: the same numba type marshals to the same types)."""

    __slots__ = ("slots", "pointers", "address")

    def __init__(self, values: list):
        self.slots = [_c_value(v) for v in values]
        self.pointers = (ctypes.c_void_p * max(len(self.slots), 1))(*map(ctypes.addressof, self.slots))
        self.address = ctypes.addressof(self.pointers)

    def patch(self, start: int, values: list) -> None:
        for slot, v in zip(self.slots[start:start + len(values)], values):
            slot.value = _plain(v)


# ---------------------------------------------------------------- bound launches

def _typeof(value):
    """The numba type the dispatcher gives ``value`` as a kernel argument."""
    from numba.cuda.typing.typeof import Purpose, typeof

    return typeof(value, Purpose.argument)


def _same_type(kernel, value, ty) -> bool:
    try:
        return _typeof(value) == ty
    except Exception:                                     # noqa: BLE001 - untyped: the dispatcher decides
        return False


def _overload(dispatcher, args):
    """The overload numba's dispatcher launched for ``args``: the one compiled for their numba types
    (it compiles the exact types where none matches; None where they cannot be typed here)."""
    try:
        return dispatcher.overloads.get(tuple(map(_typeof, args)))
    except Exception:                                     # noqa: BLE001 - untyped: nothing kept
        return None


class _Bound:
    """A kernel launch bound once (see the module docstring): the overload the dispatcher launched
    first, each argument marshalled by numba once per object, one parameter block patched in place."""

    __slots__ = ("device", "index", "kernel", "func", "types", "held", "starts", "counts", "block", "last")

    def __init__(self, device: str):
        self.device, self.index = device, C._index(device)
        self.kernel = None                                # the overload the dispatcher launched first
        self.func = None                                  # its driver handle
        self.types: tuple = ()                            # its argument types
        self.held: list = []                              # per argument: the object its block values are of
        self.starts: list = []                            # per argument: its first slot in the block
        self.counts: list = []                            # per argument: how many slots
        self.block: _Block | None = None
        self.last: tuple = ()                             # the last launch's arguments

    def _launch(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Launch ``dispatcher``'s kernel with ``args`` on the raw stream ``raw``: the kept overload's
        parameter block (patched where an argument changed) where every argument fits it, else
        through the dispatcher (``dispatcher(args)`` gives it), keeping the overload it launched."""
        if C.WAITING:                                     # released sources waiting for their events
            C.prune_retired(self.device, raw)
        if self.kernel is not None:
            last = self.last
            if (len(args) == len(last) and all(map(operator.is_, args, last))) or self._patch(args):
                self.last = args
                stream = _driver_stream(raw)
                if _current_context() == _primary_context(self.index):
                    _driver_launch(self.func, blocks, config.CUDA_THREADS, stream, self.block.address)
                else:                                     # another context current (or none): push ours
                    with cuda.gpus[self.index]:
                        _driver_launch(self.func, blocks, config.CUDA_THREADS, stream, self.block.address)
                return
        self._through_dispatcher(dispatcher(args), args, C.external_stream(raw), blocks)

    def _patch(self, args) -> bool:
        """Write the arguments that are new objects into the block (each marshalled once by numba's
        own ``_prepare_args``; numbers and tuples equal to the held ones count as the same); False
        when one has another numba type than the overload's (the dispatcher decides then)."""
        if len(args) != len(self.types):
            return False
        for i, value in enumerate(args):
            held = self.held[i]
            if held is value or (isinstance(value, (int, np.integer, tuple)) and type(held) is type(value)
                                 and held == value):
                continue
            ty = self.types[i]
            if not _same_type(self.kernel, value, ty):
                return False
            marshalled, retr = [], []
            self.kernel._prepare_args(ty, value, 0, retr, marshalled)
            if retr or len(marshalled) != self.counts[i]:     # a host array copied over: not ours to cache
                return False
            self.block.patch(self.starts[i], marshalled)
            self.held[i] = value
        return True

    def _through_dispatcher(self, dispatcher, args, stream, blocks) -> None:
        """A launch by numba's dispatcher (compiling if needed), keeping the overload it launched and
        packing its parameter block."""
        C._run(dispatcher, self.device, stream, blocks, *args)     # inside the device's context, as below
        if not cached_launch_available():
            return
        with cuda.gpus[self.index]:                       # every CUDA call of the binding on its device (C4)
            kernel = _overload(dispatcher, args)
            if kernel is None or getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False):
                return                                    # launched; the next call asks the dispatcher again
            func = _function(kernel._codelibrary.get_cufunc())   # the module loaded into this device's context
        values, starts, counts = [], [], []
        for ty, value in zip(kernel.argument_types, args):
            marshalled, retr = [], []
            kernel._prepare_args(ty, value, 0, retr, marshalled)
            if retr:                                      # a host array copied over: not ours to cache
                return
            starts.append(len(values))
            counts.append(len(marshalled))
            values.extend(marshalled)
        self.kernel, self.func, self.types = kernel, func, tuple(kernel.argument_types)
        self.held, self.starts, self.counts, self.block, self.last = list(args), starts, counts, _Block(values), args


class LerpLaunch(_Bound):
    """One group's ``"lerp"`` launch on CUDA, bound once (see the module docstring); called as
    ``run(weights, key=0)`` on the stream the group's framework has current at that call. ``cast``:
    the kernel's arithmetic type for host weights."""

    __slots__ = ("group", "flag", "stochastic", "cast", "w_in", "w")

    def __init__(self, group, flag, stochastic: bool, cast):
        super().__init__(group.device)
        self.group, self.stochastic, self.cast = group, stochastic, cast
        self.flag = C._zero_flag(group.device) if flag is None else flag     # the zero flag is never freed
        self.w_in: object = self                          # no host weights yet
        self.w: tuple = ()

    def __call__(self, weights, key=0) -> None:
        if isinstance(weights, tuple):
            if weights is not self.w_in:
                self.w_in, self.w = weights, tuple(map(self.cast, weights))
            weights = self.w
        key = key if not isinstance(key, int) else (np.uint32(key) if key else _ZERO_KEY)
        g = self.group
        args = (*g.tables.args(), weights, self.flag, key)
        self._launch(self._dispatcher, args, g.current_stream(), max(1, min(g.tables.chunks, config.CUDA_MAX_BLOCKS)))

    def _dispatcher(self, args):
        return K.lerp_kernel(self.group.shadow_kind, self.group.src_kind, self.stochastic,
                             not isinstance(args[-1], (int, np.integer)))


_TABLES = operator.methodcaller("args")           # a launch over the tables: n, shadows, sources, offsets, chunks


def _scanned(t) -> tuple:
    """The tables a scan of the sources reads (no shadow)."""
    return t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin


class BoundLaunch(_Bound):
    """A launch with its arguments bound once but for those given at each call (``run(*middle)``,
    between ``head`` and ``tail``; first, what ``tables_of`` takes of the group's tables at that call,
    none where None), on the stream current at that call. ``dispatcher``: the kernel's. The grid:
    ``grid`` blocks where given, else a block per chunk up to ``CUDA_MAX_BLOCKS`` and, with ``per_sm``
    (the name of a :mod:`.config` tunable), at most that many blocks per multiprocessor."""

    __slots__ = ("group", "dispatcher", "head", "tail", "per_sm", "tables_of", "grid")

    def __init__(self, group, dispatcher, head: tuple, tail: tuple, per_sm: str | None = None, tables_of=_TABLES,
                 grid: int | None = None):
        super().__init__(group.device)
        self.group, self.dispatcher, self.head, self.tail, self.per_sm = group, dispatcher, head, tail, per_sm
        self.tables_of, self.grid = tables_of, grid

    def __call__(self, *middle) -> None:
        g = self.group
        front = () if self.tables_of is None else self.tables_of(g.tables)
        self._launch(self._dispatcher, (*front, *self.head, *middle, *self.tail), g.current_stream(), self.blocks())

    def blocks(self) -> int:
        if self.grid is not None:
            return self.grid
        blocks = max(1, min(self.group.tables.chunks, config.CUDA_MAX_BLOCKS))   # a rank may hold no element
        if self.per_sm is not None:
            cap = getattr(config, self.per_sm) * _sm_count(self.index)
            if cap:
                blocks = min(blocks, cap)
        return blocks

    def _dispatcher(self, args):
        return self.dispatcher


def plan_launch(group, plan: dict) -> BoundLaunch:
    """``run(given)``: the one-thread plan kernel of a model EMA's device plan (see
    :func:`fastema._launch.plan_launcher`); ``group`` gives the device and the stream."""
    return BoundLaunch(group, K.plan_kernel(), (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"]), tables_of=None, grid=1)


def nonfinite_launch(group, flag) -> BoundLaunch:
    """``run()``: the scan of a group's sources for inf/NaN into ``flag`` (see
    :func:`fastema._launch.nonfinite_launcher`)."""
    return BoundLaunch(group, K.nonfinite_kernel(group.src_kind), (), (flag,), tables_of=_scanned)


def plan_lerp_launch(group, plan: dict, gi: int, stochastic: bool) -> BoundLaunch:
    """``run(given)``: see :func:`fastema._launch.plan_lerp_launcher` (``kernels.cuda.plan_lerp_kernel``).
    Its grid is capped at ``config.CUDA_PLAN_LERP_BLOCKS_PER_SM`` blocks per multiprocessor: every
    block's first thread runs the plan step (about 20 dependent loads and a float64 pow) before it
    streams, so a few waves of blocks that grid-stride over the chunks pay it far less often than a
    block per chunk (issue 37, D3)."""
    return BoundLaunch(group, K.plan_lerp_kernel(group.shadow_kind, group.src_kind, stochastic),
                       (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(gi)),
                       per_sm="CUDA_PLAN_LERP_BLOCKS_PER_SM")


def copy_launch(group, to_shadow: bool, row_lo: int, row_hi: int, flag) -> BoundLaunch:
    """``run()``: see :func:`fastema._launch.copy_launcher`."""
    return BoundLaunch(group, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), (),
                       (row_lo, row_hi, C._zero_flag(group.device) if flag is None else flag))
