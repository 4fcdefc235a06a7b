"""The boundary: framework arrays in, plain descriptions of memory out.

:func:`describe` turns a NumPy array, a torch tensor, a CUDA-array-interface
object (CuPy, Numba) or a DLPack producer into a :class:`Buf`: storage kind,
device, shape, address and, on the CPU, an unsigned-integer NumPy view of the
bits. Frameworks are imported lazily, only when one of their objects arrives.
Every check that the user can trip lives here or in the callers' validation,
before anything is written.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _dlpack as _dl
from .kernels._bits import BF16, F16, F32, F64, ITEMSIZE, KIND_NAMES

SUPPORTED = "float32, bfloat16, float16 and float64"
_NP_KINDS = {np.dtype(np.float32): F32, np.dtype(np.float16): F16, np.dtype(np.float64): F64}


def layout(shape, strides) -> tuple | None:
    """The canonical element strides of a dense, non-overlapping layout, or None.

    Dense means the elements fill ``numel`` consecutive slots in some dimension order
    (C order, channels_last, any permutation), so a kernel can walk them in storage
    order from the lowest address. Dimensions of size 1 have no meaningful stride and
    get 0, so two layouts with the same storage order compare equal.
    """
    shape, strides = tuple(int(d) for d in shape), tuple(int(s) for s in strides)
    canon = tuple(0 if d == 1 else s for d, s in zip(shape, strides))
    if 0 in shape:
        return tuple(0 for _ in shape)
    expected = 1
    for st, d in sorted((st, d) for d, st in zip(shape, strides) if d != 1):
        if st != expected:
            return None
        expected *= d
    return canon


def c_layout(shape) -> tuple:
    """The canonical strides of C order (row-major) for ``shape``."""
    out, step = [], 1
    for d in reversed(tuple(shape)):
        out.append(step)
        step *= int(d)
    return layout(shape, tuple(reversed(out)))


class Buf(NamedTuple):
    """One dense floating buffer (C order or another dense layout), described without its framework."""
    obj: Any                 # what the caller passed; kept alive while the Buf is used
    kind: int                # F32 / BF16 / F16 / F64 (fastema.kernels._bits)
    device: str              # "cpu" or "cuda:N"
    shape: tuple
    address: int             # lowest element (the first in storage order); 0 for an empty buffer
    writable: bool
    framework: str           # "numpy", "torch", "cuda" (array interface), "cudasim", "jax",
                             # "tensorflow", "dlpack" (other producers; obj is then a _dlpack.Imported)
    strides: tuple = ()      # canonical element strides (see layout()); () means C order

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.kind]

    @property
    def dtype_name(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def order(self) -> tuple:
        """Canonical element strides: equal orders mean equal storage order for equal shapes."""
        return self.strides or c_layout(self.shape)


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _unsupported_dtype(what, dtype):
    return TypeError(
        f"{what} has dtype {dtype}; fastema works on {SUPPORTED} "
        f"(convert it, e.g. .float() in torch or .astype(np.float32) in NumPy)")


def _not_contiguous(what, shape, strides):
    return ValueError(
        f"{what} is not dense (shape {tuple(shape)}, strides {tuple(strides)}): it skips or repeats "
        f"elements (a slice, an expanded or transposed-and-sliced view), so an updated copy would "
        f"not reach the original; pass the tensor itself or a dense copy (.contiguous() in torch, "
        f"np.ascontiguousarray in NumPy). C order, channels_last and other dense layouts are fine")


def _from_numpy(a: np.ndarray, what: str) -> Buf:
    kind = _NP_KINDS.get(a.dtype)
    if kind is None and a.dtype.name == "bfloat16":       # ml_dtypes.bfloat16
        kind = BF16
    if kind is None:
        raise _unsupported_dtype(what, a.dtype)
    item = a.dtype.itemsize
    order = None if any(st % item for st in a.strides) else layout(a.shape, [st // item for st in a.strides])
    if order is None or any(st < 0 for st in a.strides):
        raise _not_contiguous(what, a.shape, a.strides)
    strides = () if a.flags.c_contiguous else order
    return Buf(a, kind, "cpu", a.shape, a.ctypes.data if a.size else 0, bool(a.flags.writeable), "numpy", strides)


_TORCH_KINDS: dict = {}


def _torch_kind(t):
    if not _TORCH_KINDS:
        import torch

        _TORCH_KINDS.update({torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.float64: F64})
    return _TORCH_KINDS.get(t.dtype)


@functools.cache
def _torch_plain_types():
    import torch

    return torch.Tensor, torch.nn.Parameter


def _refuse_foreign_torch(t, what: str) -> None:
    """Tensors whose data_ptr() is not where their elements are, or whose elements are elsewhere:
    refused by name, with what to do, before any address is taken."""
    if type(t) in _torch_plain_types():
        if hasattr(t, "ds_id") or getattr(t, "_fsdp_flattened", False) or t.is_neg() or t.is_conj():
            _refuse_marked(t, what)
        return
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        kind = type(t).__name__
        hint = ("its elements live in per-rank local shards (FSDP2 fully_shard, tensor parallel, "
                "distribute_module); fastema does not average sharded models yet: average the local "
                "shards with the array-level functions (t.to_local()), or keep the EMA on an unsharded "
                "copy of the model") if kind == "DTensor" else \
            "it wraps other tensors (a quantised or sharded tensor subclass); pass the plain tensor it holds"
        raise TypeError(f"{what} is a {kind}, which fastema cannot read: {hint}. Nothing was written.")
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        raise ValueError(f"{what} is an uninitialized parameter of a lazy module (nn.LazyLinear, ...): it has no "
                         f"shape or memory yet; run one forward pass before making the average")
    _refuse_marked(t, what)


def _refuse_marked(t, what: str) -> None:
    """ZeRO-3 and FSDP1 parameters, lazy negated/conjugated views: refused by name."""
    if hasattr(t, "ds_id") or hasattr(t, "ds_tensor"):
        raise TypeError(
            f"{what} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(t.shape)}, full shape "
            f"{tuple(getattr(t, 'ds_shape', ()))}): its elements are spread over the ranks, so fastema would "
            f"average nothing. ZeRO-3 is not supported yet: use ZeRO stage 1 or 2, or gather the weights "
            f"(deepspeed.zero.GatheredParameters) into a model of your own. Nothing was written.")
    if getattr(t, "_fsdp_flattened", False):
        raise TypeError(
            f"{what} is a parameter managed by FSDP1 (FullyShardedDataParallel): it is a rank-dependent "
            f"piece of a flat parameter. Use FSDP2 (torch.distributed.fsdp.fully_shard), or make the EMA "
            f"of an unwrapped copy of the model. Nothing was written.")
    if t.is_neg() or t.is_conj():
        raise TypeError(f"{what} is a lazily negated or conjugated view (is_neg/is_conj), whose memory does "
                        f"not hold its values; pass t.resolve_neg() / t.resolve_conj(). Nothing was written.")


def _from_torch(t, what: str) -> Buf:
    import torch

    _refuse_foreign_torch(t, what)
    kind = _torch_kind(t)
    if kind is None:
        raise _unsupported_dtype(what, t.dtype)
    if t.layout != torch.strided:
        raise TypeError(f"{what} is a {t.layout} tensor; fastema works on dense (strided) tensors")
    dev = t.device
    if dev.type == "cpu":
        device = "cpu"
    elif dev.type == "cuda":
        device = f"cuda:{dev.index}"
    else:
        raise ValueError(f"{what} is on {t.device}; fastema runs on the CPU and on CUDA GPUs "
                         f"(a meta tensor has no memory: materialise the model first)")
    contiguous = t.is_contiguous()
    order = () if contiguous else layout(t.shape, t.stride())
    if order is None:
        raise _not_contiguous(what, t.shape, t.stride())
    numel = t.numel()
    address = t.data_ptr()
    if numel:
        if address == 0:
            raise ValueError(
                f"the storage of {what} was freed (address 0 with {numel} elements: an FSDP unsharded "
                f"parameter or untyped_storage().resize_(0)); point it at live memory, or make the EMA over "
                f"tensors that own their storage. Nothing was written.")
        span = numel if contiguous else 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))
        need = (t.storage_offset() + span) * t.element_size()
        have = t.untyped_storage().nbytes()
        if have < need:
            raise ValueError(
                f"the storage of {what} holds {have} bytes but the tensor needs {need} (it was resized in "
                f"place, e.g. untyped_storage().resize_()); restore its storage or make a new EMA. "
                f"Nothing was written.")
    return Buf(t, kind, device, tuple(t.shape), address, True, "torch", order)


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


_DL_KINDS = {(_dl.FLOAT, 32): F32, (_dl.FLOAT, 16): F16, (_dl.BFLOAT, 16): BF16, (_dl.FLOAT, 64): F64}
_DL_NAMES = {(_dl.INT, 8): "int8", (_dl.INT, 16): "int16", (_dl.INT, 32): "int32", (_dl.INT, 64): "int64",
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
    b = _describe(x, what)
    if b.kind == F64 and b.device != "cpu":
        raise TypeError(f"{what} is float64 on {b.device}: fastema averages float64 on the CPU only for now; "
                        f"keep float64 models on the CPU, or train in float32")
    return b


def _describe(x, what: str) -> Buf:
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
    if a.device != b.device or not a.numel or not b.numel or not a.address or not b.address:
        return False
    return a.address < b.address + b.nbytes and b.address < a.address + a.nbytes


def disjoint(bufs: list, names: list) -> None:
    """ValueError naming two of ``bufs`` that share memory (tied or aliased tensors, the same
    tensor twice): an in-place update or swap would then touch those bytes twice."""
    spans = sorted((b.device, b.address, b.address + b.nbytes, i) for i, b in enumerate(bufs)
                   if b.numel and b.address)
    end, last = None, None
    for device, lo, hi, i in spans:
        if end is not None and device == end[0] and lo < end[1]:
            a, b = names[last], names[i]
            raise ValueError(f"{a} and {b} share memory (the same tensor twice, tied weights or a view of "
                             f"another source); pass each tensor once. Nothing was written.")
        if end is None or device != end[0] or hi > end[1]:
            end, last = (device, hi), i


def empty(like: Buf, kind: int, shape: tuple):
    """A new C-contiguous array of ``kind`` and ``shape`` on ``like``'s device, in its framework."""
    if like.framework == "torch":
        import torch

        dtype = {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16, F64: torch.float64}[kind]
        return torch.empty(shape, dtype=dtype, device=like.obj.device)
    if kind == BF16:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("a bfloat16 shadow for NumPy/CUDA-array sources needs the ml_dtypes "
                            "package (pip install ml_dtypes), or use dtype='float32'") from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype({F32: np.float32, F64: np.float64}.get(kind, np.float16))
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
