"""The argument ABI of numba-cuda kernels, written once: what fastema packs for ``cuLaunchKernel``.

A kernel compiled by numba-cuda takes each argument flattened into kernel parameters by its numba
type (numba-cuda 0.30's ``_Kernel._prepare_args``; ``tests/launch/test_abi.py`` holds this module
to it, byte for byte, for every shipped variant):

==========================  =====================================================================
numba type                  parameters (each in the C type cuda.core's ``ParamHolder`` gives it)
==========================  =====================================================================
``Array(dtype, ndim, ...)``  meminfo (0), parent (0), size, itemsize, data pointer, ``ndim`` shape
                            values, ``ndim`` strides in bytes: ``5 + 2 ndim`` ``intptr_t``
``Integer``                 its own C type (``int64`` -> ``int64_t``, ``uint32`` -> ``uint32_t``)
``float32`` / ``float64``   ``float`` / ``double``; ``float16``: its bits as ``uint16_t``
``boolean``                 ``bool`` (one byte)
``UniTuple`` / ``Tuple``    each member in turn
``CPointer``                ``intptr_t``
==========================  =====================================================================

An array argument must be device memory: an object with ``__cuda_array_interface__`` (a numba device
array, a torch or CuPy tensor). Anything else is refused (:class:`NotDeviceMemory`), so no host
address reaches a kernel.

The layout of a kernel's parameters (:class:`Layout`: each parameter's C type and offset in one
buffer, each argument's ``struct.Struct`` at its offset, and what a later value of the argument must
be to fit it) is computed once per variant (its numba types). :class:`Block` holds one launch's
parameters in one preallocated buffer and the array of their addresses that ``cuLaunchKernel``
reads; :meth:`Block.patch` rewrites one argument at C speed (``Struct.pack_into``): no numba type
and no ctypes object per call.
"""
from __future__ import annotations

import ctypes
import functools
import struct

import numpy as np


class NotDeviceMemory(TypeError):
    """An array argument that is not device memory (no ``__cuda_array_interface__``)."""


_SCALARS = {"int8": "b", "int16": "h", "int32": "i", "int64": "q", "uint8": "B", "uint16": "H", "uint32": "I",
            "uint64": "Q", "float32": "f", "float64": "d", "float16": "H", "bool": "?", "boolean": "?"}
_C_NAMES = {"b": "c_byte", "h": "c_short", "i": "c_int", "q": "c_long", "B": "c_ubyte", "H": "c_ushort",
            "I": "c_uint", "Q": "c_ulong", "f": "c_float", "d": "c_double", "?": "c_bool", "n": "c_long"}
# what a later value of a scalar argument may be, by numba type: the Python/NumPy types numba's typeof
# gives that type (an int is int64, a float float64, a NumPy scalar its own)
_FITS = {"int64": (int, np.int64), "float64": (float, np.float64), "bool": (bool, np.bool_),
         "boolean": (bool, np.bool_)}


def _array_values(ndim: int, value) -> tuple:
    try:
        cai = value.__cuda_array_interface__
    except AttributeError:
        raise NotDeviceMemory(f"fastema: a kernel's array argument must be device memory (an object with "
                              f"__cuda_array_interface__), got {type(value).__name__}") from None
    shape = tuple(int(s) for s in cai["shape"])
    if len(shape) != ndim:
        raise TypeError(f"fastema: a {ndim}-d kernel argument got a {len(shape)}-d array")
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai.get("strides")
    if strides is None:                                   # C-contiguous
        strides, step = [], itemsize
        for s in reversed(shape):
            strides.append(step)
            step *= s
        strides = tuple(reversed(strides))
    size = 1
    for s in shape:
        size *= s
    return (0, 0, size, itemsize, int(cai["data"][0]), *shape, *(int(s) for s in strides))


def _scalar(code: str):
    if code == "?":
        return lambda v: (bool(v),)
    if code in "fd":
        return lambda v: (float(v),)
    return lambda v: (int(v),)


def _f16(v) -> tuple:
    return (int(np.float16(v).view(np.uint16)),)


def _plan(ty) -> tuple:
    """``(codes, to_values, fits)`` of one argument of numba type ``ty``: its parameters' struct
    codes, the function from a value to their values, and the check a later value must pass to take
    its place (same type: the same parameters)."""
    name = getattr(ty, "name", str(ty))
    if hasattr(ty, "ndim") and hasattr(ty, "layout"):     # types.Array
        ndim = ty.ndim
        dtype = np.dtype(str(ty.dtype)) if str(ty.dtype) != "bool" else np.dtype(np.bool_)
        contiguous = ty.layout == "C"

        def fits(v, dtype=dtype, ndim=ndim, contiguous=contiguous) -> bool:
            cai = getattr(v, "__cuda_array_interface__", None)
            if cai is None or len(cai["shape"]) != ndim or np.dtype(cai["typestr"]) != dtype:
                return False
            return not contiguous or cai.get("strides") is None or _c_strides(cai, dtype.itemsize)
        return "n" * (5 + 2 * ndim), functools.partial(_array_values, ndim), fits
    code = _SCALARS.get(name)
    if code is not None:
        kinds = _FITS.get(name) or ((getattr(np, name),) if name != "float16" else (np.float16,))
        return code, (_f16 if name == "float16" else _scalar(code)), lambda v, k=kinds: type(v) in k
    if hasattr(ty, "types"):                              # UniTuple, Tuple
        parts = [_plan(t) for t in ty.types]
        count = len(parts)

        def to_values(v, parts=parts, count=count) -> tuple:
            if not isinstance(v, tuple) or len(v) != count:
                raise TypeError(f"fastema: a kernel argument of type {ty} got {v!r}")
            return tuple(c for p, x in zip(parts, v) for c in p[1](x))

        def fits(v, parts=parts, count=count) -> bool:
            return type(v) is tuple and len(v) == count and all(p[2](x) for p, x in zip(parts, v))
        return "".join(p[0] for p in parts), to_values, fits
    if name.endswith("*"):                                # CPointer
        return "n", lambda v: (int(v),), lambda v: isinstance(v, (int, np.integer))
    raise TypeError(f"fastema: no kernel ABI for an argument of numba type {ty}")


def _c_strides(cai, itemsize: int) -> bool:
    step, out = itemsize, []
    for s in reversed(cai["shape"]):
        out.append(step)
        step *= int(s)
    return tuple(int(s) for s in cai["strides"]) == tuple(reversed(out))


class Layout:
    """Where each parameter of a kernel of numba ``types`` lives in one buffer (natural alignment),
    and per argument its ``struct.Struct`` (from its first parameter's offset, with the padding
    between), its values' function and the check a later value passes to fit it: computed once per
    variant (:func:`layout`)."""

    __slots__ = ("types", "codes", "offsets", "nbytes", "args")

    def __init__(self, types: tuple):
        self.types = tuple(types)
        self.codes: list = []
        self.offsets: list = []
        self.args: list = []                          # per argument: (offset, Struct, to_values, fits)
        at = 0
        for ty in self.types:
            codes, to_values, fits = _plan(ty)
            first, fmt = None, "<"
            for code in codes:
                size = struct.calcsize(code)
                pad = -at % size
                if first is not None and pad:
                    fmt += f"{pad}x"
                at += pad
                if first is None:
                    first = at
                self.codes.append(code)
                self.offsets.append(at)
                fmt += "q" if code == "n" else code
                at += size
            self.args.append((at if first is None else first, struct.Struct(fmt), to_values, fits))
        self.nbytes = at


@functools.lru_cache(maxsize=1024)
def layout(types: tuple) -> Layout:
    """The :class:`Layout` of a kernel of numba ``types``, once per variant."""
    return Layout(types)


class Block:
    """One launch's kernel parameters in one preallocated buffer, and the array of their addresses
    ``cuLaunchKernel`` reads (at ``address``): the layout is the variant's (:func:`layout`); every
    argument is packed by its ``Struct`` (:meth:`patch`)."""

    __slots__ = ("layout", "types", "buffer", "pointers", "address", "sizes")

    def __init__(self, types: tuple, args: tuple):
        lay = self.layout = layout(tuple(types))
        self.types = lay.types
        if len(self.types) != len(args):
            raise TypeError(f"fastema: a kernel of {len(self.types)} arguments got {len(args)}")
        self.buffer = (ctypes.c_uint64 * max(1, (lay.nbytes + 7) // 8))()   # 8-byte aligned
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * max(len(lay.offsets), 1))(*(base + o for o in lay.offsets))
        self.address = ctypes.addressof(self.pointers)
        self.sizes = [struct.calcsize(c) for c in lay.codes]
        for i, value in enumerate(args):
            self.patch(i, value)

    def fits(self, i: int, value) -> bool:
        """Whether ``value`` may take argument ``i``'s place (the same parameters: dtype, ndim and
        contiguity of an array, the type of a number, a tuple's length and members)."""
        return self.layout.args[i][3](value)

    def patch(self, i: int, value) -> None:
        """Argument ``i`` is now ``value`` (of the same numba type: :meth:`fits`)."""
        offset, st, to_values, _ = self.layout.args[i]
        st.pack_into(self.buffer, offset, *to_values(value))

    def patched(self, i: int, value) -> bool:
        """:meth:`patch` where ``value`` :meth:`fits` (True), else nothing written (False): one call
        a changed argument on a prepared launch's path."""
        offset, st, to_values, fits = self.layout.args[i]
        if not fits(value):
            return False
        st.pack_into(self.buffer, offset, *to_values(value))
        return True

    def values(self) -> list:
        """Every parameter's value as packed (what the tests read)."""
        raw = bytes(self.buffer)
        return [struct.unpack_from("<" + ("q" if c == "n" else c), raw, o)[0]
                for c, o in zip(self.layout.codes, self.layout.offsets)]

    def raw(self) -> list:
        """Each parameter as ``(C type name, bytes)``: what the tests compare."""
        raw = bytes(self.buffer)
        return [(_C_NAMES[c], raw[o:o + n]) for c, o, n in zip(self.layout.codes, self.layout.offsets, self.sizes)]
