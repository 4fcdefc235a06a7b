"""The bit-cast and pointer intrinsics, written once for both numba targets.

``build(intrinsic, types)`` takes the target's ``intrinsic`` decorator and types
module (``numba.extending``/``numba.core.types`` for the CPU,
``numba.cuda.extending``/``numba.cuda.types`` for CUDA) and returns
``(as_float, as_bits, u32_pointer, u16_pointer, f64_pointer)``; each is one LLVM instruction.
"""
from llvmlite import ir


def build(intrinsic, types):
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

    def pointer(dtype):
        @intrinsic
        def typed_pointer(typingctx, address, count):
            """Typed pointer to ``count`` elements at integer ``address`` (count: simulator only)."""
            if not isinstance(address, types.Integer):
                return None
            sig = types.CPointer(dtype)(address, count)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return typed_pointer

    return as_float, as_bits, pointer(types.uint32), pointer(types.uint16), pointer(types.float64)
