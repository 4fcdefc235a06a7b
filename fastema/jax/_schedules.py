"""The schedules of :mod:`fastema.schedules`, computed on the device from a traced step.

The host plan (:class:`fastema.average.Plan`) computes each decay in float64 from Python
numbers; inside ``jax.jit`` the step is a traced int32, and the same formulas
(``kernels/_stats.py``'s ``schedule_decay``, ``momentum_decay``) run in ``jnp``: in float64 when
``jax_enable_x64`` is on (the host plan's arithmetic: weights equal to the host's but where
XLA's ``pow``/``exp2`` differ from the C library's by an ulp of float64, which rounds away in
the float32 weight almost always), else in float32, arranged so that each weight is within one
float32 ulp of the host's float64 (PowerFunction and HalfLife: about one, 1.02 at worst measured;
``tests/bridges/test_jax_schedule_ulps.py``): constants added last as hi + lo pairs, the power
function's ratio as a pair (:func:`_ratio_pair`). Constant decays need no device arithmetic:
their weights are the host's float32 numbers, baked into the compiled step.

Counters and times are int32 (steps up to 2**31 - 1); a timed schedule's times are the steps
given to ``update(step=)`` or the calls made, as on the host.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..schedules import (
    BEMA,
    MERGE_SCHEDULES,
    Constant,
    Cosine,
    HalfLife,
    Linear,
    NumUpdates,
    PiecewiseConstant,
    PowerFunction,
    PowerWarmup,
)

#: what the functional average computes on the device; the rest is refused by name
DEVICE_SCHEDULES = (Constant, NumUpdates, PowerWarmup, PowerFunction, HalfLife, BEMA, Cosine, Linear,
                    PiecewiseConstant)


def float_dtype():
    """The dtype the schedules compute in: float64 with ``jax_enable_x64``, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32    # type: ignore[attr-defined]


def _pair(x: float, f) -> tuple:
    """``x`` as two numbers of ``f`` whose sum is ``x`` to twice the precision (``hi``, ``lo``):
    a constant added last keeps its float64 value to the final rounding (float32: ``0.9`` is
    ``0.9 - 2.4e-8``, half an ulp of a decay before any arithmetic)."""
    hi = np.asarray(x, np.float64).astype(f)
    return hi, np.asarray(float(x) - float(hi), np.float64).astype(f)


def _opaque(*constants):
    """``constants`` as values XLA cannot fold: its simplifier reassociates float constants
    (``hi + (lo + x)`` became ``x + 0.9``, ``(i / total) * span`` became ``i * (span / total)``),
    which undoes the rounding order the pairs are for. An optimization barrier keeps them apart
    (no cost: scalars, once a step)."""
    return jax.lax.optimization_barrier(tuple(jnp.asarray(c) for c in constants))


def _split12(a):
    """float32 ``a`` as ``hi + lo``, each of at most 12 significant bits (the mantissa's low 12
    bits masked off: exact, and no arithmetic XLA could contract)."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.uint32) & np.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def _ratio_pair(num, den):
    """``num / den`` of int32s (``0 <= num <= den``, ``den > 0``) as float32 ``(hi, lo)``,
    ``hi + lo`` within ~2**-40 of it: ``hi`` the float32 quotient, ``lo`` its remainder over ``den``.
    The remainder ``num - hi * den`` is Dekker's: ``den`` cut to a multiple of 256 above 2**24
    (24 significant bits, exact in float32) and the rest, ``hi * den`` an exact pair of 12-bit
    products (the rounded product kept apart from the subtraction by a barrier: an FMA there would
    take the rounding twice)."""
    f = jnp.float32
    mask = jnp.where(den >= 2 ** 24, jnp.int32(-256), jnp.int32(-1))
    nh, nl = (num & mask).astype(f), (num - (num & mask)).astype(f)
    dh, dl = (den & mask).astype(f), (den - (den & mask)).astype(f)
    hi = num.astype(f) / den.astype(f)
    (p,) = jax.lax.optimization_barrier((hi * dh,))
    a1, a2 = _split12(hi)
    b1, b2 = _split12(dh)
    e = (((a1 * b1 - p) + a1 * b2) + a2 * b1) + a2 * b2          # hi * dh - p, exactly
    return hi, (((nh - p) - e) + (nl - hi * dl)) / den.astype(f)


def refuse_schedule(schedule) -> None:
    """ValueError for a schedule the device plan does not compute, with the reason."""
    if isinstance(schedule, MERGE_SCHEDULES):
        raise ValueError(f"fastema.jax.ema() does not take decay={type(schedule).__name__}(...): a merge schedule "
                         f"weighs checkpoints by a running total kept on the host between steps; use "
                         f"fastema.jax.EMA (between jitted steps), which runs it")
    if not isinstance(schedule, DEVICE_SCHEDULES):
        raise ValueError(f"fastema.jax.ema() does not take decay={schedule!r}")


def _one(schedule, every: int, compensate: bool) -> Callable:
    """``decay(n, t, last, first, started)`` of one schedule, in :func:`float_dtype` (traced args:
    ``n``, ``t``, ``last``, ``first`` int32, ``started`` bool: an update was made)."""
    f = float_dtype()
    s = schedule

    def comp(d):
        return d ** every if (compensate and every > 1) else d

    if isinstance(s, Constant):
        return lambda n, t, last, first, started: comp(jnp.asarray(float(s.decay), f))
    if isinstance(s, NumUpdates):
        def num_updates(n, t, last, first, started):
            n = n.astype(f)
            return comp(jnp.minimum(jnp.asarray(float(s.decay), f), (1.0 + n) / (10.0 + n)))
        return num_updates
    if isinstance(s, PowerWarmup):
        def power_warmup(n, t, last, first, started):
            k = jnp.maximum(0.0, n.astype(f) - float(s.update_after_step) - 1.0)
            if s.warmup:
                v = 1.0 - (1.0 + k / float(s.inv_gamma)) ** -float(s.power)
                v = jnp.maximum(jnp.minimum(v, float(s.decay)), float(s.min_decay))
            else:
                v = jnp.asarray(float(s.decay), f)
            return comp(jnp.where(k <= 0.0, jnp.zeros((), f), v.astype(f)))
        return power_warmup
    if isinstance(s, (Cosine, Linear)):
        start, end, total = float(s.start), float(s.end), float(s.total_steps)
        wide = f == jnp.float64                     # x64: the host's formula, operation for operation
        # float32: the constant the ramp is added to as a pair, hi + (lo + ramp): rounded once, last
        base_hi, base_lo = _pair(end if isinstance(s, Cosine) else start, f)
        span = (0.5 * (start - end)) if isinstance(s, Cosine) else (end - start)

        def ramp(n, t, last, first, started):
            i = jnp.maximum(n - 1, 0).astype(f)
            if wide and isinstance(s, Cosine):
                v = end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * i / total))
            elif wide:
                v = start + i * (end - start) / total
            else:
                hi, lo, sp, tot = _opaque(base_hi, base_lo, np.asarray(span, f), np.asarray(total, f))
                r = i / tot
                ramp = (1.0 + jnp.cos(math.pi * r)) if isinstance(s, Cosine) else r
                v = hi + (lo + sp * ramp)
            return comp(jnp.where(n.astype(f) - 1.0 >= total, jnp.asarray(end, f), v))
        return ramp
    if isinstance(s, PiecewiseConstant):
        bounds = [float(b) for b in s.boundaries]
        values = [float(v) for v in s.values]

        def piecewise(n, t, last, first, started):
            i = n.astype(f) - 1.0
            v = jnp.asarray(values[-1], f)
            for b, value in zip(reversed(bounds), reversed(values[:-1])):
                v = jnp.where(i <= b, jnp.asarray(value, f), v)
            return comp(v)
        return piecewise
    if isinstance(s, PowerFunction):
        def power_function(n, t, last, first, started):
            ok = (last > 0) & (t > 0)
            if f == jnp.float64:                    # x64: the host's formula
                lf, tf = last.astype(f), t.astype(f)
                return jnp.where(ok, (lf / jnp.where(ok, tf, 1.0)) ** (float(s.gamma) + 1.0), 0.0)
            # float32: the ratio's rounding times gamma + 1 (~18 for EDM2's sigma_rel=0.05) was 32
            # ulps; the ratio as a pair (hi + lo), XLA's pow of hi (within half an ulp), and the
            # first-order terms of lo and of gamma + 1's own rounding
            r, r_lo = _ratio_pair(last, jnp.where(ok, t, 1))
            g, g_lo = _opaque(*_pair(float(s.gamma) + 1.0, f))
            r = jnp.where(ok, r, 1.0)
            p = r ** g
            return jnp.where(ok, p + p * (g * (r_lo / r) + g_lo * jnp.log(r)), 0.0).astype(f)
        return power_function
    if isinstance(s, HalfLife):
        # exp(-dt ln2 / half_life), the constant to twice float32's precision (XLA's exp2 is exp of
        # x * ln2 rounded: one more rounding of the exponent)
        inv_hi, inv_lo = _pair(math.log(2.0) / float(s.half_life), f)

        def half_life(n, t, last, first, started):
            dt = (t - last).astype(f)
            if f == jnp.float64:                    # x64: the host's formula
                return jnp.exp2(-dt / float(s.half_life))
            hi, lo = _opaque(inv_hi, inv_lo)
            return jnp.exp(-(dt * hi + dt * lo))
        return half_life
    if isinstance(s, BEMA):
        def bema(n, t, last, first, started):
            beta = bema_base(s, t, first) ** -float(s.ema_power)
            d = 1.0 - jnp.minimum(1.0, jnp.maximum(beta, float(s.min_ema_multiplier)))
            return jnp.where(started, d, 0.0).astype(f)
        return bema
    refuse_schedule(s)
    raise AssertionError("unreachable")


def bema_base(s: BEMA, t, first):
    """``lag + multiplier * max(0, t - first)`` of BEMA, in :func:`float_dtype`."""
    f = float_dtype()
    return float(s.lag) + float(s.multiplier) * jnp.maximum(0.0, (t - first).astype(f))


def bema_alpha(s: BEMA, t, first, started):
    """BEMA's bias-correction factor of an update at ``t`` (0 on the first update)."""
    return jnp.where(started, bema_base(s, t, first) ** -float(s.bias_power), 0.0).astype(float_dtype())


def decays(schedules: list, every: int, compensate: bool) -> Callable:
    """``decays(n, t, last, first, started)``: every row's decay as one array of :func:`float_dtype`."""
    rows = [_one(s, every, compensate) for s in schedules]
    return lambda *args: jnp.stack([jnp.asarray(r(*args), float_dtype()) for r in rows])
