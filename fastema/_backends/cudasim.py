"""The Numba CUDA simulator's device arrays: they wrap host NumPy arrays and carry no
``__cuda_array_interface__``; their "device" memory is that host array."""
from __future__ import annotations

import numpy as np

from . import numpy as np_backend

NAME = "cudasim"


def owns(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("numba") and "simulator" in mod and hasattr(x, "_ary")


def describe(x, what: str):
    return np_backend.describe(x._ary, what)._replace(obj=x, device="cuda:0", framework=NAME)


def zeros(device, n: int, dtype):
    from numba import cuda

    return cuda.to_device(np.zeros(n, dtype))


def zero_(a) -> None:
    from .. import _launch

    _launch.zero_(a, "cuda:0", NAME)


def control(x, what: str, dtype, writable: bool):
    return "cuda:0", x._ary.dtype, x._ary.size, x._ary


def metric(x, what: str):
    kind, bits, _, shape = np_backend.metric(x._ary, what)
    return kind, bits, (NAME, "cuda:0"), shape


def kernel_view(a):
    return a._ary

