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

The package's modules: ``_decay`` (the EMA decays, timed ones included), ``_momentum`` (the
momentum schedules), ``_merge`` (the merge schedules, checkpoint merging online), ``_edm2``
(``sigma_rel`` and ``gamma``), ``_base`` (plain numbers and argument checks). Each schedule's value
is the plan kernel's formula (:mod:`fastema.kernels.formulas`), so the host plan and the device
plan compute it alike.
"""
from __future__ import annotations

from typing import Any

from ._base import as_python as as_python
from ._base import check_count as check_count
from ._base import check_decay as check_decay
from ._base import check_step as check_step
from ._decay import BEMA, Constant, HalfLife, NumUpdates, PowerFunction, PowerWarmup
from ._decay import check_power_args as check_power_args
from ._decay import compensated as compensated
from ._decay import debiased_weight as debiased_weight
from ._edm2 import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma
from ._merge import MERGE_SCHEDULES as MERGE_SCHEDULES
from ._merge import WSM, EmaDecaySqrt, wsm_coefficients
from ._merge import WSM_SHAPES as WSM_SHAPES
from ._merge import merged_weight as merged_weight
from ._merge import wsm_mean as wsm_mean
from ._momentum import MAX_BOUNDARIES as MAX_BOUNDARIES
from ._momentum import MOMENTUM_SCHEDULES as MOMENTUM_SCHEDULES
from ._momentum import Cosine, Linear, PiecewiseConstant

# The names imported "as themselves" above are the plumbing of fastema's own modules (the plan, the
# device plan, the offline merge, the drop-ins): importable from here, not public (not in __all__).
__all__ = ["BEMA", "Constant", "Cosine", "EmaDecaySqrt", "HalfLife", "Linear", "NumUpdates", "PiecewiseConstant",
           "PowerFunction", "PowerWarmup", "WSM", "from_state", "wsm_coefficients",
           "gamma_to_sigma_rel", "sigma_rel_to_gamma", "SIGMA_REL_MAX"]

_KINDS: dict[str, Any] = {"constant": Constant, "num_updates": NumUpdates, "power_warmup": PowerWarmup,
                          "power_function": PowerFunction, "half_life": HalfLife, "bema": BEMA, "cosine": Cosine,
                          "linear": Linear, "piecewise_constant": PiecewiseConstant, "wsm": WSM,
                          "ema_decay_sqrt": EmaDecaySqrt}


def from_state(state: dict):
    """Rebuild a schedule saved with ``state()``."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} in checkpoint; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**state)
