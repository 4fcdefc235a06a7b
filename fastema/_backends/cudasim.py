"""The Numba CUDA simulator's device arrays: they wrap host NumPy arrays and carry no
``__cuda_array_interface__``; their "device" memory is that host array."""
from __future__ import annotations

import numpy as np

from . import numpy as np_backend
from ._buf import Buf
from .cai import CudaArrays

NAME = "cudasim"


class CudaSimulator(CudaArrays):
    """The simulator's arrays are Numba device arrays too (:meth:`empty`, the host transfers)."""

    NAME = NAME

    def owns(self, x) -> bool:
        mod = type(x).__module__
        return mod.startswith("numba") and "simulator" in mod and hasattr(x, "_ary")

    def describe(self, x, what: str) -> Buf:
        return np_backend.backend.describe(x._ary, what)._replace(obj=x, device="cuda:0", framework=NAME)

    def zeros(self, device, n: int, dtype):
        from numba import cuda

        return cuda.to_device(np.zeros(n, dtype))

    def zero_(self, a) -> None:
        a._ary.fill(0)                  # the simulator's device memory is this host array

    def location(self, a) -> tuple:
        return NAME, "cuda:0"

    def kernel_view(self, a):
        return a._ary

    def control(self, x, what: str, writable: bool):
        return "cuda:0", x._ary.dtype, x._ary.size

    def metric(self, x, what: str):
        kind, bits, _, shape = np_backend.backend.metric(x._ary, what)
        return kind, bits, (NAME, "cuda:0"), shape


backend = CudaSimulator()
