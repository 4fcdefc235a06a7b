"""Objects with ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays): CUDA memory.

fastema's own buffers for such sources are Numba device arrays; :func:`raw_view` is how any
CUDA memory (a torch tensor's, a control array's) becomes a device array for a kernel, with no copy
(fastema's own, :class:`fastema._device_view.DeviceView`: no numba-cuda).
CuPy arrays are the same memory with a current stream: :class:`CuPy`.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from ..kernels.kinds import BF16
from . import numpy as np_backend
from ._base import Backend
from ._buf import Buf, device_name, not_dense, unsupported_dtype

NAME = "cuda"


def raw_view(address: int, size: int, dtype, owner):
    """A device array over ``size`` elements of ``dtype`` at CUDA ``address`` (no copy, no sync;
    ``__cuda_array_interface__``, which numba's dispatcher takes too); ``owner`` is kept alive with
    it."""
    from .._device_view import DeviceView

    return DeviceView.view(address, size, dtype, owner)


def _numba_array(a) -> bool:
    return bool(getattr(type(a), "__cuda_ndarray__", False))       # Numba's DeviceNDArray marks itself so


class CudaArrays(Backend):
    """CUDA array interface producers; fastema launches for them on the legacy default stream."""

    NAME = NAME

    def owns(self, x) -> bool:
        return hasattr(x, "__cuda_array_interface__")

    def device_of(self, x) -> str:
        return device_name("cuda", getattr(getattr(x, "device", None), "id", 0))

    def describe(self, x, what: str) -> Buf:
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
        return Buf(x, kind, self.device_of(x), shape, int(address or 0), not readonly, self.NAME)

    def address(self, x) -> int:
        return x.__cuda_array_interface__["data"][0]

    def empty(self, like, kind: int, shape: tuple):
        from numba import cuda

        if kind == BF16:
            raise TypeError("bfloat16 shadows on the GPU need torch tensors as sources; use dtype='float32'")
        return cuda.device_array(shape, np_backend.numpy_dtype(kind))

    def zeros(self, device, n: int, dtype):
        from numba import cuda

        with cuda.gpus[int(device.split(":")[1])]:
            a = cuda.device_array(n, dtype)
        self.zero_(a)
        return a

    def zero_(self, a) -> None:
        """A memset on the legacy default stream (where fastema launches for these arrays):
        asynchronous, no host copy, no kernel."""
        from numba import cuda
        from numba.cuda.cudadrv.driver import device_memset

        device_memset(a, 0, a.nbytes, stream=cuda.default_stream())

    def location(self, a) -> tuple:
        return self.NAME, self.device_of(a)

    def kernel_view(self, a):
        if _numba_array(a):
            return a
        cai = a.__cuda_array_interface__
        return raw_view(cai["data"][0], math.prod(cai["shape"]), np.dtype(cai["typestr"]), a)

    def control(self, x, what: str, writable: bool):
        cai = x.__cuda_array_interface__
        return self.device_of(x), np.dtype(cai["typestr"]), int(np.prod(cai["shape"]))

    def to_host(self, a) -> np.ndarray:
        return a.copy_to_host()

    def copy_from_host(self, dst, a: np.ndarray) -> None:
        dst.copy_to_device(np.ascontiguousarray(a.astype(dst.dtype)))


class CuPy(CudaArrays):
    """CuPy arrays: fastema launches on CuPy's current stream."""

    NAME = "cupy"

    def owns(self, x) -> bool:
        cupy = sys.modules.get("cupy")
        return cupy is not None and isinstance(x, cupy.ndarray)

    def zero_(self, a) -> None:
        a.fill(0)

    def to_host(self, a) -> np.ndarray:
        return a.get()

    def copy_from_host(self, dst, a: np.ndarray) -> None:
        dst.set(np.ascontiguousarray(a.astype(dst.dtype)))

    def stream_getter(self, device: str):
        import cupy

        index = int(device.split(":")[1])

        def current() -> int:
            with cupy.cuda.Device(index):
                return cupy.cuda.get_current_stream().ptr

        return current


backend = CudaArrays()
cupy = CuPy()
