"""Scalar arithmetic of the running statistics, shared by every kernel that needs it.

Plain Python over float scalars; each target compiles it (see :mod:`._target`).
"""
from .kinds import DEBIASED, SEEDED


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
