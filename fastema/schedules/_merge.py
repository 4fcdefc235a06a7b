"""The merge schedules: checkpoint merging online, a running weighted average of the updates'
samples (:func:`merged_weight`), with WSM's weights (:class:`WSM`, its decay shapes
:data:`WSM_SHAPES`) or Levanter's (:class:`EmaDecaySqrt`).

Each weight is the plan kernel's formula (:func:`fastema.kernels.formulas.merge_weight`), run on
the host over the schedule's table as the kernel reads it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Sequence

from ..kernels.formulas import merge_weight, wsm_antiderivative
from ..kernels.formulas import wsm_mean as _wsm_mean
from ..kernels.kinds import EMA_DECAY_SQRT, WSM_SHAPE_CODES
from ..kernels.kinds import WSM as WSM_KIND
from ._base import _plain_fields, check_decay

#: The decay shapes of WSM (Tian et al., arXiv 2507.17634) on ``[0, 1]``, ``name -> (f, F)`` with ``F``
#: the antiderivative of ``f``, the plan kernel's :func:`~fastema.kernels.formulas.wsm_antiderivative`: the
#: offline merge's ``wsm:`` weights (:func:`fastema.merge.merge_weights`), :class:`WSM` and the device plan
#: compute them alike.
WSM_SHAPES = {
    "linear": (lambda x: 1.0 - x, lambda x: wsm_antiderivative(WSM_SHAPE_CODES["linear"], x)),
    "cosine": (lambda x: (1 + math.cos(math.pi * x)) / 2, lambda x: wsm_antiderivative(WSM_SHAPE_CODES["cosine"], x)),
    "1-sqrt": (lambda x: 1.0 - math.sqrt(x), lambda x: wsm_antiderivative(WSM_SHAPE_CODES["1-sqrt"], x)),
}


def wsm_mean(shape: str, x0: float, x1: float) -> float:
    """The mean of WSM's decay ``shape`` over ``[x0, x1]`` (``x0 < x1``): ``(F(x1) - F(x0)) / (x1 - x0)``."""
    return _wsm_mean(WSM_SHAPE_CODES[shape], x0, x1)


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

    @cached_property
    def _table(self) -> tuple:
        return float(WSM_SHAPE_CODES[self.shape]), float(self.start), float(self.end), float(self.every)

    def weight(self, t: float) -> float:
        """The weight ``c_j`` of the checkpoint at step ``t`` (0 off the checkpoints), unnormalised."""
        return merge_weight(self._table, 0, WSM_KIND, t)

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
        check_decay("beta", self.beta)

    @cached_property
    def _table(self) -> tuple:
        return float(self.beta), float(self.switch_step), float(self.decay_steps)

    def weight(self, t: float) -> float:
        """The weight ``a(t - 1)`` of the sample of the update at step ``t``, unnormalised."""
        return merge_weight(self._table, 0, EMA_DECAY_SQRT, t)

    def state(self) -> dict:
        return {"kind": "ema_decay_sqrt", **asdict(self)}


#: The merge schedules: a running weighted average of the updates' samples (:func:`merged_weight`).
MERGE_SCHEDULES = (WSM, EmaDecaySqrt)
