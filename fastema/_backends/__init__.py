"""The boundary: framework arrays in, plain descriptions of memory out. The only place in
fastema that recognises array types.

One adapter per framework (:mod:`.numpy`, :mod:`.torch`, :mod:`.cudasim`, :mod:`.cai` for
the CUDA array interface of CuPy and Numba, :mod:`.dlpack` for JAX, TensorFlow, Keras and
any other DLPack producer), each with the same functions; :func:`backend_of` picks one,
importing no framework (einops' idea: a framework's classes are looked up only when the
framework is already in ``sys.modules``). The functions here dispatch to it:

- :func:`describe`: a :class:`Buf` (storage kind, device, shape, address, layout) of an
  array or tensor, with every check the user can trip, before anything is written;
- :func:`empty`, :func:`zero_`, :func:`new_flag`: fastema's own buffers in the sources' framework;
- :func:`control_view`: a small control array (weights, flags) checked and viewed for a kernel;
- :func:`metric_values`, :func:`zeros`, :func:`kernel_view`, :func:`to_host`: the metric
  smoothers' values and state.

A new framework is one more module here and one line in :data:`_ORDER`.
"""
from __future__ import annotations

import numpy as np

from ..kernels.kinds import F64
from . import _buf, cai, cudasim, dlpack
from ._buf import Buf, c_layout, layout, not_dense, unsupported_dtype  # noqa: F401  (the boundary's names)
from . import numpy as np_backend
from . import torch as torch_backend

SUPPORTED = _buf.SUPPORTED
READ_ONLY_HINTS = dlpack.READ_ONLY_HINTS

_ORDER = (np_backend, torch_backend, cudasim, dlpack.frameworks, cai, dlpack)   # first owner wins
_BY_NAME = {"numpy": np_backend, "torch": torch_backend, "cudasim": cudasim, "cuda": cai, "cupy": cai, "jax": dlpack,
            "tensorflow": dlpack, "keras": dlpack, "dlpack": dlpack}


_BY_TYPE: dict = {}          # type -> adapter, for the adapters whose ownership the type alone decides


def backend_of(x):
    """The adapter module that owns ``x``, or None."""
    backend = _BY_TYPE.get(type(x))
    if backend is not None:
        return backend
    for backend in _ORDER:
        if backend.owns(x):
            if backend is np_backend or backend is torch_backend:     # isinstance of a class: by type
                _BY_TYPE[type(x)] = backend
            return backend
    return None


def framework(x) -> str | None:
    """The name of ``x``'s framework ("numpy", "torch", ...), or None for anything else."""
    backend = backend_of(x)
    return None if backend is None else backend.NAME


def is_torch(x) -> bool:
    return torch_backend.owns(x)


def describe(x, what: str) -> Buf:
    """Describe ``x`` as a :class:`Buf`, or raise ``TypeError``/``ValueError`` naming ``what``."""
    backend = backend_of(x)
    if backend is None:
        if isinstance(x, (bool, int, float, complex, list, tuple)):
            raise TypeError(f"{what} must be an array (NumPy, torch, CuPy, ...), got {type(x).__name__}; "
                            f"wrap Python numbers with np.asarray(..., dtype=np.float32)")
        raise TypeError(f"{what} must be a NumPy array, a torch tensor or an object with "
                        f"__cuda_array_interface__ or __dlpack__, got {type(x).__name__}")
    b = backend.describe(x, what)
    if b.kind == F64 and b.device != "cpu":
        raise TypeError(f"{what} is float64 on {b.device}: fastema averages float64 on the CPU only for now; "
                        f"keep float64 models on the CPU, or train in float32")
    return b


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
    """A new C-contiguous array of ``kind`` and ``shape`` on ``like``'s device, in its framework
    (NumPy for CPU buffers of other frameworks, Numba device arrays on CUDA)."""
    if like.framework == "torch":
        return torch_backend.empty(like, kind, shape)
    return (np_backend if like.device == "cpu" else cai).empty(like, kind, shape)


def zero_(a) -> None:
    """Fill one of fastema's arrays with zeros on its device (stream-ordered, no sync)."""
    (backend_of(a) or cai).zero_(a)


def new_flag(like: Buf):
    """A zeroed int32[1] flag on ``like``'s device, in ``like``'s framework."""
    if like.framework == "torch":
        return torch_backend.zeros(like.obj.device, 1, np.int32)
    return (np_backend if like.device == "cpu" else cai).zeros(like.device, 1, np.int32)


def control_view(x, what: str, dtype, size: int, device: str, writable: bool):
    """A small control array (weights, flag) checked and viewed for the kernels: ``x`` must hold
    exactly ``size`` elements of ``dtype`` on ``device``."""
    dtype = np.dtype(dtype)
    backend = backend_of(x)
    if backend is None or not hasattr(backend, "control"):
        raise TypeError(f"{what} must be a NumPy array or a tensor of {dtype} on {device}, "
                        f"got {type(x).__name__}")
    dev, dt, n, view = backend.control(x, what, dtype, writable)
    if dt != dtype or n != size:
        raise ValueError(f"{what} must hold {size} element(s) of {dtype}, got {n} of {dt}")
    if dev != device:
        raise ValueError(f"{what} is on {dev} but the buffers are on {device}; create it on {device}")
    if view is None:                                   # CUDA memory of a framework: a raw Numba view
        from .. import _launch

        view = _launch.device_view(backend.address(x), size, dtype, x)
    return view.reshape(-1) if isinstance(view, np.ndarray) else view


def metric_values(x, what: str):
    """``(kind, flat kernel view of the bits, (framework, device), shape)`` of metric values:
    a Python number, a NumPy array or a torch tensor (float64 allowed)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = np.asarray([x], np.float64)
    backend = backend_of(x)
    if backend is None or not hasattr(backend, "metric"):
        raise TypeError(f"{what} must be a Python float, a NumPy array or a torch tensor, "
                        f"got {type(x).__name__}")
    return backend.metric(x, what)


def zeros(where: tuple, n: int, dtype):
    """``n`` zeros of NumPy ``dtype`` in ``where = (framework, device)``."""
    return _BY_NAME[where[0]].zeros(where[1], n, dtype)


def kernel_view(a):
    """A kernel's view (NumPy or Numba device array) of one of fastema's state arrays."""
    return backend_of(a).kernel_view(a)


def to_host(a) -> np.ndarray:
    """A NumPy copy of an array fastema made (NumPy, torch, or a Numba device array); a torch
    tensor is read in order on torch's current stream."""
    if is_torch(a):
        return a.detach().cpu().numpy().copy()
    return np.array(a, copy=True) if isinstance(a, np.ndarray) else a.copy_to_host()


def where(cond, a, fill):
    """``a`` where ``cond``, else ``fill``, in ``a``'s framework (NumPy or torch)."""
    if is_torch(a):
        import torch

        return torch.where(cond, a, torch.full_like(a, fill))
    return np.where(cond, a, fill)


def copy_from_host(dst, a: np.ndarray) -> None:
    """``dst[...] = a`` (converted to ``dst``'s dtype) for a NumPy array, a torch tensor (on
    torch's current stream) or a Numba device array."""
    if is_torch(dst):
        import torch

        dst.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(dst.dtype))
    elif isinstance(dst, np.ndarray):
        dst[...] = a.astype(dst.dtype)
    else:
        dst.copy_to_device(np.ascontiguousarray(a.astype(dst.dtype)))


def strided(v, shape, order):
    """A view of the flat slice ``v`` with ``shape`` and canonical element strides ``order``
    (() for C order): the shadow of a channels_last source is laid out as the source is."""
    if not order:
        return v.reshape(shape)
    if isinstance(v, np.ndarray):
        return np.lib.stride_tricks.as_strided(v, shape, tuple(st * v.itemsize for st in order))
    return v.as_strided(shape, order)
