"""Objects with ``__cuda_array_interface__`` (CuPy arrays, Numba device arrays): CUDA memory.

fastema's own buffers for such sources are Numba device arrays.
"""
from __future__ import annotations

import sys

import numpy as np

from ..kernels.kinds import BF16
from ._buf import Buf, not_dense, unsupported_dtype
from . import numpy as np_backend

NAME = "cuda"


def owns(x) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def _device(x) -> str:
    return f"cuda:{int(getattr(getattr(x, 'device', None), 'id', 0))}"


def describe(x, what: str):
    cai = x.__cuda_array_interface__
    dtype = np.dtype(cai["typestr"])
    kind = np_backend.KINDS.get(dtype)
    if kind is None:
        raise unsupported_dtype(what, dtype)
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None and strides != tuple(np.empty(shape, dtype).strides):
        raise not_dense(what, shape, strides)
    address, readonly = cai["data"]
    return Buf(x, kind, _device(x), shape, int(address or 0), not readonly, _framework(x))


def _framework(x) -> str:
    """"cupy" for CuPy arrays (fastema launches on CuPy's current stream), else "cuda"."""
    cupy = sys.modules.get("cupy")
    return "cupy" if cupy is not None and isinstance(x, cupy.ndarray) else NAME


def address(x) -> int:
    return x.__cuda_array_interface__["data"][0]


def empty(like, kind: int, shape: tuple):
    from numba import cuda

    if kind == BF16:
        raise TypeError("bfloat16 shadows on the GPU need torch tensors as sources; use dtype='float32'")
    return cuda.device_array(shape, np_backend.numpy_dtype(kind))


def zeros(device, n: int, dtype):
    from numba import cuda

    with cuda.gpus[int(device.split(":")[1])]:
        a = cuda.device_array(n, dtype)
    zero_(a)
    return a


def zero_(a) -> None:
    """Zeros on the device, stream-ordered (CuPy's current stream, or a kernel): no host copy."""
    if _framework(a) == "cupy":
        a.fill(0)
        return
    from .. import _launch

    _launch.zero_(a, _device(a), NAME)


def control(x, what: str, dtype, writable: bool):
    cai = x.__cuda_array_interface__
    return _device(x), np.dtype(cai["typestr"]), int(np.prod(cai["shape"])), None


def kernel_view(a):
    return a

