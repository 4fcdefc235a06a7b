"""What every CUDA kernel module of fastema shares: the element bodies bound for CUDA (:data:`E`), the
dispatcher maker (:func:`jit`: ``cuda.jit``'s options, the disk cache when :data:`CACHE`), raw pointers
by storage kind, and the masks of a 16-bit element's half of a 32-bit word. The kernel factories'
decorator, which names every kernel, is ``._store.identity.variant`` (outside the device code's
sources: an edit of it compiles nothing anew)."""
import functools
import sys

import numpy as np
from numba import cuda

from . import _bits, _cuda_hw, _elementwise, _intrinsics, _stats, _target, kinds
from ._cache import cached_cuda
from ._cuda_hw import HW, SIMULATOR
from ._target import bind
from .kinds import F32, F64

E = bind(functools.partial(cuda.jit, device=True, inline="always"), HW)
DEPENDENCIES = (_bits, _stats, _elementwise, _intrinsics, _target, _cuda_hw, kinds, sys.modules[__name__])
"""The modules every CUDA kernel's code depends on besides its own file (the cache's stamp): this one's
pointers and masks too."""
CACHE = False
"""Kernels built from now on by numba's dispatcher are cached on disk (:func:`._cache.cached_cuda`): set by
``fastema._launch.cuda`` from FASTEMA_CUDA_CACHE=1. Only the dispatcher path uses it (the Numba CUDA
simulator has none; ``FASTEMA_CUDA_LAUNCH=dispatcher``): every other launch runs the shipped device code,
or code compiled once per node into fastema's own cache (``fastema._launch.device_code``)."""


def jit(fn, **options):
    """A kernel's dispatcher, with ``cuda.jit``'s ``options`` (not in the simulator, which takes none of
    them) and the disk cache when :data:`CACHE` (never in the simulator)."""
    if SIMULATOR:
        return cuda.jit(fn)
    kernel = cuda.jit(fn, **options)
    return cached_cuda(kernel, DEPENDENCIES) if CACHE else kernel


_POINTERS = {F32: HW["u32_pointer"], F64: HW["f64_pointer"]}
M16, S16, Z32 = np.uint32(0xFFFF), np.uint32(16), np.uint32(0)   # a 16-bit element's half of a 32-bit word
M32, S32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def pointer(kind):
    """The raw-pointer intrinsic of a storage kind (32-bit words, float64, or 16-bit elements)."""
    return _POINTERS.get(kind, HW["u16_pointer"])
