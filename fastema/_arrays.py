"""The boundary: framework arrays in, plain descriptions of memory out.

:func:`describe` turns a NumPy array, a torch tensor, a CUDA-array-interface
object (CuPy, Numba) or a DLPack producer into a :class:`Buf`: storage kind,
device, shape, address and, on the CPU, an unsigned-integer NumPy view of the
bits. Frameworks are imported lazily, only when one of their objects arrives.
Every check that the user can trip lives here or in the callers' validation,
before anything is written.
"""
from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _dlpack as _dl
from .kernels._bits import BF16, F16, F32, KIND_NAMES

SUPPORTED = "float32, bfloat16 and float16"
_NP_KINDS = {np.dtype(np.float32): F32, np.dtype(np.float16): F16}
ITEMSIZE = {F32: 4, BF16: 2, F16: 2}


class Buf(NamedTuple):
    """One contiguous floating buffer, described without its framework."""
    obj: Any                 # what the caller passed; kept alive while the Buf is used
    kind: int                # F32 / BF16 / F16 (fastema.kernels._bits)
    device: str              # "cpu" or "cuda:N"
    shape: tuple
    address: int             # first element; 0 for an empty buffer
    writable: bool
    framework: str           # "numpy", "torch", "cuda" (array interface), "cudasim", "jax",
                             # "tensorflow", "dlpack" (other producers; obj is then a _dlpack.Imported)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.kind]

    @property
    def dtype_name(self) -> str:
        return KIND_NAMES[self.kind]


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _unsupported_dtype(what, dtype):
    return TypeError(
        f"{what} has dtype {dtype}; fastema works on {SUPPORTED} "
        f"(convert it, e.g. .float() in torch or .astype(np.float32) in NumPy)")


def _not_contiguous(what, shape, strides):
    return ValueError(
        f"{what} is not contiguous (shape {tuple(shape)}, strides {tuple(strides)}); "
        f"pass a contiguous array (.contiguous() in torch, np.ascontiguousarray in NumPy): "
        f"an updated copy would not reach the original")


def _from_numpy(a: np.ndarray, what: str) -> Buf:
    kind = _NP_KINDS.get(a.dtype)
    if kind is None and a.dtype.name == "bfloat16":       # ml_dtypes.bfloat16
        kind = BF16
    if kind is None:
        raise _unsupported_dtype(what, a.dtype)
    if not a.flags.c_contiguous:
        raise _not_contiguous(what, a.shape, a.strides)
    return Buf(a, kind, "cpu", a.shape, a.ctypes.data if a.size else 0, bool(a.flags.writeable), "numpy")


def _from_torch(t, what: str) -> Buf:
    import torch

    kind = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}.get(t.dtype)
    if kind is None:
        raise _unsupported_dtype(what, t.dtype)
    if t.layout != torch.strided:
        raise TypeError(f"{what} is a {t.layout} tensor; fastema works on dense (strided) tensors")
    if not t.is_contiguous():
        raise _not_contiguous(what, t.shape, t.stride())
    dev = t.device
    if dev.type == "cpu":
        return Buf(t, kind, "cpu", tuple(t.shape), t.data_ptr(), True, "torch")
    if dev.type == "cuda":
        return Buf(t, kind, f"cuda:{dev.index}", tuple(t.shape), t.data_ptr(), True, "torch")
    raise ValueError(f"{what} is on {t.device}; fastema runs on the CPU and on CUDA GPUs")


def _from_cai(x, what: str) -> Buf:
    cai = x.__cuda_array_interface__
    dtype = np.dtype(cai["typestr"])
    kind = _NP_KINDS.get(dtype)
    if kind is None:
        raise _unsupported_dtype(what, dtype)
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None and strides != tuple(np.empty(shape, dtype).strides):
        raise _not_contiguous(what, shape, strides)
    address, readonly = cai["data"]
    device = getattr(getattr(x, "device", None), "id", 0)
    return Buf(x, kind, f"cuda:{int(device)}", shape, int(address or 0), not readonly, "cuda")


def _from_cudasim(x, what: str) -> Buf:
    # The Numba CUDA simulator's device arrays wrap host NumPy arrays and carry
    # no __cuda_array_interface__; their "device" memory is that host array.
    a = x._ary
    b = _from_numpy(a, what)
    return b._replace(obj=x, device="cuda:0", framework="cudasim")


def _is_cudasim(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("numba") and "simulator" in mod and hasattr(x, "_ary")


_DL_KINDS = {(_dl.FLOAT, 32): F32, (_dl.FLOAT, 16): F16, (_dl.BFLOAT, 16): BF16}
_DL_NAMES = {(_dl.INT, 8): "int8", (_dl.INT, 16): "int16", (_dl.INT, 32): "int32", (_dl.INT, 64): "int64",
             (_dl.UINT, 8): "uint8", (_dl.FLOAT, 64): "float64", (_dl.UINT, 1): "bool", (6, 8): "bool"}
_FRAMEWORKS = {"jax": "jax", "jaxlib": "jax", "tensorflow": "tensorflow", "keras": "keras"}

# Where to go instead when an in-place write reaches an array its framework keeps immutable.
READ_ONLY_HINTS = {
    "jax": "JAX arrays are immutable; keep the average of JAX parameters in fastema.jax.EMA, "
           "which owns the shadow and hands back new arrays with shadow()",
    "tensorflow": "TensorFlow tensors cannot be written in place; keep the average of tf.Variables in "
                  "fastema.tensorflow.EMA, which owns the shadow and writes the variables with assign()",
}


def _framework_of(x) -> str | None:
    return _FRAMEWORKS.get(type(x).__module__.partition(".")[0])


def _from_framework(x, what: str, framework: str) -> Buf:
    if framework == "keras":                       # a keras.Variable: describe the backend's value
        value = getattr(x, "value", None)
        if value is None or value is x:
            raise TypeError(f"{what} is a {type(x).__name__} without an array value")
        return describe(value, what)
    if framework == "tensorflow" and not hasattr(x, "__dlpack__") and hasattr(x, "read_value"):
        x = x.value()                              # a tf.Variable: its current tensor (no copy)
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{what} is a {type(x).__module__}.{type(x).__name__}, which fastema cannot read; "
                        f"pass an array or tensor")
    return _from_dlpack(x, what, framework)


def _from_dlpack(x, what: str, framework: str) -> Buf:
    dev = x.__dlpack_device__() if hasattr(x, "__dlpack_device__") else (_dl.CPU, 0)
    on_gpu = int(dev[0]) in (_dl.CUDA, _dl.CUDA_MANAGED)
    try:
        # CUDA producers order their writes before the legacy default stream (1), where
        # fastema launches for arrays it does not know the stream of.
        im = _dl.import_(x, stream=1 if on_gpu else None)
    except (BufferError, TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what}: could not read it through DLPack ({err})") from err
    kind = _DL_KINDS.get((im.code, im.bits)) if im.lanes == 1 else None
    if kind is None:
        raise _unsupported_dtype(what, _DL_NAMES.get((im.code, im.bits), f"DLPack code {im.code}/{im.bits} bits"))
    if not im.contiguous:
        raise _not_contiguous(what, im.shape, im.strides)
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


def describe(x, what: str) -> Buf:
    """Describe ``x`` as a :class:`Buf`, or raise ``TypeError``/``ValueError`` naming ``what``."""
    if isinstance(x, np.ndarray):
        return _from_numpy(x, what)
    if _is_torch(x):
        return _from_torch(x, what)
    if _is_cudasim(x):
        return _from_cudasim(x, what)
    framework = _framework_of(x)
    if framework is not None:                      # JAX, TensorFlow, Keras variables
        return _from_framework(x, what, framework)
    if hasattr(x, "__cuda_array_interface__"):
        return _from_cai(x, what)
    if hasattr(x, "__dlpack__"):
        return _from_dlpack(x, what, _framework_of(x) or "dlpack")
    if isinstance(x, (bool, int, float, complex, list, tuple)):
        raise TypeError(f"{what} must be an array (NumPy, torch, CuPy, ...), got {type(x).__name__}; "
                        f"wrap Python numbers with np.asarray(..., dtype=np.float32)")
    raise TypeError(f"{what} must be a NumPy array, a torch tensor or an object with "
                    f"__cuda_array_interface__ or __dlpack__, got {type(x).__name__}")


def overlaps(a: Buf, b: Buf) -> bool:
    """True when two buffers on the same device share any byte."""
    if a.device != b.device or not a.numel or not b.numel:
        return False
    return a.address < b.address + b.nbytes and b.address < a.address + a.nbytes


def empty(like: Buf, kind: int, shape: tuple):
    """A new C-contiguous array of ``kind`` and ``shape`` on ``like``'s device, in its framework."""
    if like.framework == "torch":
        import torch

        dtype = {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16}[kind]
        return torch.empty(shape, dtype=dtype, device=like.obj.device)
    if kind == BF16:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("a bfloat16 shadow for NumPy/CUDA-array sources needs the ml_dtypes "
                            "package (pip install ml_dtypes), or use dtype='float32'") from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(np.float32 if kind == F32 else np.float16)
    if like.device == "cpu":
        return np.empty(shape, dtype)
    from numba import cuda

    if kind == BF16:
        raise TypeError("bfloat16 shadows on the GPU need torch tensors as sources; "
                        "use dtype='float32'")
    return cuda.device_array(shape, dtype)


def zero_(a) -> None:
    """Fill a framework array with zeros on its device (stream-ordered in torch, no sync)."""
    if _is_torch(a):
        a.zero_()
    elif isinstance(a, np.ndarray):
        a.fill(0)
    else:                                          # Numba device array (or its simulator twin)
        a.copy_to_device(np.zeros(a.shape, a.dtype))
