"""CUDA launchers (same signatures as :mod:`.cpu`), and the CUDA pieces of dispatch: stream
objects, table upload and in-place update, retirement events.

Nothing on a per-step path allocates, frees or copies from pageable memory: tables are
allocated once (copied asynchronously on the caller's stream), later address changes are
written into the same device table from pinned staging slots on the caller's stream (so a
captured CUDA graph keeps reading a live table that follows re-allocated sources); flags are
zeroed by their framework (:meth:`fastema._backends.Backend.zero_`).

Imported only when a CUDA buffer arrives (or under the Numba CUDA simulator). Imports
nothing back from the package: its tunables come from :mod:`.config`.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from ..kernels._cuda_hw import SIMULATOR
from . import config

K.CACHE = config.CUDA_CACHE             # before any kernel is built (FASTEMA_CUDA_CACHE=1)


def _index(device: str) -> int:
    """N of "cuda:N" (the names fastema._backends.device_name gives)."""
    return int(device.split(":")[1])


@functools.lru_cache(maxsize=64)
def external_stream(ptr: int):
    """The Numba stream object of a raw CUDA stream handle (0: 0, the legacy default stream)."""
    return cuda.external_stream(ptr) if ptr else 0


def _on(stream):
    """A Numba stream object for ``stream`` (0: the legacy default stream, as a stream, so
    copies on it are asynchronous: numba makes a synchronous copy when given no stream)."""
    return stream if stream else cuda.default_stream()


def to_device(a: np.ndarray, device: str, stream=0):
    """A new device copy of ``a``, copied asynchronously on ``stream`` (a pageable source is
    staged by the driver at once: no device synchronisation)."""
    with cuda.gpus[_index(device)]:
        return cuda.to_device(np.ascontiguousarray(a), stream=_on(stream))


class Staging:
    """Pinned host slots through which one device table is rewritten in place, in stream
    order. A slot is reused only once the copy that read it has run (an event per slot);
    only ``config.CUDA_STAGING_SLOTS`` rewrites queued on the GPU at once make the host wait."""

    def __init__(self, size: int, dtype, device: str):
        with cuda.gpus[_index(device)]:
            self.host = [cuda.pinned_array(max(size, 1), dtype) for _ in range(config.CUDA_STAGING_SLOTS)]
        self.events: list = [None] * len(self.host)
        self.next = 0

    def write(self, device_array, values: np.ndarray, device: str, stream) -> None:
        i = self.next
        self.next = (i + 1) % len(self.host)
        with cuda.gpus[_index(device)]:
            event = self.events[i]
            if event is not None and not event.query():
                event.synchronize()           # rare: every slot still has a copy queued behind it
            slot = self.host[i][:len(values)]
            slot[:] = values
            device_array.copy_to_device(slot, stream=_on(stream))
            if SIMULATOR:                     # the simulator copies at once
                return
            if event is None:
                event = self.events[i] = cuda.event(timing=False)
            event.record(_on(stream))


class AddressTables:
    """The device tables of one group's source addresses, all made at construction.

    One table (torch, CuPy): rewritten in place, so a captured CUDA graph, which holds the
    table's address, follows re-allocated sources. Two (JAX, TensorFlow: new arrays every
    step, whose addresses alternate between two sets when the framework reuses its buffers):
    addresses seen in either table switch to it with no copy; new ones overwrite the other
    table, in stream order after the launches that read it."""

    def __init__(self, first, addresses: np.ndarray, slots: int, device: str, stream):
        self.arrays = [first] + [to_device(addresses, device, stream) for _ in range(slots - 1)]
        self.held = [addresses.copy() for _ in range(slots)]
        self.current = 0
        self.staging = Staging(len(addresses), np.int64, device)

    def point(self, addresses: np.ndarray, device: str, stream):
        """The device table holding ``addresses`` (written now if none does)."""
        for i, held in enumerate(self.held):
            if np.array_equal(held, addresses):
                self.current = i
                return self.arrays[i]
        i = (self.current + 1) % len(self.arrays)
        self.staging.write(self.arrays[i], addresses, device, stream)
        self.held[i] = addresses.copy()
        self.current = i
        return self.arrays[i]


def upload(t, device: str, stream=0, slots: int = 1):
    """The tables on ``device`` (allocated once, copied on ``stream``), with ``slots`` address
    tables for later address changes (0: the addresses never change); the default flag is
    made now, not at a first update inside a graph capture."""
    d = functools.partial(to_device, device=device, stream=stream)
    _zero_flag(device)
    seg_addr = d(t.seg_addr)
    return t._replace(shadow_addr=d(t.shadow_addr), seg_addr=seg_addr, seg_offset=d(t.seg_offset),
                      chunk_seg=d(t.chunk_seg), chunk_begin=d(t.chunk_begin),
                      staging=AddressTables(seg_addr, t.seg_addr, slots, device, stream) if slots else None)


def update_addresses(t, addresses: np.ndarray, device: str, stream=0):
    """``t`` pointing at a device table that holds ``addresses`` (see :class:`AddressTables`):
    written on ``stream`` from pinned staging, nothing copied when a table holds them already."""
    return t._replace(seg_addr=t.staging.point(addresses, device, stream))


@functools.lru_cache(maxsize=16)
def _zero_flag(device: str):
    """An int32[1] zero per device: the flag of launches with no guard (never written)."""
    with cuda.gpus[_index(device)]:
        return cuda.to_device(np.zeros(1, np.int32), stream=cuda.default_stream())


def _run(kernel, device: str, stream, blocks, *args):
    with cuda.gpus[_index(device)]:
        if SIMULATOR or not stream:
            kernel[blocks, config.CUDA_THREADS](*args)
        else:
            kernel[blocks, config.CUDA_THREADS, stream](*args)


def _chunks(group, stream, kernel, *args):
    _run(kernel, group.device, stream, min(group.tables.chunks, config.CUDA_MAX_BLOCKS), *args)


def lerp(group, stream, *, weights, flag=None, key=0, stochastic=False):
    device_key = not isinstance(key, int)
    _chunks(group, stream, K.lerp_kernel(group.shadow_kind, group.src_kind, stochastic, device_key),
            *group.tables.args(), weights, _zero_flag(group.device) if flag is None else flag,
            key if device_key else np.uint32(key))


# ---------------------------------------------------------------- the lerp launch bound once (issue 23 item 1)
#
# numba-cuda's dispatcher, at every launch, types the arguments, picks the compiled overload, and
# marshals every argument (``_Kernel._prepare_args``: an array is 5 + 2 ndim values), then cuda.core
# packs and launches (measured on an H100: 170-590 us of host time per update). A group's lerp
# launch changes little from step to step: the tables are the same device arrays, the flag and a
# device plan's weight and key arrays too. ``LerpLaunch`` lets the dispatcher make its first launch
# (compiling if needed) and keeps what it launched (the overload, through the launch configuration's
# ``pre_launch_callbacks``), then marshals each argument with numba's own ``_prepare_args`` once per
# argument object and launches through ``cuda.core.launch`` with a cached ``LaunchConfig``: per step,
# only new objects (host weights, a stochastic-rounding key) are marshalled again. An argument of
# another numba type than the kept overload's goes through the dispatcher again. The numba-cuda
# internals used are checked once (``cached_launch_available``); where they differ (another numba-cuda
# than 0.30) every launch goes through the dispatcher, with one warning. FASTEMA_CUDA_LAUNCH=dispatcher
# turns the cached launch off.

_NUMBA_CUDA_KNOWN = ("0.30.",)
_ZERO_KEY = np.uint32(0)


@functools.cache
def cached_launch_available() -> bool:
    """True when the cached launch path can run here: a real GPU (not the simulator), the numba-cuda
    internals it uses present, and FASTEMA_CUDA_LAUNCH not set to ``dispatcher``."""
    import os

    if SIMULATOR or os.environ.get("FASTEMA_CUDA_LAUNCH", "cached") == "dispatcher":
        return False
    try:
        import importlib.metadata as md

        from cuda.core import LaunchConfig, Stream, launch  # noqa: F401
        from numba.cuda import dispatcher as D

        version = md.version("numba-cuda")
        ok = (version.startswith(_NUMBA_CUDA_KNOWN) and hasattr(D._Kernel, "_prepare_args")
              and hasattr(D._Kernel, "argument_types") and "pre_launch_callbacks" in
              D._LaunchConfiguration.__init__.__code__.co_names)
    except Exception:                                     # noqa: BLE001 - any difference: the dispatcher
        version, ok = "unknown", False
    if not ok:
        import warnings

        warnings.warn(f"fastema: numba-cuda {version}'s launch internals are not the ones fastema knows (0.30), so "
                      f"every CUDA launch goes through numba's dispatcher (tens to hundreds of us of host time a "
                      f"call)", RuntimeWarning, stacklevel=3)
    return ok


@functools.lru_cache(maxsize=64)
def _core_stream(handle: int):
    from cuda.core import Stream

    return Stream.from_handle(handle)


@functools.lru_cache(maxsize=64)
def _core_config(blocks: int, threads: int):
    from cuda.core import LaunchConfig

    return LaunchConfig(grid=blocks, block=threads)


def _core_launch(stream, config_, kernel, *args) -> None:
    from cuda.core import launch

    launch(stream, config_, kernel, *args)


class _Bound:
    """A kernel launch bound once (see the section comment above): the overload the dispatcher
    launched first, and each argument marshalled by numba once per object."""

    __slots__ = ("device", "index", "kernel", "func", "types", "marshalled", "last")

    def __init__(self, device: str):
        self.device, self.index = device, _index(device)
        self.kernel = None                                # the overload the dispatcher launched first
        self.func = None
        self.types: tuple = ()
        self.marshalled: list = []                        # per argument: (the object, its kernel arguments)
        self.last: tuple = ((), [])                       # the last call's arguments and their kernel arguments

    def _launch(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Launch ``dispatcher``'s kernel with ``args`` on the raw stream ``raw``: through the kept
        overload where every argument fits it, else through the dispatcher (``dispatcher(args)``
        gives it), keeping the overload it launched."""
        if self.kernel is not None:
            last, kernelargs = self.last
            if len(args) != len(last) or not all(map(operator.is_, args, last)):   # the same objects: as last time
                kernelargs = self._marshal(args)
                if kernelargs is not None:
                    self.last = (args, kernelargs)
            if kernelargs is not None:
                with cuda.gpus[self.index]:
                    _core_launch(_core_stream(raw), _core_config(blocks, config.CUDA_THREADS), self.func,
                                 *kernelargs)
                return
        self._through_dispatcher(dispatcher(args), args, external_stream(raw), blocks)

    def _through_dispatcher(self, dispatcher, args, stream, blocks) -> None:
        """A launch by numba's dispatcher (compiling if needed), keeping the overload it launched."""
        if not cached_launch_available():
            _run(dispatcher, self.device, stream, blocks, *args)
            return
        launched: list = []
        with cuda.gpus[self.index]:
            configured = dispatcher[blocks, config.CUDA_THREADS, stream] if stream else \
                dispatcher[blocks, config.CUDA_THREADS]
            keep = lambda kernel, _: launched.append(kernel)     # noqa: E731
            configured.pre_launch_callbacks.append(keep)  # a shared (cached) configuration: removed at once
            try:
                configured(*args)
            finally:
                configured.pre_launch_callbacks.remove(keep)
        kernel = launched[-1] if launched else None
        if kernel is None or getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False):
            return                                        # launched; the next call asks the dispatcher again
        self.kernel, self.func = kernel, kernel._codelibrary.get_cufunc().kernel
        self.types = tuple(kernel.argument_types)
        self.marshalled = [(None, None)] * len(args)
        self.last = ((), [])                              # another kernel: the last call's arguments are not its
        self._marshal(args)

    def _marshal(self, args) -> list | None:
        """The kernel arguments of ``args`` for the kept overload, each marshalled by numba's own
        ``_prepare_args`` once per object (arrays: this very object; numbers and tuples: this value),
        or None when one has another numba type than the overload's (the dispatcher decides then)."""
        out: list = []
        for i, (value, ty) in enumerate(zip(args, self.types)):
            held, marshalled = self.marshalled[i]
            if held is not value and not (isinstance(value, (int, np.integer, tuple)) and type(held) is type(value)
                                          and held == value):
                if not _same_type(self.kernel, value, ty):
                    return None
                marshalled, retr = [], []
                self.kernel._prepare_args(ty, value, 0, retr, marshalled)
                if retr:                                  # a host array copied over: not ours to cache
                    return None
                self.marshalled[i] = (value, marshalled)
            out.extend(marshalled)
        return out


class LerpLaunch(_Bound):
    """One group's ``"lerp"`` launch on CUDA, bound once (see the section comment above); called as
    ``run(weights, key=0)`` on the stream the group's framework has current at that call. ``cast``:
    the kernel's arithmetic type for host weights."""

    __slots__ = ("group", "flag", "stochastic", "cast", "w_in", "w")

    def __init__(self, group, flag, stochastic: bool, cast):
        super().__init__(group.device)
        self.group, self.flag, self.stochastic, self.cast = group, flag, stochastic, cast
        self.w_in: object = self                          # no host weights yet
        self.w: tuple = ()

    def __call__(self, weights, key=0) -> None:
        if isinstance(weights, tuple):
            if weights is not self.w_in:
                self.w_in, self.w = weights, tuple(map(self.cast, weights))
            weights = self.w
        key = key if not isinstance(key, int) else (np.uint32(key) if key else _ZERO_KEY)
        g = self.group
        args = (*g.tables.args(), weights, _zero_flag(g.device) if self.flag is None else self.flag, key)
        self._launch(self._dispatcher, args, g.current_stream(), min(g.tables.chunks, config.CUDA_MAX_BLOCKS))

    def _dispatcher(self, args):
        return K.lerp_kernel(self.group.shadow_kind, self.group.src_kind, self.stochastic,
                             not isinstance(args[-1], (int, np.integer)))


class BoundLaunch(_Bound):
    """A launch over a group's tables with the other arguments bound once but for those given at each
    call (``run(*middle)``, between ``head`` and ``tail``), on the stream current at that call.
    ``kernel``: the dispatcher."""

    __slots__ = ("group", "dispatcher", "head", "tail")

    def __init__(self, group, dispatcher, head: tuple, tail: tuple):
        super().__init__(group.device)
        self.group, self.dispatcher, self.head, self.tail = group, dispatcher, head, tail

    def __call__(self, *middle) -> None:
        g = self.group
        args = (*g.tables.args(), *self.head, *middle, *self.tail)
        self._launch(self._dispatcher, args, g.current_stream(), min(g.tables.chunks, config.CUDA_MAX_BLOCKS))

    def _dispatcher(self, args):
        return self.dispatcher


def plan_lerp_launch(group, plan: dict, gi: int, stochastic: bool) -> BoundLaunch:
    """``run(given)``: see :func:`fastema._launch.plan_lerp_launcher` (``kernels.cuda.plan_lerp_kernel``)."""
    return BoundLaunch(group, K.plan_lerp_kernel(group.shadow_kind, group.src_kind, stochastic),
                       (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(gi)))


def copy_launch(group, to_shadow: bool, row_lo: int, row_hi: int, flag) -> BoundLaunch:
    """``run()``: see :func:`fastema._launch.copy_launcher`."""
    return BoundLaunch(group, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), (),
                       (row_lo, row_hi, _zero_flag(group.device) if flag is None else flag))


def _typeof(value):
    """The numba type the dispatcher gives ``value`` as a kernel argument."""
    from numba.cuda.typing.typeof import Purpose, typeof

    return typeof(value, Purpose.argument)


def _same_type(kernel, value, ty) -> bool:
    try:
        return _typeof(value) == ty
    except Exception:                                     # noqa: BLE001 - untyped: the dispatcher decides
        return False


def bema(group, stream, *, alpha, flag=None):
    _chunks(group, stream, K.bema_kernel(group.shadow_kind), *group.tables.args(), alpha,
            _zero_flag(group.device) if flag is None else flag)


def plan(group, stream, *, state, params, decays, given, w32, w64, flag, keys):
    _run(K.plan_kernel(), group.device, stream, 1, state, params, decays, np.int64(given), w32, w64, flag, keys)


def copy(group, stream, *, to_shadow, row_lo, row_hi, flag=None):
    _chunks(group, stream, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), *group.tables.args(), row_lo,
            row_hi, _zero_flag(group.device) if flag is None else flag)


def swap(group, stream, *, mode, row):
    _chunks(group, stream, K.swap_kernel(group.shadow_kind, group.src_kind, mode), *group.tables.args(), row)


def nonfinite(group, stream, *, flag):
    t = group.tables
    _chunks(group, stream, K.nonfinite_kernel(group.src_kind), t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin,
            flag)


def window(group, stream, *, ring_kind, ring_addr, slot, full, count, recompute):
    _chunks(group, stream, K.window_kernel(ring_kind, group.src_kind), *group.tables.args(), ring_addr, slot, full,
            count, recompute)


def _streams(group, stream, kernel, size, *args):
    blocks = max(1, min((size + config.CUDA_THREADS - 1) // config.CUDA_THREADS, config.CUDA_STREAM_MAX_BLOCKS))
    _run(kernel, group.device, stream, blocks, *args)


def ema_streams(group, stream, *, values, w0, c, per_stream, a, b, d, mode, skip):
    _streams(group, stream, K.ema_kernel(group.src_kind, mode, skip), values.size, values, w0, c, per_stream, a, b, d)


def sma_streams(group, stream, *, values, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp, n, bad, slot, skip):
    _streams(group, stream, K.sma_kernel(group.src_kind, skip), values.size, values, w0, c, per_stream, ring_v, ring_w,
             s, comp, ws, wcomp, n, bad, slot)


class Retired:
    """Objects kept alive until fastema's launches issued before their release have run: each
    release records an event on the launch stream, and what sits behind a passed event is
    dropped at the next release, without waiting. Only past ``config.CUDA_RETIRED_MAX``
    pending releases (the GPU that far behind the host) does the host wait for the oldest."""

    def __init__(self):
        self.pending: list = []               # (event, kept objects), oldest first

    def release(self, kept, device: str, stream) -> None:
        while self.pending and (self.pending[0][0] is None or self.pending[0][0].query()):
            self.pending.pop(0)
        if len(self.pending) >= config.CUDA_RETIRED_MAX:
            self.pending.pop(0)[0].synchronize()
        if SIMULATOR:                         # the simulator runs every launch to completion
            return
        with cuda.gpus[_index(device)]:
            event = cuda.event(timing=False)
            event.record(_on(stream))
        self.pending.append((event, kept))
