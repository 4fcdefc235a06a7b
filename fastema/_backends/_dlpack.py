"""Read what a DLPack capsule describes: address, device, dtype, shape, strides.

fastema's kernels need only an address and a layout. NumPy's ``from_dlpack`` refuses
bfloat16 and every GPU array, and Numba cannot import DLPack at all, so this module
reads the capsule's ``DLTensor`` (the structs of ``dlpack.h``, legacy and versioned;
64-bit layout). The capsule is not consumed: it stays with the returned
:class:`Imported`, and dropping it runs the producer's deleter, which releases the
producer's hold on the memory. Keep the :class:`Imported` as long as the address is used.
"""
from __future__ import annotations

import ctypes
import math
import struct
from typing import Any, NamedTuple

CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13           # DLDeviceType
INT, UINT, FLOAT, BFLOAT = 0, 1, 2, 4                      # DLDataTypeCode
READ_ONLY = 1                                              # DLPACK_FLAG_BITMASK_READ_ONLY


# struct DLTensor on a 64-bit machine: data, device {type, id}, ndim, dtype {code, bits, lanes},
# shape*, strides*, byte_offset. Unpacked from raw bytes (one C call, unlike ctypes field access).
_TENSOR = struct.Struct("<QiiiBBHQQQ")
_VERSIONED_FLAGS = 24        # DLManagedTensorVersioned: version, manager_ctx, deleter, flags, dl_tensor
_VERSIONED_TENSOR = 32


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
        base = _get_pointer(capsule, name)
        flags = struct.unpack_from("<Q", ctypes.string_at(base + _VERSIONED_FLAGS, 8))[0]
        at, read_only = base + _VERSIONED_TENSOR, bool(flags & READ_ONLY)
    elif name == b"dltensor":
        at, read_only = _get_pointer(capsule, name), False   # DLManagedTensor starts with its DLTensor
    else:
        raise BufferError(f"__dlpack__ returned a capsule named {name!r}, not a DLPack tensor")
    data, dev_type, dev_id, ndim, code, bits, lanes, shape_p, strides_p, offset = \
        _TENSOR.unpack(ctypes.string_at(at, _TENSOR.size))
    shape = struct.unpack(f"<{ndim}q", ctypes.string_at(shape_p, 8 * ndim)) if ndim else ()
    strides = struct.unpack(f"<{ndim}q", ctypes.string_at(strides_p, 8 * ndim)) if ndim and strides_p else None
    return Imported(x, capsule, dev_type, dev_id, code, bits, lanes, shape, strides, data + offset, read_only)
