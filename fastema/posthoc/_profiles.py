"""The EDM2 maths of post-hoc EMA (numpy only, float64).

The profile of exponent ``gamma`` at time ``t`` weights the training trajectory as
``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)`` on ``[0, t]``; the inner product of two of them
(EDM2 Eq. 151, integrated over ``[0, min(t_a, t_b)]``) is::

    <p_a, p_b> = (gamma_a+1)(gamma_b+1) (t_a/t_b)^e / ((gamma_a+gamma_b+1) max(t_a, t_b)),
    e = gamma_b if t_a < t_b else -gamma_a

and the coefficients ``x`` of a target ``p_r`` solve ``A x = b``, ``A_ij = <p_i, p_j>``,
``b_i = <p_i, p_r>``, in float64; they are then scaled to sum to 1 (as EDM2), so a constant
trajectory is reproduced exactly. The synthesised average is ``sum_i x_i snapshot_i``.

The relative L2 error of the synthesised profile, ``||p_r - sum_i x_i p_i|| / ||p_r||``, says how
well the snapshots can represent the target; a target above ``max_error`` (default 5%) is
refused rather than returned silently wrong (a width far outside the tracked ones, a time
before enough snapshots exist). A profile between the tracked ones is reproduced to ~1e-3
with snapshots every 2.5% of training, ~1e-2 every 10%.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np

from ..schedules import gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = ["MAX_ERROR", "Solution", "profile", "profile_dot", "solve"]

#: The largest relative L2 error of a synthesised profile that :func:`solve` accepts by default (5%).
MAX_ERROR = 0.05


def profile(tau, time: float, gamma: float) -> np.ndarray:
    """The power-function profile ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)`` on ``[0, t]`` (0 after),
    computed as ``(gamma+1) / t * (tau/t)^gamma``: no power of ``t`` alone, which overflows for a
    narrow profile's large ``gamma`` (a plot of ``sigma_rel=0.001`` at ``t = 40`` raised OverflowError)."""
    tau = np.asarray(tau, np.float64)
    inside = (tau >= 0) & (tau <= time)
    return np.where(inside, (gamma + 1) / time * np.clip(tau / time, 0, 1) ** gamma, 0.0)


def profile_dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """``<p_a, p_b>`` of two power-function profiles (EDM2 Eq. 151), broadcasting, float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
    e = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


class Solution(NamedTuple):
    """The least-squares combination of stored profiles that best matches a target."""
    coefficients: np.ndarray     # one per stored profile, summing to 1
    error: float                 # ||p_r - sum x_i p_i|| / ||p_r|| (relative L2)
    condition: float             # condition number of A (large for dense snapshot grids)
    time: float
    gamma: float
    sigma_rel: float


def _target(sigma_rel, gamma) -> float:
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("give exactly one of sigma_rel= and gamma=")
    if gamma is None:
        return sigma_rel_to_gamma(sigma_rel)
    try:
        gamma_to_sigma_rel(gamma)                # checks gamma
    except OverflowError:
        raise ValueError(f"gamma={gamma!r} is too large to be a profile (its width underflows): ask for a "
                         f"gamma up to 1e100, or give sigma_rel=") from None
    return float(gamma)


def _check_max_error(max_error) -> None:
    if isinstance(max_error, bool) or not isinstance(max_error, numbers.Real) or not float(max_error) >= 0:
        raise ValueError(f"max_error must be a number >= 0 (a relative L2 error; inf accepts any), got "
                         f"{max_error!r}")


def solve(times: Sequence[float], gammas: Sequence[float], *, sigma_rel: float | None = None,
          gamma: float | None = None, time: float | None = None, max_error: float = MAX_ERROR) -> Solution:
    """Coefficients of stored profiles ``(times[i], gammas[i])`` for the target of width
    ``sigma_rel`` (or exponent ``gamma``) at ``time`` (default: the last stored time).

    Raises ``ValueError`` when the best combination is further than ``max_error`` (relative L2)
    from the target, naming the error and what to change.
    """
    _check_max_error(max_error)
    t = np.asarray(times, np.float64)
    g = np.asarray(gammas, np.float64)
    if t.ndim != 1 or t.shape != g.shape or t.size == 0:
        raise ValueError(f"times and gammas must be two equal non-empty lists, got {t.shape} and {g.shape}")
    if not np.all(t > 0) or not np.all(np.isfinite(t)):
        raise ValueError("every stored profile's time must be a finite number > 0")
    g_r = _target(sigma_rel, gamma)
    t_r = float(t.max()) if time is None else float(time)
    if not 0 < t_r <= t.max():
        raise ValueError(f"time={time!r}: a profile can be synthesised at a time in (0, {t.max():g}] (the stored "
                         f"snapshots' range), not after the last snapshot")
    if not (np.all(g > 0) and np.all(np.isfinite(g))):
        raise ValueError(f"every stored profile's gamma must be a finite number > 0, got {sorted(set(g.tolist()))[:5]}")
    with np.errstate(all="ignore"):               # huge exponents: caught as non-finite below
        A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
        b = profile_dot(t, g, t_r, g_r)
        rr = float(profile_dot(t_r, g_r, t_r, g_r))
        try:
            x = np.linalg.lstsq(A, b, rcond=None)[0] if np.isfinite(A).all() and np.isfinite(b).all() else b * np.nan
            condition = float(np.linalg.cond(A)) if np.isfinite(A).all() else math.inf
        except np.linalg.LinAlgError:
            x, condition = b * np.nan, math.inf
    if not np.isfinite(x).all() or abs(x.sum()) < 1e-12 or not math.isfinite(rr) or rr <= 0:
        raise ValueError("the stored profiles cannot represent this target (degenerate least squares): ask for a "
                         "width between the tracked ones")
    x = x / x.sum()
    error = math.sqrt(max(0.0, rr - 2 * float(x @ b) + float(x @ A @ x)) / rr)
    sol = Solution(x, error, condition, t_r, g_r, gamma_to_sigma_rel(g_r))
    if not error <= max_error:
        stored = sorted({round(gamma_to_sigma_rel(v), 4) for v in g})
        raise ValueError(f"the snapshots represent the profile sigma_rel={sol.sigma_rel:.4f} at time {t_r:g} only "
                         f"to a relative error of {error:.3g} (max_error={max_error:g}): the tracked widths are "
                         f"{stored} at {t.size} stored profiles up to time {t.max():g}. Ask for a width between "
                         f"the tracked ones, a time with more snapshots before it, or pass a larger max_error=")
    return sol
