"""CPU hardware pieces: the intrinsics of :mod:`._intrinsics` for numba's CPU target."""
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from ._intrinsics import build, python_pairs

HW = build(intrinsic, types)
HW.update({name: njit(inline="always")(fn) for name, fn in python_pairs().items()})
as_float, as_bits, fma = HW["as_float"], HW["as_bits"], HW["fma"]
u32_pointer, u16_pointer, f64_pointer = HW["u32_pointer"], HW["u16_pointer"], HW["f64_pointer"]
