"""The model-average engine, framework-free: the options every face takes
(:class:`EMAOptions`), the host and device plans, the swap state machine
(:class:`ModelSwap`) and the update driver and checkpoint of a model EMA (:class:`Average`).

The faces (:mod:`fastema.torch`, :mod:`fastema.jax`, :mod:`fastema.tensorflow`) and the
callbacks (:mod:`fastema.keras`, :mod:`fastema.lightning`) are adapters over it. Nothing here
imports a framework (a test checks the imports).
"""
from .core import Average, Face, ModelAdapter, PlanReader
from .options import HOST_ONLY_REFUSALS, EMAOptions, ShadowSettings
from .plan import Cadence, Pending, Plan
from .swap import ModelSwap

__all__ = ["Average", "Cadence", "EMAOptions", "Face", "HOST_ONLY_REFUSALS", "ModelAdapter", "ModelSwap", "Pending",
           "Plan", "PlanReader", "ShadowSettings"]
