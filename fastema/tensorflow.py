"""TensorFlow bridge: an EMA of ``tf.Variable``s (a Keras model's weights) in fastema's flat shadow.

TensorFlow tensors cannot be written in place, so the average lives in buffers fastema
owns. ``update()`` reads every variable's current value through DLPack (on the CPU the
tensor a variable read returns is the variable's own buffer: no copy) and makes one
kernel launch per (device, dtype) group. The variables are written only by ``assign``:
when the average is swapped in for evaluation, and back::

    ema = fastema.tensorflow.EMA(model.trainable_variables, decay=0.999)
    for x, y in data:
        train_step(x, y)                # a tf.function with optimizer.apply_gradients
        ema.update()
    with ema.average_weights():
        model.evaluate(val_data)        # the average in, the raw weights back after
"""
from __future__ import annotations

from typing import ContextManager, Sequence

import tensorflow as tf

from ._average import ModelSwap
from ._bridge import FrameworkEMA, make_plan, to_host
from .flat import FlatShadow

__all__ = ["EMA"]

_FLOATS = (tf.float32, tf.bfloat16, tf.float16, tf.float64)


def _as_tf_variable(v, i: int):
    inner = getattr(v, "value", None)                 # a keras.Variable on the TensorFlow backend
    if type(v).__module__.startswith("keras") and isinstance(inner, tf.Variable):
        return inner, getattr(v, "path", None) or v.name
    if isinstance(v, tf.Variable):
        return v, v.name
    raise TypeError(f"variables[{i}] is a {type(v).__module__}.{type(v).__name__}; fastema.tensorflow.EMA "
                    f"averages tf.Variables (e.g. model.trainable_variables on the TensorFlow backend)")


class EMA(FrameworkEMA):
    """Exponential moving average of ``tf.Variable``s.

    Args:
        variables: the variables (``model.trainable_variables``, a ``tf.Module``'s
            ``trainable_variables``, or keras Variables on the TensorFlow backend), or a
            ``tf.Module`` / Keras model, whose trainable variables are taken.
        decay: a float, or up to 8 floats for several averages kept in one pass.
        warmup, min_decay, inv_gamma, power, update_after_step, update_every, compensate,
            debias: the schedule, as in :class:`fastema.torch.EMA` (:class:`fastema.schedules.Plan`).
        shadow_dtype: ``"float32"`` (default: float16/bfloat16 variables keep moving),
            ``"same"`` or ``"bfloat16"``.
        rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).
        seed: stochastic-rounding seed.
        skip_nonfinite: skip an update (decided on the device) when a variable holds inf/NaN.
    """

    _format = "fastema.tensorflow.EMA"

    def __init__(self, variables, decay: float | Sequence[float] = 0.9999, *, warmup: str | None = None,
                 min_decay: float = 0.0, inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0,
                 update_every: int = 1, compensate: bool = False, debias: bool = False,
                 shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0,
                 skip_nonfinite: bool = False):
        if hasattr(variables, "trainable_variables") and not isinstance(variables, tf.Variable):
            variables = variables.trainable_variables
        pairs = [_as_tf_variable(v, i) for i, v in enumerate(variables)]
        if not pairs:
            raise ValueError("no variables to average")
        bad = [n for (v, n) in pairs if v.dtype not in _FLOATS]
        if bad:
            raise TypeError(f"variables {bad[:5]} are not float32/bfloat16/float16; leave them out "
                            f"(e.g. pass model.trainable_variables)")
        self._settings(*make_plan(decay, shadow_dtype=shadow_dtype, rounding=rounding, seed=seed,
                  skip_nonfinite=skip_nonfinite, warmup=warmup, min_decay=min_decay, inv_gamma=inv_gamma,
                  power=power, update_after_step=update_after_step, update_every=update_every,
                  compensate=compensate, debias=debias))
        self.variables = [v for v, _ in pairs]
        self.names = _unique([n for _, n in pairs])
        self._read = tf.function(lambda: [v.value() for v in self.variables])   # one call reads them all
        first = self._read()
        self._specs = [(tuple(t.shape), t.dtype) for t in first]
        self._shapes = [shape for shape, _ in self._specs]
        self._flat = FlatShadow(dict(zip(self.names, first)), rows=self.plan.rows, dtype=shadow_dtype)
        self._raw: list | None = None                    # the variables' own values while swapped
        self._swap = ModelSwap(self._exchange, "the average is swapped into the variables; swap() back first")

    # ------------------------------------------------------------ operations

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def update(self, step: int | None = None) -> None:
        """Fold the variables' current values into the average (call after the optimizer step)."""
        self._not_swapped("update()")
        pending = self.plan.next(step)          # checks step; records nothing yet
        if not pending.due:
            self.plan.done(pending)
            return
        self._fold(pending, self._read())   # FlatShadow checks dtypes, shapes and devices before any write

    def averages(self, row: int = 0) -> list:
        """The average as new tensors in the variables' dtypes (rounded to nearest), in variable order."""
        self._flat.check_row(row)
        out = []
        for i, (shape, dtype) in enumerate(self._specs):
            with tf.device(self.variables[i].device):             # to_host copies: TF may alias NumPy memory
                out.append(tf.cast(tf.constant(to_host(self._flat.view(i, row))), dtype))
        return out

    def swap(self, row: int = 0) -> None:
        """Assign average ``row`` to the variables; call again to put their own values back.

        The variables' values are kept as TensorFlow tensors while swapped (a variable read
        is a snapshot: later assigns do not change it), so the swap back is bit for bit.
        """
        self._swap.swap(row)

    def _exchange(self, row: int, into_model: bool) -> None:
        if into_model:
            averages = self.averages(row)
            self._raw = [v.value() for v in self.variables]
            for v, a in zip(self.variables, averages):
                v.assign(a)
        else:
            for v, raw in zip(self.variables, self._raw):
                v.assign(raw)
            self._raw = None

    def average_weights(self, row: int = 0) -> ContextManager[None]:
        """``with ema.average_weights(): evaluate()``: the average in, the variables' values back on exit.
        Re-entrant: inside a block (or after ``swap()``) of the same row it leaves the weights in."""
        return self._swap.block(row)

    def copy_to(self, row: int = 0) -> None:
        """Assign average ``row`` to the variables for good (e.g. when training ends)."""
        self._not_swapped("copy_to()")
        for v, a in zip(self.variables, self.averages(row)):
            v.assign(a)

    def _not_swapped(self, what: str) -> None:
        self._swap.refuse(what)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        self._not_swapped("state_dict()")
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._not_swapped("load_state_dict()")
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return f"fastema.tensorflow.EMA(decay={self.decay}, updates={self.updates}, shadow={self._flat!r})"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}#{k}")
    return out
