"""The EMA decays: :class:`Constant`, :class:`NumUpdates`, :class:`PowerWarmup` (functions of the
update count ``n``) and the timed :class:`PowerFunction`, :class:`HalfLife`, :class:`BEMA` (functions
of training time, ``between(first, last, t)``); and the plan's arithmetic over a decay
(:func:`debiased_weight`, :func:`compensated`).

Each value is the plan kernel's formula (:func:`fastema.kernels.formulas.schedule_decay`), run on
the host over the schedule's parameters as the kernel reads them (:func:`_shared_params`), so the host
plan and the device plan compute it alike. :class:`BEMA` runs on the host only. One exception:
:class:`HalfLife`'s ``2 ** x`` is ``math.exp2(x)`` on the host, as in the compiled kernel (LLVM
rewrites ``pow(2, x)`` to ``exp2(x)``; the C library's two differ by an ulp about once in a thousand).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import cached_property

from ..kernels.formulas import schedule_decay
from ..kernels.kinds import (
    CONSTANT,
    HALF_LIFE,
    NUM_UPDATES,
    P_AFTER,
    P_INV_GAMMA,
    P_MIN_DECAY,
    P_POWER,
    P_SCHEDULE,
    P_WARMUP,
    PLAN_PARAMS,
    POWER_FUNCTION,
    POWER_WARMUP,
)
from ._base import _plain_fields, check_count, check_decay
from ._edm2 import gamma_to_sigma_rel, sigma_rel_to_gamma

_EXP2 = getattr(math, "exp2", None)              # Python 3.11+ (and numba's math.exp2)


def _shared_params(kind: int, slots: dict | None = None) -> tuple:
    """The plan kernel's shared parameters (``kernels.kinds.P_*``) of one schedule of ``kind``, as
    :func:`~fastema.kernels.formulas.schedule_decay` reads them: ``slots`` maps a slot to its number."""
    params = [0.0] * PLAN_PARAMS
    params[P_SCHEDULE] = float(kind)
    for slot, value in (slots or {}).items():
        params[slot] = float(value)
    return tuple(params)


_CONSTANT, _NUM_UPDATES = _shared_params(CONSTANT), _shared_params(NUM_UPDATES)
_POWER_FUNCTION, _HALF_LIFE = _shared_params(POWER_FUNCTION), _shared_params(HALF_LIFE)


@dataclass(frozen=True)
class Constant:
    """``decay(n) = decay``."""
    decay: float

    def __post_init__(self):
        _plain_fields(self)
        check_decay("decay", self.decay)

    def __call__(self, n: int) -> float:
        return schedule_decay(_CONSTANT, float(self.decay), n, 0.0, 0.0)

    def state(self) -> dict:
        return {"kind": "constant", **asdict(self)}


@dataclass(frozen=True)
class NumUpdates:
    """``decay(n) = min(decay, (1 + n) / (10 + n))``: torch_ema's ``use_num_updates`` and TF's ``num_updates``."""
    decay: float

    def __post_init__(self):
        _plain_fields(self)
        check_decay("decay", self.decay)

    def __call__(self, n: int) -> float:
        return schedule_decay(_NUM_UPDATES, float(self.decay), n, 0.0, 0.0)

    def state(self) -> dict:
        return {"kind": "num_updates", **asdict(self)}


@dataclass(frozen=True)
class PowerWarmup:
    """The warm-up of timm ``ModelEmaV3``, diffusers and ema-pytorch.

    With ``s = step - update_after_step - 1`` (``step`` = the update count ``n``)::

        decay(n) = 0                                                     if s <= 0
                 = clamp(1 - (1 + s / inv_gamma) ** -power, min_decay, decay)   otherwise

    ``decay = 0`` copies the weights, so the average starts after ``update_after_step``.
    ``warmup=False`` keeps only that start: ``decay`` whenever ``s > 0``.
    """
    decay: float
    min_decay: float = 0.0
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_after_step: int = 0
    warmup: bool = True

    def __post_init__(self):
        _plain_fields(self)
        check_power_args(self.decay, self.min_decay, self.inv_gamma, self.power, self.update_after_step)

    @cached_property
    def _params(self) -> tuple:
        slots = {P_MIN_DECAY: self.min_decay, P_INV_GAMMA: self.inv_gamma, P_POWER: self.power,
                 P_AFTER: self.update_after_step, P_WARMUP: self.warmup}
        return _shared_params(POWER_WARMUP, slots)

    def __call__(self, n: int) -> float:
        return schedule_decay(self._params, float(self.decay), n, 0.0, 0.0)

    def state(self) -> dict:
        return {"kind": "power_warmup", **asdict(self)}


def check_power_args(decay, min_decay, inv_gamma, power, update_after_step,
                     names: tuple = ("decay", "min_decay", "inv_gamma", "power", "update_after_step")) -> None:
    """The arguments of :class:`PowerWarmup`, checked whatever the warm-up (a typo is an error);
    ``names``: what the caller calls them (ema-pytorch's ``beta``, ``min_value``), for the messages."""
    check_decay(names[0], decay)
    check_decay(names[1], min_decay)
    for name, v in ((names[2], inv_gamma), (names[3], power)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    check_count(names[4], update_after_step)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class PowerFunction:
    """The power-function EMA profile of Karras et al. 2024 (EDM2, arXiv 2312.02696), exact
    for any update interval (the paper's Delta-t form, Eq. 127).

    At time ``t`` the average weights the past as ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)``
    on ``[0, t]`` (relative width ``sigma_rel``, :func:`gamma_to_sigma_rel`). An update at time
    ``t`` after one at ``last`` uses::

        decay = (last / t) ** (gamma + 1)          (= (1 - dt/t) ** (gamma + 1), dt = t - last)

    so the first update (``last = 0``) copies, and the sample taken at ``t_i`` ends with the
    weight ``(t_i^(gamma+1) - t_(i-1)^(gamma+1)) / t^(gamma+1)``: the integral of ``p`` over
    ``[t_(i-1), t_i]``, whatever the steps between updates (the product of decays telescopes).
    Unit steps give EDM2's ``(1 - 1/t) ** (gamma + 1)``.
    """
    gamma: float
    timed = True

    def __post_init__(self):
        _plain_fields(self)
        _check_positive("gamma", self.gamma)

    @classmethod
    def of(cls, sigma_rel: float) -> "PowerFunction":
        """The profile of relative width ``sigma_rel`` (:func:`sigma_rel_to_gamma`)."""
        return cls(sigma_rel_to_gamma(sigma_rel))

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def between(self, first, last: float, t: float) -> float:
        return schedule_decay(_POWER_FUNCTION, float(self.gamma), 0.0, last, t)

    def __call__(self, n: int) -> float:
        return self.between(None, n - 1, n)

    def state(self) -> dict:
        return {"kind": "power_function", **asdict(self)}


@dataclass(frozen=True)
class HalfLife:
    """An EMA whose weights halve every ``half_life`` units of time (steps, or samples when
    ``update(step=)`` counts samples): ``decay = 2 ** (-(t - last) / half_life)``, exact for any
    interval between updates (as Composer's ``smoothing = 2 ** -(interval / half_life)``). The
    average starts from the weights at construction (time 0)."""
    half_life: float
    timed = True

    def __post_init__(self):
        _plain_fields(self)
        _check_positive("half_life", self.half_life)

    def between(self, first, last: float, t: float) -> float:
        if _EXP2 is None:                       # Python 3.10: pow(2, x), which may be an ulp off exp2(x)
            return schedule_decay(_HALF_LIFE, float(self.half_life), 0.0, last, t)
        return _EXP2(-(t - last) / float(self.half_life))   # the kernel's formula, as LLVM compiles it

    def __call__(self, n: int) -> float:
        return self.between(None, n - 1, n)

    def state(self) -> dict:
        return {"kind": "half_life", **asdict(self)}


@dataclass(frozen=True)
class BEMA:
    """The EMA of bias-corrected EMA (Block & Zhang 2025, arXiv 2508.00180; TRL's ``BEMACallback``).

    The first update copies the weights (into the average and into ``theta_0``); an update at
    ``tau = t - first`` time units after it gives the new sample the weight
    ``beta = max((lag + multiplier * tau) ** -ema_power, min_ema_multiplier)``, i.e.
    ``decay = 1 - beta``. The bias correction ``alpha = (lag + multiplier * tau) ** -bias_power``
    (:meth:`alpha`) is applied by the model average: output ``= EMA + alpha (theta_t - theta_0)``.
    Names and defaults are TRL's (paper: ``rho = lag``, ``gamma = multiplier``,
    ``kappa = ema_power``, ``eta = bias_power``); TRL counts ``tau`` from step 0, which is the
    same with its default ``update_after=0``.
    """
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0
    timed = True

    def __post_init__(self):
        _plain_fields(self)
        for name in ("ema_power", "bias_power"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        _check_positive("lag", self.lag)
        _check_positive("multiplier", self.multiplier)
        check_decay("min_ema_multiplier", self.min_ema_multiplier)

    def _base(self, first, t: float) -> float:
        return float(self.lag) + float(self.multiplier) * max(0.0, t - first)

    def between(self, first, last: float, t: float) -> float:
        if first is None:
            return 0.0
        beta = self._base(first, t) ** -float(self.ema_power)
        return 1.0 - min(1.0, max(beta, float(self.min_ema_multiplier)))

    def alpha(self, first, t: float) -> float:
        """The bias-correction factor of the update at time ``t`` (0 on the first update)."""
        return 0.0 if first is None else self._base(first, t) ** -float(self.bias_power)

    def __call__(self, n: int) -> float:
        return self.between(None if n <= 1 else 1, n - 1, n)

    def state(self) -> dict:
        return {"kind": "bema", **asdict(self)}


def debiased_weight(decay: float, norm: float) -> tuple[float, float]:
    """One step of zero-init debiasing (optax ``ema(debias=True)``, pandas ``ewm(adjust=True)``).

    Keeping ``e`` from 0 with ``e <- d e + (1 - d) x`` and reading ``e / c`` with
    ``c <- d c + (1 - d)`` is the same as keeping the debiased value ``v = e / c`` and
    updating ``v <- v + w (x - v)`` with ``w = (1 - d) / c_new``. Returns ``(w, c_new)``;
    ``c`` starts at 0, so the first update copies (``w = 1``).
    """
    c = decay * norm + (1.0 - decay)
    return (1.0 if c == 0.0 else (1.0 - decay) / c), c


def compensated(decay: float, every: int) -> float:
    """The per-update decay that matches ``every`` steps of ``decay``: ``decay ** every``."""
    return decay ** every if every > 1 else decay
