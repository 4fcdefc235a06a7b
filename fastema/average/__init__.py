"""The model-average engine, framework-free: the options every face takes (:class:`EMAOptions`)
and the schedule with its counters (:class:`Plan`, what ``ema.plan`` is on every face).

The faces (:mod:`fastema.torch`, :mod:`fastema.jax`, :mod:`fastema.tensorflow`) and the
callbacks (:mod:`fastema.keras`, :mod:`fastema.lightning`) are adapters over it. Nothing here
imports a framework (a test checks the imports). The types a contributor builds a face from
(``Average``, ``Face``, ``ModelAdapter`` in :mod:`fastema.average.core`; ``ModelSwap`` in
:mod:`fastema.average.swap`; ``Cadence`` and ``Pending`` in :mod:`fastema.average.plan`;
``DevicePlan`` in :mod:`fastema.average.device_plan`) are documented in docs/architecture.md and
imported from their modules.
"""
from __future__ import annotations

import importlib
import warnings

from .options import HOST_ONLY_REFUSALS, EMAOptions
from .plan import Plan

__all__ = ["EMAOptions", "HOST_ONLY_REFUSALS", "Plan"]

# Contributors' types this module exported in 0.2's development: they work for one release, with a warning.
_MOVED = {"Average": "core", "Face": "core", "ModelAdapter": "core", "PlanReader": "core",
          "ShadowSettings": "options", "Cadence": "plan", "Pending": "plan", "ModelSwap": "swap"}


def __getattr__(name: str):
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        warnings.warn(f"fastema.average.{name} is a contributors' type: import it from {module} (see "
                      f"docs/architecture.md); the alias goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
