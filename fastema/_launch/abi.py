"""The argument ABI of numba-cuda kernels, written once: what fastema packs for ``cuLaunchKernel``.

A kernel compiled by numba-cuda takes each argument flattened into kernel parameters by its numba type
(numba-cuda 0.30's ``_Kernel._prepare_args``; ``tests/kernels/test_abi.py`` holds this module to it,
byte for byte, for every shipped variant):

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
array, a torch or CuPy tensor). Anything else is refused (:class:`NotDeviceMemory`), so no host address
reaches a kernel; the caller then launches through numba's dispatcher, which copies a host array over.

:class:`Block` holds one launch's values and the array of their addresses that ``cuLaunchKernel`` reads;
``patch`` rewrites the values of one argument in place.
"""
from __future__ import annotations

import ctypes

import numpy as np


class NotDeviceMemory(TypeError):
    """An array argument that is not device memory (no ``__cuda_array_interface__``)."""


_INTEGERS = {"int8": ctypes.c_int8, "int16": ctypes.c_int16, "int32": ctypes.c_int32, "int64": ctypes.c_int64,
             "uint8": ctypes.c_uint8, "uint16": ctypes.c_uint16, "uint32": ctypes.c_uint32,
             "uint64": ctypes.c_uint64}


def _array(ndim: int, value) -> list:
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
    ssize = ctypes.c_ssize_t
    return [ssize(0), ssize(0), ssize(size), ssize(itemsize), ssize(int(cai["data"][0])),
            *(ssize(s) for s in shape), *(ssize(int(s)) for s in strides)]


def values(ty, value) -> list:
    """The C values of one argument ``value`` of numba type ``ty`` (see the module docstring)."""
    name = getattr(ty, "name", str(ty))
    if hasattr(ty, "ndim") and hasattr(ty, "layout"):     # types.Array
        return _array(ty.ndim, value)
    c = _INTEGERS.get(name)
    if c is not None:
        return [c(int(value))]
    if name == "float32":
        return [ctypes.c_float(float(value))]
    if name == "float64":
        return [ctypes.c_double(float(value))]
    if name == "float16":
        return [ctypes.c_uint16(int(np.float16(value).view(np.uint16)))]
    if name in ("bool", "boolean"):
        return [ctypes.c_bool(bool(value))]
    if hasattr(ty, "types") and isinstance(value, tuple):  # UniTuple, Tuple
        if len(ty.types) != len(value):
            raise TypeError(f"fastema: a kernel argument of type {ty} got {len(value)} values")
        return [c for t, v in zip(ty.types, value) for c in values(t, v)]
    if name.endswith("*"):                                # CPointer
        return [ctypes.c_ssize_t(int(value))]
    raise TypeError(f"fastema: no kernel ABI for an argument of numba type {ty}")


class Block:
    """One launch's kernel parameters: the C values of every argument (``pack``) and the array of their
    addresses ``cuLaunchKernel`` reads (at ``address``). ``starts``/``counts``: each argument's first
    value and how many it has; :meth:`patch` rewrites one argument's values in place (same numba type:
    the same C types, the same count)."""

    __slots__ = ("types", "slots", "starts", "counts", "pointers", "address")

    def __init__(self, types: tuple, args: tuple):
        self.types = tuple(types)
        if len(self.types) != len(args):
            raise TypeError(f"fastema: a kernel of {len(self.types)} arguments got {len(args)}")
        self.slots: list = []
        self.starts: list = []
        self.counts: list = []
        for ty, value in zip(self.types, args):
            vals = values(ty, value)
            self.starts.append(len(self.slots))
            self.counts.append(len(vals))
            self.slots.extend(vals)
        self.pointers = (ctypes.c_void_p * max(len(self.slots), 1))(*map(ctypes.addressof, self.slots))
        self.address = ctypes.addressof(self.pointers)

    def patch(self, i: int, value) -> None:
        """Argument ``i`` is now ``value`` (of the same numba type)."""
        vals = values(self.types[i], value)
        if len(vals) != self.counts[i]:
            raise TypeError(f"fastema: kernel argument {i} changed its shape of parameters")
        for slot, v in zip(self.slots[self.starts[i]:self.starts[i] + len(vals)], vals):
            slot.value = v.value

    def raw(self) -> list:
        """Each parameter as ``(C type name, bytes)``: what the tests compare."""
        return [(type(s).__name__, bytes(s)) for s in self.slots]
