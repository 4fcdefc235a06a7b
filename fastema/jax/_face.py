"""JAX bridge: an EMA of a pytree of parameters in fastema's flat shadow.

JAX arrays are immutable, so the average lives in buffers fastema owns; each
``update(params)`` reads the new parameters through DLPack (no copy of the model)
and makes one kernel launch per (device, dtype) group. Call it between the steps of
an ordinary jit-compiled training loop::

    ema = fastema.jax.EMA(params, decay=0.999)
    for batch in data:
        params, opt_state = train_step(params, opt_state, batch)   # jax.jit
        ema.update(params)
    eval_params = ema.shadow()          # same pytree structure, shapes and dtypes

On the CPU the update waits for ``params`` to be computed (the kernel runs on the
host); on a GPU the read is ordered on the device through DLPack's stream argument.
On the CPU ``update()`` may also be called inside the jitted step (an ordered host
callback; see :meth:`EMA._traced_update`).
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backends
from .._checkpoint_format import refuse_load
from ..average import (
    HOST_ONLY_REFUSALS,
    Average,
    EMAOptions,
    Face,
    FaceMemory,
    FaceNonFinite,
    document,
)
from ..schedules import check_step

__all__ = ["EMA"]

_FLOATS = ("float32", "bfloat16", "float16", "float64")

#: a new buffer with ``x``'s value, on its device(s) and sharding: one dispatch (a few us) per leaf
_copy = jax.jit(jnp.copy)


def _ref(x) -> Callable[[], object]:
    """A weak reference to ``x`` (one that never matches when ``x`` takes none)."""
    try:
        return weakref.ref(x)
    except TypeError:
        return lambda: None


def _flatten(params):
    pairs, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(p) or "<root>" for p, _ in pairs], [x for _, x in pairs], treedef


def _deleted(name: str, fix: str) -> str:
    """The refusal of a leaf whose buffer was deleted, with ``fix``."""
    return (f"leaf {name} was deleted (donated to a jitted step, jax.jit(..., donate_argnums=...), or deleted) "
            f"before fastema.jax.EMA read it: {fix}.")


def _key(index: tuple) -> tuple:
    """A shard's index (a tuple of slices) as a hashable key."""
    return tuple((sl.start, sl.stop, sl.step) for sl in index)


def _shard_plan(name: str, x) -> list | None:
    """None for a leaf on one device; for a ``jax.Array`` spread over several, its distinct shards
    as ``(device, key)`` pairs, one per distinct index (a replicated shard is averaged once, on the
    first device holding it). A leaf with shards in other processes is refused."""
    if len(x.sharding.device_set) == 1:
        return None
    if not x.is_fully_addressable:
        raise ValueError(f"leaf {name} has shards in other processes ({x.sharding}); fastema.jax.EMA averages "
                         f"the shards this process holds: use fastema.jax.ema() inside the jitted step, which "
                         f"XLA shards across processes")
    seen: dict = {}
    for device, index in x.sharding.addressable_devices_indices_map(x.shape).items():
        seen.setdefault(_key(index), device)
    return [(device, key) for key, device in seen.items()]


def _shard_arrays(x, plan: list) -> list:
    """The single-device arrays of ``x``'s distinct shards, in ``plan``'s order."""
    by_device = {s.device: s.data for s in x.addressable_shards}
    return [by_device[device] for device, _ in plan]


#: What fastema.jax.EMA refuses, and why: every other option is taken.
REFUSED = HOST_ONLY_REFUSALS


class EMA(Face, FaceMemory, FaceNonFinite):
    """Exponential moving average of a pytree of JAX arrays (parameters, batch statistics).

    Floating leaves (float32, bfloat16, float16) are averaged; other leaves (integer
    counters) are carried as the latest value. A leaf sharded over several devices
    (``NamedSharding``) is averaged shard by shard, each on its device (a replicated shard
    once), and ``shadow()`` puts it back with the leaf's sharding. ``shadow()`` returns a new pytree with the
    structure, shapes, dtypes and devices of ``params``.

    Args:
        params: the pytree to average; its values start the average.
        {decay}
        **options: any :class:`fastema.average.EMAOptions` option, as on every face
            (``update_every=``, ``shadow_dtype=``...); the two in
            :data:`REFUSED` are refused by name, with the reason.
    """

    _format = "fastema.jax.EMA"

    def __init__(self, params, decay: float | Sequence[float] | None = None, **options):
        opts = EMAOptions.of(decay, **options)
        opts.refuse("fastema.jax.EMA", REFUSED)
        names, leaves, self._treedef = _flatten(params)
        self.names = names
        leaves = [self._check_leaf(n, x) for n, x in zip(names, leaves)]
        complex_ = [names[i] for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.complexfloating)]
        if complex_:
            raise TypeError(f"leaf {complex_[0]} is complex: fastema averages real floating leaves; keep complex "
                            f"parameters out of the pytree given to EMA")
        self._float = [i for i, x in enumerate(leaves) if x.dtype.name in _FLOATS]
        self._float_set = frozenset(self._float)
        if not self._float:
            raise ValueError("params has no float64/float32/bfloat16/float16 leaves to average")
        # a leaf over several devices is averaged shard by shard: one source of the shadow per distinct
        # shard, on its device (each device's shards in one launch per dtype group)
        self._shards = {i: _shard_plan(names[i], leaves[i]) for i in self._float}
        self._specs = [(x.shape, x.dtype, x.sharding) for x in leaves]
        self._taken = [x.sharding for x in leaves]     # the sharding object last taken per leaf (an equivalent one)
        self._array_type = type(leaves[self._float[0]])
        self._on_cpu = all(next(iter(leaves[i].devices())).platform == "cpu" for i in self._float)
        self._slots: dict = {}               # float leaf -> its shadow slots (one per distinct shard)
        sources: dict = {}
        shapes: list = []
        for i in self._float:
            parts = self._sources_of(i, leaves[i])
            self._slots[i] = list(range(len(sources), len(sources) + len(parts)))
            for j, a in enumerate(parts):
                sources[names[i] if self._shards[i] is None else f"{names[i]}#shard{j}"] = a
                shapes.append(a.shape)
        self._core = Average.of_sources(opts, sources, shapes, self._format)
        self.shadow_dtype = opts.shadow_dtype
        self._others: list = [None] * len(leaves)
        self._others = self._keep_others(leaves)

    @staticmethod
    def _check_leaf(name: str, x):
        if _backends.framework(x) == "numpy":
            x = jnp.asarray(x)
        if not isinstance(x, jax.Array):
            raise TypeError(f"leaf {name} is a {type(x).__name__}; fastema.jax.EMA averages pytrees of JAX "
                            f"arrays (use jnp.asarray)")
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"leaf {name} is a tracer: make the EMA outside jax.jit, from concrete parameters "
                            f"(update() may then be called inside jax.jit)")
        if x.is_deleted():
            raise ValueError(_deleted(name, "make the EMA from arrays no step has donated yet"))
        return x

    # ------------------------------------------------------------ operations

    def update(self, params, step: int | None = None) -> None:
        """Fold ``params`` (a pytree like the one the EMA was made with) into the average.

        Args:
            params: the current parameters, e.g. what the jitted train step returned.
            step: the training step for the schedule; defaults to the number of updates made.
        """
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((params, step))):
            return self._traced_update(params, step)
        kept = []

        def read():
            leaves = self._match(params)
            kept.append(self._keep_others(leaves))              # before anything is counted
            sources = [a for i in self._float for a in self._sources_of(i, leaves[i])]
            if not self._on_cpu:
                return sources
            # The kernel runs on the host, so it waits for the step that makes params (as a
            # DLPack export would); the arrays' own addresses then cost 0.1 us a leaf, not ~9.
            jax.block_until_ready(sources)
            self._core.shadow.adopt(sources, [x.unsafe_buffer_pointer() for x in sources])
            return None

        try:
            self._core.update(step, read)
        except Exception as err:                 # a leaf donated before this read: say which (off the per-step path)
            name = next((nm for nm, x in zip(self.names, jax.tree_util.tree_leaves(params))
                         if isinstance(x, jax.Array) and x.is_deleted()), None)
            if name is None:
                raise
            raise ValueError(_deleted(name, "call ema.update(params) on the arrays the step returns, before the "
                                            "next step donates them") + " Nothing was updated.") from err
        if kept:
            self._others = kept[0]

    def _sources_of(self, i: int, x) -> list:
        """The shadow's sources of float leaf ``i``: the leaf, or its distinct shards."""
        plan = self._shards[i]
        return [x] if plan is None else _shard_arrays(x, plan)

    def _keep_others(self, leaves: list) -> list:
        """The leaves that are not averaged (integer counters), as ``(weak reference to the
        leaf, copy)`` pairs; None for the averaged ones, which are not kept.

        Copies, because a ``jax.jit(step, donate_argnums=0)`` loop donates (deletes) the arrays
        of the step's input, and the EMA must still return them from :meth:`shadow`. A leaf
        that is the very array the last update copied is not copied again: JAX arrays are
        immutable, so that copy still holds its value (donated since or not). The weak reference
        keeps the leaf's memory free to go, and never takes a new array for a freed one."""
        out: list = []
        for i, x in enumerate(leaves):
            old = self._others[i]
            if i in self._float_set:
                out.append(None)
            elif old is not None and old[0]() is x:
                out.append(old)
            else:
                out.append((_ref(x), _copy(x)))
        return out

    def _traced_update(self, params, step) -> None:
        """``update()`` inside ``jax.jit``: an ordered ``io_callback`` runs the eager update on the
        parameters' values at every call of the compiled function (in program order, after the
        computation that makes them). On the CPU the callback gets the arrays themselves and the
        kernel reads their buffers (no copy). On a GPU a host callback would copy the model to
        the host at every step, so it is refused: that needs an XLA FFI custom call."""
        from jax.experimental import io_callback

        if not self._on_cpu:
            raise NotImplementedError("fastema.jax.EMA.update() inside jax.jit runs on the CPU only: on a GPU a "
                                      "host callback would copy every parameter to the host at each step. Call "
                                      "update() on the parameters the jitted step returns.")
        if step is not None and not isinstance(step, jax.core.Tracer):
            check_step(step)                        # eager's refusal of a concrete step, when traced
        elif step is not None and (jnp.dtype(step.dtype).kind not in "iu" or step.shape != ()):
            raise ValueError(f"step must be an integer scalar, got a traced {jnp.dtype(step.dtype).name}"
                             f"{list(step.shape)}; pass the training step as a jnp.int32 scalar")
        # what the eager update would refuse in the callback, refused now (JAX shows a callback's error as
        # its own INTERNAL one)
        for nm, x, (shape, dtype, _) in zip(self.names, self._leaves(params), self._specs):
            self._refuse_other(nm, x if isinstance(x, jax.Array) else jnp.asarray(x), shape, dtype)
        wide = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32  # type: ignore[attr-defined]
        # "no step" is a flag of its own: a traced step's value, negative too, is eager's to check
        io_callback(self._from_callback, None, params, jnp.asarray(0 if step is None else step, wide),
                    jnp.asarray(step is not None), ordered=True)

    def _from_callback(self, params, step, given) -> None:
        self.update(params, int(step) if bool(given) else None)

    def _leaves(self, params) -> list:
        """The leaves of ``params``; ValueError if its structure is not the EMA's."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self._treedef:
            names = _flatten(params)[0]
            missing = sorted(set(self.names) - set(names))[:5]
            extra = sorted(set(names) - set(self.names))[:5]
            raise ValueError(f"params does not have the structure the EMA was made for (missing {missing}, "
                             f"unexpected {extra}; expected {self._treedef}); make a new EMA for a new model. "
                             f"Nothing was updated.")
        return leaves

    @staticmethod
    def _refuse_other(nm: str, x, shape, dtype) -> None:
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(f"leaf {nm} was {dtype}{list(shape)} when the EMA was made and is now "
                             f"{x.dtype}{list(x.shape)}; make a new EMA after changing the model. "
                             f"Nothing was updated.")

    def _match(self, params) -> list:
        leaves = self._leaves(params)
        for k, (nm, x, (shape, dtype, sharding)) in enumerate(zip(self.names, leaves, self._specs)):
            if type(x) is not self._array_type:
                x = leaves[k] = self._check_leaf(nm, x)
            self._refuse_other(nm, x, shape, dtype)
            if x.sharding is not sharding and x.sharding is not self._taken[k]:
                if x.sharding != sharding and not x.sharding.is_equivalent_to(sharding, len(shape)):
                    raise ValueError(f"leaf {nm} was on {sharding} when the EMA was made and is now on "
                                     f"{x.sharding}; make a new EMA after moving the model. Nothing was updated.")
                self._taken[k] = x.sharding                # the same devices and layout: asked once a new object
        return leaves

    def shadow(self, row: int = 0, *, allow_nonfinite: bool | None = None):
        """The average as a new pytree: the structure, shapes, dtypes and shardings of ``params``.

        Floating leaves are copies of the shadow, rounded to their dtype; other leaves are
        copies of the values of the last ``update()`` (so donating what this returns to a jitted
        step deletes nothing the EMA keeps). An average holding inf or NaN is refused, naming its
        leaves, unless allowed (``allow_nonfinite``, None: :attr:`allow_nonfinite`); see
        :meth:`repair_nonfinite`.
        """
        self._core.check_row(row)
        if not self._on_cpu:
            # JAX imports the shadow through its CUDA array interface and reads it on its own
            # stream: let fastema's launches (legacy default stream) finish first. An
            # evaluation-time read, not a per-step one.
            from numba import cuda

            cuda.default_stream().synchronize()
        self._core.refuse_nonfinite("shadow()", row, allow_nonfinite)
        out = [None if kept is None else _copy(kept[1]) for kept in self._others]
        for i in self._float:
            shape, dtype, sharding = self._specs[i]
            values = [jnp.array(self._core.view(slot, row), dtype=dtype) for slot in self._slots[i]]   # copies
            plan = self._shards[i]
            if plan is None:
                out[i] = jax.device_put(values[0], sharding)
                continue
            by_key = {key: v for (_, key), v in zip(plan, values)}
            arrays = [jax.device_put(by_key[_key(index)], device)
                      for device, index in sharding.addressable_devices_indices_map(shape).items()]
            out[i] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
        return jax.tree_util.tree_unflatten(self._treedef, out)

    def state_dict(self) -> dict:
        """Everything needed to resume: averages keyed by leaf path (NumPy copies, shape
        ``(rows, *shape)``), counters and settings (:meth:`fastema.average.Average.state_dict`),
        and under ``"kept"`` the leaves that are not averaged (integer counters: NumPy copies of
        their values at the last update, what :meth:`shadow` returns for them)."""
        kept = {self.names[i]: np.asarray(self._others[i][1]) for i in self._kept()}
        return {**self._core.state_dict(), "kept": kept}

    def _kept(self) -> list[int]:
        """The leaves a state keeps under ``"kept"``: those not averaged, but typed PRNG keys
        (``jax.random.key``: no NumPy array holds one; a load leaves them as they are)."""
        key = jax.dtypes.prng_key
        return [i for i, k in enumerate(self._others)
                if k is not None and not jax.dtypes.issubdtype(self._specs[i][1], key)]

    def load_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing if anything is
        off. An average holding inf or NaN is refused, naming its leaves, unless allowed
        (``allow_nonfinite``, None: :attr:`allow_nonfinite`): then loaded with a warning, for
        :meth:`repair_nonfinite`. The leaves that are not averaged take the state's ``"kept"``
        values (a state without them, written before they were kept, leaves them as they are)."""
        kept = state.get("kept") if isinstance(state, dict) else None
        others = self._others if kept is None else self._kept_others(kept)
        self._core.load_state_dict(state, allow_nonfinite)
        self._others = others

    def _kept_others(self, kept) -> list:
        """The leaves that are not averaged, as :meth:`_keep_others` holds them, from a state's
        ``"kept"`` (``leaf path -> array`` of each one's shape and dtype); refused, naming what is
        off, before anything is loaded."""
        mine = self._kept()
        names = [self.names[i] for i in mine]
        if not isinstance(kept, dict) or sorted(kept) != sorted(names):
            held = sorted(kept) if isinstance(kept, dict) else kept
            refuse_load("fastema.jax.EMA", [f"'kept' holds {held!r}, this EMA's leaves that are "
                                            f"not averaged are {names}"])
        out: list = list(self._others)                 # typed keys: as they are
        for i in mine:
            shape, dtype, sharding = self._specs[i]
            a = np.asarray(kept[self.names[i]])
            if a.shape != tuple(shape) or a.dtype != dtype:
                refuse_load("fastema.jax.EMA", [f"'kept' {self.names[i]} is {a.dtype}"
                                                f"{list(a.shape)}, expected {np.dtype(dtype)}"
                                                f"{list(shape)}"])
            x = jax.device_put(a, sharding)
            out[i] = (_ref(x), x)              # a reference that only this copy matches
        return out

    def repair_nonfinite(self, params) -> list[str]:
        """Reset every averaged leaf (and row) holding inf or NaN from ``params`` (the live
        parameters, a pytree like the one the EMA was made with), rounded to the shadow's dtype;
        every other leaf and row left bit for bit. Returns the names reset (a sharded leaf's
        shards by ``#shard``). Not inside ``jax.jit``."""
        leaves = self._match(params)
        live = [a for i in self._float for a in self._sources_of(i, leaves[i])]
        return self._core.repair_nonfinite(live)

    def __repr__(self) -> str:
        return (f"fastema.jax.EMA(decay={self.decay}, updates={self.updates}, leaves={len(self._others)}, "
                f"shadow={self._core.shadow!r})")


EMA.__doc__ = document(EMA.__doc__)
