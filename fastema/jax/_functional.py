"""``fastema.jax.ema``: the average as pure functions of pytrees, inside the jitted step.

``avg = fastema.jax.ema(decay=0.999, **options)`` gives ``avg.init(params) -> state``,
``avg.update(state, params, step=None) -> state`` and ``avg.average(state, row=0) -> params``:
the optax shape. The state (:class:`EmaState`) is a NamedTuple of arrays: the averages (a pytree
like ``params``, each floating leaf ``(rows, *shape)`` in the shadow's dtype), the counters and
times (int32 scalars), the debiasing normalisers and the folded stochastic-rounding seed. Every
schedule is computed on the device from the traced step (:mod:`._schedules`), every element as
the kernels compute it (:mod:`._bits`), so XLA traces, fuses, shards and donates it: the averages
take the parameters' sharding (GSPMD propagates it through the elementwise update: each device
averages its own shard, no collective), and a ``jax.jit(step, donate_argnums=...)`` updates them
in place.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np

from ..average import HOST_ONLY_REFUSALS, EMAOptions
from ..schedules import BEMA, Constant
from . import _bits, _schedules

__all__ = ["EmaState", "EmaTransform", "REFUSED_IN_JIT", "ema"]

_FLOATS = ("float64", "float32", "bfloat16", "float16")

#: the placements (where the average lives: the torch face's offload), refused as every host-plan face does
PLACEMENT_REFUSALS = {k: v for k, v in HOST_ONLY_REFUSALS.items() if k != "device_step"}

#: What :func:`ema` refuses, and why: every other option of the model EMAs is taken (``device_step``
#: only when False: True is what it does).
REFUSED_IN_JIT = {
    **PLACEMENT_REFUSALS,
    "device_step": "inside jax.jit the plan is always on the device (a traced step); device_step=False (the plan "
                   "on the host) cannot run there: leave it unset (or True). fastema.jax.EMA keeps it on the host",
}


class EmaState(NamedTuple):
    """The average's state: arrays only (jit, donation, sharding, orbax, ``lax.scan`` carry).

    ``averages`` is a pytree like ``params``: each floating leaf ``(rows, *shape)`` in the shadow
    dtype (row ``k`` the average of decay ``k``; BEMA: output, EMA, ``theta_0``), other leaves
    (integer counters) as their value at the last update. ``calls`` counts the ``update()`` calls
    (skipped ones included) and ``updates`` the updates, int32; ``last_time`` and ``first_time`` are
    the times of the last and first update (timed schedules), int32; ``norms`` the debiasing
    normalisers, one per row; ``seed`` the stochastic-rounding seed as two uint32 words (low,
    high); ``skipped`` is True when the last due call was skipped by ``skip_nonfinite``.
    """
    averages: Any
    calls: jax.Array
    updates: jax.Array
    last_time: jax.Array
    first_time: jax.Array
    norms: jax.Array
    seed: jax.Array
    skipped: jax.Array


def _is_float(x) -> bool:
    """(a Python number leaf too: its JAX dtype; x.dtype raised a bare AttributeError)"""
    return jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype).name in _FLOATS


def _agreed(held, leaves) -> list | None:
    """The dtypes of ``leaves`` as JAX holds them (a NumPy float64 leaf is float32 without x64), where
    ``held`` (the ones seen before: None where they disagreed, empty where none were) has the same
    float ones; else None (the kept leaves are not rounded: theirs may differ)."""
    dtypes = [jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype) for x in leaves]
    if held is None or held and any((a.name in _FLOATS or b.name in _FLOATS) and a != b for a, b in zip(held, dtypes)):
        return None
    return dtypes


def _kind(x) -> str:
    """What a leaf is to the average: ``"float"`` (averaged), else its dtype's kind (kept)."""
    dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)
    if dtype.name in _FLOATS:
        return "float"
    return {"b": "bool", "i": "int", "u": "uint", "c": "complex"}.get(dtype.kind, dtype.name)


def _step(step):
    """``(n, ok)``: ``step`` as the int32 ``n`` of the schedules, and ``ok``, a traced bool where
    ``step`` is traced (False: out of ``[0, 2**31)``, which the call then holds) or None.

    A concrete step (Python, NumPy or a ``jax.Array`` that is not a tracer) is checked here: an
    int in ``[0, 2**31)``, or ValueError. A traced one must be an integer scalar (its dtype and
    shape are known when traced); its value is checked in its own dtype, before the int32 cast
    (an x64 ``int64`` 2**31 wrapped to -2**31)."""
    what = (f"step must be an int in [0, 2**31) (or a traced integer scalar), got {step!r}; pass the training "
            f"step as an int >= 0 (a jnp.int32 inside jax.jit)")
    if isinstance(step, jax.core.Tracer):
        dtype = jnp.dtype(step.dtype)
        if dtype.kind not in "iu" or step.shape != ():
            raise ValueError(f"step must be an integer scalar, got a traced {dtype.name}{list(step.shape)}; pass "
                             f"the training step as a jnp.int32 scalar (jnp.asarray(step, jnp.int32))")
        ok = step <= np.asarray(2 ** 31 - 1, dtype) if jnp.iinfo(dtype).max >= 2 ** 31 else jnp.ones((), jnp.bool_)
        if dtype.kind == "i":
            ok = ok & (step >= 0)
        return step.astype(jnp.int32), ok
    if isinstance(step, (bool, np.bool_)):
        raise ValueError(what)
    if not isinstance(step, int):                     # NumPy and concrete JAX scalars: by their dtype
        dtype = getattr(step, "dtype", None)
        if dtype is None or jnp.dtype(dtype).kind not in "iu" or np.shape(step) != ():
            raise ValueError(what)
    if not 0 <= int(step) < 2 ** 31:
        raise ValueError(what)
    return jnp.asarray(int(step), jnp.int32), None


class EmaTransform:
    """What :func:`ema` returns: ``init``, ``update``, ``average``; pure functions (``jax.jit`` them
    or call them inside a jitted step). Holds the options only, never arrays."""

    def __init__(self, options: EMAOptions):
        options.refuse("fastema.jax.ema()", PLACEMENT_REFUSALS)
        dtype = options.shadow_dtype               # fastema.jax.EMA's list (FlatShadow's), by name
        if not isinstance(dtype, str) or (dtype != "same" and dtype not in _FLOATS):
            raise ValueError(f"shadow_dtype must be one of {sorted(_FLOATS)} or 'same', got {dtype!r}")
        if options.device_step is False:
            raise ValueError(f"fastema.jax.ema() does not take device_step=False: {REFUSED_IN_JIT['device_step']}")
        plan = options.plan()                              # the host's checks of the schedule
        for s in plan.schedules:
            _schedules.refuse_schedule(s)
        self.options = options
        self.schedules = list(plan.schedules)
        self.bema = isinstance(self.schedules[0], BEMA)
        self.rows = options.shadow_rows
        self.every, self.debias, self.compensate = plan.update_every, plan.debias, plan.compensate
        self.stochastic = options.rounding == "stochastic"
        self._decays = _schedules.decays(self.schedules, self.every, self.compensate)
        constant = all(type(s) is Constant for s in self.schedules) and not self.debias
        # Constant decays: the host plan's own weights (its float64 1 - d, compensated as it does:
        # d ** every; float32 in the kernel), as numbers; the plan is asked, never counted
        self._fixed = [float(w) for w in plan.next().weights] if constant else None
        self._dtypes: dict = {}            # treedef -> the parameters' dtypes (see _seen)

    # ------------------------------------------------------------ init

    def _shadow_dtype(self, x):
        name = self.options.shadow_dtype
        if name == "same":
            return x.dtype
        if self.stochastic and jnp.dtype(x.dtype).name == "float64":
            raise TypeError("rounding='stochastic' rounds float32 results to bfloat16; a float64 leaf has none")
        return jnp.dtype(name)

    def init(self, params) -> EmaState:
        """The state of an average started from ``params`` (every row a copy, rounded to the shadow
        dtype), counters at zero. Under ``jax.jit`` the averages take ``params``' shardings."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if not any(_is_float(x) for x in leaves):
            raise ValueError("params has no float64/float32/bfloat16/float16 leaves to average")
        averages = []
        for x in leaves:
            x = jnp.asarray(x)
            if jnp.issubdtype(x.dtype, jnp.complexfloating):
                raise TypeError("fastema.jax.ema() averages real floating leaves; keep complex ones out of params")
            if _is_float(x):
                s = x.astype(self._shadow_dtype(x))
                averages.append(jnp.broadcast_to(s[None], (self.rows, *x.shape)))
            else:
                averages.append(jnp.array(x, copy=True))          # a buffer of its own: the state may be donated
        f = _schedules.float_dtype()
        def counter():                     # a buffer each: each may be donated
            return jnp.zeros((), jnp.int32)

        self._seen(treedef, leaves)
        return EmaState(jax.tree_util.tree_unflatten(treedef, averages), counter(), counter(), counter(), counter(),
                        jnp.zeros((self.rows,), f), jnp.asarray(_bits.seed_words(self.options.seed)),
                        jnp.zeros((), jnp.bool_))

    # ------------------------------------------------------------ update

    def _weights(self, state: EmaState, n, t):
        """``(weights, new norms)`` of a due call: float32 (float64 with x64) per row."""
        f = _schedules.float_dtype()
        if self._fixed is not None:               # NumPy scalars: the lerp's form is picked when traced
            return list(np.asarray(self._fixed, np.float64).astype(f)), state.norms
        d = self._decays(n, t, state.last_time, state.first_time, state.updates > 0)
        if self.debias:
            c = d * state.norms + (1.0 - d)
            w = jnp.where(c == 0.0, jnp.ones((), f), (1.0 - d) / jnp.where(c == 0.0, 1.0, c))
            return w, c.astype(f)
        return 1.0 - d, state.norms

    def update(self, state: EmaState, params, step=None) -> EmaState:
        """The state after one ``update()`` call with ``params`` (a pytree like ``init``'s).

        ``step``: the training step for the schedule and the rounding key, an int in ``[0,
        2**31)``, or None for the update count (timed schedules: the calls made). A concrete one
        (Python, NumPy, a ``jax.Array`` that is not traced: its value is read) out of range or not
        an integer is a ValueError; a traced one must be an integer scalar, and one out of range
        (checked in its own dtype) holds the call: nothing written, no update counted. A call that
        ``update_every`` skips writes nothing (a select: the arithmetic still runs); with
        ``skip_nonfinite`` a call whose parameters hold inf/NaN writes nothing but is counted, as
        on every face. ``params`` must be as ``init`` saw them: each leaf of the same kind (float,
        int, uint, bool), each float leaf of the same shape (else ValueError naming the leaf).
        """
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [x for _, x in with_paths]
        old, old_def = jax.tree_util.tree_flatten(state.averages)
        if cast(Any, treedef) != old_def:
            raise ValueError(f"params does not have the structure of the state (expected {old_def}, got "
                             f"{treedef}); init a new state for a new model")
        self._check_leaves(with_paths, old)
        due = state.calls % self.every == 0
        ok = None
        if step is None:
            n, t = state.updates + 1, state.calls + 1
        else:
            n, ok = _step(step)
            t = n
            if ok is not None:             # a traced step out of range: the call is held (no update)
                due = due & ok
        w, norms = self._weights(state, n, t)
        started = state.updates > 0
        skip = jnp.zeros((), jnp.bool_)
        if self.options.skip_nonfinite:
            bad = [~jnp.all(jnp.isfinite(x)) for x in leaves if _is_float(x)]
            skip = jnp.any(jnp.stack(bad))
        key = (lambda group: _bits.sr_key(_bits.group_seed(state.seed, group), n)) if self.stochastic else None
        alpha = _schedules.bema_alpha(self.schedules[0], t, state.first_time, started) if self.bema else None
        if self.bema:
            w = jnp.stack([jnp.ones((), w.dtype), w[0], jnp.where(started, 0.0, 1.0).astype(w.dtype)])
        averages = self._fold(old, leaves, w, key, alpha)
        if self.every > 1 or self.options.skip_nonfinite or ok is not None:
            # a select, not lax.cond: XLA fuses it into the update and keeps the buffers in place (a
            # cond's branches copied every average); the skipped calls compute what they throw away
            write = due & ~skip
            averages = [jnp.where(write, a, s) for a, s in zip(averages, old)]
        self._seen(treedef, leaves)
        return EmaState(jax.tree_util.tree_unflatten(treedef, averages),
                        state.calls + 1,
                        jnp.where(due, state.updates + 1, state.updates),
                        jnp.where(due, t, state.last_time),
                        jnp.where(due & ~started, t, state.first_time),
                        jnp.where(due, norms, state.norms),
                        state.seed,
                        jnp.where(due, skip, state.skipped))

    @staticmethod
    def _check_leaves(with_paths: list, averages: list) -> None:
        """ValueError, naming the leaf, for a ``params`` leaf (``with_paths``: ``(path, leaf)``, as
        flattened) that is not what the state holds there (``averages``: its averages' leaves, or a
        window's rings): another kind (a float leaf where the state averages an int one, or the reverse:
        the state would change structure) or another shape (averaged: of one row; kept: its own)."""
        for (path, x), s in zip(with_paths, averages):
            name = "params" + jax.tree_util.keystr(path)
            got, held = _kind(x), _kind(s)
            if got != held:
                raise ValueError(f"{name} is a {got} leaf ({jnp.asarray(x).dtype}) where the state holds a {held} "
                                 f"one ({s.dtype}); pass the leaf as init saw it (cast it back), or init a new "
                                 f"state after changing the model")
            if got == "float" and tuple(s.shape[1:]) != tuple(jnp.shape(x)):
                raise ValueError(f"{name}: a leaf of shape {tuple(jnp.shape(x))} meets an average of shape "
                                 f"{tuple(s.shape[1:])}; init a new state after changing the model")
            if got != "float" and tuple(s.shape) != tuple(jnp.shape(x)):     # kept as it comes: the state's
                raise ValueError(f"{name}: a leaf of shape {tuple(jnp.shape(x))} where the state holds one of "
                                 f"shape {tuple(s.shape)}; init a new state after changing the model")

    def _fold(self, averages: list, leaves: list, w, key, alpha) -> list:
        """Every floating leaf's rows lerped toward its parameter; the other leaves replaced."""
        out: list = []
        offsets: dict = {}
        groups: dict = {}
        for s, x in zip(averages, leaves):
            x = jnp.asarray(x)
            if not _is_float(x):
                out.append(x)
                continue
            group = (jnp.dtype(x.dtype).name, jnp.dtype(s.dtype).name)      # the kernels' (source, shadow) group
            offset = offsets.get(group, 0)
            offsets[group] = offset + int(np.prod(x.shape, dtype=np.int64))
            gi = groups.setdefault(group, len(groups))
            out.append(self._fold_leaf(s, x, w, None if key is None else key(gi), alpha, offset))
        return out

    def _fold_leaf(self, s, x, w, key, alpha, offset: int):
        """The ``(rows, *shape)`` average ``s`` lerped toward ``x``: one elementwise expression over
        every row (XLA fuses it into one loop that reads ``x`` once, in place)."""
        wide = jnp.float64 in (s.dtype, x.dtype)
        c = jnp.float64 if wide else jnp.float32
        column = (self.rows,) + (1,) * x.ndim
        if isinstance(w, list):            # constant decays: NumPy numbers, each row's form known now
            wk = np.asarray(w).astype(c)
            y = _bits.lerp_rows(s.astype(c), x.astype(c), jnp.asarray(wk.reshape(column)),
                                small=bool(np.all(np.abs(wk) < 0.5)), large=bool(np.all(np.abs(wk) >= 0.5)))
        else:
            y = _bits.lerp_rows(s.astype(c), x.astype(c), w.astype(c).reshape(column))
        if self.stochastic and s.dtype == jnp.bfloat16:
            high = jnp.asarray(np.array([_bits.row_high(k) for k in range(self.rows)], np.uint32).reshape(column))
            out = _bits.round_bf16_stochastic(y, _bits.sr_noise(key, high, _bits.element_index(x.shape, offset)))
        else:
            out = y.astype(s.dtype)
        if self.bema:                      # output <- EMA + alpha (theta_t - theta_0), from the stored rows
            stored = out.astype(c)
            out = out.at[0].set((stored[1] + alpha.astype(c) * (stored[0] - stored[2])).astype(s.dtype))
        return out

    # ------------------------------------------------------------ reads

    def _seen(self, treedef, leaves) -> None:
        """Remember the parameters' dtypes of this structure (what :meth:`average` rounds back to):
        static facts of the trace, kept here rather than as arrays in the state (an array the step
        passes through unchanged costs XLA a copy per leaf under donation). Parameters of this structure
        seen in other dtypes (two models through one transform, or a cast) leave it unknown: ``like=``."""
        self._dtypes[treedef] = _agreed(self._dtypes.get(treedef, ()), leaves)

    def average(self, state: EmaState, row: int = 0, like=None):
        """Average ``row`` as a pytree like ``params``, in the parameters' dtypes (rounded to
        nearest); other leaves as at the last update. BEMA shows one average, its output (row 0).

        ``like``: a pytree of the parameters (arrays or ``jax.ShapeDtypeStruct``) giving the dtypes;
        by default those of the parameters this average's ``init``/``update`` saw with this structure
        (give ``like`` for a state restored in a fresh process, or where it saw several)."""
        shown = len(self.schedules)
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < shown:
            raise IndexError(f"row must be an int in [0, {shown}) (one per average), got {row!r}")
        leaves, treedef = jax.tree_util.tree_flatten(state.averages)
        if like is not None:
            like_leaves, like_def = jax.tree_util.tree_flatten(like)
            if cast(Any, like_def) != treedef:
                raise ValueError(f"like= has the structure {like_def}, the state {treedef}: pass the "
                                 f"parameters the state was made for (or a tree of their structure)")
            dtypes = [jnp.dtype(x.dtype) for x in like_leaves]
        elif self._dtypes.get(treedef) is not None:
            dtypes = self._dtypes[treedef]
        else:
            raise ValueError("this average has not seen parameters of the state's structure (a state restored "
                             "in a fresh process), or has seen them in several dtypes (two models of one "
                             "structure, or a cast): pass like=params (or their jax.ShapeDtypeStructs), or use a "
                             "transform per model")
        out = [s[row].astype(d) if d.name in _FLOATS else s for s, d in zip(leaves, dtypes)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def __repr__(self) -> str:
        return f"fastema.jax.ema({', '.join(f'{k}={v!r}' for k, v in self.options.given().items())})"


def ema(decay: float | Sequence[float] | Any = None, **options) -> EmaTransform:
    """An exponential moving average of a pytree, as pure functions for the jitted step.

    Args:
        decay: a float, up to 8 floats (one average each, from one read of the parameters), or a
            schedule of :mod:`fastema.schedules` computed on the device from the traced step:
            ``NumUpdates``, ``PowerWarmup``, ``PowerFunction``, ``HalfLife``, ``BEMA``, ``Cosine``,
            ``Linear``, ``PiecewiseConstant`` (the merge schedules are refused, with the reason).
        **options: the options of every fastema EMA (:class:`fastema.average.EMAOptions`):
            ``update_every``, ``compensate``, ``debias``, ``shadow_dtype`` (``"float32"``, the
            default, ``"bfloat16"``, ``"float16"``, ``"float64"`` or ``"same"``, by name),
            ``rounding="stochastic"`` with ``seed``, ``skip_nonfinite``; :data:`REFUSED_IN_JIT`
            names the ones refused, and why.
    """
    return EmaTransform(EMAOptions.of(decay, **options))
