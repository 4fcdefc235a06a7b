"""Deprecated alias of :mod:`fastema.cli.plot` (``python -m fastema plot``), kept for one release."""
import sys
import warnings

from .cli import plot as _moved

warnings.warn("fastema.plot moved to fastema.cli.plot (python -m fastema plot is unchanged); the old module goes in "
              "the next release", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
