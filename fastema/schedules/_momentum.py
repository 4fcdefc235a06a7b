"""The momentum schedules: :class:`Cosine`, :class:`Linear`, :class:`PiecewiseConstant` (the teacher
momentum of DINO, BYOL, I-JEPA...), indexed by the update, ``t = n - 1`` (:mod:`fastema.schedules`).

Each value is the plan kernel's formula (:func:`fastema.kernels.formulas.momentum_decay`), run on
the host over the schedule's table as the kernel reads it.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import ClassVar, Sequence

from ..kernels.formulas import momentum_decay
from ..kernels.kinds import COSINE, LINEAR, PIECEWISE_CONSTANT
from ._base import _plain_fields, as_python, check_count, check_decay
from ._merge import MERGE_SCHEDULES


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
    _kind: ClassVar[int]            # the plan kernel's schedule kind (kernels.kinds)

    def __post_init__(self):
        _plain_fields(self)
        check_decay("start", self.start)
        check_decay("end", self.end)
        _check_total(self.total_steps)

    @cached_property
    def _table(self) -> tuple:
        return float(self.start), float(self.end), float(self.total_steps)

    def at(self, t: int) -> float:
        """The decay at step index ``t`` (0 for the first update)."""
        return momentum_decay(self._table, 0, self._kind, t)

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
    _kind = COSINE

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
    _kind = LINEAR

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
            check_count("a boundary", x)
        if any(b1 >= b2 for b1, b2 in zip(b, b[1:])):
            raise ValueError(f"boundaries must increase strictly, got {list(b)}")
        if len(v) != len(b) + 1:
            raise ValueError(f"PiecewiseConstant needs one value more than boundaries (a value before the first "
                             f"boundary and one after each), got {len(v)} values for {len(b)} boundaries")
        for x in v:
            check_decay("each value", x)

    @cached_property
    def _table(self) -> tuple:
        return float(len(self.boundaries)), *map(float, self.boundaries), *map(float, self.values)

    def at(self, t: int) -> float:
        """The decay at step index ``t`` (0 for the first update)."""
        return momentum_decay(self._table, 0, PIECEWISE_CONSTANT, t)

    def __call__(self, n: int) -> float:
        return self.at(n - 1)

    def state(self) -> dict:
        return {"kind": "piecewise_constant", "boundaries": list(self.boundaries), "values": list(self.values)}


#: The schedule objects ``decay=`` takes (and ``TargetNetwork``'s ``momentum=``): the momentum
#: schedules, indexed by the update (``t = n - 1``), and the merge schedules, functions of the step.
MOMENTUM_SCHEDULES = (Cosine, Linear, PiecewiseConstant, *MERGE_SCHEDULES)
