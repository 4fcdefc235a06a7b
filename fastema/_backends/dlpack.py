"""DLPack producers: JAX arrays, TensorFlow tensors and variables, Keras variables, and any
other object with ``__dlpack__`` (read through :mod:`fastema._backends._dlpack`, no copy).

JAX, TensorFlow and Keras objects are recognised by their module before the CUDA array
interface (JAX GPU arrays also have one): :data:`frameworks` is that earlier owner.
"""
from __future__ import annotations

import math

from ..kernels.kinds import BF16, F16, F32, F64
from . import _dlpack as _dl
from ._base import Backend
from ._buf import Buf, not_dense, unsupported_dtype

NAME = "dlpack"
_KINDS = {(_dl.FLOAT, 32): F32, (_dl.FLOAT, 16): F16, (_dl.BFLOAT, 16): BF16, (_dl.FLOAT, 64): F64}
_NAMES = {(_dl.INT, 8): "int8", (_dl.INT, 16): "int16", (_dl.INT, 32): "int32", (_dl.INT, 64): "int64",
          (_dl.UINT, 8): "uint8", (_dl.UINT, 1): "bool", (6, 8): "bool", (5, 64): "complex64",
          (5, 128): "complex128"}
_FRAMEWORKS = {"jax": "jax", "jaxlib": "jax", "tensorflow": "tensorflow", "keras": "keras"}

# Where to go instead when an in-place write reaches an array its framework keeps immutable.
READ_ONLY_HINTS = {
    "jax": "JAX arrays are immutable; keep the average of JAX parameters in fastema.jax.EMA, "
           "which owns the shadow and hands back new arrays with shadow()",
    "tensorflow": "TensorFlow tensors cannot be written in place; keep the average of tf.Variables in "
                  "fastema.tensorflow.EMA, which owns the shadow and writes the variables with assign()",
}


def framework_of(x) -> str | None:
    return _FRAMEWORKS.get(type(x).__module__.partition(".")[0])


def _traced(x) -> bool:
    import jax  # (loaded: x is one of its arrays)

    return isinstance(x, jax.core.Tracer)


def _from_dlpack(x, what: str, framework: str):
    if framework == "tensorflow":
        _numbers_only(x, what)
    if framework == "jax" and _traced(x):
        raise TypeError(f"{what} is a traced JAX array (inside jax.jit or another transformation), which has no "
                        f"values to read yet: use fastema.jax.ema() inside jit, or fastema.jax.EMA's update() "
                        f"(it runs inside jit on the CPU), or call this function on the arrays jit returns")
    if framework == "jax" and callable(getattr(x, "is_deleted", None)) and x.is_deleted():
        raise ValueError(f"{what} is a deleted JAX array (donated to a jitted function, or deleted): pass "
                         f"the array that function returned")
    try:
        dev = x.__dlpack_device__() if hasattr(x, "__dlpack_device__") else (_dl.CPU, 0)
        on_gpu = int(dev[0]) in (_dl.CUDA, _dl.CUDA_MANAGED)
        # CUDA producers order their writes before the legacy default stream (1), where
        # fastema launches for arrays it does not know the stream of.
        im = _dl.import_(x, stream=1 if on_gpu else None)
    except (BufferError, TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what}: could not read it through DLPack ({err})") from err
    kind = _KINDS.get((im.code, im.bits)) if im.lanes == 1 else None
    if kind is None:
        raise unsupported_dtype(what, _NAMES.get((im.code, im.bits), f"DLPack code {im.code}/{im.bits} bits"))
    if not im.contiguous:
        raise not_dense(what, im.shape, im.strides)
    if im.device_type in (_dl.CPU, _dl.CUDA_HOST):
        device = "cpu"
    elif im.device_type in (_dl.CUDA, _dl.CUDA_MANAGED):
        device = f"cuda:{im.device_id}"
    else:
        raise ValueError(f"{what} is on DLPack device type {im.device_type}; fastema runs on the CPU "
                         f"and on CUDA GPUs")
    writable = framework not in READ_ONLY_HINTS and not im.read_only
    address = im.address if math.prod(im.shape) else 0
    return Buf(im, kind, device, im.shape, address, writable, framework)


def refuse_moving(x, what: str) -> None:
    """Refuse, as a source a shadow holds (``FlatShadow``, ``WindowShadow``), a TensorFlow or Keras
    variable: while a DLPack view of it is held, its next ``assign()`` moves it to new memory
    (TensorFlow copies it), and the shadow would read the old values from then on, unrefused."""
    framework = framework_of(x)
    if framework not in ("tensorflow", "keras") or not hasattr(x, "assign"):
        return
    if framework == "keras" and type(getattr(x, "value", None)).__module__.partition(".")[0] == "torch":
        return                             # Keras's torch backend assigns in place (copy_)
    raise TypeError(f"{what} is a {type(x).__name__}, whose memory moves at its next assign(): a shadow that "
                    f"holds its sources would go on reading the old values. Keep the average of variables "
                    f"in fastema.tensorflow.EMA or fastema.keras.WeightEMA, or hand the shadow their values "
                    f"at each update: FlatShadow.update(sources=[...]) (WindowShadow: rebind(), then "
                    f"push()) of v.read_value() (TensorFlow) or v.value (Keras)")


def _numbers_only(x, what: str) -> None:
    """Refuse a TensorFlow tensor that holds no numbers (strings, resources, variants) before
    DLPack is asked: TensorFlow's export of a string tensor aborts the process."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not any(getattr(dtype, f, False) for f in ("is_floating", "is_integer", "is_bool",
                                                                          "is_complex")):
        raise unsupported_dtype(what, getattr(dtype, "name", str(dtype)))


class DLPack(Backend):
    """Any ``__dlpack__`` producer, read with no copy; new arrays every step (JAX, TensorFlow)."""

    NAME = NAME
    HANDS_OVER = True

    def owns(self, x) -> bool:
        return hasattr(x, "__dlpack__")

    def describe(self, x, what: str) -> Buf:
        framework = framework_of(x)
        if framework is None:
            return _from_dlpack(x, what, NAME)
        if framework == "keras":                       # a keras.Variable: describe the backend's value
            value = getattr(x, "value", None)
            if value is None or value is x:
                raise TypeError(f"{what} is a {type(x).__name__} without an array value")
            from . import numpy as np_backend
            from . import torch as torch_backend

            for backend in (np_backend.backend, torch_backend.backend):   # Keras on the NumPy or torch backend
                if backend.owns(value):
                    return backend.describe(value, what)
            return self.describe(value, what)                # JAX or TensorFlow
        if framework == "tensorflow" and not hasattr(x, "__dlpack__") and hasattr(x, "read_value"):
            x = x.value()                              # a tf.Variable: its current tensor (no copy)
        if not hasattr(x, "__dlpack__"):
            if framework == "tensorflow":
                raise TypeError(_tensorflow_unread(x, what))
            raise TypeError(f"{what} is a {type(x).__module__}.{type(x).__name__}, which fastema cannot read; "
                            f"pass an array or tensor")
        return _from_dlpack(x, what, framework)


def _tensorflow_unread(x, what: str) -> str:
    """What to do with a TensorFlow object without ``__dlpack__``: upgrade a TensorFlow that gives
    none of its tensors one (before 2.20: ``fastema._floors``), else pass an eager dense tensor."""
    import sys

    from .. import _floors

    version = getattr(sys.modules.get("tensorflow"), "__version__", None)
    if version is not None and _floors.older("tensorflow", version):
        wanted = _floors.floor("tensorflow")
        return (f"{what} is a TensorFlow {type(x).__name__}, and TensorFlow {version} gives its tensors no "
                f"__dlpack__, by which fastema reads them (TensorFlow {wanted} and newer): "
                f"pip install -U 'tensorflow>={wanted}'")
    return (f"{what} is a TensorFlow {type(x).__name__}, which has no __dlpack__ (a symbolic tensor inside "
            f"tf.function, a sparse or ragged tensor): pass an eager dense tensor or a tf.Variable, "
            f"outside tf.function (fastema.tensorflow.EMA updates inside one)")


class Frameworks(DLPack):
    """JAX, TensorFlow and Keras objects, recognised by their module before the CUDA array
    interface (JAX GPU arrays have one too) and before ``__dlpack__`` (tf.Variable has none)."""

    def owns(self, x) -> bool:
        return framework_of(x) is not None


backend = DLPack()
frameworks = Frameworks()
