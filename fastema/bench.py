"""Deprecated alias of :mod:`fastema.cli.bench` (``python -m fastema bench``), kept for one release."""
import sys
import warnings

from .cli import bench as _moved

warnings.warn("fastema.bench moved to fastema.cli.bench (python -m fastema bench is unchanged); the old module goes in "
              "the next release", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
