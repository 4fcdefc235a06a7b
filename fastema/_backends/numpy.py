"""NumPy arrays (and ml_dtypes bfloat16 arrays): host memory."""
from __future__ import annotations

import operator
import weakref

import numpy as np

from ..kernels.kinds import BF16, F16, F32, F64
from ._base import Backend
from ._buf import Buf, layout, not_dense, unsupported_dtype

KINDS = {np.dtype(np.float32): F32, np.dtype(np.float16): F16, np.dtype(np.float64): F64}
BITS = {F32: np.uint32, BF16: np.uint16, F16: np.uint16, F64: np.float64}    # how kernels read each kind


def kind_of(dtype) -> int | None:
    dtype = np.dtype(dtype)
    kind = KINDS.get(dtype)
    if kind is None and dtype.name == "bfloat16" and dtype.isnative:       # ml_dtypes.bfloat16
        kind = BF16                    # (byte-swapped it keeps its name: refused, as float32 is)
    return kind


def numpy_dtype(kind: int):
    """The NumPy dtype of a storage kind (bfloat16 through ml_dtypes)."""
    if kind == BF16:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("a bfloat16 shadow for NumPy/CUDA-array sources needs the ml_dtypes "
                            "package (pip install ml_dtypes), or use dtype='float32'") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({F32: np.float32, F64: np.float64}.get(kind, np.float16))


_LAYOUT = operator.attrgetter("shape", "strides", "dtype", "flags.writeable")


class NumPy(Backend):
    NAME = "numpy"
    BY_TYPE = True

    def owns(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def describe(self, a: np.ndarray, what: str) -> Buf:
        kind = kind_of(a.dtype)
        if kind is None:
            raise unsupported_dtype(what, a.dtype if a.dtype.isnative else
                                    f"{a.dtype.name} in the other byte order ({a.dtype.str})")
        item = a.dtype.itemsize
        order = None if any(st % item for st in a.strides) else layout(a.shape, [st // item for st in a.strides])
        if order is None or any(st < 0 for st in a.strides):
            raise not_dense(what, a.shape, a.strides)
        strides = () if a.flags.c_contiguous else order
        return Buf(a, kind, "cpu", a.shape, a.ctypes.data if a.size else 0, bool(a.flags.writeable), self.NAME,
                   strides)

    def address_key(self, objs: list) -> tuple | None:
        """The arrays' identities (``id``: reading a NumPy array's address costs ~2 us, its identity
        nothing): an equal key says the same memory only together with :meth:`layout_guard`, which
        holds each array by a weak reference and checks that the very arrays are passed again (an
        array object keeps its memory for its life); None when one is not a NumPy array."""
        for a in objs:
            if not isinstance(a, np.ndarray):
                return None
        return tuple(map(id, objs))

    def layout_guard(self, objs: list):
        """The very arrays (weak references: none kept alive), each with the shape, strides, dtype and
        writability it has now (``a.shape = ...`` and ``a.dtype = ...`` re-view an array in place;
        ``a.flags.writeable`` may be cleared)."""
        refs = tuple(map(weakref.ref, objs))
        layouts = tuple(map(_LAYOUT, objs))
        n = len(objs)

        def same(ts: list) -> bool:                  # C-level maps: ~0.2 us an array
            return len(ts) == n and all(map(operator.is_, map(operator.call, refs), ts)) and \
                tuple(map(_LAYOUT, ts)) == layouts
        return same

    def read_only_now(self, objs: list) -> int | None:
        return next((i for i, a in enumerate(objs) if not a.flags.writeable), None)

    def address(self, x) -> int:
        return x.ctypes.data

    def empty(self, like, kind: int, shape: tuple):
        return np.empty(shape, numpy_dtype(kind))

    def zeros(self, device, n: int, dtype):
        return np.zeros(n, dtype)

    def zero_(self, a) -> None:
        a.fill(0)

    def location(self, a) -> tuple:
        return self.NAME, "cpu"

    def kernel_view(self, a):
        return a

    def strided(self, v, shape, order):
        if not order:
            return v.reshape(shape)
        return np.lib.stride_tricks.as_strided(v, shape, tuple(st * v.itemsize for st in order))

    def control(self, x, what: str, writable: bool):
        if writable and not x.flags.writeable:
            raise ValueError(f"{what} is read-only; pass a writable array")
        return "cpu", x.dtype, x.size

    def metric(self, x, what: str):
        kind = KINDS.get(x.dtype)
        if kind is None:
            raise TypeError(f"{what} has dtype {x.dtype}; smoothers take floating values")
        flat = np.ascontiguousarray(x).reshape(-1)
        return kind, flat.view(BITS[kind]), (self.NAME, "cpu"), x.shape

    def metric_vector(self, x):
        return np.asarray(x, np.float64)

    def where(self, cond, a, fill):
        return np.where(cond, a, fill)

    def to_host(self, a) -> np.ndarray:
        return np.array(a, copy=True)

    def copy_from_host(self, dst, a: np.ndarray) -> None:
        dst[...] = a.astype(dst.dtype)


backend = NumPy()
