"""Moved to :mod:`fastema.average.device_plan` (this internal path stays until fastema.torch imports
from there)."""
from .average.device_plan import *  # noqa: F401,F403
from .average.device_plan import DevicePlan, parameters  # noqa: F401
