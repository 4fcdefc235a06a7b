"""Moved: :class:`ModelSwap` is :mod:`fastema.average.swap`, :func:`check_header` is
:mod:`fastema._state` (this internal module stays until fastema.torch imports from there)."""
from ._state import check_header  # noqa: F401
from .average.swap import ModelSwap  # noqa: F401
