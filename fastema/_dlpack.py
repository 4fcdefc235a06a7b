"""Read what a DLPack capsule describes: address, device, dtype, shape, strides.

fastema's kernels need only an address and a layout. NumPy's ``from_dlpack`` refuses
bfloat16 and every GPU array, and Numba cannot import DLPack at all, so this module
reads the capsule's ``DLTensor`` with ctypes (the structs are those of ``dlpack.h``,
legacy and versioned). The capsule is not consumed: it stays with the returned
:class:`Imported`, and dropping it runs the producer's deleter, which releases the
producer's hold on the memory. Keep the :class:`Imported` as long as the address is used.
"""
from __future__ import annotations

import ctypes
import math
from typing import Any, NamedTuple

CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13           # DLDeviceType
INT, UINT, FLOAT, BFLOAT = 0, 1, 2, 4                      # DLDataTypeCode
READ_ONLY = 1                                              # DLPACK_FLAG_BITMASK_READ_ONLY


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype, _get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


class Imported(NamedTuple):
    """One array as its DLPack capsule describes it (the capsule kept alive here)."""
    source: Any            # the producer
    capsule: Any
    device_type: int
    device_id: int
    code: int
    bits: int
    lanes: int
    shape: tuple
    strides: tuple | None  # in elements; None = C-contiguous
    address: int           # first element
    read_only: bool

    @property
    def contiguous(self) -> bool:
        if self.strides is None or math.prod(self.shape) <= 1:
            return True
        expected, step = [], 1
        for n in reversed(self.shape):
            expected.append(step)
            step *= n
        return all(s == e for s, e, n in zip(self.strides, reversed(expected), self.shape) if n != 1)


def import_(x, stream: int | None = None) -> Imported:
    """Describe ``x`` (any object with ``__dlpack__``) without copying it.

    ``stream``: for CUDA producers, the consumer's stream; the producer orders its
    pending writes before that stream's later work (DLPack's stream argument).
    """
    kwargs = {} if stream is None else {"stream": stream}
    try:
        capsule = x.__dlpack__(max_version=(1, 1), **kwargs)
    except TypeError:                                    # producers from before DLPack 1.0
        capsule = x.__dlpack__(**kwargs)
    name = _get_name(capsule)
    if name == b"dltensor_versioned":
        managed = _ManagedVersioned.from_address(_get_pointer(capsule, name))
        t, read_only = managed.dl_tensor, bool(managed.flags & READ_ONLY)
    elif name == b"dltensor":
        t, read_only = _Managed.from_address(_get_pointer(capsule, name)).dl_tensor, False
    else:
        raise BufferError(f"__dlpack__ returned a capsule named {name!r}, not a DLPack tensor")
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim))
    strides = tuple(t.strides[i] for i in range(ndim)) if t.strides else None
    address = (t.data or 0) + t.byte_offset
    return Imported(x, capsule, t.device.device_type, t.device.device_id, t.dtype.code, t.dtype.bits,
                    t.dtype.lanes, shape, strides, address, read_only)
