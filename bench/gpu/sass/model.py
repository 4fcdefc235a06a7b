"""The target and its model: sm_90's occupancy rules (gpu.md §1.1) and the bandwidth model's
constants (gpu.md §1.3, Little's law, calibrated on the 2026-11-22 H100 run: a prediction, not a
measurement)."""
from __future__ import annotations

ARCH, CC = "sm_90", (9, 0)

# sm_90 (H100) limits, gpu.md §1.1
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_BLOCKS = 65536, 256, 64, 32
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024
SMS = 132                                  # H100 SXM5

# The bandwidth model, gpu.md §1.3
COPY_GBS = 3017.0                          # the 2026-11-22 H100 copy ceiling
LATENCY_NS = 920.0                         # loaded DRAM latency fitted on the 2026-11-22 figures


def blocks_per_sm(registers: int, threads: int = 256, smem: int = 0) -> int:
    """Resident blocks per SM on sm_90 at ``registers`` per thread (gpu.md §1.1): registers
    allocated per warp in units of 256, 64 warps, 32 blocks, shared memory with 1 KiB reserved per
    block."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // warps if per_warp else MAX_BLOCKS
    return min(by_regs, MAX_WARPS // warps, SMEM_PER_SM // (smem + SMEM_RESERVED), MAX_BLOCKS)
