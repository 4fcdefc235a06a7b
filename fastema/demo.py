"""Deprecated alias of :mod:`fastema.cli.demo` (``python -m fastema demo``), kept for one release."""
import sys
import warnings

from .cli import demo as _moved

warnings.warn("fastema.demo moved to fastema.cli.demo (python -m fastema demo is unchanged); the old module goes in "
              "the next release", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
