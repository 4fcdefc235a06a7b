"""fastema's own arrays, made in the sources' framework (:func:`empty`, :func:`zeros`,
:func:`new_flag`; NumPy on the host and Numba device arrays on a GPU for the frameworks fastema
does not allocate in), zeroed (:func:`zero_`), the control arrays it made and keeps
(:func:`made_here`), and the allocation that holds an array (:func:`allocation`, for a face's
memory accounting). The package (:mod:`fastema._backends`) names them all.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import cai
from ._buf import Buf
from .dispatch import backend_of, device_of, is_torch, maker


def empty(like: Buf, kind: int, shape: tuple):
    """A new C-contiguous array of ``kind`` and ``shape`` on ``like``'s device, in its framework
    (NumPy for CPU buffers of other frameworks, Numba device arrays on CUDA)."""
    return maker(like.framework, like.device).empty(like, kind, shape)


def zero_(a) -> None:
    """Fill one of fastema's arrays with zeros on its device (stream-ordered, no sync, no
    kernel)."""
    (backend_of(a) or cai.backend).zero_(a)


def new_flag(like: Buf):
    """A zeroed int32[1] flag on ``like``'s device, in ``like``'s framework (:func:`made_here`)."""
    flag = maker(like.framework, like.device).zeros(like.device, 1, np.int32)
    mark_made_here(flag)
    return flag


_MADE_HERE: dict[int, weakref.ref] = {}     # id -> weak reference (not a WeakSet: its lookups
                                            # compare the referents with ==, an element-wise
                                            # tensor compare and a sync)


def mark_made_here(x) -> None:
    """Record that fastema made the control array ``x`` (a skip flag) and keeps its memory: see
    :func:`made_here`. Arrays that take no weak reference are not recorded."""
    key = id(x)

    def forget(ref, key=key):
        if _MADE_HERE.get(key) is ref:
            del _MADE_HERE[key]

    try:
        _MADE_HERE[key] = weakref.ref(x, forget)
    except TypeError:
        pass


def made_here(x) -> bool:
    """True for a control array fastema made (:func:`new_flag`, a device plan's flag): nothing
    re-points its memory, so a launch may bind its kernel view once. A caller's array is viewed
    again at every launch (its ``.data`` may have been replaced since). Identity only: no value
    of ``x`` is read."""
    ref = _MADE_HERE.get(id(x))
    return ref is not None and ref() is x


def zeros(where: tuple, n: int, dtype):
    """``n`` zeros of NumPy ``dtype`` in ``where = (framework, device)``."""
    return maker(*where).zeros(where[1], n, dtype)


def allocation(x) -> tuple[str, int, int] | None:
    """``(device, address, bytes)`` of the allocation that holds ``x`` (a torch tensor's whole
    storage, a NumPy array's base, a CUDA device array), for a face's memory accounting; None for
    anything else."""
    if is_torch(x):
        storage = x.untyped_storage()
        return device_of(x), storage.data_ptr(), storage.nbytes()
    if isinstance(x, np.ndarray):
        base = x if x.base is None else x.base
        if isinstance(base, np.ndarray):
            return "cpu", base.__array_interface__["data"][0], base.nbytes
        return "cpu", x.__array_interface__["data"][0], x.nbytes
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        device = getattr(getattr(x, "gpu_data", None), "device", None)
        index = getattr(getattr(x, "_numba_type_", None), "device", None)
        name = f"cuda:{getattr(device, 'id', index) or 0}"
        return name, cai["data"][0], int(getattr(x, "nbytes", 0) or getattr(x, "alloc_size", 0))
    return None
