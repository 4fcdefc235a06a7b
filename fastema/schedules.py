"""Decay schedules: small pure objects, ``decay = schedule(n)``.

``n`` counts the updates made so far, the one being made included (1 on the first
update). The value is computed on the host from Python ints, so reading it never
syncs a device. Every schedule has ``state()`` and ``from_state()`` for checkpoints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Constant", "NumUpdates", "PowerWarmup", "from_state", "debiased_weight"]


def _check_decay(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


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
        _check_decay("decay", self.decay)
        _check_decay("min_decay", self.min_decay)
        if not self.inv_gamma > 0 or not self.power > 0:
            raise ValueError(f"inv_gamma and power must be > 0, got {self.inv_gamma!r}, {self.power!r}")
        if self.update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {self.update_after_step!r}")

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


_KINDS = {"constant": Constant, "num_updates": NumUpdates, "power_warmup": PowerWarmup}


def from_state(state: dict):
    """Rebuild a schedule saved with ``state()``."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} in checkpoint; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**state)


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


