"""Moved to the engine (:mod:`fastema.average`): this internal module keeps the names
fastema.torch imported from it until the torch face switches (the next commit)."""
from __future__ import annotations

from ._checks import shadow_problems
from .average.core import PlanReader  # noqa: F401
from .average.options import EMAOptions, ShadowSettings
from .average.plan import Plan


def make_plan(decay, **options) -> tuple[Plan, ShadowSettings]:
    opts = EMAOptions.of(decay, **options)
    return opts.plan(), opts.shadow()


def check_shadow_settings(shadow_dtype, rounding, seed, problems: list) -> None:
    problems += shadow_problems(shadow_dtype, rounding, seed)
