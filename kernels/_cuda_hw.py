"""CUDA hardware-only pieces: bit casts, FMA, typed pointers from raw addresses.

On a GPU these are numba-cuda intrinsics (one PTX instruction each). The Numba
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) can run neither intrinsics nor raw
device pointers, so it gets NumPy fallbacks with the same semantics; the kernels
in :mod:`fastema.kernels.ema_cuda` use only these names and run unchanged on both.
"""
import ctypes

import numpy as np
from numba.cuda.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

if SIMULATOR:
    def as_float(bits):
        """Low 32 bits of an unsigned integer, reinterpreted as float32."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def as_bits(value):
        """float32 -> its uint32 bit pattern."""
        return np.float32(value).view(np.uint32)

    def fma(a, b, c):
        """a * b + c rounded once (float64 holds the float32 product exactly)."""
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

    def u32_pointer(address, count):
        """``count`` uint32 at a host address (simulated device memory is host memory)."""
        return np.ctypeslib.as_array((ctypes.c_uint32 * max(int(count), 1)).from_address(int(address)))

    def u16_pointer(address, count):
        return np.ctypeslib.as_array((ctypes.c_uint16 * max(int(count), 1)).from_address(int(address)))

    def f64_pointer(address, count):
        return np.ctypeslib.as_array((ctypes.c_double * max(int(count), 1)).from_address(int(address)))

else:
    from numba import cuda
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    from ._intrinsics import build

    as_float, as_bits, u32_pointer, u16_pointer, f64_pointer = build(intrinsic, types)

    @cuda.jit(device=True, inline="always")
    def fma(a, b, c):
        return cuda.fma(a, b, c)   # the stub is typed only when reached through `cuda.`
