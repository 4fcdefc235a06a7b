"""What the schedule tests share: an error in ulps, and the JAX device plan's decays of a schedule.

The host plan computes a schedule's decay in float64 (``fastema.schedules``), the JAX device plan
(``fastema.jax._schedules``) in float32, or in float64 under ``jax.enable_x64``. The tests hold the
schedules to the code they come from (``tests/schedules/test_momentum_schedules.py``) and the
device to the host (``tests/bridges/test_jax_schedule_ulps.py``, ``test_jax_schedules_total.py``),
each error counted by :func:`ulps`; :func:`device_decays` is the device side, one jitted function a
schedule. JAX is imported only by :func:`device_decays` (the host's tests run without it).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def ulp(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """The spacing of ``dtype`` at ``|x|`` (``x`` rounded to ``dtype`` first), as float64."""
    return np.spacing(np.abs(np.asarray(x, np.float64)).astype(dtype)).astype(np.float64)


def ulps(got: Any, want: Any, *of: Any, dtype: Any = np.float64) -> np.ndarray:
    """``|got - want|`` in ulps of ``dtype`` at the largest magnitude among ``of`` (by default
    ``got`` and ``want``): for a decay ``d`` and its weight ``1 - d``, pass both, as an error of
    one ulp of the larger moves an element by one ulp of ``x - s``."""
    scale = np.maximum.reduce([ulp(x, dtype) for x in (of or (got, want))])
    return np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) / scale


def device_decays(schedule: Any, weights: bool = False) -> Callable[..., Any]:
    """``fastema.jax``'s decays of ``schedule`` on the device (``weights``: the weights ``1 - d``),
    jitted and mapped over int32 arrays ``(n, t, last, first)``: the update count, the step, the
    last and the first update's times. Float32, or float64 where the first call runs under
    ``jax.enable_x64`` (JAX traces it then)."""
    import jax
    import jax.numpy as jnp

    from fastema.jax import _schedules

    one = _schedules.decays([schedule], 1, False)

    def decay(n: Any, t: Any, last: Any, first: Any) -> Any:
        d = one(n, t, last, first, jnp.bool_(True))[0]
        return 1.0 - d if weights else d

    return jax.jit(jax.vmap(decay))
