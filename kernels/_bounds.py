"""Launch bounds per compiled set and architecture: where a kernel's own bounds (``kernels.cuda``'s
``SR_LERP_BOUNDS`` and ``PLAN_LERP_BOUNDS``, ``_cuda_scan.SCAN_BOUNDS``: what numba's dispatcher and
the run-time compile use) make a toolchain spill on an architecture, the build compiles that kernel
for it with fewer blocks per multiprocessor.

Only the second figure (``.minnctapersm``, blocks per SM) ever changes: the first (``.maxntid``)
stays the kernel's own, the 256 threads a block fastema launches
(``fastema._launch.config.CUDA_THREADS``), so every image takes the launch the dispatcher path
makes. Fewer blocks per SM lift the register cap (64K registers over 256 threads: 4 blocks -> 64,
3 -> 80, 2 -> 128); the grid-stride kernels are correct at any occupancy, and the grid caps of
``config`` (``CUDA_PLAN_LERP_BLOCKS_PER_SM``) only become more waves.

Keys: ``(set, arch)``, set ``"cu12"`` (:mod:`._toolchain_cu12`) or ``"cu13"`` (the CUDA 13.5 set of
``scripts/build_device_code.py``), arch ``"sm_XY"`` or the PTX's ``"compute_XY"``; in each, a
kernel's name (``kernels._cuda_jit.VARIANTS``, every variant of that kernel) to its bounds. Found
with ``ptxas -v`` and nvJitLink's log; ``tests/kernels/test_toolchain_cu12.py`` holds every entry to
a kernel that exists, to 256 threads and to fewer blocks than the kernel's own.
"""
from __future__ import annotations

OVERRIDES: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}


def launch_bounds(toolset: str, arch: str, name: str, own):
    """The launch bounds kernel ``name`` is built with for ``arch`` in compiled set ``toolset``:
    its override, else ``own`` (its own, ``dispatcher.targetoptions["launch_bounds"]``)."""
    return OVERRIDES.get((toolset, arch), {}).get(name, own)
