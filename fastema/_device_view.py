"""A 1-d view of CUDA device memory as fastema's launch path reads it: ``ptr``, ``size``,
``dtype``, ``shape``, ``nbytes``, ``__cuda_array_interface__`` (v3; numba's dispatcher takes it too),
contiguous slices. A description only: it makes no driver call, so the boundary that describes a
framework's arrays (:func:`.cai.raw_view`) holds no launch code; the device memory fastema allocates
and copies is :class:`fastema._launch.cuda.memory.DeviceArray`, a view that can also copy."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DeviceView"]


class DeviceView:
    """``size`` elements of ``dtype`` at the CUDA address ``ptr``; ``owner`` is what keeps the memory
    alive (an allocation of fastema's, a tensor, None: the caller), kept with every slice;
    ``device``: the device it was allocated on, where fastema allocated it (else None)."""

    __slots__ = ("ptr", "size", "dtype", "shape", "nbytes", "owner", "device", "__cuda_array_interface__")

    def __init__(self, ptr: int, size: int, dtype, owner, device: Any = None):
        self.ptr, self.size, self.dtype = int(ptr), int(size), np.dtype(dtype)
        self.shape = (self.size,)
        self.nbytes = self.size * self.dtype.itemsize
        self.owner, self.device = owner, device
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": self.dtype.str,
                                         "data": (self.ptr, False), "strides": None, "version": 3}

    @classmethod
    def view(cls, address: int, size: int, dtype, owner):
        """``size`` elements of ``dtype`` at the CUDA address ``address`` (no copy, no sync), whose
        memory ``owner`` keeps alive (kept with the view)."""
        return cls(address, size, dtype, owner)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size} x {self.dtype} at {self.ptr:#x})"

    def __getitem__(self, item):
        """A contiguous slice (no copy), of this class."""
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError(f"fastema: a device array takes contiguous slices only (a[i:j]), got {item!r}")
        lo, hi, _ = item.indices(self.size)
        hi = max(lo, hi)
        return type(self)(self.ptr + lo * self.dtype.itemsize, hi - lo, self.dtype, self.owner, self.device)
