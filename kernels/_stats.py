"""Scalar arithmetic of the running statistics, shared by every kernel that needs it.

Plain Python over float scalars; each target compiles it (see :mod:`._target`).
"""
import math

import numpy as np

from ._bits import sr_noise
from .kinds import (
    CONSTANT,
    COSINE,
    DEBIASED,
    EMA_DECAY_SQRT,
    HALF_LIFE,
    NUM_UPDATES,
    P_AFTER,
    P_COMPENSATE,
    P_DEBIAS,
    P_EVERY,
    P_INV_GAMMA,
    P_MIN_DECAY,
    P_POWER,
    P_SCHEDULE,
    P_SEED_HI,
    P_SEED_LO,
    P_WARMUP,
    PIECEWISE_CONSTANT,
    POWER_FUNCTION,
    S_CALLS,
    S_LAST,
    S_NORMS,
    S_UPDATES,
    SEEDED,
    WSM,
)


def ema_step(a, b, v, w, d, mode):
    """One EMA update of stream state ``(a, b)`` with value ``v`` of weight ``w``; returns ``(a, b)``.

    DEBIASED: ``a <- d a + w v``, ``b <- d b + w``; the mean is ``a / b`` (TensorBoard's
    smoothing, pandas ``ewm(adjust=True)``, weighted by sample counts).
    SEEDED:   the first value seeds ``a`` (``b = 1`` marks it); then ``a <- a + (1 - d)(v - a)``
    (pandas ``adjust=False``). ZEROS: ``a <- a + (1 - d)(v - a)`` from 0, no correction.
    """
    if mode == DEBIASED:
        return d * a + w * v, d * b + w
    if mode == SEEDED and b == 0.0:
        return v, 1.0
    return a + (1.0 - d) * (v - a), 1.0


def neumaier(s, c, x):
    """Add ``x`` to the compensated sum ``(s, c)`` (Neumaier); the value is ``s + c``."""
    t = s + x
    if abs(s) >= abs(x):
        c += (s - t) + x
    else:
        c += (x - t) + s
    return t, c


def momentum_decay(params, o, kind, t):
    """The decay at step index ``t`` (``n - 1``) of a momentum schedule whose table starts at
    ``params[o]``: ``start, end, total_steps`` (``COSINE``, ``LINEAR``), or ``m``, ``m`` boundaries
    and ``m + 1`` values (``PIECEWISE_CONSTANT``); as :class:`fastema.schedules.Cosine` and the others."""
    if kind == PIECEWISE_CONSTANT:
        m = int(params[o])
        for j in range(m):
            if t <= params[o + 1 + j]:
                return params[o + 1 + m + j]
        return params[o + 1 + 2 * m]
    start, end, total = params[o], params[o + 1], params[o + 2]
    if t >= total:
        return end
    t = max(t, 0.0)
    if kind == COSINE:
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / total))
    return start + t * (end - start) / total


_S1, _S2, _S3 = -1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04
_S4, _S5, _S6 = 2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10


def sin_pi(x):
    """``sin(pi x)`` in ``+ - * /`` and ``floor`` alone, so every target rounds it alike (libm's
    ``sin`` and CUDA's libdevice differ in the last bits; NVVM contracts nothing,
    ``_cuda_jit.NVVM``): ``x`` reduced exactly to ``[0, 1]``, fdlibm's ``__kernel_sin`` polynomial
    on ``[0, pi/4]``, and ``1 - 2 sin^2(t / 2)`` for ``pi/2 - t`` above it; within 2 ulps of
    ``sin(pi x)`` (``tests/kernels/test_same_bits.py``)."""
    r = x - 2.0 * math.floor(x * 0.5)            # [0, 2), exact
    sign = 1.0
    if r > 1.0:                                  # sin(pi (r + 1)) = -sin(pi r)
        r, sign = r - 1.0, -1.0
    u = min(r, 1.0 - r)                          # sin(pi r) = sin(pi (1 - r)); 1 - r exact for r >= 1/2
    if u <= 0.25:
        t = math.pi * u
    else:
        t = math.pi * (0.5 - u) * 0.5            # 0.5 - u exact for u in [1/4, 1/2]
    z = t * t
    s = t + z * t * (_S1 + z * (_S2 + z * (_S3 + z * (_S4 + z * (_S5 + z * _S6)))))
    return sign * (s if u <= 0.25 else 1.0 - 2.0 * s * s)


def wsm_antiderivative(shape, x):
    """``F(x)`` of WSM's decay ``shape`` (0 linear, 1 cosine, 2 1-sqrt: ``kinds.WSM_SHAPE_CODES``) for
    ``x`` in ``[0, 1]``, the expressions of :data:`fastema.schedules.WSM_SHAPES`, in operations every
    target rounds alike (:func:`sin_pi`; ``x ** 1.5`` as ``x sqrt(x)``: IEEE's square root, not
    ``pow``)."""
    if shape == 0.0:
        return x - x * x / 2
    if shape == 1.0:
        return x / 2 + sin_pi(x) / (2 * math.pi)
    return x - 2.0 / 3.0 * (x * math.sqrt(x))


def wsm_mean(shape, x0, x1):
    """The mean of WSM's decay over ``[x0, x1]`` (:func:`fastema.schedules.wsm_mean`)."""
    return (wsm_antiderivative(shape, x1) - wsm_antiderivative(shape, x0)) / (x1 - x0)


def merge_weight(params, o, kind, t):
    """The weight of the sample at time ``t`` under a merge schedule whose table starts at
    ``params[o]``: ``shape, start, end, every`` (``WSM``) or ``beta, switch_step, decay_steps``
    (``EMA_DECAY_SQRT``); as :meth:`fastema.schedules.WSM.weight` and ``EmaDecaySqrt.weight``."""
    if kind == EMA_DECAY_SQRT:
        i = t - 1.0
        if i < params[o + 1]:
            return 1.0 - params[o]
        return 1.0 - math.sqrt(min(max((i - params[o + 1]) / params[o + 2], 0.0), 1.0))
    shape, start, end, every = params[o], params[o + 1], params[o + 2], params[o + 3]
    if t < start or t > end or (t - start) % every != 0.0:
        return 0.0
    span = end - start
    x = (t - start) / span
    w_in = 1.0 if t == start else wsm_mean(shape, (t - every - start) / span, x)
    w_out = 0.0 if t == end else wsm_mean(shape, x, (t + every - start) / span)
    return w_in - w_out


def schedule_decay(params, decay, n, last, t):
    """The decay of update ``n`` at time ``t`` (the last update's: ``last``) under the schedule in
    ``params``, ``decay`` the row's parameter (the decay; ``gamma`` of ``PowerFunction``;
    ``half_life`` of ``HalfLife``; where a momentum schedule's table starts in ``params``): the
    formulas of :mod:`fastema.schedules`, in float64."""
    kind = params[P_SCHEDULE]
    if kind == CONSTANT:
        return decay
    if kind == POWER_FUNCTION:
        if last <= 0.0 or t <= 0.0:
            return 0.0
        return (last / t) ** (decay + 1.0)
    if kind == HALF_LIFE:
        return 2.0 ** (-(t - last) / decay)
    if kind == NUM_UPDATES:
        return min(decay, (1.0 + n) / (10.0 + n))
    if kind >= COSINE:                          # ``decay``: where the row's table starts in ``params``
        return momentum_decay(params, int(decay), kind, n - 1.0)
    s = max(0.0, n - params[P_AFTER] - 1.0)
    if s <= 0.0:
        return 0.0
    if params[P_WARMUP] == 0.0:
        return decay
    value = 1.0 - (1.0 + s / params[P_INV_GAMMA]) ** -params[P_POWER]
    return max(min(value, decay), params[P_MIN_DECAY])


def plan_step(state, params, decays, given, w32, w64, flag, keys):
    """One ``update()`` call of a model EMA's plan, on the device (one thread), so a captured
    CUDA graph replays the schedule rather than the values of the capture.

    ``state`` float64: calls, updates, the last update's time, then the debiasing normalisers;
    advanced here. A call
    that ``update_every`` skips sets ``flag[0] = 1`` (the update's kernels then write
    nothing); a due call clears it and writes the weights ``w = 1 - decay`` (or the debiased
    weight) as float32 (``w32``) and float64 (``w64``), and each group's stochastic-rounding
    key of the step ``n`` into ``keys`` (int64, the uint32 value). ``given``: the training
    step passed to ``update(step=)``, or -1 for the update count. Same arithmetic as
    :class:`fastema.schedules.Plan` (``next`` then ``done``) and ``fastema.ops.sr_key``.
    A merge schedule's row folds its sample weight in with the running total in its normaliser
    (``merge_weight``); a call whose weights are all 0 is skipped as ``update_every`` skips, and so
    is a call at the last update's step (a checkpoint counts once).
    """
    calls = state[S_CALLS]
    every = params[P_EVERY]
    state[S_CALLS] = calls + 1.0
    if calls % every != 0.0:
        flag[0] = 1
        return
    n = state[S_UPDATES] + 1.0 if given < 0 else np.float64(given)
    t = calls + 1.0 if given < 0 else np.float64(given)       # the time of timed schedules
    kind = params[P_SCHEDULE]
    if kind >= WSM:                                           # a merge schedule: counted if some weight is not 0
        counted = False
        if not (state[S_UPDATES] > 0.0 and t == state[S_LAST]):           # nor at the last update's step
            for i in range(decays.size):
                if merge_weight(params, int(decays[i]), kind, t) != 0.0:
                    counted = True
        if not counted:
            flag[0] = 1
            return
    flag[0] = 0
    for i in range(decays.size):
        if kind >= WSM:
            a = merge_weight(params, int(decays[i]), kind, t)
            c = state[S_NORMS + i] + a
            w = 0.0 if c == 0.0 else a / c
            state[S_NORMS + i] = c
            w32[i] = np.float32(w)
            w64[i] = w
            continue
        d = schedule_decay(params, decays[i], n, state[S_LAST], t)
        if params[P_COMPENSATE] != 0.0 and every > 1.0:
            d = d ** every
        if params[P_DEBIAS] != 0.0:
            c = d * state[S_NORMS + i] + (1.0 - d)
            w = 1.0 if c == 0.0 else (1.0 - d) / c
            state[S_NORMS + i] = c
        else:
            w = 1.0 - d
        w32[i] = np.float32(w)
        w64[i] = w
    state[S_UPDATES] = state[S_UPDATES] + 1.0
    state[S_LAST] = t
    lo = np.int64(params[P_SEED_LO])
    hi = np.int64(params[P_SEED_HI])
    for g in range(keys.size):
        keys[g] = np.int64(sr_noise(np.uint32(lo ^ ((hi + g) & 0xFFFFFFFF)), np.int64(n)))


def key_of(key):
    """A stochastic-rounding key given as a scalar: itself."""
    return key


def key_at(key):
    """A stochastic-rounding key kept on the device (int64[1], see :func:`plan_step`)."""
    return np.uint32(key[0] & 0xFFFFFFFF)
