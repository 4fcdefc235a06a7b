"""Views and copies of arrays for the kernels: a control array checked and viewed
(:func:`control_view`), a kernel's view of fastema's state arrays (:func:`kernel_view`,
:func:`strided`), host copies both ways (:func:`to_host`, :func:`copy_from_host`), and the metric
smoothers' values and state (:func:`metric_values`, :func:`stack`, :func:`location`...). The
package (:mod:`fastema._backends`) names them all.
"""
from __future__ import annotations

import numpy as np

from . import cai, dlpack
from ._base import Unsupported
from .dispatch import NUMPY, backend_of


def control_view(x, what: str, dtype, size: int, device: str, writable: bool):
    """A small control array (weights, flag) checked and viewed for the kernels: ``x`` must hold
    exactly ``size`` elements of ``dtype`` on ``device``."""
    dtype = np.dtype(dtype)
    backend = backend_of(x)
    try:
        if backend is None:
            raise Unsupported
        dev, dt, n = backend.control(x, what, writable)
    except Unsupported:
        raise TypeError(f"{what} must be a NumPy array or a tensor of {dtype} on {device}, "
                        f"got {foreign(x, what, writable)}") from None
    if dt != dtype or n != size:
        raise ValueError(f"{what} must hold {size} element(s) of {dtype}, got {n} of {dt}")
    if dev != device:
        raise ValueError(f"{what} is on {dev} but the buffers are on {device}; create it on "
                         f"{device}")
    view = backend.kernel_view(x)
    return view.reshape(-1) if isinstance(view, np.ndarray) else view


def kernel_view(a):
    """A kernel's view (NumPy or Numba device array) of one of fastema's state arrays."""
    return backend_of(a).kernel_view(a)


def to_host(a) -> np.ndarray:
    """A NumPy copy of an array fastema made (NumPy, torch, or a Numba device array); a torch
    tensor is read in order on torch's current stream."""
    return (backend_of(a) or cai.backend).to_host(a)


def where(cond, a, fill):
    """``a`` where ``cond``, else ``fill``, in ``a``'s framework (NumPy or torch)."""
    return backend_of(a).where(cond, a, fill)


def copy_from_host(dst, a: np.ndarray) -> None:
    """``dst[...] = a`` (converted to ``dst``'s dtype) for a NumPy array, a torch tensor (on
    torch's current stream) or a Numba device array."""
    (backend_of(dst) or cai.backend).copy_from_host(dst, a)


def strided(v, shape, order):
    """A view of the flat slice ``v`` with ``shape`` and canonical element strides ``order``
    (() for C order): the shadow of a channels_last source is laid out as the source is."""
    return backend_of(v).strided(v, shape, order)


def foreign(x, what: str, writable: bool = False) -> str:
    """``x``'s type, named with its module, and for an array of a framework read only through DLPack
    (JAX, TensorFlow, Keras), which fastema does not take here, what to pass instead."""
    name = f"{type(x).__module__}.{type(x).__qualname__}"
    framework = {"jax": "JAX", "tensorflow": "TensorFlow", "keras": "Keras"}.get(dlpack.framework_of(x) or "")
    if framework is None:
        return name
    if writable:
        return f"a {framework} array ({name}), which is not written in place here: pass a NumPy array"
    return f"a {framework} array ({name}), which is not read here: pass np.asarray({what}), a host copy"


_NUMBERS = (int, float, np.integer, np.floating)
_BOOLS = (bool, np.bool_)


def metric_values(x, what: str):
    """``(kind, flat kernel view of the bits, (framework, device), shape)`` of metric values:
    a Python or NumPy number (float64), a NumPy array or a torch tensor (float64 allowed)."""
    if x.__class__ is float or x.__class__ is int:             # (a logged loss.item(): no adapter walk)
        x = np.asarray([x], np.float64)
    backend = backend_of(x)
    if backend is None and isinstance(x, _NUMBERS) and not isinstance(x, _BOOLS):  # no adapter's
        x = np.asarray([x], np.float64)
        backend = backend_of(x)
    try:
        if backend is None:
            raise Unsupported
        return backend.metric(x, what)
    except Unsupported:
        raise TypeError(f"{what} must be a Python or NumPy number, a NumPy array or a torch tensor, "
                        f"got {foreign(x, what)}") from None


def metric_vector(x):
    """``x`` as one vector of metric values for a smoother, if its framework takes vectors
    (NumPy, torch), else None."""
    backend = backend_of(x)
    try:
        return None if backend is None else backend.metric_vector(x)
    except Unsupported:
        return None


def stack(values, names):
    """One vector of one-element metric values, all of one framework (NumPy reads the others)."""
    backend = backend_of(values[0])
    return (backend or NUMPY).stack(values, names)


def concat(parts: list):
    """``parts`` (fastema's state arrays, of one framework) joined end to end."""
    return backend_of(parts[0]).concat(parts)


def keeps_on_device(x) -> bool:
    """True when ``x``'s framework keeps metric values on their device (see
    :meth:`Backend.stack`)."""
    backend = backend_of(x)
    return backend is not None and backend.DEVICE_METRICS


def location(a) -> tuple:
    """``(framework, device)`` of a smoother's state array (NumPy on the host for anything else)."""
    backend = backend_of(a)
    return ("numpy", "cpu") if backend is None else backend.location(a)
