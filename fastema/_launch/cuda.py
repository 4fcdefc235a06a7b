"""CUDA launchers (same signatures as :mod:`.cpu`), and the CUDA pieces of dispatch: stream
objects, table upload and in-place update, retirement events, the capture query. Every launch goes
through :mod:`.cuda_bound` (the shipped device code, fastema's own argument block); the launches bound
once per group (the per-step path) live there too. The ops take the raw handle of the stream to launch on.

Nothing on a per-step path allocates, frees or copies from pageable memory: tables are
allocated once, at construction, and copied there on a private stream that is waited for (so
a first launch on any stream reads them written, and nothing waits for other work); later
address changes are written into the same device table from pinned staging slots on the
caller's stream (so a captured CUDA graph keeps reading a live table that follows re-allocated
sources); flags are zeroed by their framework (:meth:`fastema._backends.Backend.zero_`).

Imported only when a CUDA buffer arrives (or under the Numba CUDA simulator). Imports
nothing back from the package: its tunables come from :mod:`.config`.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from . import config
from .cuda_base import (  # noqa: F401
    SIMULATOR,
    WAITING,
    _dispatch,
    _driver,
    _index,
    capturing,
    cuda_versions,
    external_stream,
    prune_retired,
)
from .cuda_launch import launch_once


def _on(stream):
    """A Numba stream object for ``stream`` (0: the legacy default stream, as a stream, so
    copies on it are asynchronous: numba makes a synchronous copy when given no stream)."""
    return stream if stream else cuda.default_stream()


@functools.cache
def _upload_stream(index: int):
    """A stream of fastema's own on device ``index``, non-blocking (it waits for no other stream's
    work, the legacy stream's included), for the construction-time uploads."""
    if SIMULATOR:
        return cuda.stream()
    from numba.cuda.cudadrv.driver import binding, driver

    with cuda.gpus[index]:
        handle = driver.cuStreamCreate(binding.CUstream_flags.CU_STREAM_NON_BLOCKING.value)
        return cuda.external_stream(int(handle))     # never destroyed: one per device and process


def to_device(a: np.ndarray, device: str):
    """A new device copy of ``a``, written when this returns: copied on fastema's upload stream
    (:func:`_upload_stream`), which is then waited for. That wait is for this copy only (the
    stream waits for nothing else), and it orders the copy before every launch queued after it,
    on any stream: the caller's stream at construction (whatever it is) and the stream of a first
    launch may be two non-blocking streams that nothing orders (issue 37, C1)."""
    index = _index(device)
    with cuda.gpus[index]:
        stream = _upload_stream(index)
        out = cuda.to_device(np.ascontiguousarray(a), stream=stream)
        stream.synchronize()
        return out


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
    """The device tables of one group's source addresses, all made at construction (written when
    construction returns: :func:`to_device`).

    One table (torch, CuPy): rewritten in place, so a captured CUDA graph, which holds the
    table's address, follows re-allocated sources. Two (JAX, TensorFlow: new arrays every
    step, whose addresses alternate between two sets when the framework reuses its buffers):
    addresses seen in either table switch to it with no copy; new ones overwrite the other
    table, in stream order after the launches that read it."""

    def __init__(self, first, addresses: np.ndarray, slots: int, device: str):
        self.arrays = [first] + [to_device(addresses, device) for _ in range(slots - 1)]
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


def upload(t, device: str, slots: int = 1):
    """The tables on ``device`` (allocated once, written when this returns: :func:`to_device`), with
    ``slots`` address tables for later address changes (0: the addresses never change); the
    default flag is made now, not at a first update inside a graph capture."""
    d = functools.partial(to_device, device=device)
    _zero_flag(device)
    seg_addr = d(t.seg_addr)
    return t._replace(shadow_addr=d(t.shadow_addr), seg_addr=seg_addr, seg_offset=d(t.seg_offset),
                      chunk_seg=d(t.chunk_seg), chunk_begin=d(t.chunk_begin),
                      staging=AddressTables(seg_addr, t.seg_addr, slots, device) if slots else None)


def update_addresses(t, addresses: np.ndarray, device: str, stream=0):
    """``t`` pointing at a device table that holds ``addresses`` (see :class:`AddressTables`):
    written on ``stream`` from pinned staging, nothing copied when a table holds them already."""
    return t._replace(seg_addr=t.staging.point(addresses, device, stream))


class _ZeroFlags:
    """``_zero_flag(device)``: an int32[1] zero per device, the flag of launches with no guard (never
    written), made once (written when it returns: :func:`to_device`) and never freed: a captured
    CUDA graph may read it at every replay, so ``cache_clear()`` (``fastema.clear_caches()``) keeps
    it. ``cache_info().currsize``: how many devices have one."""

    def __init__(self):
        self.flags: dict = {}

    def __call__(self, device: str):
        flag = self.flags.get(device)
        if flag is None:
            flag = self.flags[device] = to_device(np.zeros(1, np.int32), device)
        return flag

    def cache_clear(self) -> None:
        """Keeps the flags (see the class docstring)."""

    def cache_info(self):
        return functools._CacheInfo(0, 0, None, len(self.flags))


_zero_flag = _ZeroFlags()


def _run(kernel, device: str, stream: int, blocks, *args):
    """Launch ``kernel`` on the raw stream ``stream`` of ``device``: its shipped (or once-compiled) device code
    with an argument block of fastema's own (:func:`.cuda_launch.launch_once`), or through numba's dispatcher
    where that cannot run (:func:`.cuda_base._dispatch`)."""
    launch_once(kernel, device, stream, blocks, args)


def _chunks(group, stream, kernel, *args):
    _run(kernel, group.device, stream, max(1, min(group.tables.chunks, config.CUDA_MAX_BLOCKS)), *args)


def lerp(group, stream, *, weights, flag=None, key=0, stochastic=False):
    device_key = not isinstance(key, int)
    _chunks(group, stream, K.lerp_kernel(group.shadow_kind, group.src_kind, stochastic, device_key),
            *group.tables.args(), weights, _zero_flag(group.device) if flag is None else flag,
            key if device_key else np.uint32(key))


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
    dropped, without waiting, at the next release or (``at_launches``: a torch storage, released
    rarely) at the first fastema launch after it has passed (:func:`prune_retired`), so a released
    storage is not kept longer than that. Only past ``config.CUDA_RETIRED_MAX`` pending releases (the GPU that far
    behind the host) does the host wait for the oldest.

    Why: a source replaced under fastema (``param.data = new``, a new JAX array every step) is
    freed by its framework's allocator on the stream it was allocated on, which knows nothing of
    fastema's launches on another stream (an update under ``torch.cuda.stream(side)``): its block
    could go to a new tensor while a queued kernel of fastema still reads it (issue 37, C2)."""

    def __init__(self, at_launches: bool = False):
        self.pending: list = []               # (event, kept objects), oldest first
        self.at_launches = at_launches        # pruned at launches too (torch: releases are rare); else only at
                                              # the next release (JAX, TensorFlow: a release every step)

    def release(self, kept, device: str, stream) -> None:
        self.prune()
        if len(self.pending) >= config.CUDA_RETIRED_MAX:
            self.pending.pop(0)[0].synchronize()
        if SIMULATOR:                         # the simulator runs every launch to completion
            return
        with cuda.gpus[_index(device)]:
            event = cuda.event(timing=False)
            event.record(_on(stream))
        self.pending.append((event, kept))
        if self.at_launches and self not in WAITING:
            WAITING.append(self)

    def prune(self) -> None:
        """Drop what sits behind passed events (event queries: no wait)."""
        while self.pending and (self.pending[0][0] is None or self.pending[0][0].query()):
            self.pending.pop(0)
