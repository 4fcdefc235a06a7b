"""CUDA hardware pieces: the intrinsics of :mod:`._intrinsics` for numba-cuda.

The Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) can run neither intrinsics nor raw
device pointers, so it gets the plain-Python versions with the same semantics; the
kernels in :mod:`fastema.kernels.cuda` use only these names and run unchanged on both.
"""
from numba.cuda.core import config

from ._intrinsics import build, build_pairs, build_vectors, python_vectors, python_versions

SIMULATOR = bool(config.ENABLE_CUDASIM)

if SIMULATOR:
    from numba import types  # the simulator's local arrays take numba's types
    HW = python_versions()
    VECTORS = python_vectors()
else:
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    HW = {**build(intrinsic, types), **build_pairs(intrinsic, types)}
    VECTORS = build_vectors(intrinsic, types)    # used by the kernels' skeletons, not the element bodies

as_float, as_bits, fma = HW["as_float"], HW["as_bits"], HW["fma"]
u32_pointer, u16_pointer, f64_pointer = HW["u32_pointer"], HW["u16_pointer"], HW["f64_pointer"]
