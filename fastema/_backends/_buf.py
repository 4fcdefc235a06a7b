"""What every adapter returns: :class:`Buf`, a framework-free description of a dense buffer,
with the layout rules and the messages for what cannot be described."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from ..kernels.kinds import ITEMSIZE, KIND_NAMES

SUPPORTED = "float32, bfloat16, float16 and float64"


def device_name(kind: str, index=None) -> str:
    """fastema's one name of a device: "cpu" or "cuda:N" (CUDA with no index: device 0); other
    kinds as ``kind:index`` (or ``kind``), for messages."""
    kind = str(kind)
    if kind == "cpu":
        return "cpu"
    if index is None:
        return "cuda:0" if kind == "cuda" else kind
    return f"{kind}:{int(index)}"


def layout(shape, strides) -> tuple | None:
    """The canonical element strides of a dense, non-overlapping layout, or None.

    Dense means the elements fill ``numel`` consecutive slots in some dimension order
    (C order, channels_last, any permutation), so a kernel can walk them in storage
    order from the lowest address. Dimensions of size 1 have no meaningful stride and
    get 0, so two layouts with the same storage order compare equal.
    """
    shape, strides = tuple(int(d) for d in shape), tuple(int(s) for s in strides)
    canon = tuple(0 if d == 1 else s for d, s in zip(shape, strides))
    if 0 in shape:
        return tuple(0 for _ in shape)
    expected = 1
    for st, d in sorted((st, d) for d, st in zip(shape, strides) if d != 1):
        if st != expected:
            return None
        expected *= d
    return canon


def c_layout(shape) -> tuple:
    """The canonical strides of C order (row-major) for ``shape``."""
    out, step = [], 1
    for d in reversed(tuple(shape)):
        out.append(step)
        step *= int(d)
    return layout(shape, tuple(reversed(out)))


class Buf(NamedTuple):
    """One dense floating buffer (C order or another dense layout), described without its framework."""
    obj: Any                 # what the caller passed; kept alive while the Buf is used
    kind: int                # F32 / BF16 / F16 / F64 (fastema.kernels.kinds)
    device: str              # "cpu" or "cuda:N"
    shape: tuple
    address: int             # lowest element (the first in storage order); 0 for an empty buffer
    writable: bool
    framework: str           # "numpy", "torch", "cuda" (array interface), "cudasim", "jax",
                             # "tensorflow", "dlpack" (other producers; obj is then a _dlpack.Imported)
    strides: tuple = ()      # canonical element strides (see layout()); () means C order

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.kind]

    @property
    def dtype_name(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def order(self) -> tuple:
        """Canonical element strides: equal orders mean equal storage order for equal shapes."""
        return self.strides or c_layout(self.shape)


def unsupported_dtype(what, dtype):
    return TypeError(
        f"{what} has dtype {dtype}; fastema works on {SUPPORTED} "
        f"(convert it, e.g. .float() in torch or .astype(np.float32) in NumPy)")


def not_dense(what, shape, strides):
    return ValueError(
        f"{what} is not dense (shape {tuple(shape)}, strides {tuple(strides)}): it skips or repeats "
        f"elements (a slice, an expanded or transposed-and-sliced view), so an updated copy would "
        f"not reach the original; pass the tensor itself or a dense copy (.contiguous() in torch, "
        f"np.ascontiguousarray in NumPy). C order, channels_last and other dense layouts are fine")
