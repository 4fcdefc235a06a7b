"""The model-average engine, framework-free: the options every face takes (:class:`EMAOptions`),
the schedule with its counters (:class:`Plan`, what ``ema.plan`` is on every face), and the types a
face is built from.

The faces (:mod:`fastema.torch`, :mod:`fastema.jax`, :mod:`fastema.tensorflow`) and the
callbacks (:mod:`fastema.keras`, :mod:`fastema.lightning`) are adapters over it. Nothing here
imports a framework (a test checks the imports). This ``__init__`` is the package's surface (its
``__all__`` what users call; the engine's types, imported here, what a face is built from); its
modules are plumbing: ``_options`` (:class:`EMAOptions`, each option's text written once and
:func:`document`), ``_plan`` (:class:`Plan`, :class:`Cadence`), ``_device_plan`` (the plan in
device memory), ``_swap`` (:class:`ModelSwap`), ``_core`` (:class:`Average`, the one update driver
and checkpoint of a model EMA; :class:`Face`; :class:`ModelAdapter`), ``_nonfinite`` (an average
that inf or NaN reached: refused, repaired, checked at a load). See docs/architecture.md.
"""
from __future__ import annotations

from ._core import Average as Average
from ._core import Face as Face
from ._core import FaceMemory as FaceMemory
from ._core import FaceNonFinite as FaceNonFinite
from ._core import ModelAdapter as ModelAdapter
from ._device_plan import DevicePlan as DevicePlan
from ._device_plan import check_state as check_device_state  # noqa: F401  (TargetNetwork's checkpoint check)
from ._options import HOST_ONLY_REFUSALS, EMAOptions
from ._options import OPTION_DOCS as OPTION_DOCS
from ._options import SELECTION as SELECTION
from ._options import document as document
from ._plan import Cadence as Cadence
from ._plan import Plan
from ._swap import ModelSwap as ModelSwap

# What users call is __all__; the names imported "as themselves" above are the engine's interface to
# fastema's faces (the types a face is built from): importable from here, not public.
__all__ = ["EMAOptions", "HOST_ONLY_REFUSALS", "Plan"]

