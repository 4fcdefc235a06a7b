"""CPU-only low-level pieces: float32 bit casts and typed pointers from raw addresses."""
from numba.core import types
from numba.extending import intrinsic

from ._intrinsics import build

as_float, as_bits, u32_pointer, u16_pointer, f64_pointer = build(intrinsic, types)
