"""CPU-only low-level pieces: float32 bit casts and typed pointers from raw addresses.

Small numba intrinsics (one LLVM instruction each). Everything else in the CPU
kernels is plain numba.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def as_float(typingctx, bits):
    """Reinterpret the low 32 bits of an unsigned integer as a float32."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        u32 = context.cast(builder, args[0], bits, types.uint32)
        return builder.bitcast(u32, ir.FloatType())

    return sig, codegen


@intrinsic
def as_bits(typingctx, value):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if value != types.float32:
        return None
    sig = types.uint32(value)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _pointer(dtype):
    @intrinsic
    def pointer(typingctx, address, count):
        """Typed pointer to ``count`` elements at ``address`` (count is unused on the CPU)."""
        if not isinstance(address, types.Integer):
            return None
        sig = types.CPointer(dtype)(address, count)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return pointer


u32_pointer = _pointer(types.uint32)
u16_pointer = _pointer(types.uint16)


def fma(a, b, c):
    """Placeholder: on the CPU ``a * b + c`` is contracted by LLVM (``fastmath={'contract'}``)."""
    return a * b + c
