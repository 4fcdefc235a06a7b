"""The kernels' element arithmetic in ``jax.numpy``, for the average inside ``jax.jit``.

What fastema's kernels compute per element (``kernels/_elementwise.py``, ``kernels/_bits.py``),
written with ``jnp`` so XLA traces, fuses and shards it:

- :func:`lerp` is ``lerp32``: ``s + w (x - s)`` from ``s`` when ``|w| < 0.5``, else
  ``x + (w - 1) (x - s)`` (``torch.lerp``'s two forms). The kernels round the product-sum
  once (an FMA); XLA's CPU backend contracts these multiply-adds into FMAs too, so the result
  is the kernel's bit for bit there (tested); a backend that does not contract rounds twice,
  within one ulp.
- :func:`sr_noise` and :func:`round_bf16_stochastic` are the kernels' stochastic rounding: the
  lowbias32 counter hash of (key, element index) in uint32 arithmetic (wrapping multiplies: the
  kernels' ``& 0xFFFFFFFF``), the noise added to the float32 bits and truncated. Equal keys and
  indices give equal bits.

Element indices are uint32 (a leaf of up to 2**32 elements); a row's index carries the row in
its high 32 bits as the kernels' (``kinds.NOISE_ROW = 2**40``: the high word is ``256 * row``).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..kernels.kinds import NOISE_ROW

_GOLDEN = np.uint32(0x9E3779B9)
_ROW_HIGH = NOISE_ROW >> 32                 # the high word of row k's first index: k * 256
_BF16_QNAN = np.uint16(0x7FC0)             # the kernels' bfloat16 NaN (torch's .bfloat16() of every NaN)


def lowbias32(x):
    """One round of C. Wellons' lowbias32 on uint32 ``x`` (the kernels' ``_bits._lowbias32``)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def sr_noise(key, high, low):
    """The kernels' ``sr_noise(key, index)`` for the index ``high * 2**32 + low`` (uint32 words)."""
    return lowbias32(lowbias32(jnp.asarray(high, jnp.uint32) + _GOLDEN) ^ low ^ key)


def sr_key(seed_word, step):
    """The kernels' ``sr_key(seed, step)`` (``fastema._checks``): the noise of index ``step`` under the
    seed folded to 32 bits (``seed_word``, uint32); ``step`` a non-negative int32 (traced)."""
    return sr_noise(seed_word, jnp.uint32(0), step.astype(jnp.uint32))


def seed_words(seed: int) -> np.ndarray:
    """A seed in ``[0, 2**64)`` as its two uint32 words ``(low, high)``."""
    return np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint32)


def group_seed(words, group: int):
    """The 32-bit key word of the kernels' group ``group`` (the ``group``-th (source dtype, shadow dtype)
    pair met): fastema keys group ``gi`` with ``seed + (gi << 32)`` (``fastema._steps``), folded as
    ``sr_key`` folds it, ``low ^ high``."""
    return words[0] ^ (words[1] + np.uint32(group))


def element_index(shape: tuple, offset: int):
    """The uint32 index of every element of a C-order array of ``shape``, from ``offset``: built from
    ``broadcasted_iota`` per dimension, so XLA partitions it with the array (no collective)."""
    index = jnp.full(shape, np.uint32(offset), jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        if shape[d] > 1:
            index = index + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
        stride *= shape[d]
    return index


def lerp_rows(s, x, w, small: bool = False, large: bool = False):
    """``lerp32(s[k], x, w[k])`` of the kernels for every row ``k``: ``s`` ``(rows, *shape)``, ``x``
    ``shape``, ``w`` ``(rows, 1, ...)``, one dtype. ``small``/``large``: every ``|w| < 0.5`` (or
    every ``>= 0.5``) is known when traced, and XLA compiles one multiply-add per element."""
    d = x - s
    if small:
        return s + w * d
    if large:
        return x + (w - 1) * d
    return jnp.where(jnp.abs(w) < 0.5, s + w * d, x + (w - 1) * d)


def round_bf16_stochastic(y, noise):
    """float32 ``y`` to bfloat16 with 16 random bits of ``noise`` (uint32): the kernels'
    ``encode_bf16_sr``, every NaN to the kernels' quiet NaN."""
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    out = ((bits + (noise & np.uint32(0xFFFF))) >> np.uint32(16)).astype(jnp.uint16)
    out = jnp.where(jnp.isnan(y), _BF16_QNAN, out)
    return lax.bitcast_convert_type(out, jnp.bfloat16)


def row_high(row: int) -> np.uint32:
    """The high index word of shadow row ``row``."""
    return np.uint32(row * _ROW_HIGH)
