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

from .options import HOST_ONLY_REFUSALS, EMAOptions
from .plan import Plan

__all__ = ["EMAOptions", "HOST_ONLY_REFUSALS", "Plan"]
