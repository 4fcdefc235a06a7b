"""``fastema.tensorflow.EMA``: an EMA of ``tf.Variable`` objects in fastema's flat shadow, as a ``tf.Module``.

TensorFlow tensors cannot be written in place, so the average lives in buffers fastema
owns. ``update()`` reads every variable's current value (on the CPU the tensor a variable
read returns is the variable's own buffer: no copy) and makes one kernel launch per
(device, dtype) group; inside a ``tf.function`` it is an op of the graph, run in program
order. The variables are written only by ``assign``: when the average is swapped in for
evaluation, and back. The shadow goes into ``tf.train.Checkpoint``, ``CheckpointManager``
and SavedModel (see :mod:`fastema.tensorflow._checkpoint`).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import tensorflow as tf

from .._backends import to_host
from ..average import HOST_ONLY_REFUSALS, Average, EMAOptions, Face, FaceMemory, FaceNonFinite, ModelSwap
from . import _checkpoint

__all__ = ["EMA", "REFUSED"]

_FLOATS = (tf.float32, tf.bfloat16, tf.float16, tf.float64)
_NO_STEP = -(2 ** 63)                  # the graph op's step when update() was given none


def _as_tf_variable(v, what: str, owner: str = "fastema.tensorflow.EMA"):
    """``v`` (a ``tf.Variable``, or a Keras variable on the TensorFlow backend) as ``(tf.Variable, name)``;
    anything else is refused naming the argument (``what``: ``"variables[3]"``) and the class refusing it."""
    inner = getattr(v, "value", None)                 # a keras.Variable on the TensorFlow backend
    if type(v).__module__.startswith("keras") and isinstance(inner, tf.Variable):
        return inner, getattr(v, "path", None) or v.name
    if isinstance(v, tf.Variable):
        return v, v.name
    raise TypeError(f"{what} is a {_kind(v)}; {owner} averages tf.Variables (e.g. model.trainable_variables "
                    f"on the TensorFlow backend)")


def _kind(v) -> str:
    """``v``'s class, with its module: ``tensorflow.python.framework.ops.EagerTensor``."""
    return f"{type(v).__module__}.{type(v).__name__}"


def _weak(method, *bound) -> Callable:
    """``method`` (a bound method) called through a weak reference to its object, with ``bound``
    first: the Python body of a ``tf.numpy_function`` op. TensorFlow keeps an op's function for as
    long as the outermost graph lives (for ops traced from eager code: the eager context's, for
    good), so a bound method there would keep the EMA, its shadow and the model's variables alive
    after the last reference to it is gone."""
    owner, func, cls = weakref.ref(method.__self__), method.__func__, type(method.__self__)
    module = cls.__module__[:-len(".ema")] if cls.__module__.endswith(".ema") else cls.__module__

    def body(*args):
        obj = owner()
        if obj is None:
            raise RuntimeError(f"the {module}.{cls.__name__} this graph op uses was deleted; keep a reference to "
                               f"it for as long as the tf.function that uses it runs")
        return func(obj, *bound, *args)
    return body


def _in_replica_context() -> bool:
    """Inside ``strategy.run`` of a distribution strategy: a replica context, where the step function
    runs (and is traced) once per replica."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def _local(value):
    """One replica's ``value`` in a merge_call's function (the same for every replica: a step, an int)."""
    return value if value is None else tf.distribute.get_strategy().experimental_local_results(value)[0]


#: What fastema.tensorflow.EMA refuses, and why: every other option is taken.
REFUSED = HOST_ONLY_REFUSALS


class _Runtime:
    """What the EMA keeps out of TensorFlow's tracking: the averaged variables (the model's, not
    the EMA's: a checkpoint of the EMA must not carry them), the compiled functions (a
    SavedModel must not export them) and the values kept while swapped."""

    def __init__(self, variables: list):
        self.variables = variables
        self.read: Any = None               # tf.function: every variable's value in one call
        self.apply: Any = None              # tf.function: the update as a graph op (CPU variables)
        self.raw: list | None = None        # the variables' own values while swapped
        self.error: BaseException | None = None     # the exception the last graph update raised


class EMA(tf.Module, Face, FaceMemory, FaceNonFinite):
    """Exponential moving average of ``tf.Variable`` objects, a ``tf.Module``.

    Args:
        variables: the variables (``model.trainable_variables``, a ``tf.Module``'s
            ``trainable_variables``, or keras Variables on the TensorFlow backend), or a
            ``tf.Module`` / Keras model, whose trainable variables are taken.
        decay: the decay, default 0.9999; a list keeps up to 8 averages in one pass.
        name: the module's name (``tf.Module``), default ``"ema"``.
        **options: the options of every fastema EMA (:class:`fastema.average.EMAOptions`:
            timed schedules, BEMA, warm-ups, ``update_every``, the shadow's dtype and rounding,
            the non-finite guard); :data:`REFUSED` names the ones this face refuses, and why.

    Checkpoints, the TensorFlow way: ``tf.train.Checkpoint(ema=ema)`` (or a ``CheckpointManager``,
    or a module holding the EMA given to ``tf.saved_model.save``) saves every shadow row, the
    update count and the plan, and ``restore`` puts them back bit for bit. A checkpoint of other
    variables (names, shapes, shadow dtypes, decays) is refused naming the difference, with
    nothing changed, also when TensorFlow restores it later (a deferred restore, when the EMA is
    attached after ``restore()``). The EMA's checkpoint never holds the model's variables: save
    them next to it (``tf.train.Checkpoint(model=model, ema=ema)``).
    """

    _format = "fastema.tensorflow.EMA"

    def __init__(self, variables, decay: float | Sequence[float] | None = None, *, name: str | None = None,
                 **options):
        _no_tf1_graph("fastema.tensorflow.EMA()")
        opts = EMAOptions.of(decay, **options)
        opts.refuse("fastema.tensorflow.EMA", REFUSED)
        if hasattr(variables, "trainable_variables") and not isinstance(variables, tf.Variable):
            variables = variables.trainable_variables
        pairs = [_as_tf_variable(v, f"variables[{i}]") for i, v in enumerate(variables)]
        if not pairs:
            raise ValueError("no variables to average")
        bad = [n for (v, n) in pairs if v.dtype not in _FLOATS]
        if bad:
            raise TypeError(f"variables {bad[:5]} are not float32/bfloat16/float16; leave them out "
                            f"(e.g. pass model.trainable_variables)")
        super().__init__(name=name or "ema")
        rt = _Runtime([v for v, _ in pairs])
        with tf.init_scope():               # made inside a tf.function: from the values now, as TF's own EMA
            first = [v.value() for v in rt.variables]
        # past tf.Module's attribute tracking: lists stay plain lists, and the model's variables
        # stay out of the EMA's checkpoint
        _plain(self, _rt=rt, names=_unique([n for _, n in pairs]), _specs=[(tuple(t.shape), t.dtype) for t in first],
               _np_specs=[(tuple(t.shape), np.dtype(t.dtype.as_numpy_dtype)) for t in first])
        self._core = Average.of_sources(opts, dict(zip(self.names, first)), [shape for shape, _ in self._specs],
                                        self._format)
        self.shadow_dtype = opts.shadow_dtype
        self._on_cpu = all(g.device == "cpu" for g in self._core.shadow.layout.groups)
        if self._on_cpu:                    # one graph call reads every variable and runs the update
            rt.apply = tf.function(self._graph_update, input_signature=[tf.TensorSpec([], tf.int64)])
        else:                               # one graph call reads every variable, through DLPack after
            rt.read = tf.function(lambda: [v.value() for v in rt.variables])
        self._swap = ModelSwap(self._exchange, "the average is swapped into the variables; swap() back first")

    @property
    def variables(self) -> list:
        """The averaged variables, in order: the model's own (``tf.Module.variables`` would be the
        EMA's, and it owns none: its shadow is fastema's flat buffers, checkpointed as tensors)."""
        return self._rt.variables

    @property
    def trainable_variables(self) -> list:
        """Empty: the EMA trains nothing (an optimizer given the module's trainable variables
        leaves the average alone)."""
        return []

    # ------------------------------------------------------------ operations

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def update(self, step: int | None = None) -> tf.Tensor | None:
        """Fold the variables' current values into the average (call after the optimizer step).

        Eagerly it updates and returns None. Inside a ``tf.function`` (the training step) it adds
        the update to the graph, after the step's variable writes (TensorFlow orders stateful ops
        in program order), and returns it as an op: an int64 tensor, the update count after it;
        ``step`` may then be a tensor. The graph op runs fastema's kernel on the host, on the
        variables' own buffers (CPU variables; with variables on a GPU call ``update()`` eagerly,
        after the step). ``jit_compile=True`` functions cannot hold it (XLA compiles no Python).

        Inside ``strategy.run`` of a distribution strategy (``MirroredStrategy``: once per replica)
        it updates once per step, from the cross-replica context (a ``merge_call``), as
        ``tf.train.ExponentialMovingAverage`` does; it reads the variables there (a mirrored
        variable's replicas hold the same values), and every replica gets the count.
        """
        _no_tf1_graph("fastema.tensorflow.EMA.update()")
        if _in_replica_context():
            return tf.distribute.get_replica_context().merge_call(lambda _, s: self.update(_local(s)), args=(step,))
        if not tf.executing_eagerly():
            return self._traced_update(step)
        self._not_swapped("update()")
        if not self._on_cpu:
            self._core.update(step, self._rt.read)    # FlatShadow checks dtypes, shapes and devices before any write
            return None
        if step is not None and not isinstance(step, int) and hasattr(step, "numpy"):
            step = int(_integer_scalar(step).numpy())  # a tensor or a variable (optimizer.iterations): a host read
        self.plan.next(step)                          # checks step: a bad one raises here, as itself
        self._run(lambda: self._rt.apply(tf.constant(_NO_STEP if step is None else step, tf.int64)))
        return None

    @tf.autograph.experimental.do_not_convert      # graph code as written (AutoGraph would rewrite it): the
    def _traced_update(self, step):                # eager update() pays no wrapper
        if not self._on_cpu:
            devices = sorted({g.device for g in self._core.shadow.layout.groups})
            raise RuntimeError(f"fastema.tensorflow.EMA.update() inside a tf.function runs on the host and reads "
                               f"CPU variables; these are on {devices}. Call ema.update() eagerly after the "
                               f"tf.function step instead.")
        step = tf.constant(_NO_STEP, tf.int64) if step is None else tf.cast(_integer_scalar(step), tf.int64)
        return self._graph_update(step)

    def _graph_update(self, step):
        values = [v.value() for v in self._rt.variables]     # read after the step's writes (program order)
        out = tf.numpy_function(_weak(self._host_update), [step, *values], tf.int64, stateful=True,
                                name="fastema_update")
        out.set_shape([])
        return out

    def _host_update(self, step, *arrays) -> np.int64:
        """The graph op's body: the arrays are the variables' buffers (no copy on the CPU)."""
        try:
            if np.ndim(step) != 0:                  # a step of unknown rank, traced: its value's
                raise ValueError(f"step must be an int or an integer scalar tensor, not one of shape {np.shape(step)}")
            n = int(step)
            # a 0-d variable comes as a NumPy scalar, whose __array_interface__ is a temporary's (freed
            # at once): every source as an ndarray, kept by the shadow (adopt) until the next update
            arrays = tuple(np.asarray(a) for a in arrays)

            def read():
                got = [(a.shape, a.dtype) for a in arrays]
                if got != self._np_specs:
                    name, (s, d), (s0, d0) = next(x for x in zip(self.names, got, self._np_specs) if x[1] != x[2])
                    raise ValueError(f"variable {name!r} was {d0} {s0} when the EMA was made and is now {d} {s} (an "
                                     f"assign of another shape?); make a new EMA after changing the model, or "
                                     f"change it back. Nothing was updated.")
                live = list(arrays)
                self._core.shadow.adopt(live, [a.__array_interface__["data"][0] for a in live])
                return None

            self._not_swapped("update()")
            self._core.update(None if n == _NO_STEP else n, read)     # a negative step is refused by name
            return np.int64(self.updates)
        except BaseException as err:
            self._rt.error = err
            raise

    def _run(self, fn):
        """Run a graph call of the update; raise what the Python inside it raised, as itself."""
        self._rt.error = None
        try:
            return fn()
        except tf.errors.OpError:
            err, self._rt.error = self._rt.error, None
            if err is not None:
                raise err from None
            raise

    def averages(self, row: int = 0, *, allow_nonfinite: bool | None = None) -> list:
        """The average as new tensors in the variables' dtypes (rounded to nearest), in variable
        order. An average holding inf or NaN is refused, naming its variables, unless allowed
        (``allow_nonfinite``, None: :attr:`allow_nonfinite`; see :meth:`repair_nonfinite`)."""
        _eager("averages()")
        self._core.check_row(row)
        self._core.refuse_nonfinite("averages()", row, allow_nonfinite)
        return self._averages(row)

    def _averages(self, row: int) -> list:
        out = []
        for i, (shape, dtype) in enumerate(self._specs):
            with tf.device(self._rt.variables[i].device):          # to_host copies: TF may alias NumPy memory
                out.append(tf.cast(tf.constant(to_host(self._core.view(i, row))), dtype))
        return out

    def swap(self, row: int = 0, *, allow_nonfinite: bool | None = None) -> None:
        """Assign average ``row`` to the variables; call again to put their own values back.

        The variables' values are kept as TensorFlow tensors while swapped (a variable read
        is a snapshot: later assigns do not change it), so the swap back is bit for bit. An
        average holding inf or NaN is not swapped in unless allowed (as :meth:`averages`).
        """
        _eager("swap()")
        self._checked_in("swap()", row, allow_nonfinite)
        self._swap.swap(row)

    def _checked_in(self, what: str, row: int, allow: bool | None) -> None:
        """A swap in of ``row`` refused for inf or NaN (nothing while an average is in)."""
        if not self._swap.swapped:
            self._core.check_row(row)
            self._core.refuse_nonfinite(what, row, allow)

    def _exchange(self, row: int, into_model: bool) -> None:
        if into_model:
            averages = self._averages(row)
            self._rt.raw = [v.value() for v in self._rt.variables]
            for v, a in zip(self._rt.variables, averages):
                v.assign(a)
        else:
            for v, raw in zip(self._rt.variables, self._rt.raw or ()):
                v.assign(raw)
            self._rt.raw = None

    def average_parameters(self, row: int = 0, *,
                           allow_nonfinite: bool | None = None) -> ContextManager[None]:
        """``with ema.average_parameters(): evaluate()``: the average in, the variables' values back on exit.
        Re-entrant: inside a block (or after ``swap()``) of the same row it leaves the weights in.
        An average holding inf or NaN is refused as by :meth:`swap`."""
        _eager("average_parameters()")
        self._checked_in("average_parameters()", row, allow_nonfinite)
        return self._swap.block(row)

    def copy_to(self, row: int = 0, *, allow_nonfinite: bool | None = None) -> None:
        """Assign average ``row`` to the variables for good (e.g. when training ends); refused for
        inf or NaN as :meth:`swap`."""
        _eager("copy_to()")
        self._not_swapped("copy_to()")
        self._core.check_row(row)
        self._core.refuse_nonfinite("copy_to()", row, allow_nonfinite)
        for v, a in zip(self._rt.variables, self._averages(row)):
            v.assign(a)

    def repair_nonfinite(self) -> list[str]:
        """Reset every averaged variable (and row) holding inf or NaN from the variable's value now
        (rounded to the shadow's dtype), every other one left bit for bit; returns the names reset.
        Refused while an average is swapped in (the variables hold it then)."""
        _eager("repair_nonfinite()")
        self._not_swapped("repair_nonfinite()")
        return self._core.repair_nonfinite([v.numpy() for v in self._rt.variables])

    def _not_swapped(self, what: str) -> None:
        self._swap.refuse(what)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume: averages keyed by variable name (NumPy copies, shape
        ``(rows, *shape)``), counters and settings (:meth:`fastema.average.Average.state_dict`)."""
        _eager("state_dict()")
        self._not_swapped("state_dict()")
        return self._core.state_dict()

    def load_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing if anything is
        off. An average holding inf or NaN is refused unless allowed (``allow_nonfinite``, None:
        :attr:`allow_nonfinite`, which a checkpoint's restore reads): then loaded with a warning,
        for :meth:`repair_nonfinite`."""
        _eager("load_state_dict()")
        self._not_swapped("load_state_dict()")
        self._core.load_state_dict(state, allow_nonfinite)

    def _serialize_to_tensors(self) -> dict:
        """TensorFlow's checkpoint hook: the ``state`` JSON and the ``shadow`` bytes
        (:mod:`fastema.tensorflow._checkpoint`), read when the checkpoint is written."""
        if tf.executing_eagerly():
            self._not_swapped("saving or restoring a checkpoint")   # (a restore asks this first too)
            state, blob = _checkpoint.pack(self._core)
            with tf.device("/cpu:0"):
                return {_checkpoint.STATE: tf.constant(state), _checkpoint.SHADOW: tf.constant(blob)}
        if _checkpoint.savedmodel_trace():
            return _checkpoint.traced_placeholder(self._core)
        # traced in a tf.function that writes a checkpoint: read when it runs, never baked into the graph
        state = tf.numpy_function(_weak(self._packed, 0), [], tf.string, stateful=True)
        blob = tf.numpy_function(_weak(self._packed, 1), [], tf.uint8, stateful=True)
        return {_checkpoint.STATE: tf.reshape(state, []), _checkpoint.SHADOW: tf.reshape(blob, [-1])}

    def _packed(self, part: int):
        return _checkpoint.pack(self._core)[part]

    def _restore_from_tensors(self, restored_tensors: dict):
        """TensorFlow's restore hook: everything is checked before anything is written; a checkpoint
        of other variables raises ValueError naming them, and the EMA stays as it was."""
        state, blob = restored_tensors[_checkpoint.STATE], restored_tensors[_checkpoint.SHADOW]
        if not tf.executing_eagerly():
            # a traced restore (a SavedModel's restore function, or TF1 graph mode): the EMA restores
            # eagerly only. Returning no op keeps tf.saved_model.load of a model holding it working.
            return tf.no_op()
        self.load_state_dict(_checkpoint.unpack(self._core, state.numpy(), blob.numpy()))
        return None

    def _copy_trackable_to_cpu(self, object_map) -> None:
        """Async checkpoints (``CheckpointOptions(experimental_enable_async_checkpoint=True)``): the
        shadow lives on the host already; the copy saves this EMA as it is when copied."""
        object_map[self] = _Snapshot(self)

    def __repr__(self) -> str:
        return f"fastema.tensorflow.EMA(decay={self.decay}, updates={self.updates}, shadow={self._core.shadow!r})"


class _Snapshot(tf.__internal__.tracking.Trackable):   # type: ignore[name-defined]
    """An async checkpoint's copy of an EMA: its two tensors as they were when copied."""

    def __init__(self, ema: EMA):
        state, blob = _checkpoint.pack(ema._core)
        self._tensors = {_checkpoint.STATE: tf.constant(state), _checkpoint.SHADOW: tf.constant(blob)}

    def _serialize_to_tensors(self) -> dict:
        return dict(self._tensors)


def _no_tf1_graph(what: str) -> None:
    """Refuse ``what`` where a TF1 graph is built (``tf.compat.v1``: a ``tf.Graph().as_default()`` block,
    or eager execution disabled). A ``tf.function`` is traced into a graph too (``executing_eagerly()``
    is False there), but one whose outermost context is eager: ``init_scope`` tells the two apart."""
    if tf.executing_eagerly():
        return
    with tf.init_scope():
        tf1 = not tf.executing_eagerly()
    if tf1:
        raise RuntimeError(f"{what} runs eagerly or inside a tf.function (TensorFlow 2); this is a TF1 graph "
                           f"(tf.compat.v1: a tf.Graph().as_default() block, or eager execution disabled), which "
                           f"fastema builds no op into: call it outside the graph block. Nothing was changed.")


def _eager(what: str) -> None:
    """Refuse ``what`` inside a ``tf.function``: it would read the average once, when traced."""
    _no_tf1_graph(f"fastema.tensorflow.EMA.{what}")
    if not tf.executing_eagerly():
        raise RuntimeError(f"fastema.tensorflow.EMA.{what} runs eagerly (in a tf.function it would use the average "
                           f"as traced at every call): call it outside the tf.function; update() works inside")


def _plain(module: tf.Module, **attributes) -> None:
    """Set attributes of ``module`` past ``tf.Module``'s tracking (no list wrappers, no dependencies)."""
    for k, v in attributes.items():
        object.__setattr__(module, k, v)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen[n] = seen.get(n, -1) + 1
        out.append(n if k == 0 else f"{n}#{k}")
    return out


def _integer_scalar(step):
    """``step`` as a tensor, or ValueError where it is no integer scalar (a float one was truncated)."""
    if not (step := tf.convert_to_tensor(step)).dtype.is_integer or step.shape.rank not in (0, None):
        raise ValueError(f"step must be an int or an integer scalar tensor, not a {step.dtype.name} {step.shape}")
    return step                                  # (of unknown rank: the graph op checks its value)
