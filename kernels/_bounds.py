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

Keys: ``(set, arch)``, set ``"cu12"`` (:mod:`._toolchain_cu12`) or ``"cu13"`` (NVVM and nvJitLink
13.5: ``fastema._launch.cuda.compiler.NumbaCuda``), arch ``"sm_XY"`` or the PTX's ``"compute_XY"``; in each, a
kernel's name (``kernels._store.identity.VARIANTS``, every variant of that kernel) to its bounds. Found
with ``ptxas -v`` and nvJitLink's log; ``tests/kernels/test_toolchain_cu12.py`` holds every entry to
a kernel that exists, to 256 threads and to fewer blocks than the kernel's own.
"""
from __future__ import annotations

_SCAN_F32 = "nonfinite_kernel(0)"       # the float32 scan: at 6 blocks, 40 registers spill
_PLAN_F32 = "plan_lerp_kernel(0,0,0)"    # the fused plan + lerp, float32 <- float32, nearest
_SR_PLAN = ("plan_lerp_kernel(1,0,1)", "plan_lerp_kernel(1,1,1)", "plan_lerp_kernel(1,2,1)",
            "plan_lerp_kernel(2,0,1)", "plan_lerp_kernel(2,1,1)", "plan_lerp_kernel(2,2,1)")
_SR_LERP_F16 = ("lerp_kernel(1,2,1,0)", "lerp_kernel(1,2,1,1)", "lerp_kernel(2,2,1,0)",
                "lerp_kernel(2,2,1,1)")   # 16-bit shadows of float16 sources, stochastic rounding
_SR_LERP_BF16 = ("lerp_kernel(1,0,1,0)", "lerp_kernel(1,0,1,1)", "lerp_kernel(1,1,1,0)")
_SCANS = ("nonfinite_kernel(0)", "nonfinite_kernel(1)", "nonfinite_kernel(2)")

OVERRIDES: dict[tuple[str, str], dict[str, tuple[int, int]]] = {
    # CUDA 12.0 (ptxas 12.0 on NVVM 12.0's PTX). The float32 fused kernel (nearest rounding) at its own
    # 4 blocks spills on sm_70 only (24/52 bytes at 64 registers): 2 blocks there
    ("cu12", "sm_70"): {_SCAN_F32: (256, 5),                      # 48 registers, no spill
                        _PLAN_F32: (256, 2), **dict.fromkeys(_SR_PLAN, (256, 3))},   # 73-79
    ("cu12", "sm_80"): {_SCAN_F32: (256, 4)},                     # 59; at 5 blocks 48 spill
    ("cu12", "sm_86"): {_SCAN_F32: (256, 4)},
    ("cu12", "sm_89"): {_SCAN_F32: (256, 4)},
    ("cu12", "sm_90"): dict.fromkeys(("plan_lerp_kernel(1,0,1)", "plan_lerp_kernel(1,2,1)"),
                                     (256, 3)),                # 80; at 4 blocks 12/12 bytes
    # Blackwell's CUDA 12 cubins (ptxas 12.8 on NVVM 12.0's PTX): at the kernels' own bounds the
    # same two SR fused kernels spill 12/12 bytes on sm_100 at 64 registers; on sm_120 every SR
    # fused kernel (44-100 bytes), the bfloat16/float16 SR lerps (4-32 bytes at 64) and the 16-bit
    # and float32 scans (16/8 at 40)
    ("cu12", "sm_100"): dict.fromkeys(("plan_lerp_kernel(1,0,1)", "plan_lerp_kernel(1,2,1)"),
                                      (256, 3)),
    ("cu12", "sm_120"): {**dict.fromkeys(_SR_PLAN + _SR_LERP_F16 + _SR_LERP_BF16, (256, 3)),
                         **dict.fromkeys(_SCANS, (256, 4))},
    # CUDA 13.5 (nvJitLink's LTO of NVVM 13.5's LTO-IR for cc 8.0)
    ("cu13", "sm_80"): {_SCAN_F32: (256, 4)},                     # 59; at 5 blocks 48 spill 8/4
    ("cu13", "sm_100"): {_SCAN_F32: (256, 5)},                    # 48
    ("cu13", "sm_120"): {_SCAN_F32: (256, 4),                     # 62; at 5 blocks 48 spill 20/16
                         **dict.fromkeys(_SR_PLAN + _SR_LERP_F16, (256, 3))},   # 61-80, no spill
}


def launch_bounds(toolset: str, arch: str, name: str, own):
    """The launch bounds kernel ``name`` is built with for ``arch`` in compiled set ``toolset``:
    its override, else ``own`` (its own, ``dispatcher.targetoptions["launch_bounds"]``)."""
    return OVERRIDES.get((toolset, arch), {}).get(name, own)
