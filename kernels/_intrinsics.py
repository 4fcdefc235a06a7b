"""The hardware pieces of the kernels, written once: bit casts, FMA and typed pointers.

``build(intrinsic, types)`` takes a numba target's ``intrinsic`` decorator and types
module (``numba.extending``/``numba.core.types`` for the CPU,
``numba.cuda.extending``/``numba.cuda.types`` for CUDA) and returns a dict of
``as_float, as_bits, fma, u32_pointer, u16_pointer, f64_pointer``; each is one LLVM
instruction or intrinsic call (``llvm.fma`` becomes ``vfmadd`` on the CPU and ``fma.rn``
in PTX, so both targets round the lerp once, by name rather than by contraction).
``load_pair, store_pair`` (an interleaved float64 pair) are :func:`build_pairs`' 16-byte
accesses on CUDA and :func:`python_pairs`' two plain ones on the CPU.

:func:`python_versions` returns the same names as plain Python with the same semantics:
the CUDA simulator runs them, and the element bodies of :mod:`._elementwise` use them
when called from Python (tests, debugging).
"""
import ctypes

import numpy as np
from llvmlite import ir

NAMES = ("as_float", "as_bits", "fma", "u32_pointer", "u16_pointer", "f64_pointer")


def build(intrinsic, types) -> dict:
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

    @intrinsic
    def fma(typingctx, a, b, c):
        """``a * b + c`` rounded once; all three float32 or all three float64."""
        if not (a == b == c and a in (types.float32, types.float64)):
            return None
        sig = a(a, b, c)

        def codegen(context, builder, signature, args):
            t = args[0].type
            name = "llvm.fma.f32" if isinstance(t, ir.FloatType) else "llvm.fma.f64"
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(t, [t, t, t]), name)
            return builder.call(fn, args)

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

    return dict(as_float=as_float, as_bits=as_bits, fma=fma, u32_pointer=pointer(types.uint32),
                u16_pointer=pointer(types.uint16), f64_pointer=pointer(types.float64))


def build_vectors(intrinsic, types) -> dict:
    """16-byte and 8-byte global-memory vector accesses for numba-cuda: ``load4_u32(address)``
    (``ld.global.v4.u32``), ``store4_u32(address, a, b, c, d)`` and ``load4_u16(address)``
    (``ld.global.v4.u16``). ``address`` must be aligned to the access size (16 or 8 bytes):
    the kernels check it per segment and take the scalar path otherwise."""
    def vector_load(lane_type, lane_bits, align):
        vector = ir.VectorType(ir.IntType(lane_bits), 4)

        @intrinsic
        def load4(typingctx, address):
            if not isinstance(address, types.Integer):
                return None
            sig = types.UniTuple(lane_type, 4)(address)

            def codegen(context, builder, signature, args):
                v = builder.load(builder.inttoptr(args[0], ir.PointerType(vector, addrspace=1)), align=align)
                lanes = [builder.extract_element(v, ir.Constant(ir.IntType(32), i)) for i in range(4)]
                return context.make_tuple(builder, signature.return_type, lanes)

            return sig, codegen

        return load4

    v4u32 = ir.VectorType(ir.IntType(32), 4)

    @intrinsic
    def store4_u32(typingctx, address, a, b, c, d):
        if not isinstance(address, types.Integer):
            return None
        sig = types.void(address, a, b, c, d)

        def codegen(context, builder, signature, args):
            v = ir.Constant(v4u32, ir.Undefined)
            for i in range(4):
                lane = context.cast(builder, args[1 + i], signature.args[1 + i], types.uint32)
                v = builder.insert_element(v, lane, ir.Constant(ir.IntType(32), i))
            builder.store(v, builder.inttoptr(args[0], ir.PointerType(v4u32, addrspace=1)), align=16)
            return context.get_dummy_value()

        return sig, codegen

    return dict(load4_u32=vector_load(types.uint32, 32, 16), store4_u32=store4_u32,
                load4_u16=vector_load(types.uint16, 16, 8))


def build_pairs(intrinsic, types) -> dict:
    """An interleaved float64 pair as one 16-byte access, for numba-cuda: ``load_pair(a, i)`` is
    ``(a[i], a[i + 1])`` (``ld.global.v2.f64``) and ``store_pair(a, i, x, y)`` writes them
    (``st.global.v2.f64``). ``i`` must be even and ``a`` (1-D, contiguous, float64) start on a
    16-byte boundary: the smoothers' state arrays, which fastema allocates (every allocator it
    uses aligns to 256 bytes). The CPU and the simulator take :func:`python_pairs`."""
    v2 = ir.VectorType(ir.DoubleType(), 2)

    def pair_pointer(context, builder, aryty, ary, index, indexty):
        data = context.make_array(aryty)(context, builder, ary).data
        at = builder.gep(data, [context.cast(builder, index, indexty, types.intp)])
        return builder.inttoptr(builder.ptrtoint(at, ir.IntType(64)), ir.PointerType(v2, addrspace=1))

    def takes(a, i):
        return isinstance(a, types.Array) and a.dtype == types.float64 and isinstance(i, types.Integer)

    @intrinsic
    def load_pair(typingctx, a, i):
        if not takes(a, i):
            return None
        sig = types.UniTuple(types.float64, 2)(a, i)

        def codegen(context, builder, signature, args):
            v = builder.load(pair_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1]),
                             align=16)
            lanes = [builder.extract_element(v, ir.Constant(ir.IntType(32), j)) for j in range(2)]
            return context.make_tuple(builder, signature.return_type, lanes)

        return sig, codegen

    @intrinsic
    def store_pair(typingctx, a, i, x, y):
        if not takes(a, i):
            return None
        sig = types.void(a, i, types.float64, types.float64)

        def codegen(context, builder, signature, args):
            v = ir.Constant(v2, ir.Undefined)
            for j in range(2):
                v = builder.insert_element(v, args[2 + j], ir.Constant(ir.IntType(32), j))
            builder.store(v, pair_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1]),
                          align=16)
            return context.get_dummy_value()

        return sig, codegen

    return dict(load_pair=load_pair, store_pair=store_pair)


def python_pairs() -> dict:
    """:func:`build_pairs` as two plain accesses (the CPU compiles these; the simulator runs them)."""
    def load_pair(a, i):
        return a[i], a[i + 1]

    def store_pair(a, i, x, y):
        a[i] = x
        a[i + 1] = y

    return dict(load_pair=load_pair, store_pair=store_pair)


def python_vectors() -> dict:
    """:func:`build_vectors` in plain Python, failing (as the hardware does) on a misaligned address."""
    def check(address, size):
        if int(address) % size:
            raise RuntimeError(f"misaligned {size}-byte vector access at {int(address):#x}")

    def load4_u32(address):
        check(address, 16)
        a = np.ctypeslib.as_array((ctypes.c_uint32 * 4).from_address(int(address)))
        return np.uint32(a[0]), np.uint32(a[1]), np.uint32(a[2]), np.uint32(a[3])

    def store4_u32(address, a, b, c, d):
        check(address, 16)
        np.ctypeslib.as_array((ctypes.c_uint32 * 4).from_address(int(address)))[:] = (a, b, c, d)

    def load4_u16(address):
        check(address, 8)
        a = np.ctypeslib.as_array((ctypes.c_uint16 * 4).from_address(int(address)))
        return np.uint16(a[0]), np.uint16(a[1]), np.uint16(a[2]), np.uint16(a[3])

    return dict(load4_u32=load4_u32, store4_u32=store4_u32, load4_u16=load4_u16)


def python_versions() -> dict:
    """The names of :func:`build` in plain Python (NumPy scalars, host memory through ctypes)."""
    def as_float(bits):
        """Low 32 bits of an unsigned integer, reinterpreted as float32."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def as_bits(value):
        """float32 -> its uint32 bit pattern."""
        return np.float32(value).view(np.uint32)

    def fma(a, b, c):
        """``a * b + c`` rounded once: float64 holds a float32 product exactly; float64 inputs
        go through Python's exact ``math.fma`` where there is one (3.13+)."""
        if isinstance(a, np.float32):
            return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
        import math
        if hasattr(math, "fma"):
            return np.float64(math.fma(float(a), float(b), float(c)))
        from fractions import Fraction
        return np.float64(float(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))))

    def pointer(ctype):
        def typed_pointer(address, count):
            return np.ctypeslib.as_array((ctype * max(int(count), 1)).from_address(int(address)))
        return typed_pointer

    return dict(as_float=as_float, as_bits=as_bits, fma=fma, u32_pointer=pointer(ctypes.c_uint32),
                u16_pointer=pointer(ctypes.c_uint16), f64_pointer=pointer(ctypes.c_double), **python_pairs())
