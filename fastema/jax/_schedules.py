"""The schedules of :mod:`fastema.schedules`, computed on the device from a traced step.

The host plan (:class:`fastema.average.Plan`) computes each decay in float64 from Python
numbers; inside ``jax.jit`` the step is a traced int32, and the same formulas
(``kernels/_stats.py``'s ``schedule_decay``, ``momentum_decay``) run in ``jnp``: in float64 when
``jax_enable_x64`` is on (the host plan's arithmetic: weights equal to the host's but where
XLA's ``pow``/``exp2`` differ from the C library's by an ulp of float64, which rounds away in
the float32 weight almost always), else in float32, arranged so that each weight is within one
float32 ulp of the host's float64 (``tests/bridges/test_jax_schedule_ulps.py``): constants added
last as hi + lo pairs; PowerFunction and HalfLife through :mod:`._float32` (the exponent as
float32 pairs, exact where it counts, then a table-driven ``2 ** -y``): the decay within 0.53 ulp,
the weight within 0.77 (PowerFunction: ``0.54 + g / 3800`` and ``0.77 + g / 7600``, ``g = gamma +
1``; 0.52 and 0.76 measured). Constant decays need no device arithmetic: their weights are the
host's float32 numbers, baked into the compiled step.

Counters and times are int32 (steps up to 2**31 - 1); a timed schedule's times are the steps
given to ``update(step=)`` or the calls made, as on the host. Every decay is in ``[0, 1]`` for any
int32 inputs, in either precision (``tests/bridges/test_jax_schedules_total.py``): a time before
the last update's gives the timed PowerFunction and HalfLife ``d = 1`` (the average holds), and
counts and differences that would wrap are clamped first.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
from . import _float32
from ._float32 import opaque as _opaque
from ._float32 import pair as _pair

#: what the functional average computes on the device; the rest is refused by name
DEVICE_SCHEDULES = (Constant, NumUpdates, PowerWarmup, PowerFunction, HalfLife, BEMA, Cosine, Linear,
                    PiecewiseConstant)


def float_dtype():
    """The dtype the schedules compute in: float64 with ``jax_enable_x64``, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32    # type: ignore[attr-defined]


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
            n = jnp.maximum(n, 0).astype(f)         # n in [-10, -2] gave d < 0 (the guard holds such steps)
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
            n = jnp.maximum(n, 1)                   # n <= 0 reads step index 0; n - 1 of -2**31 wrapped
            i = (n - 1).astype(f)
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
        pf32 = None if f == jnp.float64 else _float32.power_function(float(s.gamma))

        def power_function(n, t, last, first, started):
            # the first update (last 0) copies; a time before the last update's (t < last, t = 0
            # included, which the host refuses) counts as the last's: d = 1, the average holds
            ok = (last > 0) & (t > 0)
            safe_last, safe_t = jnp.where(ok, jnp.minimum(last, t), 1), jnp.where(ok, t, 1)
            if pf32 is None:                        # x64: the host's formula
                d = (safe_last.astype(f) / safe_t.astype(f)) ** (float(s.gamma) + 1.0)
            else:
                d = pf32(safe_last, safe_t).astype(f)
            return jnp.where(ok, d, jnp.where(last > 0, 1.0, 0.0)).astype(f)
        return power_function
    if isinstance(s, HalfLife):
        hl32 = None if f == jnp.float64 else _float32.half_life(float(s.half_life))

        def half_life(n, t, last, first, started):
            # a time before the last update's: d = 1, the average holds (the maximum: a difference
            # that wraps, past int32, from a negative time the update never stores)
            dt = jnp.maximum(jnp.where(t > last, t - last, 0), 0)
            if hl32 is None:                        # x64: the host's formula
                return jnp.exp2(-dt.astype(f) / float(s.half_life))
            return hl32(dt)
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
