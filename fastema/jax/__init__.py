"""JAX: the average inside the jitted step, and between steps.

Two faces over one set of semantics (fastema's schedules, lerp and rounding):

- :func:`ema` (``_functional``): pure ``init``/``update``/``average`` functions of pytrees, in the
  optax shape, that XLA traces, fuses, shards (the averages laid out as the parameters) and
  donates. The schedules are computed on the device from the traced step (``_schedules``), each
  element as fastema's kernels compute it (``_bits``).
- :func:`snapshot` (``_posthoc``): an ``ema`` state's power-function profiles written between steps
  as a post-hoc snapshot (EDM2), in the format :mod:`fastema.posthoc` synthesises from.
- :func:`window` (``_window``): the mean of the last W snapshots (or of all: SWA), the same shape.
- :class:`EMA` (``_face``): an object updated between jitted steps, its shadow in fastema's flat
  buffers, updated by fastema's kernels (one launch per device and dtype group).

One concern per module: ``_functional`` (the state and its update), ``_schedules`` (the decays on the
device), ``_bits`` (the kernels' element arithmetic in ``jnp``), ``_window`` (the window of snapshots),
``_posthoc`` (the snapshots), ``_face`` (the between-steps EMA), ``_floor`` (the oldest jax it runs on).
"""
from . import _floor  # noqa: F401, I001  (first: refuses a jax older than its floor)
from ._face import EMA, REFUSED
from ._functional import REFUSED_IN_JIT, EmaState, EmaTransform, ema
from ._posthoc import snapshot
from ._window import WindowState, WindowTransform, window

__all__ = ["EMA", "REFUSED", "REFUSED_IN_JIT", "EmaState", "EmaTransform", "WindowState", "WindowTransform", "ema",
           "snapshot", "window"]
