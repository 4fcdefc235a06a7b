"""CPU launchers: one function per kernel family, ``op(group, stream, **args)`` (``stream``
is unused on the CPU), serial or parallel by the work's size (see :mod:`.config`)."""
from __future__ import annotations

import numpy as np

from ..kernels import cpu as K
from . import config

_NO_FLAG = np.zeros(1, np.int32)     # never written: passed when no guard is asked for


def _parallel(group, rows: int) -> bool:
    t = group.tables
    return t.n * rows >= config.CPU_SERIAL_BELOW and t.chunks > 1


def lerp(group, stream, *, weights, flag=None, key=0, stochastic=False):
    device_key = not isinstance(key, int)
    k = K.lerp_kernel(group.shadow_kind, group.src_kind, stochastic, _parallel(group, len(weights)), device_key)
    k(*group.tables.args(), weights, _NO_FLAG if flag is None else flag, key if device_key else np.uint32(key))


def bema(group, stream, *, alpha, flag=None):
    k = K.bema_kernel(group.shadow_kind, _parallel(group, 3))
    k(*group.tables.args(), alpha, _NO_FLAG if flag is None else flag)


def plan(group, stream, *, state, params, decays, given, w32, w64, flag, keys):
    K.plan_kernel()(state, params, decays, given, w32, w64, flag, keys)


def copy(group, stream, *, to_shadow, row_lo, row_hi, flag=None):
    k = K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow, _parallel(group, row_hi - row_lo))
    k(*group.tables.args(), row_lo, row_hi, _NO_FLAG if flag is None else flag)


def swap(group, stream, *, mode, row):
    K.swap_kernel(group.shadow_kind, group.src_kind, mode, _parallel(group, 1))(*group.tables.args(), row)


def nonfinite(group, stream, *, flag):
    t = group.tables
    K.nonfinite_kernel(group.src_kind, _parallel(group, 1))(t.seg_addr, t.seg_offset, t.chunk_seg,
                                                             t.chunk_begin, flag)


def window(group, stream, *, ring_kind, ring_addr, slot, full, count, recompute):
    K.window_kernel(ring_kind, group.src_kind, _parallel(group, 3))(*group.tables.args(), ring_addr, slot, full,
                                                                    count, recompute)


def ema_streams(group, stream, *, values, w0, c, per_stream, a, b, d, mode, skip):
    parallel = values.size >= config.CPU_STREAMS_SERIAL_BELOW
    K.ema_kernel(group.src_kind, mode, skip, parallel)(values, w0, c, per_stream, a, b, d)


def sma_streams(group, stream, *, values, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp, n, bad, slot, skip):
    parallel = values.size >= config.CPU_STREAMS_SERIAL_BELOW
    K.sma_kernel(group.src_kind, skip, parallel)(values, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp,
                                                 n, bad, slot)
