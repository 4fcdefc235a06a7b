"""The width of a power-function EMA profile (Karras et al. 2024, EDM2): ``sigma_rel`` and the
exponent ``gamma`` of :class:`~fastema.schedules.PowerFunction`, each from the other."""
from __future__ import annotations

import math
import numbers

import numpy as np

#: The widest power-function profile: the ``gamma -> 0`` limit of ``sigma_rel``, ``sqrt(1/12)``.
SIGMA_REL_MAX = math.sqrt(1 / 12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of a power-function EMA profile (Karras et al. 2024, EDM2, Eq. 123).

    The profile at time ``t`` weights the past as ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)``
    on ``[0, t]``; its standard deviation relative to ``t`` is
    ``sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))``. ``gamma > 0``.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA profile of relative width ``sigma_rel`` (EDM2, Eq. 126):
    the largest real root of ``gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0``
    (``(gamma+2)^2 (gamma+3) = gamma^3 + 7 gamma^2 + 16 gamma + 12``). EDM2's values: 0.05 -> 16.97,
    0.10 -> 6.94. ``0 < sigma_rel < sqrt(1/12) = 0.2887`` (the ``gamma -> 0`` limit).
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, numbers.Real) or \
            not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be a number in (0, {SIGMA_REL_MAX:.4f}) (sqrt(1/12), where gamma reaches 0), "
                         f"got {sigma_rel!r}")
    q = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    g = max(float(r.real) for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)))
    for _ in range(3):                     # polish in float64 (Newton on the same cubic)
        f = ((g + 7) * g + 16 - q) * g + 12 - q
        df = (3 * g + 14) * g + 16 - q
        if df == 0:
            break
        g -= f / df
    return g
