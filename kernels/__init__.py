"""fastema.kernels: the compiled math, on plain arrays (NumPy, Numba and llvmlite only).

Installed as ``fastema.kernels`` from the top-level ``kernels/`` folder (``package-dir`` in
``pyproject.toml``): the folder holds no framework code, and a test checks its imports.

- :mod:`.kinds`: storage kinds, item sizes, swap and EMA modes (the kernels' constants).
- :mod:`._bits`: scalar bit math (dtype conversions, stochastic rounding, exact swap packing).
- :mod:`._stats`: scalar running statistics (EMA step, Neumaier compensated sum).
- :mod:`.formulas`: the schedules' scalar formulas of :mod:`._stats`, for the host
  (:mod:`fastema.schedules` calls them).
- :mod:`._elementwise`: the element body of every kernel, written once.
- :mod:`._intrinsics`: bit casts, FMA and typed pointers, once for every target;
  :mod:`._cpu_hw` and :mod:`._cuda_hw` instantiate them (the CUDA one falls back to plain
  Python under the simulator).
- :mod:`._target`: compiles the plain element bodies for one target.
- :mod:`._toolchain_cu12`, :mod:`._bounds`: the CUDA 12 set's toolchain (the build only) and the launch
  bounds per compiled set and architecture.
- :mod:`.layout`: segment and chunk tables for many tensors in one launch.
- :mod:`.cpu`: every CPU kernel (chunk loops under ``prange``); :mod:`.cuda`: every CUDA
  kernel (grid-stride loops), imported lazily.
- :mod:`._cache`: numba's disk cache keyed by what each CPU kernel captures, so a kernel is
  compiled once per machine and loaded by every later process.
- :mod:`._store`: the compiled-code store: one identity (the one digest of the kernel sources and
  the toolchain; the kernel factories' decorator), one entry format, the shipped sets
  (``device/cu13``, ``device/cu12``) and the node store, one lock, trust rule and atomic write.

To add an op: its element body in ``_elementwise.py``, one skeleton in ``cpu.py`` and one
in ``cuda.py``. To add a target: one hardware shim and one skeleton module.
"""
