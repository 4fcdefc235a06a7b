"""TensorFlow bridge: an EMA of ``tf.Variable`` objects (a Keras model's weights) in fastema's flat shadow.

TensorFlow tensors cannot be written in place, so the average lives in buffers fastema
owns. ``update()`` reads every variable's current value through DLPack (on the CPU the
tensor a variable read returns is the variable's own buffer: no copy) and makes one
kernel launch per (device, dtype) group. The variables are written only by ``assign``:
when the average is swapped in for evaluation, and back::

    ema = fastema.tensorflow.EMA(model.trainable_variables, decay=0.999)
    for x, y in data:
        train_step(x, y)                # a tf.function with optimizer.apply_gradients
        ema.update()
    with ema.average_parameters():
        model.evaluate(val_data)        # the average in, the raw weights back after
"""
from __future__ import annotations

from typing import ContextManager, Sequence

import tensorflow as tf

from ._backends import to_host
from .average import HOST_ONLY_REFUSALS, Average, EMAOptions, Face, ModelSwap

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


#: What fastema.tensorflow.EMA refuses, and why: every other option is taken.
REFUSED = HOST_ONLY_REFUSALS


class EMA(Face):
    """Exponential moving average of ``tf.Variable`` objects.

    Args:
        variables: the variables (``model.trainable_variables``, a ``tf.Module``'s
            ``trainable_variables``, or keras Variables on the TensorFlow backend), or a
            ``tf.Module`` / Keras model, whose trainable variables are taken.
        decay: the decay, default 0.9999; a list keeps up to 8 averages in one pass.
        **options: the options of every fastema EMA (:class:`fastema.average.EMAOptions`:
            timed schedules, BEMA, warm-ups, ``update_every``, the shadow's dtype and rounding,
            the non-finite guard); :data:`REFUSED` names the ones this face refuses, and why.
    """

    _format = "fastema.tensorflow.EMA"

    def __init__(self, variables, decay: float | Sequence[float] | None = None, **options):
        opts = EMAOptions.of(decay, **options)
        opts.refuse("fastema.tensorflow.EMA", REFUSED)
        if hasattr(variables, "trainable_variables") and not isinstance(variables, tf.Variable):
            variables = variables.trainable_variables
        pairs = [_as_tf_variable(v, i) for i, v in enumerate(variables)]
        if not pairs:
            raise ValueError("no variables to average")
        bad = [n for (v, n) in pairs if v.dtype not in _FLOATS]
        if bad:
            raise TypeError(f"variables {bad[:5]} are not float32/bfloat16/float16; leave them out "
                            f"(e.g. pass model.trainable_variables)")
        self.variables = [v for v, _ in pairs]
        self.names = _unique([n for _, n in pairs])
        self._read = tf.function(lambda: [v.value() for v in self.variables])   # one call reads them all
        first = self._read()
        self._specs = [(tuple(t.shape), t.dtype) for t in first]
        self._core = Average.of_sources(opts, dict(zip(self.names, first)), [shape for shape, _ in self._specs],
                                        self._format)
        self.shadow_dtype, self.skip_nonfinite = opts.shadow_dtype, opts.skip_nonfinite
        self._raw: list | None = None                    # the variables' own values while swapped
        self._swap = ModelSwap(self._exchange, "the average is swapped into the variables; swap() back first")

    # ------------------------------------------------------------ operations

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def update(self, step: int | None = None) -> None:
        """Fold the variables' current values into the average (call after the optimizer step)."""
        self._not_swapped("update()")
        self._core.update(step, self._read)   # FlatShadow checks dtypes, shapes and devices before any write

    def averages(self, row: int = 0) -> list:
        """The average as new tensors in the variables' dtypes (rounded to nearest), in variable order."""
        self._core.check_row(row)
        out = []
        for i, (shape, dtype) in enumerate(self._specs):
            with tf.device(self.variables[i].device):             # to_host copies: TF may alias NumPy memory
                out.append(tf.cast(tf.constant(to_host(self._core.view(i, row))), dtype))
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
            for v, raw in zip(self.variables, self._raw or ()):
                v.assign(raw)
            self._raw = None

    def average_weights(self, row: int = 0) -> ContextManager[None]:
        """Deprecated alias of :meth:`average_parameters` (the name every fastema face uses)."""
        import warnings

        warnings.warn("fastema.tensorflow.EMA.average_weights() is now average_parameters(); the old name goes in "
                      "the next release", DeprecationWarning, stacklevel=2)
        return self.average_parameters(row)

    def average_parameters(self, row: int = 0) -> ContextManager[None]:
        """``with ema.average_parameters(): evaluate()``: the average in, the variables' values back on exit.
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
        """Everything needed to resume: averages keyed by variable name (NumPy copies, shape
        ``(rows, *shape)``), counters and settings (:meth:`fastema.average.Average.state_dict`)."""
        self._not_swapped("state_dict()")
        return self._core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing if anything is off."""
        self._not_swapped("load_state_dict()")
        self._core.load_state_dict(state)

    def __repr__(self) -> str:
        return f"fastema.tensorflow.EMA(decay={self.decay}, updates={self.updates}, shadow={self._core.shadow!r})"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}#{k}")
    return out
