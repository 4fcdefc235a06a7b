"""Scalar bit-level helpers shared by the CPU and CUDA kernels.

Plain Python functions over unsigned integers; each target compiles them with
its own decorator (``njit`` on the CPU, ``cuda.jit(device=True)`` on CUDA), so
the CPU, the GPU and the CUDA simulator run the same arithmetic.

Every value travels as the bit pattern of a float32 (``uint32``). Storage kinds:
``F32`` is stored as uint32, ``BF16`` and ``F16`` as uint16. ``F64`` (float64) is not
a bit pattern: kernels that meet it read and write float64 values directly. Only unsigned
constants are used: numba types ``uint64 op int64`` as float64.
"""
import numpy as np

from .kinds import BF16, F16, F32, F64, ITEMSIZE, KIND_NAMES  # noqa: F401  (re-exported)

_U16 = np.uint32(16)
_U13 = np.uint32(13)
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_BF16_QNAN = np.uint32(0x7FC0)    # what torch's .bfloat16() gives for every NaN
_F16_QNAN = np.uint32(0x7E00)     # every float16 NaN (the sign of a computed NaN is the hardware's)
_M32 = np.uint64(0xFFFFFFFF)


def decode(bits, kind):
    """Stored bits of ``kind`` -> float32 bits; exact for every input (subnormals, inf, NaN).

    ``kind`` is a compile-time constant in the kernels, so only one branch remains.
    """
    h = np.uint32(bits)
    if kind == F32:
        return h
    if kind == BF16:                                    # bf16 bits are the high half
        return h << _U16
    sign = (h & np.uint32(0x8000)) << _U16              # float16
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    man = h & np.uint32(0x3FF)
    if exp == np.uint32(0x1F):                          # inf / NaN, payload kept
        return sign | _INF | (man << _U13)
    if exp != np.uint32(0):
        return sign | ((exp + np.uint32(112)) << np.uint32(23)) | (man << _U13)
    if man == np.uint32(0):
        return sign
    e = np.uint32(113)                                  # subnormal: normalise
    while (man & np.uint32(0x400)) == np.uint32(0):
        man = man << np.uint32(1)
        e = e - np.uint32(1)
    return sign | (e << np.uint32(23)) | ((man & np.uint32(0x3FF)) << _U13)


def encode(bits, kind):
    """float32 bits -> stored bits of ``kind``, round to nearest even.

    bfloat16: every NaN becomes 0x7FC0 (as torch's ``.bfloat16()``). float16: overflow
    goes to inf, every NaN becomes 0x7E00: a NaN made by the arithmetic (``inf - inf``) has the
    sign bit set on x86 and clear on an NVIDIA GPU, so keeping its sign would store other bits on
    each target.
    """
    b = np.uint32(bits)
    if kind == F32:
        return b
    if kind == BF16:
        if (b & _ABS) > _INF:
            return _BF16_QNAN
        return (b + np.uint32(0x7FFF) + ((b >> _U16) & np.uint32(1))) >> _U16
    sign = (b >> _U16) & np.uint32(0x8000)              # float16
    a = b & _ABS
    if a > _INF:
        return _F16_QNAN
    if a == _INF:
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x477FF000):                      # >= 65520 rounds to inf
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):                      # normal float16 (>= 2**-14)
        m = a - np.uint32(0x38000000)                   # rebias exponent 127 -> 15
        m = (m + np.uint32(0xFFF) + ((m >> _U13) & np.uint32(1))) >> _U13
        return sign | m
    if a <= np.uint32(0x33000000):                      # <= 2**-25 (a tie) rounds to zero
        return sign
    man = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - (a >> np.uint32(23))       # 14..24
    k = man >> shift
    rem = man & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (k & np.uint32(1)) != np.uint32(0)):
        k = k + np.uint32(1)
    return sign | k


def encode_bf16_sr(b, noise):
    """float32 bits -> bfloat16 bits, rounded stochastically with 16 random bits.

    Adding a uniform value in [0, 2**16) to the float32 bits and truncating rounds
    up with probability equal to the discarded fraction: unbiased in expectation.
    """
    b = np.uint32(b)
    if (b & _ABS) > _INF:
        return _BF16_QNAN
    return (b + (np.uint32(noise) & np.uint32(0xFFFF))) >> _U16


def sr_noise(key, index):
    """Random bits for element ``index`` (int64) under ``key`` (uint32): two rounds of
    the bijective lowbias32 hash (C. Wellons), self-contained so both targets inline it.
    The first round sees only the index's high 32 bits (:func:`sr_noise_first`), the second
    its low 32 bits and the key (:func:`sr_noise_last`)."""
    i = np.uint64(index)
    return sr_noise_last(sr_noise_first(i >> np.uint64(32)), key, i & _M32)


def sr_noise_first(high):
    """The first round of :func:`sr_noise` for an index whose high 32 bits are ``high``: the same
    for every index of a run that does not cross a multiple of 2**32 (a vector's lanes share it)."""
    return _lowbias32(np.uint64(high) + np.uint64(0x9E3779B9))


def sr_noise_last(first, key, low):
    """:func:`sr_noise`'s bits from its first round ``first`` and the index's low 32 bits ``low``."""
    return np.uint32(_lowbias32(np.uint64(first) ^ (np.uint64(low) & _M32) ^ np.uint64(key)))


def _lowbias32(x):
    """One round of lowbias32 on the low 32 bits of ``x`` (uint64 arithmetic, masked: exact on
    both targets); returns a uint64 below 2**32."""
    x = x & _M32
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def pack_bf16(e, r):
    """Swap-in of a float32 shadow against a bfloat16 source (``e``: shadow bits, ``r``: source bits).

    Returns ``(slot, out)``: ``out`` is ``e`` rounded to nearest bfloat16 (ties toward
    zero, NaN quiet), ``slot`` holds the raw source in its high half and the low 16
    bits of ``e`` in its low half. :func:`unpack_bf16` inverts it exactly, so a
    float32 shadow survives a swap into a bfloat16 model bit for bit.
    """
    e = np.uint32(e)
    lo = e & np.uint32(0xFFFF)
    if (e & _ABS) > _INF:
        out = _BF16_QNAN | ((e >> _U16) & np.uint32(0x8000))
    else:
        out = (e >> _U16) + (np.uint32(1) if lo > np.uint32(0x8000) else np.uint32(0))
    return (np.uint32(r) << _U16) | lo, out


def unpack_bf16(slot, out):
    """Inverse of :func:`pack_bf16`: returns ``(e, r)``."""
    slot = np.uint32(slot)
    lo = slot & np.uint32(0xFFFF)
    hi = np.uint32(out)
    if lo > np.uint32(0x8000):
        hi = hi - np.uint32(1)
    return ((hi & np.uint32(0xFFFF)) << _U16) | lo, slot >> _U16


def is_nonfinite(bits, kind):
    """True when the stored value (any kind) is inf or NaN; integer test only."""
    if kind == F32:
        return (np.uint32(bits) & _INF) == _INF
    if kind == BF16:
        return (np.uint32(bits) & np.uint32(0x7F80)) == np.uint32(0x7F80)
    return (np.uint32(bits) & np.uint32(0x7C00)) == np.uint32(0x7C00)

