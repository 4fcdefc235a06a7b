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

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from ..kernels._cuda_hw import SIMULATOR
from . import config


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
