"""fastema.kernels: the compiled math, on plain arrays (NumPy and Numba only).

- :mod:`._bits`: scalar bit helpers shared by both targets (dtype conversions,
  stochastic rounding, the exact float32/bfloat16 swap packing).
- :mod:`.layout`: segment and chunk tables for many tensors in one launch.
- :mod:`.ema_cpu`: CPU kernels; :mod:`.ema_cuda`: their CUDA twins (imported lazily).
- :mod:`._cpu_hw`, :mod:`._cuda_hw`: the few hardware-only pieces (bit casts, raw
  pointers), the CUDA one with a simulator fallback.

No framework is imported here: framework knowledge lives in ``fastema``.
"""
