"""A drop-in for ``tf.train.ExponentialMovingAverage`` on fastema's flat shadow.

:class:`ExponentialMovingAverage` has TensorFlow's API and behaviour: ``apply(var_list)``
creates the averages of new variables (from their values) and updates them,
``decay = min(decay, (1 + num_updates) / (10 + num_updates))`` when ``num_updates`` is given
(a number, a tensor or a variable read at each ``apply``, computed in float32 as TensorFlow
does), ``average(var)``, ``average_name(var)`` and ``variables_to_restore()`` give the names
TensorFlow gives. The averages live in fastema's flat buffers, one per ``apply`` of new
variables, and each ``apply`` is one graph op that runs one kernel launch on the variables'
own buffers (no copy), eagerly or inside a ``tf.function``.

Deliberate differences (documented in the TensorFlow guide):

- ``average(var)`` returns an :class:`AverageVariable`, not a ``tf.Variable``: it reads
  (``value()``, ``numpy()``, ``tf.convert_to_tensor``, arithmetic), assigns and checkpoints
  (``tf.train.Checkpoint(averaged_weights=[...])``, under a variable's own key, so a
  checkpoint of TensorFlow's averages restores into it and back) like one.
- The variables must be on the CPU (the kernel runs on the host, on their buffers): for
  variables on a GPU use :class:`fastema.tensorflow.EMA`.
- ``zero_debias`` is kept and, as in TensorFlow 2, changes nothing: TensorFlow debiases only
  averages of tensors, which it refuses when running eagerly, and so does this class.
- ``apply`` runs eagerly or inside a ``tf.function``: in a TF1 graph (``tf.compat.v1``) it is
  refused by name.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from .._checkpoint_format import load_refused
from ..flat import FlatShadow
from ..ops import ema_update_
from ._checkpoint import savedmodel_trace
from .ema import _as_tf_variable, _in_replica_context, _kind, _no_tf1_graph, _weak

__all__ = ["AverageVariable", "ExponentialMovingAverage"]

_FLOATS = (tf.bfloat16, tf.float16, tf.float32, tf.float64)
_VALUE_KEY = "VARIABLE_VALUE"          # a variable's key in TensorFlow's checkpoints
_SELF = "fastema.tensorflow.compat.ExponentialMovingAverage"      # who refuses, in refusals


def _variable(v, what: str):
    """``v`` as a ``tf.Variable``, or refused naming ``what`` (``"var_list[2]"``, ``"var"``) and this class;
    a tensor in TensorFlow's words for it (``tf.train.ExponentialMovingAverage.apply``'s)."""
    if isinstance(v, tf.Tensor) and not isinstance(v, tf.Variable):
        raise TypeError(f"{_SELF} does not support non-Variable tensors when eager execution is enabled ({what} "
                        f"is a {_kind(v)}); pass the tf.Variables themselves.")
    return _as_tf_variable(v, what, owner=_SELF)[0]


class _Group:
    """The averages of the variables one ``apply`` saw first: one flat shadow in their own dtypes."""

    def __init__(self, variables: list, values: list):
        self.variables = variables
        self.specs = [(tuple(t.shape), np.dtype(t.dtype.as_numpy_dtype)) for t in values]
        self.shadow = FlatShadow(list(values), rows=1, dtype="same")
        for g in self.shadow.layout.groups:
            if g.device != "cpu":
                raise ValueError(f"fastema.tensorflow.compat.ExponentialMovingAverage averages CPU variables (its "
                                 f"kernel runs on the host, on their buffers); these are on {g.device}. Use "
                                 f"fastema.tensorflow.EMA for variables on a GPU.")


class _Plan:
    """What one ``apply(var_list)`` does, by group: whole groups in one launch, single slots otherwise."""

    def __init__(self, whole: list, single: list):
        self.whole = whole              # (group, [positions in var_list, in the group's order])
        self.single = single            # (group, slot, position in var_list)


class ExponentialMovingAverage:
    """``tf.train.ExponentialMovingAverage`` on fastema's kernels.

    Args:
        decay: the decay: a float, or a scalar tensor or variable (read at each ``apply``).
        num_updates: optional count of updates (a number, tensor or variable, e.g. the
            optimizer's ``iterations``); the decay used is then
            ``min(decay, (1 + num_updates) / (10 + num_updates))``.
        zero_debias: kept for TensorFlow's API; as in TensorFlow 2 it changes nothing for
            variables (the only thing ``apply`` takes when running eagerly).
        name: the prefix of the averages' names (``var/ExponentialMovingAverage``).
    """

    def __init__(self, decay, num_updates=None, zero_debias: bool = False, name: str = "ExponentialMovingAverage"):
        self._decay = decay
        self._num_updates = num_updates
        self._zero_debias = zero_debias
        self._name = name
        self._groups: list[_Group] = []
        self._where: dict[int, tuple[_Group, int]] = {}      # id(variable) -> (group, slot)
        self._averages: dict[int, AverageVariable] = {}
        self._applied: list = []                              # the averaged variables, in order
        self._plans: dict[tuple, _Plan] = {}
        self._functions: dict[tuple, Any] = {}
        self._lists: dict[tuple, list] = {}                   # key -> the variables of its apply()
        self._error: BaseException | None = None

    @property
    def name(self) -> str:
        """The name of this ExponentialMovingAverage object."""
        return self._name

    # ------------------------------------------------------------ apply

    def apply(self, var_list: Sequence | None = None):
        """Create the averages of variables seen for the first time (from their values) and update
        the averages of ``var_list`` with its current values.

        Args:
            var_list: ``tf.Variable`` objects (or Keras variables on the TensorFlow backend) of
                dtype bfloat16, float16, float32 or float64; None: ``tf.compat.v1.trainable_variables()``
                as TensorFlow does (empty when running eagerly: pass the list).

        Returns:
            None when running eagerly; inside a ``tf.function``, the update as an ``Operation``
            (run in program order, after the step's writes to the variables). Inside ``strategy.run``
            of a distribution strategy it applies once per step, from the cross-replica context (a
            ``merge_call``), as TensorFlow's does.
        """
        _no_tf1_graph(f"{_SELF}.apply()")
        if _in_replica_context():
            return tf.distribute.get_replica_context().merge_call(lambda _: self.apply(var_list))
        if var_list is None:
            var_list = tf.compat.v1.trainable_variables()
        tf_vars = []
        for i, v in enumerate(var_list):
            tv = _variable(v, f"var_list[{i}]")
            if tv.dtype not in _FLOATS:
                raise TypeError(f"The variables must be half, float, or double: {tv.name}; leave the others out.")
            tf_vars.append(tv)
        if not tf_vars:
            return None if tf.executing_eagerly() else tf.no_op()
        self._add_new(tf_vars)
        key = tuple(map(id, tf_vars))
        if tf.executing_eagerly():
            fn = self._functions.get(key)
            if fn is None:
                fn = self._functions[key] = tf.function(lambda: self._op(tf_vars, key))
            self._error = None
            try:
                fn()
            except tf.errors.OpError:
                err, self._error = self._error, None
                if err is not None:
                    raise err from None
                raise
            return None
        return tf.group(self._op(tf_vars, key), name=self._name)

    def _add_new(self, tf_vars: list) -> None:
        new, seen = [], set()
        for v in tf_vars:
            if id(v) not in self._where and id(v) not in seen:
                new.append(v)
                seen.add(id(v))
        if not new:
            return
        with tf.init_scope():                       # inside a tf.function: the values now, as TensorFlow does
            values = [v.value() for v in new]
            group = _Group(new, values)
            for slot, v in enumerate(new):
                self._where[id(v)] = (group, slot)
                # named as TensorFlow's slot variables are: the scope var/ExponentialMovingAverage, made
                # unique with TensorFlow's own counters (a second average of a variable of that name: _1)
                prefix = getattr(v, "_shared_name", None) or v.name.split(":")[0]
                with tf.compat.v1.variable_scope(None, default_name=prefix + "/" + self._name) as scope:
                    name = scope.name
                self._averages[id(v)] = AverageVariable(self, group, slot, name + ":0")
        self._groups.append(group)
        self._applied += new
        self._plans.clear()

    def _decay_tensor(self):
        """The weight ``1 - decay`` as TensorFlow's ``apply`` computes it (float32 ops)."""
        decay = tf.convert_to_tensor(self._decay, dtype=tf.float32)
        if self._num_updates is not None:
            n = tf.cast(self._num_updates, tf.float32)
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        return 1.0 - decay

    def _op(self, tf_vars: list, key: tuple):
        values = [v.value() for v in tf_vars]               # after the step's writes (program order)
        self._lists[key] = tf_vars                          # (the op's body holds neither them nor this object)
        return tf.numpy_function(_weak(self._host_apply, key), [self._decay_tensor(), *values], tf.int64,
                                 stateful=True, name="fastema_apply")

    def _plan(self, key: tuple, tf_vars: list) -> _Plan:
        plan = self._plans.get(key)
        if plan is None:
            position = {id(v): p for p, v in enumerate(tf_vars)}
            whole, single = [], []
            for g in self._groups:
                ps = [position.get(id(v)) for v in g.variables]
                if all(p is not None for p in ps) and len(set(ps)) == len(ps):
                    whole.append((g, ps))
                else:
                    single += [(g, slot, p) for slot, p in enumerate(ps) if p is not None]
            done = {p for _, ps in whole for p in ps} | {p for _, _, p in single}
            single += [self._where[id(v)] + (p,) for p, v in enumerate(tf_vars) if p not in done]  # repeats
            plan = self._plans[key] = _Plan(whole, single)
        return plan

    def _host_apply(self, key: tuple, w, *values) -> np.int64:
        """The graph op's body: ``values`` are the variables' own buffers (no copy on the CPU)."""
        try:
            tf_vars = self._lists[key]
            # a 0-d variable comes as a NumPy scalar, whose __array_interface__ is a temporary's (freed
            # at once): every source as an ndarray, kept by the shadow (adopt) until the next apply
            arrays = [np.asarray(a) for a in values]
            plan = self._plan(key, tf_vars)
            weight = float(w)
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"the decay must be in [0, 1], got {1.0 - weight!r}; pass a decay in [0, 1]")
            checked = []
            for g, ps in plan.whole:                        # every check before any write
                live = [arrays[p] for p in ps]
                _check(g, range(len(ps)), live, tf_vars, ps)
                checked.append((g, live))
            for g, slot, p in plan.single:
                _check(g, [slot], [arrays[p]], tf_vars, [p])
            for g, live in checked:
                g.shadow.adopt(live, [a.__array_interface__["data"][0] for a in live])
                g.shadow.update(weight=weight)
            for g, slot, p in plan.single:                  # part of a group: the same kernel, one slot
                ema_update_(g.shadow.view(slot), arrays[p], weight=weight)
            return np.int64(0)
        except BaseException as err:
            self._error = err
            raise

    # ------------------------------------------------------------ names and averages

    def average(self, var) -> "AverageVariable | None":
        """The :class:`AverageVariable` holding the average of ``var``, or None if ``apply`` has not seen it."""
        return self._averages.get(id(_variable(var, "var")))

    def average_name(self, var) -> str:
        """The name of the average of ``var`` (``var``'s name, ``/``, this object's :attr:`name`), whether or
        not ``apply`` has seen it: the name a name-based checkpoint (``tf.compat.v1.train.Saver``) keeps it under."""
        tv = _variable(var, "var")
        avg = self._averages.get(id(tv))
        if avg is not None:
            return avg.name[:-len(":0")]
        return tf.compat.v1.get_default_graph().unique_name(tv.name[:-len(":0")] + "/" + self._name,
                                                            mark_as_used=False)

    def variables_to_restore(self, moving_avg_variables: Sequence | None = None) -> dict:
        """A map of names to variables for restoring the averages into the variables by name (e.g.
        ``tf.compat.v1.train.Saver(ema.variables_to_restore())`` at evaluation): the average's name for
        each of ``moving_avg_variables`` (default: the variables ``apply`` has seen, and
        ``tf.compat.v1.trainable_variables()``), the variable's own name for every other global variable."""
        if moving_avg_variables is None:
            moving_avg_variables = list(tf.compat.v1.trainable_variables()) + list(self._applied)
        name_map = {}
        for v in moving_avg_variables:
            name_map[self.average_name(v)] = v
        names = {v.name for v in moving_avg_variables}
        for v in tf.compat.v1.global_variables():
            if v.name not in names and v.op.name not in name_map:
                name_map[v.op.name] = v
        return name_map


def _check(g: _Group, slots, arrays, tf_vars, positions) -> None:
    for slot, a, p in zip(slots, arrays, positions):
        if (a.shape, a.dtype) != g.specs[slot]:
            shape, dtype = g.specs[slot]
            raise ValueError(f"variable {tf_vars[p].name!r} was {dtype} {shape} when its average was made and is "
                             f"now {a.dtype} {a.shape}; assign it a value of its shape. Nothing was updated.")


class AverageVariable(tf.__internal__.tracking.Trackable):   # type: ignore[name-defined]
    """What :meth:`ExponentialMovingAverage.average` returns: the average of one variable, a view of
    fastema's shadow that reads, assigns and checkpoints like the ``tf.Variable`` TensorFlow's class
    returns (it is not one: ``isinstance(avg, tf.Variable)`` is False).

    ``value()`` / ``read_value()`` / ``numpy()`` / ``tf.convert_to_tensor(avg)`` (and so ``var.assign(avg)``
    and arithmetic) read it as a new tensor; ``assign(value)`` writes it. In a checkpoint it is saved
    under a variable's own key (``.ATTRIBUTES/VARIABLE_VALUE``): ``tf.train.Checkpoint(averaged_weights=
    [ema.average(v) for v in variables])`` is read by the same checkpoint of TensorFlow's averages, and
    the other way round. A value of another shape or dtype is refused, with nothing changed.
    """

    def __init__(self, ema: ExponentialMovingAverage, group: _Group, slot: int, name: str):
        self._ema, self._group, self._slot, self._name = ema, group, slot, name
        shape, dtype = group.specs[slot]
        self._shape, self._dtype = tf.TensorShape(shape), tf.as_dtype(dtype)

    @property
    def name(self) -> str:
        """``average_name(var) + ":0"``, as TensorFlow names its average variables."""
        return self._name

    @property
    def shape(self) -> tf.TensorShape:
        return self._shape

    @property
    def dtype(self) -> tf.DType:
        return self._dtype

    @property
    def device(self) -> str:
        return "/job:localhost/replica:0/task:0/device:CPU:0"

    @property
    def trainable(self) -> bool:
        return False

    def _host(self) -> np.ndarray:
        return self._group.shadow.view(self._slot)

    def numpy(self) -> np.ndarray:
        """A NumPy copy of the average."""
        return np.array(self._host())

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def value(self) -> tf.Tensor:
        """The average as a new tensor (inside a ``tf.function``: read when the graph runs, in program order)."""
        if tf.executing_eagerly():
            return tf.constant(self.numpy())
        out = tf.numpy_function(_weak(self.numpy), [], self._dtype, stateful=True, name="fastema_average")
        out.set_shape(self._shape)
        return out

    read_value = value

    def assign(self, value, read_value: bool = True):
        """Write ``value`` (of this shape) into the average (eagerly; inside a ``tf.function``, when the graph runs)."""
        if not tf.executing_eagerly():
            op = tf.numpy_function(_weak(self._write), [tf.convert_to_tensor(value, self._dtype)], tf.int64,
                                   stateful=True, name="fastema_average_assign")
            with tf.control_dependencies([op]):
                return self.value() if read_value else tf.no_op()
        self._write(np.asarray(tf.convert_to_tensor(value, self._dtype).numpy()))
        return self if read_value else None

    def _write(self, a: np.ndarray) -> np.int64:
        if tuple(a.shape) != tuple(self._shape):
            raise ValueError(f"{self._name} has shape {tuple(self._shape)}, the value {tuple(a.shape)}; assign a value "
                             f"of its shape. Nothing was written.")
        self._host()[...] = a
        return np.int64(0)

    def _serialize_to_tensors(self) -> dict:
        if not tf.executing_eagerly() and savedmodel_trace():     # runs at every load: no Python in it
            return {_VALUE_KEY: tf.zeros(self._shape, self._dtype)}
        return {_VALUE_KEY: self.value()}

    def _restore_from_tensors(self, restored_tensors: dict):
        t = restored_tensors[_VALUE_KEY]
        if not tf.executing_eagerly():
            # a traced restore (a SavedModel's restore function): the average restores eagerly only;
            # no op keeps tf.saved_model.load of a module holding it working
            return tf.no_op()
        if t.dtype != self._dtype:
            raise load_refused(f"the checkpoint holds {t.dtype.name} {tuple(t.shape)} for {self._name}, a "
                               f"{self._dtype.name} {tuple(self._shape)} average; restore the checkpoint of these "
                               f"variables.")
        self._write(t.numpy())
        return None

    def _gather_saveables_for_checkpoint(self) -> dict:
        """For ``tf.compat.v1.train.Saver`` (name-based checkpoints): saved under the name it is given,
        as a variable is (``Saver({ema.average_name(v): ema.average(v)})``)."""
        from tensorflow.python.training.saving import saveable_object

        avg = self

        class _Saveable(saveable_object.SaveableObject):
            def __init__(self, name):
                super().__init__(avg, [saveable_object.SaveSpec(avg.value(), "", name)], name)

            def restore(self, restored_tensors, restored_shapes):
                return avg._restore_from_tensors({_VALUE_KEY: restored_tensors[0]}) or tf.no_op()

        return {_VALUE_KEY: _Saveable}

    def _copy_trackable_to_cpu(self, object_map) -> None:
        object_map[self] = tf.Variable(self.numpy(), trainable=False)

    def __repr__(self) -> str:
        return f"<fastema AverageVariable '{self._name}' shape={tuple(self._shape)} dtype={self._dtype.name}>"


def _delegate(op: str):
    def method(self, *args):
        return getattr(self.value(), op)(*args)
    method.__name__ = op
    method.__doc__ = f"``{op}`` of :meth:`value`, as on a ``tf.Variable``."
    return method


for _op in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
            "__matmul__", "__rmatmul__", "__pow__", "__neg__", "__abs__", "__getitem__", "__lt__", "__le__", "__gt__",
            "__ge__"):
    setattr(AverageVariable, _op, _delegate(_op))

tf.register_tensor_conversion_function(
    AverageVariable, lambda v, dtype=None, name=None, as_ref=False: tf.cast(v.value(), dtype) if dtype and
    dtype != v.dtype else v.value())
