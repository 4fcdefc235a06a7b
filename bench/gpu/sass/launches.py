"""Which kernels are read: every per-step kernel variant as one launcher launches it, with the
arguments that launcher passes (their numba types pick the shipped entry) and what the checks and
the model need to know of it (register cap, bytes per element, rows)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel as one launcher launches it."""
    name: str                 # short, unique: the test id and the table's first column
    path: str                 # which public path launches it
    family: str               # "lerp", "plan_lerp", "scan", "copy", "swap", "streams", "other"
    build: Callable           # () -> (dispatcher, args): the kernel and its launcher's arguments
    cap: int                  # register cap (headroom over today's count, gpu.md §1.7)
    x_bytes: int = 4          # bytes per source element read
    q_bytes: int = 4          # bytes per shadow element (read and written, per row)
    rows: int = 1             # shadow rows updated
    chunked: bool = True      # grid-stride over chunks, threads over elements (kernels/cuda.py);
                              # else over elements
    streaming: bool = True    # a per-step streaming kernel: every check; else spills and
                              # registers only
    known: tuple = ()         # ((check, reason), ...): checks it is known to fail, until fixed
    traffic: tuple | None = None   # (read, written) bytes per element, where not the family's

    def moved(self) -> tuple[float, float]:
        """(read, written) bytes per element a launch must move: the source and each shadow row
        read, each row written (the scan: the source read)."""
        if self.traffic is not None:
            return self.traffic
        if self.family == "scan":
            return float(self.x_bytes), 0.0
        return float(self.x_bytes + self.q_bytes * self.rows), float(self.q_bytes * self.rows)

    def min_bytes(self) -> float:
        return sum(self.moved())

    def read_share(self) -> float:
        """The share of those bytes that are reads (gpu.md §1.3)."""
        read, written = self.moved()
        return read / (read + written)


def _tables():
    """Host tables as ``fastema._launch.tables`` builds them (their values do not matter, their
    types do: on a GPU they are device arrays, which numba types as these arrays)."""
    from fastema._launch import Tables
    from fastema.kernels.layout import chunk_table, segment_offsets

    seg_offset = segment_offsets([4096, 1000])
    chunk_seg, chunk_begin = chunk_table(seg_offset, 4096)
    n = int(seg_offset[-1])
    return Tables(np.array([1 << 20, 2 << 20], np.int64), np.array([3 << 20, 4 << 20], np.int64),
                  seg_offset, chunk_seg, chunk_begin, n, len(chunk_seg))


def _plan(rows: int = 1, groups: int = 2) -> dict:
    """A device plan's arrays (``fastema.average._device_plan._OnDevice``'s, by dtype)."""
    from fastema.kernels.kinds import PLAN_PARAMS, S_NORMS

    sizes = dict(state=(S_NORMS + rows, np.float64), params=(PLAN_PARAMS + 4 * rows, np.float64),
                 decays=(rows, np.float64), w32=(rows, np.float32), w64=(rows, np.float64),
                 flag=(1, np.int32), keys=(groups, np.int64), done=(1, np.int32))
    return {k: np.zeros(size, dt) for k, (size, dt) in sizes.items()}


def _lerp(sk, xk, stochastic=False, rows=1, device=False):
    """``_launch.cuda.launch.CudaLerp.__call__``'s arguments: host weights cast to float32 (a tuple) with a
    uint32 key, or the device plan's weights and a group's int64[1] key
    (``DevicePlan.weights/key``)."""
    def build():
        from fastema.kernels import cuda as K

        t = _tables()
        flag = np.zeros(1, np.int32)
        if device:
            plan = _plan(rows)
            weights, key = plan["w32"], plan["keys"][0:1]
        else:
            weights, key = tuple(map(np.float32, [0.01] * rows)), np.uint32(7)
        return K.lerp_kernel(sk, xk, stochastic, device), (*t.args(), weights, flag, key)
    return build


def _plan_lerp(sk, xk, stochastic=False, rows=1):
    """``_launch.cuda.launch._plan_lerp``'s arguments: head (state, params, decays), ``given`` (a
    Python int), tail (w32, w64, flag, keys, done, np.int64(gi))."""
    def build():
        from fastema.kernels import cuda as K

        t, p = _tables(), _plan(rows)
        args = (*t.args(), p["state"], p["params"], p["decays"], 5, p["w32"], p["w64"], p["flag"],
                p["keys"], p["done"], np.int64(0))
        return K.plan_lerp_kernel(sk, xk, stochastic), args
    return build


def _scan(xk):
    """``_launch.cuda.launch._nonfinite``'s arguments: the source tables and the flag."""
    def build():
        from fastema.kernels import cuda as K

        t = _tables()
        return K.nonfinite_kernel(xk), (t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin,
                                        np.zeros(1, np.int32))
    return build


def _swap(sk, xk, mode):
    """``cuda_bound``'s swap launch: the tables and the shadow row."""
    def build():
        from fastema.kernels import cuda as K

        return K.swap_kernel(sk, xk, mode), (*_tables().args(), 0)
    return build


def _copy(sk, xk, to_shadow):
    """``cuda_bound.copy_launch``'s arguments: the tables, the rows and the flag."""
    def build():
        from fastema.kernels import cuda as K

        return K.copy_kernel(sk, xk, to_shadow), (*_tables().args(), 0, 1, np.zeros(1, np.int32))
    return build


def _streams(kind, parts, weighted):
    """The smoother's launch (``fastema.smooth``): values, ``w0, c, per_stream, mode, d``, the EMA's
    pairs, the SMA's ring, pairs and counts, the weighted layout's, ``slot, filled, widen``."""
    def build():
        from fastema.kernels import cuda as K
        from fastema.kernels.kinds import F32, F64

        y = np.zeros(4, {F64: np.float64, F32: np.uint32}.get(kind, np.uint16))
        f64, i32 = np.zeros(8), np.zeros(4, np.int32)
        return K.streams_kernel(kind, parts, True, weighted), (y, 1.0, f64, False, 0, 0.5, f64, f64, f64, i32,
                                                              f64, f64, i32, 0, 0, False)
    return build


def _other(name):
    """The other per-update kernels, with the arguments their launchers pass
    (``_launch.cuda.launch._plan``, ``_copy``; ``_bema``, host weights for the float64
    lerp)."""
    def build():
        from fastema.kernels import cuda as K
        from fastema.kernels.kinds import F32, F64

        t, p, flag = _tables(), _plan(), np.zeros(1, np.int32)
        if name == "plan":
            return K.plan_kernel(), (p["state"], p["params"], p["decays"], 5, p["w32"], p["w64"],
                                     p["flag"], p["keys"])
        if name == "bema":
            return K.bema_kernel(F32), (*t.args(), np.float32(0.5), flag)
        return K.lerp_kernel(F64, F64, False), (*t.args(), (np.float64(0.01),), flag, np.uint32(0))
    return build


def variants() -> list[Variant]:
    """Every per-step streaming kernel variant (issue 45 item 1)."""
    from fastema.kernels.kinds import BF16, EXCHANGE, F16, F32, F64, PACK, UNPACK

    return [
        Variant("lerp f32<-f32", "FlatShadow.update, ema_update_, EMA (plan on the host)", "lerp",
                _lerp(F32, F32), 64),
        Variant("lerp f32<-f32 x2 rows", "two decays in one pass", "lerp", _lerp(F32, F32, rows=2),
                64, rows=2),
        Variant("lerp f32<-bf16", "bfloat16 model, float32 shadow", "lerp", _lerp(F32, BF16), 64,
                x_bytes=2),
        Variant("lerp f32<-f16", "float16 model, float32 shadow", "lerp", _lerp(F32, F16), 64,
                x_bytes=2),
        Variant("lerp f32<-f32 dev w",
                "EMA with the plan on the device (groups that do not carry it)", "lerp",
                _lerp(F32, F32, device=True), 80),
        Variant("lerp f32<-bf16 dev w", "as above, bfloat16 model", "lerp",
                _lerp(F32, BF16, device=True), 80, x_bytes=2),
        Variant("plan_lerp f32<-f32", "EMA.update's default on a GPU (plan+lerp, one launch)",
                "plan_lerp", _plan_lerp(F32, F32), 64),
        Variant("plan_lerp f32<-bf16", "as above, bfloat16 model", "plan_lerp",
                _plan_lerp(F32, BF16), 64, x_bytes=2),
        Variant("lerp bf16<-bf16", "bfloat16 shadow, nearest", "lerp", _lerp(BF16, BF16), 72, 2, 2),
        Variant("lerp f16<-f16", "float16 shadow, nearest", "lerp", _lerp(F16, F16), 72, 2, 2),
        Variant("lerp bf16<-bf16 SR", "bfloat16 shadow, stochastic rounding", "lerp",
                _lerp(BF16, BF16, True), 72, 2, 2),
        Variant("lerp bf16<-f32 SR", "float32 model, bfloat16 shadow, stochastic rounding", "lerp",
                _lerp(BF16, F32, True), 72, 4, 2),
        Variant("lerp bf16<-bf16 SR dev w", "bfloat16 SR shadow, plan on the device", "lerp",
                _lerp(BF16, BF16, True, device=True), 72, 2, 2),
        Variant("plan_lerp bf16<-bf16 SR", "EMA.update's default, bfloat16 SR shadow", "plan_lerp",
                _plan_lerp(BF16, BF16, True), 72, 2, 2),
        Variant("scan f32", "skip_nonfinite, float32 model", "scan", _scan(F32), 96),
        Variant("scan bf16", "skip_nonfinite, bfloat16 model", "scan", _scan(BF16), 96, x_bytes=2),
        Variant("plan", "the device plan's step where no lerp carries it (one thread)", "other",
                _other("plan"), 96, streaming=False, traffic=(0.0, 0.0)),
        Variant("copy f32->f32", "a model average's buffers, copied at every update", "copy",
                _copy(F32, F32, True), 96, traffic=(4.0, 4.0)),
        Variant("copy f32<-f32", "restore (the sources from a shadow row)", "copy",
                _copy(F32, F32, False), 96, traffic=(4.0, 4.0)),
        Variant("copy bf16->bf16", "a bfloat16 model's buffers", "copy", _copy(BF16, BF16, True), 96,
                traffic=(2.0, 2.0)),
        Variant("swap f32<->f32", "swap() in and out, float32 model and shadow", "swap",
                _swap(F32, F32, EXCHANGE), 96, traffic=(8.0, 8.0)),
        Variant("swap bf16<->bf16", "swap(), bfloat16 model and shadow", "swap",
                _swap(BF16, BF16, EXCHANGE), 96, traffic=(4.0, 4.0)),
        Variant("swap f32<->bf16 pack", "swap() in, float32 shadow into a bfloat16 model", "swap",
                _swap(F32, BF16, PACK), 96, traffic=(6.0, 6.0)),
        Variant("swap f32<->bf16 unpack", "swap() out of a bfloat16 model", "swap",
                _swap(F32, BF16, UNPACK), 96, traffic=(6.0, 6.0)),
        Variant("streams f64", "Smoother.update (EMA and SMA, float64 values, unweighted)", "streams",
                _streams(F64, 3, False), 96, chunked=False, traffic=(52.0, 44.0)),
        Variant("streams f32", "as above, float32 values", "streams", _streams(F32, 3, False), 96,
                chunked=False, traffic=(48.0, 44.0)),
        Variant("streams f64 weighted", "Smoother.update after a sample_weight", "streams",
                _streams(F64, 3, True), 96, chunked=False, streaming=False, traffic=(92.0, 76.0)),
        Variant("bema f32", "BEMA's output", "other", _other("bema"), 96, streaming=False,
                traffic=(12.0, 4.0)),
        Variant("lerp f64<-f64", "float64 model and shadow", "lerp", _other("lerp64"), 96, 8, 8,
                streaming=False),
    ]
