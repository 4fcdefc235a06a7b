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

else:
    from llvmlite import ir
    from numba import cuda
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @cuda.jit(device=True, inline="always")
    def fma(a, b, c):
        return cuda.fma(a, b, c)   # the stub is typed only when reached through `cuda.`

    @intrinsic
    def as_float(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None
        sig = types.float32(bits)

        def codegen(context, builder, signature, args):
            u32 = context.cast(builder, args[0], bits, types.uint32)
            return builder.bitcast(u32, ir.FloatType())

        return sig, codegen

    @intrinsic
    def as_bits(typingctx, value):
        if value != types.float32:
            return None
        sig = types.uint32(value)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return sig, codegen

    def _pointer(dtype):
        @intrinsic
        def pointer(typingctx, address, count):
            if not isinstance(address, types.Integer):
                return None
            sig = types.CPointer(dtype)(address, count)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return pointer

    u32_pointer = _pointer(types.uint32)
    u16_pointer = _pointer(types.uint16)
