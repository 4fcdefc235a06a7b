"""Decay schedules: small pure objects, ``decay = schedule(n)``.

``n`` counts the updates made so far, the one being made included (1 on the first
update). The value is computed on the host from Python ints, so reading it never
syncs a device. Every schedule has ``state()`` and ``from_state()`` for checkpoints.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["Cadence", "Constant", "NumUpdates", "Pending", "PowerWarmup", "Plan", "compensated", "from_state",
           "debiased_weight", "gamma_to_sigma_rel", "sigma_rel_to_gamma"]


def _check_decay(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


def _check_count(name, value, least=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def check_step(step) -> int:
    """A training step given to update(): an int >= 0."""
    _check_count("step", step)
    return int(step)


@dataclass(frozen=True)
class Constant:
    """``decay(n) = decay``."""
    decay: float

    def __post_init__(self):
        _check_decay("decay", self.decay)

    def __call__(self, n: int) -> float:
        return float(self.decay)

    def state(self) -> dict:
        return {"kind": "constant", **asdict(self)}


@dataclass(frozen=True)
class NumUpdates:
    """``decay(n) = min(decay, (1 + n) / (10 + n))``: torch_ema's ``use_num_updates`` and TF's ``num_updates``."""
    decay: float

    def __post_init__(self):
        _check_decay("decay", self.decay)

    def __call__(self, n: int) -> float:
        return min(float(self.decay), (1.0 + n) / (10.0 + n))

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
        check_power_args(self.decay, self.min_decay, self.inv_gamma, self.power, self.update_after_step)

    def __call__(self, n: int) -> float:
        s = max(0, n - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        if not self.warmup:
            return float(self.decay)
        value = 1.0 - (1.0 + s / self.inv_gamma) ** -self.power
        return max(min(value, float(self.decay)), float(self.min_decay))

    def state(self) -> dict:
        return {"kind": "power_warmup", **asdict(self)}


def check_power_args(decay, min_decay, inv_gamma, power, update_after_step) -> None:
    """The arguments of :class:`PowerWarmup`, checked whatever the warm-up (a typo is an error)."""
    _check_decay("decay", decay)
    _check_decay("min_decay", min_decay)
    for name, v in (("inv_gamma", inv_gamma), ("power", power)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    _check_count("update_after_step", update_after_step)


_KINDS = {"constant": Constant, "num_updates": NumUpdates, "power_warmup": PowerWarmup}


def from_state(state: dict):
    """Rebuild a schedule saved with ``state()``."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} in checkpoint; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**state)


SIGMA_REL_MAX = math.sqrt(1 / 12)      # the gamma -> 0 limit of the power-function profile's width


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




class Cadence:
    """Which calls of ``update()`` update: the first, then every ``every``-th. It counts the
    calls it is told were made (:meth:`called`), so a refused call counts nothing."""

    def __init__(self, every: int = 1):
        _check_count("update_every", every, 1)
        self.every = every
        self.calls = 0                      # update() calls, skipped ones included

    def due(self) -> bool:
        """True when the next call updates."""
        return self.calls % self.every == 0

    def called(self) -> None:
        """Record a call that was made (an update or a skipped call)."""
        self.calls += 1


class Pending(NamedTuple):
    """What the call about to be made does, from :meth:`Plan.next`; nothing is recorded until
    :meth:`Plan.done`."""
    due: bool              # False: a call skipped by update_every (weights unused)
    n: int                 # the schedule's step
    weights: list          # w = 1 - decay (or the debiased weight), one per average
    decays: list
    norms: list


class Plan:
    """The decay side of a model EMA, shared by the framework bridges.

    Holds the schedules (one per average), the update count, ``update_every`` with its
    optional compensation, and the debiasing normalisers, and turns "update now" into
    the kernels' weights ``w = 1 - decay`` (or the debiased weights). Everything is a
    Python number: no device is read. :meth:`state` / :meth:`load_state` carry it
    through checkpoints.

    Args:
        decay: a float, or up to 8 floats (one per average).
        warmup: ``None``, ``"num_updates"`` or ``"power"`` (see :class:`PowerWarmup`).
        min_decay, inv_gamma, power, update_after_step: parameters of ``warmup="power"``.
        update_every: update on every k-th call (the first call updates).
        compensate: with ``update_every=k``, use ``decay ** k``.
        debias: zero-init debiasing (:func:`debiased_weight`).
    """

    def __init__(self, decay=0.9999, *, warmup: str | None = None, min_decay: float = 0.0,
                 inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0,
                 update_every: int = 1, compensate: bool = False, debias: bool = False):
        decays = list(decay) if isinstance(decay, (list, tuple)) else [decay]
        if not 1 <= len(decays) <= 8:
            raise ValueError(f"1 to 8 decays (one per average), got {len(decays)}")
        if warmup not in (None, "num_updates", "power"):
            raise ValueError(f"warmup must be None, 'num_updates' or 'power', got {warmup!r}")
        cadence = Cadence(update_every)
        for d in decays:
            _check_decay("decay", d)
        check_power_args(decays[0], min_decay, inv_gamma, power, update_after_step)
        if warmup is None:
            self.schedules = [Constant(d) for d in decays]
        elif warmup == "num_updates":
            self.schedules = [NumUpdates(d) for d in decays]
        else:
            self.schedules = [PowerWarmup(d, min_decay, inv_gamma, power, update_after_step) for d in decays]
        self.cadence = cadence              # counts the calls (shared with a model average that asks it)
        self.compensate, self.debias = bool(compensate), bool(debias)
        self.updates = 0                    # updates made
        self.norms = [0.0] * len(decays)    # debiasing normalisers
        self.last_decays = [0.0] * len(decays)

    @property
    def rows(self) -> int:
        return len(self.schedules)

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        return self.cadence.calls

    @property
    def update_every(self) -> int:
        return self.cadence.every

    def decay_at(self, i: int, n: int) -> float:
        d = self.schedules[i](n)
        return compensated(d, self.cadence.every) if self.compensate else d

    @property
    def decay(self) -> float | list[float]:
        """The decay(s) the next update will use."""
        d = [self.decay_at(i, self.updates + 1) for i in range(self.rows)]
        return d[0] if len(d) == 1 else d

    def next(self, step: int | None = None) -> Pending:
        """What the next ``update()`` call does: whether it is due (the first call, then every
        ``update_every``-th), the schedule's step ``n`` (``step`` if given, else the update
        count) and the kernels' weights. ``step`` is checked; nothing is recorded: pass the
        result to :meth:`done` once the call has been made, so a refused call changes nothing."""
        n = self.updates + 1 if step is None else check_step(step)
        weights, decays, norms = [], [], list(self.norms)
        for i in range(self.rows):
            d = self.decay_at(i, n)
            if self.debias:
                w, norms[i] = debiased_weight(d, norms[i])
            else:
                w = 1.0 - d
            weights.append(w)
            decays.append(d)
        return Pending(self.cadence.due(), n, weights, decays, norms)

    def done(self, pending: Pending) -> None:
        """Record the call :meth:`next` described: counted, and its update when it was due."""
        if pending.due:
            self.last_decays, self.norms = pending.decays, pending.norms
            self.updates += 1
        self.cadence.called()

    def state(self) -> dict:
        return {"calls": self.calls, "updates": self.updates, "norms": list(self.norms),
                "schedules": [s.state() for s in self.schedules], "update_every": self.update_every,
                "compensate": self.compensate, "debias": self.debias}

    def check_state(self, state: dict, problems: list) -> None:
        """Append to ``problems`` what keeps ``state`` from loading here."""
        saved = state.get("schedules")
        if not isinstance(saved, list) or len(saved) != self.rows:
            n = len(saved) if isinstance(saved, list) else saved
            problems.append(f"checkpoint has {n} decay(s), this EMA {self.rows}")
            return
        try:
            [from_state(s) for s in saved]
            _check_count("updates", state["updates"])
            _check_count("calls", state["calls"])
            _check_count("update_every", state["update_every"], 1)
            norms = [float(x) for x in state["norms"]]
            if len(norms) != self.rows:
                raise ValueError(f"{len(norms)} norms for {self.rows} decays")
            for key in ("compensate", "debias"):
                if not isinstance(state[key], bool):
                    raise ValueError(f"{key} must be a bool, got {state[key]!r}")
        except KeyError as err:
            problems.append(f"schedule state has no {err.args[0]!r}")
        except (TypeError, ValueError) as err:
            problems.append(f"schedule state unreadable ({err})")

    def load_state(self, state: dict) -> None:
        self.schedules = [from_state(s) for s in state["schedules"]]
        self.cadence.calls, self.updates = int(state["calls"]), int(state["updates"])
        self.norms = [float(x) for x in state["norms"]]
        self.cadence.every = int(state["update_every"])      # in place: a model average shares the cadence
        self.compensate, self.debias = bool(state["compensate"]), bool(state["debias"])
