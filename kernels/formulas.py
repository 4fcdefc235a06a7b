"""The schedules' scalar formulas, for the host: :mod:`fastema.schedules` calls these, so each
schedule's value is written once, and the host plan and the plan kernel compute it alike.

They are :mod:`._stats`'s plain-Python functions, the ones every target compiles into the plan
kernel (``plan_step``); here they run as Python over floats. Their parameters are laid out as
the kernel reads them (:mod:`.kinds`): the shared ``P_*`` slots of :func:`schedule_decay`, and a
momentum or merge schedule's table from its offset ``o`` (:func:`momentum_decay`, :func:`merge_weight`).
"""
from ._stats import merge_weight, momentum_decay, schedule_decay, wsm_antiderivative, wsm_mean

__all__ = ["merge_weight", "momentum_decay", "schedule_decay", "wsm_antiderivative", "wsm_mean"]
