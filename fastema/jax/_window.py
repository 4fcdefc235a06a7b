"""``fastema.jax.window``: the mean of the last ``size`` snapshots (or of all: SWA), inside the jitted step.

``avg = fastema.jax.window(size, every=1, ring_dtype="float32")`` gives ``init``/``update``/``average``
as :func:`fastema.jax.ema` does. The state holds a ring of ``size`` snapshots per floating leaf
(``(size, *shape)``, laid out as the parameter: each device keeps its shard's ring); an update
writes one slot (``dynamic_update_slice``, in place under donation); ``average()`` takes the mean
of the filled slots, in float32 (float64 with x64 or for float64 leaves), from the ring itself, so
no running sum drifts. ``size=None``: the cumulative mean of every snapshot,
``avg <- avg + (x - avg) / n``, one float32 row (stochastic weight averaging). The parameters
given to ``init`` are the first snapshot, as for :class:`fastema.torch.WindowAverage`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from ._functional import EmaTransform, _agreed

__all__ = ["WindowState", "WindowTransform", "window"]

_FLOATS = ("float64", "float32", "bfloat16", "float16")


class WindowState(NamedTuple):
    """The window's state: ``rings`` (a pytree like ``params``: each floating leaf ``(size, *shape)``
    in the ring dtype, or ``(1, *shape)`` float32 for the cumulative mean; other leaves as at the
    last snapshot), ``calls`` (``update()`` calls made) and ``snapshots`` (taken, the first at
    ``init`` included), int32."""
    rings: Any
    calls: jax.Array
    snapshots: jax.Array


def _is_float(x) -> bool:
    """(a Python number leaf too: its JAX dtype; x.dtype raised a bare AttributeError)"""
    return jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype).name in _FLOATS


class WindowTransform:
    """What :func:`window` returns: ``init``, ``update``, ``average``, pure functions."""

    def __init__(self, size: int | None, every: int, ring_dtype: str):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be an int >= 1 or None (cumulative mean), got {size!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        if size is None and ring_dtype != "float32":
            raise ValueError("the cumulative mean (size=None) keeps one float32 row: it takes no ring_dtype")
        self.size, self.every, self.ring_dtype = size, every, ring_dtype
        self._dtypes: dict = {}

    def _row_dtype(self, x):
        if jnp.dtype(x.dtype).name == "float64":
            return x.dtype
        return jnp.dtype(self.ring_dtype)

    def init(self, params) -> WindowState:
        """The window with ``params`` as its first snapshot."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if not any(_is_float(x) for x in leaves):
            raise ValueError("params has no float64/float32/bfloat16/float16 leaves to average")
        rows = 1 if self.size is None else self.size
        rings = []
        for x in leaves:
            x = jnp.asarray(x)
            if _is_float(x):
                first = x.astype(self._row_dtype(x))[None]
                rings.append(jnp.concatenate([first, jnp.zeros((rows - 1, *x.shape), first.dtype)]) if rows > 1
                             else first)
            else:
                rings.append(jnp.array(x, copy=True))
        self._seen(treedef, leaves)
        return WindowState(jax.tree_util.tree_unflatten(treedef, rings), jnp.zeros((), jnp.int32),
                           jnp.ones((), jnp.int32))

    def update(self, state: WindowState, params) -> WindowState:
        """Take a snapshot of ``params`` on the first call and every ``every``-th after it."""
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [x for _, x in with_paths]
        old, old_def = jax.tree_util.tree_flatten(state.rings)
        if cast(Any, treedef) != old_def:
            raise ValueError(f"params does not have the structure of the state (expected {old_def}, got {treedef})")
        EmaTransform._check_leaves(with_paths, old)     # an int leaf where a ring is took the ring's place
        due = state.calls % self.every == 0
        n = state.snapshots + 1                         # snapshots after this one
        out = []
        for ring, x in zip(old, leaves):
            x = jnp.asarray(x)
            if not _is_float(x):
                out.append(jnp.where(due, x, ring))
                continue
            if tuple(ring.shape[1:]) != tuple(x.shape):
                raise ValueError(f"a leaf of shape {tuple(x.shape)} meets a window of shape {tuple(ring.shape[1:])}")
            if self.size is None:
                c = jnp.float64 if ring.dtype == jnp.float64 else jnp.float32
                mean = ring[0].astype(c)
                new = (mean + (x.astype(c) - mean) / n.astype(c)).astype(ring.dtype)[None]
                out.append(new if self.every == 1 else jnp.where(due, new, ring))
            else:                                       # one slot written (a skipped call writes it back)
                slot = state.snapshots % self.size
                value = x.astype(ring.dtype)[None]
                if self.every > 1:
                    value = jnp.where(due, value, lax.dynamic_slice_in_dim(ring, slot, 1, axis=0))
                out.append(lax.dynamic_update_slice_in_dim(ring, value, slot, axis=0))
        self._seen(treedef, leaves)
        return WindowState(jax.tree_util.tree_unflatten(treedef, out), state.calls + 1,
                           jnp.where(due, n, state.snapshots))

    def _seen(self, treedef, leaves) -> None:
        """As :meth:`fastema.jax.EmaTransform._seen`: the dtypes, or None where several were seen."""
        self._dtypes[treedef] = _agreed(self._dtypes.get(treedef, ()), leaves)

    def average(self, state: WindowState, like=None):
        """The mean of the snapshots in the window, in the parameters' dtypes (rounded to nearest);
        ``like``: as for :meth:`fastema.jax.EmaTransform.average`."""
        leaves, treedef = jax.tree_util.tree_flatten(state.rings)
        if like is not None:
            like_leaves, like_def = jax.tree_util.tree_flatten(like)
            if cast(Any, like_def) != treedef:
                raise ValueError(f"like= has the structure {like_def}, the state {treedef}: pass the "
                                 f"parameters the state was made for (or a tree of their structure)")
            dtypes = [jnp.dtype(x.dtype) for x in like_leaves]
        elif self._dtypes.get(treedef) is not None:
            dtypes = self._dtypes[treedef]
        else:
            raise ValueError("this window has not seen parameters of the state's structure, or has seen them in "
                             "several dtypes: pass like=params")
        out = []
        for ring, d in zip(leaves, dtypes):
            if d.name not in _FLOATS:
                out.append(ring)
                continue
            if self.size is None:
                out.append(ring[0].astype(d))
                continue
            c = jnp.float64 if ring.dtype == jnp.float64 or jax.config.jax_enable_x64 else jnp.float32  # type: ignore[attr-defined]
            count = jnp.minimum(state.snapshots, self.size)
            filled = (jnp.arange(self.size) < count).reshape((self.size,) + (1,) * (ring.ndim - 1))
            total = jnp.sum(jnp.where(filled, ring.astype(c), 0), axis=0)
            out.append((total / count.astype(c)).astype(d))
        return jax.tree_util.tree_unflatten(treedef, out)


def window(size: int | None, *, every: int = 1, ring_dtype: str = "float32") -> WindowTransform:
    """The mean of the last ``size`` snapshots of a pytree (``None``: of all of them, SWA), as pure
    functions for the jitted step; a snapshot on the first call and every ``every``-th after it;
    ``ring_dtype="bfloat16"`` halves the ring (each snapshot rounded to bfloat16, the mean float32)."""
    return WindowTransform(size, every, ring_dtype)
