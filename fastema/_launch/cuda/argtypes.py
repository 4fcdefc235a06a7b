"""The type of a CUDA kernel argument as numba-cuda's ``typeof`` gives it, read without numba-cuda.

A launch is bound once per variant: the variant's name in the shipped code's index is its kernel and
its arguments' numba types (``lerp_kernel(0,1,0,0)[array(int64, 1d, C), ..., UniTuple(float32 x
2)]``, ``kernels._store.identity.variant_key``) and its argument block's layout follows them
(:mod:`.abi`). :func:`typeof` gives the same types for what fastema's launchers pass (Python and
NumPy scalars, tuples of them, device arrays described by ``__cuda_array_interface__``) as small
objects with numba's names, so that finding and loading shipped code needs no numba-cuda; anything
else (and a device array of numba's own) is typed by numba-cuda itself. :func:`as_numba` gives
numba's type objects where numba-cuda compiles a variant (the fallback compiler).
``tests/launch/test_argtypes.py`` holds :func:`typeof` to numba-cuda's ``typeof(value,
Purpose.argument)``, value by value.
"""
from __future__ import annotations

import numpy as np

_INT64 = 1 << 63


class ArgType:
    """A numba type by its name (what ``str`` of numba's gives): equal and hashed by it."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


class Scalar(ArgType):
    """``int64``, ``uint32``, ``float64``, ``bool``, ..."""

    __slots__ = ()


class Array(ArgType):
    """``array(float32, 1d, C)``: what :mod:`.abi` reads (``ndim``, ``layout``, ``dtype``)."""

    __slots__ = ("dtype", "ndim", "layout", "readonly")

    def __init__(self, dtype: str, ndim: int, layout: str, readonly: bool = False):
        super().__init__(f"{'readonly ' if readonly else ''}array({dtype}, {ndim}d, {layout})")
        self.dtype, self.ndim, self.layout, self.readonly = dtype, ndim, layout, readonly


class Tuple(ArgType):
    """``UniTuple(float32 x 3)`` (every element of one type) or ``Tuple(float64, int64)``."""

    __slots__ = ("types",)

    def __init__(self, types: tuple):
        first = types[0]
        uniform = all(t == first for t in types)
        super().__init__(f"UniTuple({first} x {len(types)})" if uniform
                         else f"Tuple({', '.join(map(str, types))})")
        self.types = types


def _numba(value):
    from numba.cuda.typing.typeof import Purpose
    from numba.cuda.typing.typeof import typeof as numba_typeof

    return numba_typeof(value, Purpose.argument)


_NUMPY_SCALARS = {np.dtype(n).type: Scalar(n) for n in (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")}
_NUMPY_SCALARS[np.bool_] = Scalar("bool")
_BOOL, _INT, _FLOAT = Scalar("bool"), Scalar("int64"), Scalar("float64")
_ARRAY_DTYPES = frozenset(t.name for t in _NUMPY_SCALARS.values() if t.name != "bool")


def typeof(value):
    """``value``'s type as a kernel argument: numba-cuda's (see the module docstring)."""
    kind = type(value)
    if kind is bool:
        return _BOOL
    if kind is int:
        return _INT if -_INT64 < value < _INT64 else _numba(value)
    if kind is float:
        return _FLOAT
    got = _NUMPY_SCALARS.get(kind)
    if got is not None:
        return got
    if kind is tuple:
        if not value:
            return _numba(value)
        return Tuple(tuple(map(typeof, value)))
    if kind.__module__.startswith("numba"):               # numba's own device arrays: its own type
        return _numba(value)
    cai = getattr(value, "__cuda_array_interface__", None)
    if cai is not None and getattr(getattr(value, "__dlpack__", None), "__self__", None) is None:
        got = _of_interface(cai)
        if got is not None:
            return got
    return _numba(value)                                  # a DLPack producer (numba reads it by DLPack), others


def _of_interface(cai) -> Array | None:
    """numba-cuda 0.30's type of a ``__cuda_array_interface__`` (``_typeof_cuda_array_interface``),
    its layout rule included: it measures strides in *bits* (``dtype.bitwidth``), so any explicit
    strides give layout ``A`` but where the last (C) or first (F) stride in bytes equals the
    element's width in bits."""
    dtype = np.dtype(cai["typestr"])
    if dtype.name not in _ARRAY_DTYPES:
        return None
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    ndim = len(shape)
    if not ndim or strides is None:
        layout = "C"
    else:
        bits = dtype.itemsize * 8
        strides = tuple(strides)
        if strides[-1] == bits:
            layout = "C" if strides == _strides(shape, bits, c_order=True) else "A"
        elif strides[0] == bits:
            layout = "F" if strides == _strides(shape, bits, c_order=False) else "A"
        else:
            layout = "A"
    return Array(dtype.name, ndim, layout, bool(cai["data"][1]))


def _strides(shape: tuple, itemsize: int, c_order: bool) -> tuple:
    out, step = [], itemsize
    for s in (reversed(shape) if c_order else shape):
        out.append(step)
        step *= s
    return tuple(reversed(out)) if c_order else tuple(out)


def as_numba(ty):
    """numba-cuda's type object for ``ty`` (one of :func:`typeof`'s; a numba type is itself)."""
    if not isinstance(ty, ArgType):
        return ty
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    if isinstance(ty, Array):
        return types.Array(numpy_support.from_dtype(np.dtype(ty.dtype)), ty.ndim, ty.layout,
                           readonly=ty.readonly)
    if isinstance(ty, Tuple):
        parts = [as_numba(t) for t in ty.types]
        return types.UniTuple(parts[0], len(parts)) if ty.name.startswith("UniTuple") else types.Tuple(parts)
    return types.boolean if ty.name == "bool" else getattr(types, ty.name)
