"""float32 arithmetic past float32's precision, for the device schedules without ``jax_enable_x64``.

Numbers as unevaluated sums of float32s (pairs, and multiples of 1/64 plus a small remainder),
the error-free steps between them, and :func:`exp2_neg`: ``2 ** -y`` within 0.53 ulp of float32
for a ``y`` given to about 2**-29, which :func:`half_life` and :func:`power_function` give it.
Those two are within one float32 ulp of the host's float64 decays, in ``1 - d`` too
(``tests/bridges/test_jax_schedule_ulps.py``): ``d`` is within ``0.5 + e`` ulps, ``e`` the error
before the last rounding; ``1 - d`` is exact where ``d >= 1/2`` (Sterbenz) and rounds once more,
half an ulp of ``1 - d``, where ``d < 1/2`` (``d``'s ulp is then at most half of ``1 - d``'s):
``(0.5 + e) / 2 + 0.5``. Errors below are absolute, for ``d`` in ``[1/2, 1)`` (an ulp is 2**-24).

XLA may contract ``a * b + c`` into an FMA and folds float constants together (reassociating
them), so the constants pass through an optimization barrier (:func:`opaque`), and a rounded
product whose rounding an error-free step relies on is kept apart by one (:func:`mul12`); an
exact product is the same fused or not. Scalars, once a step: the cost is nothing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = np.float32
_LN2 = math.log(2.0)


def pair(x: float, f=F32) -> tuple:
    """``x`` as two numbers of ``f`` whose sum is ``x`` to twice the precision (``hi``, ``lo``):
    a constant added last keeps its float64 value to the final rounding (float32: ``0.9`` is
    ``0.9 - 2.4e-8``, half an ulp of a decay before any arithmetic)."""
    hi = np.asarray(x, np.float64).astype(f)
    return hi, np.asarray(float(x) - float(hi), np.float64).astype(f)


def opaque(*constants):
    """``constants`` as values XLA cannot fold: its simplifier reassociates float constants
    (``hi + (lo + x)`` became ``x + 0.9``, ``(i / total) * span`` became ``i * (span / total)``),
    which undoes the rounding order the pairs are for. An optimization barrier keeps them apart
    (no cost: scalars, once a step)."""
    return jax.lax.optimization_barrier(tuple(jnp.asarray(c) for c in constants))


def split12(a):
    """float32 ``a`` as ``hi + lo``, each of at most 12 significant bits (the mantissa's low 12
    bits masked off: exact, and no arithmetic XLA could contract)."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.uint32) & np.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def mul12(a, b):
    """``a * b`` of float32s as ``(p, e)``, ``p`` the rounded product and ``p + e`` the exact one
    (Dekker's, from 12-bit halves: each partial product exact). ``p`` passes a barrier: an FMA
    taking ``a * b`` into ``a1 * b1 - p`` would leave ``e`` the error of a product never rounded."""
    (p,) = jax.lax.optimization_barrier((a * b,))
    a1, a2 = split12(a)
    b1, b2 = split12(b)
    return p, (((a1 * b1 - p) + a1 * b2) + a2 * b1) + a2 * b2


def grid(x):
    """float32 ``x`` as ``(n, r)``: ``n`` the nearest multiple of 1/64, ``r = x - n`` (``|r| <=
    1/128``), both exact: where ``|x| >= 1/128`` its ulp is at least 2**-30, so ``r`` is a multiple
    of it under 2**23 of them; below, ``n`` is 0."""
    n = jnp.round(x * 64.0) / 64.0
    return n, x - n


def ratio_pair(num, den):
    """``num / den`` of int32s (``0 <= num <= den``, ``den > 0``) as float32 ``(hi, lo)``,
    ``hi + lo`` within ~2**-40 of it (relative): ``hi`` the float32 quotient, ``lo`` its remainder
    over ``den``. The remainder ``num - hi * den`` is Dekker's: ``den`` cut to a multiple of 256
    above 2**24 (24 significant bits, exact in float32) and the rest; ``hi`` times the first is
    exact (:func:`mul12`), times the rest (8 bits) rounded: 2**-16 of ``hi``, over ``den``."""
    f = jnp.float32
    mask = jnp.where(den >= 2 ** 24, jnp.int32(-256), jnp.int32(-1))
    nh, nl = (num & mask).astype(f), (num - (num & mask)).astype(f)
    dh, dl = (den & mask).astype(f), (den - (den & mask)).astype(f)
    hi = num.astype(f) / den.astype(f)
    p, e = mul12(hi, dh)
    return hi, (((nh - p) - e) + (nl - hi * dl)) / den.astype(f)


def _table(values) -> tuple:
    """float64 ``values`` (``|v| < 2**17``) as float32 arrays ``(n, hi, lo)``: ``n`` the multiple of
    1/64 nearest each, ``hi + lo`` the rest (``|hi| <= 1/128``) to 2**-55."""
    v = np.asarray(values, np.float64)
    n = np.round(v * 64.0) / 64.0
    hi = (v - n).astype(F32)
    return n.astype(F32), hi, (v - n - hi).astype(F32)


#: 2 ** (-j / 64), j = 0..63, as float32 pairs
_EXP2 = [2.0 ** (-j / 64.0) for j in range(64)]
_EXP2_HI = np.asarray(_EXP2, np.float64).astype(F32)
_EXP2_LO = (np.asarray(_EXP2, np.float64) - _EXP2_HI).astype(F32)


def exp2_neg(n, f):
    """``2 ** -(n + f)``: float32 ``n`` a multiple of 1/64 (``|n| < 2**17``), ``f`` small (``|f| <
    1/16``); 0 where ``n + f >= 120`` (2**-120 is far below an ulp of ``1 - d``).

    ``f`` is gridded (:func:`grid`) into ``n``: ``n = k + j / 64`` exactly, ``|f| <= 1/128``, and
    ``2 ** -(n + f) = 2 ** -k * T_j * exp(x)``, ``x = -f ln 2`` (``|x| < 0.0055``), ``T_j = 2 **
    (-j / 64)`` a float32 pair of the host's float64. ``exp(x) - 1`` to ``x**4 / 24`` (the rest
    2**-44), ``T_hi + (T_lo + T_hi * em1)``: four roundings of numbers under 2**-7 (``x``'s two,
    ``em1``'s, the product's, the sum's; the polynomial's 2**-38) before the last, 5 * 2**-32
    in all, plus ``ln 2`` times ``f``'s own error; ``2 ** -k`` (made from its bits) is exact."""
    g, f = grid(f)
    n = n + g
    k = jnp.floor(n)
    j = ((n - k) * 64.0).astype(jnp.int32)
    t_hi, t_lo, l_hi, l_lo = opaque(_EXP2_HI, _EXP2_LO, *pair(_LN2))
    x = -(f * l_hi + f * l_lo)
    em1 = x + (x * x) * (0.5 + x * (F32(1 / 6) + x * F32(1 / 24)))
    th, tl = jnp.take(t_hi, j), jnp.take(t_lo, j)
    v = th + (tl + th * em1)
    k = jnp.clip(k, -2.0, 125.0).astype(jnp.int32)
    scale = lax.bitcast_convert_type((127 - k) << 23, jnp.float32)
    return jnp.where(n >= 120.0, jnp.zeros((), jnp.float32), v * scale)


def half_life(h: float):
    """``decay(dt)``: ``2 ** (-dt / h)`` of an int32 ``dt`` (0 and below: 1), ``h`` the half life:
    within 0.53 ulp of float32 (``1 - d``: within 0.77 of the host's float64).

    ``y = dt * (1 / h)``: ``1 / h`` a float32 pair (to 2**-48), ``dt`` cut as in
    :func:`ratio_pair` (24 bits above 2**24, exact; the rest under 256); the head's product exact
    (:func:`mul12`), gridded exactly; the tail's products (under 2**-9 where ``y < 120``) rounded:
    ``y`` to 2**-31 (the sum of the remainders) + 3 * 2**-34. Before the last rounding 5 * 2**-32
    (:func:`exp2_neg`) + ``ln 2`` times that: 0.03 ulp."""
    inv_hi, inv_lo = pair(min(1.0 / float(h), 2.0 ** 64))   # 2**-64 and under: d = 0 past dt 0

    def decay(dt):
        f = jnp.float32
        dt = jnp.maximum(dt, 0)                     # a time before the last update's holds the average
        mask = jnp.where(dt >= 2 ** 24, jnp.int32(-256), jnp.int32(-1))
        dh, dl = (dt & mask).astype(f), (dt - (dt & mask)).astype(f)
        ih, il = opaque(inv_hi, inv_lo)
        p, e = mul12(dh, ih)
        n, r = grid(p)
        return exp2_neg(n, r + ((e + dl * ih) + dt.astype(f) * il))
    return decay


def power_function(gamma: float):
    """``decay(last, t)``: ``(last / t) ** (gamma + 1)`` of int32s (``0 < last <= t``; a larger
    ``last`` counts as ``t``) within ``0.54 + (gamma + 1) / 3800`` ulp of float32 (0.545 for EDM2's
    ``sigma_rel=0.05``, 0.81 at ``gamma + 1 = 2**10``, ``sigma_rel=0.001``).

    ``y = -(gamma + 1) log2(r)``, ``r = last / t`` a pair (:func:`ratio_pair`: ``rh + rl``);
    ``rh = 2**e * m``, ``m = c_j + md``, ``c_j = 1 + j / 128`` (``j`` the mantissa's top 7 bits,
    ``md`` the other 16, exact), ``z = md / c_j < 2**-7``; ``log2(r) = e + log2(c_j) + (z + Q(z) +
    rl / rh) / ln 2``, ``Q = log1p(z) - z`` to ``z**5`` (the rest 2**-44). With ``g = gamma + 1``,
    ``K = g / ln 2``, the host's tables ``g * e``, ``g * log2(c_j)`` (float64, as multiples of 1/64
    and a pair) and ``K / c_j`` (an 8-bit head: times the 16-bit ``md`` exact, and the rest): the
    large terms exact, four sums of remainders under 2**-6 rounded (3 * 2**-31 + 2**-32), the
    small ones ``K (Q + rl / rh)`` and ``md`` times the rest rounded, ``K * 2**-35.9`` (``Q``
    from a float32 ``z``, 2**-36.3). Before the last rounding 5 * 2**-32 + ``ln 2`` times ``y``'s
    error: 0.04 ulp + ``g / 3800``."""
    g = float(gamma) + 1.0
    k = g / _LN2
    cap = min(31, math.ceil(120.0 / g))             # rh < 2**-cap: y > g * cap >= 120, d = 0
    ge = _table([g * i for i in range(cap + 1)])
    c = 1.0 + np.arange(128) / 128.0
    ga = _table([-g * math.log2(v) for v in c])
    kz = k / c
    ex = np.floor(np.log2(kz)) + 1.0                # kz < 2**ex
    head = (np.round(kz * 2.0 ** (8.0 - ex)) * 2.0 ** (ex - 8.0)).astype(F32)   # 8 significant bits
    rest = (kz - head).astype(F32)
    inv = (1.0 / c).astype(F32)

    def decay(last, t):
        f = jnp.float32
        rh, rl = ratio_pair(jnp.minimum(last, t), t)
        bits = lax.bitcast_convert_type(rh, jnp.int32)
        ne = 127 - (bits >> 23)                     # -e: 0 <= ne <= 31 (r >= 1 / (2**31 - 1))
        j = (bits >> 16) & 127
        md = (bits & 0xFFFF).astype(f) * F32(2.0 ** -23)
        tables = opaque(*ge, *ga, head, rest, inv, F32(k))
        (en, eh, el), (an, ah, al) = ([jnp.take(a, i) for a in tables[s:s + 3]]
                                      for s, i in ((0, jnp.minimum(ne, cap)), (3, j)))
        h, rr, iv = (jnp.take(a, j) for a in tables[6:9])
        z = md * iv
        q = (z * z) * (-0.5 + z * (F32(1 / 3) + z * (-0.25 + z * F32(0.2))))
        n3, r3 = grid(-(md * h))                    # exact: 16 bits times 8
        n4, r4 = grid(-(md * rr + tables[9] * (q + rl / rh)))
        na, ra = grid(eh + ah)
        nb, rb = grid(r3 + r4)
        nc, rc = grid(ra + rb)
        n = ((en + an) + (n3 + n4)) + ((na + nb) + nc)
        return jnp.where(ne > cap, jnp.zeros((), f), exp2_neg(n, rc + (el + al)))
    return decay
