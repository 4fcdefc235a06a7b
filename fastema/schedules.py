"""Decay schedules, ``decay = schedule(n)``: pure values, no state of their own.

``n`` counts the updates made so far, the one being made included (1 on the first
update). The value is computed on the host from Python ints, so reading it never
syncs a device. Every schedule has ``state()`` and ``from_state()`` for checkpoints; a number
given as a NumPy scalar is kept as the Python number of its value (:func:`as_python`), so a
state is plain JSON.

Momentum schedules (:class:`Cosine`, :class:`Linear`, :class:`PiecewiseConstant`: the teacher
momentum of DINO, BYOL, I-JEPA...) are given as ``decay=`` and indexed from 0 like those
codes' iteration ``it``: the update ``n`` reads ``t = n - 1`` (the first update ``t = 0``;
``update(step=s)``: ``t = s - 1``, i.e. pass the steps done, the current one included, as
Lightning's ``global_step`` after the optimizer step), and hold their last value from
``t = total_steps`` on.

Timed schedules (:class:`PowerFunction`, :class:`HalfLife`, :class:`BEMA`) are defined over
training time, not over updates: ``decay = schedule.between(first, last, t)`` for an update
at time ``t`` when the previous one was at ``last`` (0 before any) and the first at
``first`` (None before any). Time is the number of ``update()`` calls (skipped ones
included: ``update_every=k`` advances it by ``k`` per update), or the ``step`` passed to
``update(step=)``: pass images or tokens seen to define a profile in samples. So the
profile is the same whatever the update interval, even an irregular one.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np

__all__ = ["BEMA", "Constant", "Cosine", "EmaDecaySqrt", "HalfLife", "Linear", "NumUpdates", "PiecewiseConstant",
           "PowerFunction", "PowerWarmup", "WSM", "from_state", "MAX_BOUNDARIES", "merged_weight", "wsm_coefficients",
           "wsm_mean", "WSM_SHAPES",
           "gamma_to_sigma_rel", "sigma_rel_to_gamma", "SIGMA_REL_MAX"]


def as_python(value):
    """``value`` with each NumPy scalar (``np.float32(0.99)``, ``np.int64(100)``, ``np.bool_``) as the
    Python number of its value, in a list or tuple too; anything else as it is, for the caller's checks.

    NumPy scalars pass the checks as numbers (``numbers.Real`` / ``numbers.Integral``); kept as they
    are, they would reach the checkpoints, which must stay plain Python (``json.dumps``,
    ``torch.load(weights_only=True)``, ``tf.train.Checkpoint``). So the schedules (:func:`_plain_fields`),
    :class:`~fastema.average.EMAOptions` and :class:`~fastema.average.plan.Cadence` take their numbers
    through this once, when they are made."""
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
        return value
    if type(value) in (list, tuple):
        return type(value)(as_python(v) for v in value)
    return value


def _plain_fields(schedule) -> None:
    """Every field of the (frozen) dataclass ``schedule`` through :func:`as_python`, before its checks."""
    for f in fields(schedule):
        value = getattr(schedule, f.name)
        plain = as_python(value)
        if plain is not value:
            object.__setattr__(schedule, f.name, plain)


def _check_decay(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


def _check_count(name, value, least=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        hint = "" if getattr(value, "ndim", None) != 0 else \
            " (a 0-d tensor or array: pass a Python int, e.g. a loop counter; fastema reads no device value here)"
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}{hint}")


def check_step(step) -> int:
    """A training step given to update(): an int >= 0."""
    _check_count("step", step)
    return int(step)


@dataclass(frozen=True)
class Constant:
    """``decay(n) = decay``."""
    decay: float

    def __post_init__(self):
        _plain_fields(self)
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
        _plain_fields(self)
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
        _plain_fields(self)
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


def _check_total(total_steps):
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 (the steps over which the schedule goes from start to "
                         f"end), got {total_steps!r}")


@dataclass(frozen=True)
class _Ramp:
    """What :class:`Cosine` and :class:`Linear` share: ``start`` to ``end`` over ``total_steps``
    updates, ``end`` held after; the ``n``-th update reads step index ``n - 1``."""
    start: float
    end: float
    total_steps: int

    def __post_init__(self):
        _plain_fields(self)
        _check_decay("start", self.start)
        _check_decay("end", self.end)
        _check_total(self.total_steps)

    def at(self, t: int) -> float:
        """The decay at step index ``t`` (0 for the first update)."""
        if t >= self.total_steps:
            return float(self.end)
        return self._between(max(t, 0), float(self.start), float(self.end))

    def _between(self, t: int, start: float, end: float) -> float:
        raise NotImplementedError

    def __call__(self, n: int) -> float:
        return self.at(n - 1)


@dataclass(frozen=True)
class Cosine(_Ramp):
    """A cosine decay (momentum) schedule from ``start`` to ``end`` over ``total_steps`` updates:
    DINO's teacher momentum (``utils.cosine_scheduler(0.996, 1.0, epochs, niter_per_ep)``), BYOL's
    ``1 - (1 - b) (cos(pi k / K) + 1) / 2``, MoCo v3's::

        decay(t) = end + 0.5 * (start - end) * (1 + cos(pi * t / total_steps))   for 0 <= t < total_steps
                 = end                                                            for t >= total_steps

    with ``t = n - 1`` (the module docstring): the first update uses ``start`` (to its last bit:
    ``end + 0.5 * (start - end) * 2`` rounds as DINO's does). The same float64
    arithmetic as DINO's ``final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters /
    len(iters)))`` (``math.cos``: the last bit may differ from NumPy's SIMD ``cos``), and as DINOv2's
    ``CosineScheduler``, which also holds ``final_value`` from ``total_iters`` on (DINO's array has no
    value there).

    Args:
        start: the first update's decay, in ``[0, 1]`` (DINO: ``momentum_teacher=0.996``).
        end: the decay reached at ``total_steps`` and held after, in ``[0, 1]`` (DINO: 1.0).
        total_steps: updates over which it goes from ``start`` to ``end`` (DINO:
            ``epochs * len(data_loader)``), an int >= 1.
    """
    def _between(self, t: int, start: float, end: float) -> float:
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / self.total_steps))

    def state(self) -> dict:
        return {"kind": "cosine", **asdict(self)}


@dataclass(frozen=True)
class Linear(_Ramp):
    """A linear decay (momentum) schedule from ``start`` to ``end`` over ``total_steps`` updates:
    I-JEPA's momentum scheduler (``ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)``)::

        decay(t) = start + t * (end - start) / total_steps   for 0 <= t < total_steps
                 = end                                        for t >= total_steps

    with ``t = n - 1`` (the module docstring), float64 in I-JEPA's order. (data2vec's
    ``end - (end - start) * (1 - t / total)`` is the same line, rounded in another order.)

    Args:
        start: the first update's decay, in ``[0, 1]``.
        end: the decay reached at ``total_steps`` and held after, in ``[0, 1]``.
        total_steps: an int >= 1.
    """
    def _between(self, t: int, start: float, end: float) -> float:
        return start + t * (end - start) / self.total_steps

    def state(self) -> dict:
        return {"kind": "linear", **asdict(self)}


#: The most boundaries a :class:`PiecewiseConstant` schedule takes.
MAX_BOUNDARIES = 64


@dataclass(frozen=True)
class PiecewiseConstant:
    """A step (piecewise-constant) decay schedule, as Keras' ``PiecewiseConstantDecay(boundaries, values)``
    over the optimizer's ``iterations`` (0 on the first step)::

        decay(t) = values[0]   for t <= boundaries[0]
                 = values[i]   for boundaries[i-1] < t <= boundaries[i]
                 = values[-1]  for t > boundaries[-1]

    with ``t = n - 1`` (the module docstring).

    Args:
        boundaries: 1 to 64 strictly increasing ints >= 0.
        values: the decays, one more than ``boundaries``, each in ``[0, 1]``.
    """
    boundaries: Sequence[int]
    values: Sequence[float]

    def __post_init__(self):
        for name in ("boundaries", "values"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"{name} must be a list or tuple, got {type(v).__name__}")
            object.__setattr__(self, name, as_python(tuple(v)))     # frozen and hashable
        b, v = self.boundaries, self.values
        if not 1 <= len(b) <= MAX_BOUNDARIES:
            raise ValueError(f"PiecewiseConstant takes 1 to {MAX_BOUNDARIES} boundaries, got {len(b)}")
        for x in b:
            _check_count("a boundary", x)
        if any(b1 >= b2 for b1, b2 in zip(b, b[1:])):
            raise ValueError(f"boundaries must increase strictly, got {list(b)}")
        if len(v) != len(b) + 1:
            raise ValueError(f"PiecewiseConstant needs one value more than boundaries (a value before the first "
                             f"boundary and one after each), got {len(v)} values for {len(b)} boundaries")
        for x in v:
            _check_decay("each value", x)

    def at(self, t: int) -> float:
        """The decay at step index ``t`` (0 for the first update)."""
        for b, v in zip(self.boundaries, self.values):
            if t <= b:
                return float(v)
        return float(self.values[-1])

    def __call__(self, n: int) -> float:
        return self.at(n - 1)

    def state(self) -> dict:
        return {"kind": "piecewise_constant", "boundaries": list(self.boundaries), "values": list(self.values)}


# ---------------------------------------------------------------- merge schedules: checkpoint merging online

#: The decay shapes of WSM (Tian et al., arXiv 2507.17634) on ``[0, 1]``, ``name -> (f, F)`` with ``F``
#: the antiderivative of ``f``: the one home of these formulas. The offline merge's ``wsm:`` weights
#: (:mod:`fastema.merge.weights`), :class:`WSM` and :class:`EmaDecaySqrt` read them here; the device
#: plan (``kernels._stats.merge_weight``) spells the same expressions, tested bit for bit.
WSM_SHAPES = {
    "linear": (lambda x: 1.0 - x, lambda x: x - x * x / 2),
    "cosine": (lambda x: (1 + math.cos(math.pi * x)) / 2, lambda x: x / 2 + math.sin(math.pi * x) / (2 * math.pi)),
    "1-sqrt": (lambda x: 1.0 - math.sqrt(x), lambda x: x - 2.0 / 3.0 * x ** 1.5),
}


def wsm_mean(shape: str, x0: float, x1: float) -> float:
    """The mean of WSM's decay ``shape`` over ``[x0, x1]`` (``x0 < x1``): ``(F(x1) - F(x0)) / (x1 - x0)``."""
    F = WSM_SHAPES[shape][1]
    return (F(x1) - F(x0)) / (x1 - x0)


def wsm_coefficients(shape: str, x: Sequence[float]) -> list:
    """WSM's merge coefficients of the checkpoints at positions ``x`` of the merged span (two or more,
    increasing from 0 to 1): ``c_0 = 1 - w_1``, ``c_j = w_j - w_(j+1)``, ``c_(K-1) = w_(K-1)``, with ``w_i``
    the mean of the decay between checkpoints ``i-1`` and ``i`` (:func:`wsm_mean`). They sum to 1."""
    w = [wsm_mean(shape, x[i - 1], x[i]) for i in range(1, len(x))]      # w_1 .. w_(K-1)
    return [1 - w[0]] + [w[j - 1] - w[j] for j in range(1, len(x) - 1)] + [w[-1]]


def merged_weight(weight: float, total: float) -> tuple[float, float]:
    """One sample of a weighted average kept as a running one: with ``total`` the weights of the
    samples so far, the sample of (unnormalised) ``weight`` is folded in as ``avg <- avg + w (x - avg)``,
    ``w = weight / (total + weight)`` (0 while the total is 0: the average stays as it was), as Levanter's
    ``EmaDecaySqrtModelAveraging`` does. Returns ``(w, total + weight)``. The decays ``1 - w`` telescope:
    sample ``i`` ends with ``weight_i / sum(weights)``, the normalised merge of the samples."""
    total += weight
    return (0.0 if total == 0.0 else weight / total), total


class _Merge:
    """What :class:`WSM` and :class:`EmaDecaySqrt` share: each update's sample has a weight, a function of
    the training step ``t`` (:meth:`weight`), folded in by :func:`merged_weight` with the running total
    (the plan keeps it where a debiased plan keeps its normalisers). A call whose weights are all 0
    writes nothing, nor does one at the last update's step (a sample counts once): the plan skips
    them; ``update_every`` other than 1 is refused (it would skip samples)."""
    timed = True            # a function of the step (or the calls)
    merge = True

    def weight(self, t: float) -> float:
        raise NotImplementedError


def _check_step_arg(name, value, least):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


@dataclass(frozen=True)
class WSM(_Merge):
    """Checkpoint merging as training runs, with WSM's weights (Tian et al., arXiv 2507.17634): the
    average is the merge of the checkpoints at steps ``start, start + every, ..., end`` that emulates
    the learning-rate decay ``shape`` over that span, with the weights of the offline ``wsm:SHAPE``
    merge of those checkpoints (:func:`fastema.merge.merge_checkpoints` with their ``steps``).

    The checkpoint at step ``s_j``, at ``x_j = (s_j - start) / (end - start)``, has the weight
    ``c_j = w_j - w_(j+1)`` with ``w_j`` the mean of the decay ``f`` between checkpoints ``j-1`` and
    ``j`` (:func:`wsm_mean`), ``w_0 = 1``, ``w_K = 0``: by WSM's theorem the merge of a constant-LR
    run's checkpoints is its last one trained with the gradients between checkpoints ``i-1`` and
    ``i`` scaled by ``w_i``. Each update folds the model in with ``w = c_j / (c_0 + ... + c_j)``
    (:func:`merged_weight`): after the update at ``end`` the average is ``sum_j c_j theta_j`` (they
    sum to 1); before, the merge of the checkpoints so far, normalised. A checkpoint's weight needs
    the next one's position: that is why the span and its spacing are given in advance.

    ``t`` is the step given to ``update(step=)`` (the steps done, the current one included: Hugging
    Face's ``global_step``, the ``N`` of ``checkpoint-N``), or the number of ``update()`` calls. A
    call at any other step (between checkpoints, before ``start``, after ``end``) counts 0 and writes
    nothing, so ``update()`` may be called at every step; a call at the last update's step writes
    nothing either (``update(step=global_step)`` per micro-batch: a checkpoint counts once).
    ``update_every`` other than 1 is refused (its calls 1, k + 1, 2k + 1... would miss checkpoints
    at multiples of k). Until ``start`` the average is the weights it was made from.

    Args:
        shape: the decay emulated: ``"linear"`` (``f(x) = 1 - x``), ``"cosine"``
            (``(1 + cos(pi x)) / 2``) or ``"1-sqrt"`` (``1 - sqrt(x)``).
        start: the step of the first checkpoint merged, an int >= 0.
        end: the step of the last, an int > ``start``, ``end - start`` a multiple of ``every``.
        every: the steps between checkpoints, an int >= 1 (1: every step is one).
    """
    shape: str
    start: int
    end: int
    every: int = 1

    def __post_init__(self):
        _plain_fields(self)
        if self.shape not in WSM_SHAPES:
            raise ValueError(f"shape must be one of {', '.join(map(repr, WSM_SHAPES))} (WSM's decays), "
                             f"got {self.shape!r}")
        _check_step_arg("start", self.start, 0)
        _check_step_arg("every", self.every, 1)
        _check_step_arg("end", self.end, self.start + 1)
        if (self.end - self.start) % self.every:
            k = (self.end - self.start) // self.every
            raise ValueError(f"end - start = {self.end - self.start} is not a multiple of every = {self.every}: "
                             f"the checkpoints merged are start, start + every, ..., end; give end="
                             f"{self.start + k * self.every} or {self.start + (k + 1) * self.every}")

    def weight(self, t: float) -> float:
        """The weight ``c_j`` of the checkpoint at step ``t`` (0 off the checkpoints), unnormalised."""
        start, end, every = self.start, self.end, self.every
        if t < start or t > end or (t - start) % every != 0:
            return 0.0
        span = end - start
        x = (t - start) / span
        w_in = 1.0 if t == start else wsm_mean(self.shape, (t - every - start) / span, x)
        w_out = 0.0 if t == end else wsm_mean(self.shape, x, (t + every - start) / span)
        return w_in - w_out

    def state(self) -> dict:
        return {"kind": "wsm", **asdict(self)}


@dataclass(frozen=True)
class EmaDecaySqrt(_Merge):
    """Levanter's ``EmaDecaySqrtModelAveraging`` (stanford-crfm/levanter,
    ``src/levanter/optim/model_averaging.py``; its config ``type: ema_decay_sqrt``): the running
    weighted average of the model whose sample at Levanter's step ``i`` weighs::

        a(i) = 1 - beta                                                  if i < switch_step
             = 1 - sqrt(clip((i - switch_step) / decay_steps, 0, 1))     otherwise

    folded in as Levanter folds it: ``tot <- tot + a``, ``avg <- avg + (a / tot) (x - avg)``
    (:func:`merged_weight`), so the average is ``sum_i a(i) theta_i / sum_i a(i)``. Levanter calls it
    "EMA, then 1-sqrt decay"; as every weight is normalised by the running total, the phase before
    the switch is a uniform average (each sample ``1 - beta``); from the switch a sample counts
    ``1 - sqrt`` of the decay's progress (1 at the switch, 0 from ``decay_steps`` after it: then the
    average stops changing and calls write nothing). :class:`WSM`'s ``1-sqrt`` weights checkpoints
    by the differences of the decay instead, which is what emulates training with it.

    Levanter passes its step before the optimizer step increments it (0 on the first update):
    ``i = t - 1``, with ``t`` the steps done (``update(step=t)``, or the number of calls), as the
    momentum schedules read it; a call at the last update's step writes nothing (a sample counts
    once) and ``update_every`` stays 1, as with :class:`WSM`. Computed in float64 (Levanter rounds
    the clipped fraction and its square root to float32: a weight differs by < 1e-7 relative).

    Args:
        switch_step: Levanter's ``switch_step``, an int >= 0.
        decay_steps: Levanter's ``decay_steps``, an int >= 1.
        beta: Levanter's ``beta`` (default 0.999, its default), in ``[0, 1]``.
    """
    switch_step: int
    decay_steps: int
    beta: float = 0.999

    def __post_init__(self):
        _plain_fields(self)
        _check_step_arg("switch_step", self.switch_step, 0)
        _check_step_arg("decay_steps", self.decay_steps, 1)
        _check_decay("beta", self.beta)

    def weight(self, t: float) -> float:
        """The weight ``a(t - 1)`` of the sample of the update at step ``t``, unnormalised."""
        i = t - 1
        if i < self.switch_step:
            return 1.0 - self.beta
        return WSM_SHAPES["1-sqrt"][0](min(max((i - self.switch_step) / self.decay_steps, 0.0), 1.0))

    def state(self) -> dict:
        return {"kind": "ema_decay_sqrt", **asdict(self)}


#: The merge schedules: a running weighted average of the updates' samples (:func:`merged_weight`).
MERGE_SCHEDULES = (WSM, EmaDecaySqrt)

#: The schedule objects ``decay=`` takes (and ``TargetNetwork``'s ``momentum=``): the momentum
#: schedules, indexed by the update (``t = n - 1``), and the merge schedules, functions of the step.
MOMENTUM_SCHEDULES = (Cosine, Linear, PiecewiseConstant, *MERGE_SCHEDULES)


def check_power_args(decay, min_decay, inv_gamma, power, update_after_step) -> None:
    """The arguments of :class:`PowerWarmup`, checked whatever the warm-up (a typo is an error)."""
    _check_decay("decay", decay)
    _check_decay("min_decay", min_decay)
    for name, v in (("inv_gamma", inv_gamma), ("power", power)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    _check_count("update_after_step", update_after_step)


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
        if last <= 0 or t <= 0:
            return 0.0
        return (last / t) ** (self.gamma + 1.0)

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
        return 2.0 ** (-(t - last) / float(self.half_life))

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
        _check_decay("min_ema_multiplier", self.min_ema_multiplier)

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


_KINDS: dict[str, Any] = {"constant": Constant, "num_updates": NumUpdates, "power_warmup": PowerWarmup,
          "power_function": PowerFunction, "half_life": HalfLife, "bema": BEMA, "cosine": Cosine,
          "linear": Linear, "piecewise_constant": PiecewiseConstant, "wsm": WSM, "ema_decay_sqrt": EmaDecaySqrt}


def from_state(state: dict):
    """Rebuild a schedule saved with ``state()``."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} in checkpoint; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**state)


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


_MOVED = {"Plan": "fastema.average.plan", "Cadence": "fastema.average.plan", "Pending": "fastema.average.plan"}


def __getattr__(name: str):
    # Plan, Cadence and Pending are the engine's (fastema.average.plan) since 0.2; the old path
    # works for one release with a warning.
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"fastema.schedules.{name} moved to {_MOVED[name]}.{name} (the model-average engine); "
                      f"the old name goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'fastema.schedules' has no attribute {name!r}")
