"""The sm_90 machine code of fastema's per-step CUDA kernels, read without a GPU (issues 45, 60).

Shared by ``bench/tests/test_sass.py`` (the checks CI runs), the gates' ``sass`` section
(``bench/gates/sass.py``) and ``bench/gpu/static.py`` (the table); ``python -m bench.gpu.sass``
prints the table of one set. The method is ``../shared/design/gpu.md`` §1: each variant is the one
its launcher asks for (its argument types typed by numba-cuda's own ``typeof``, as the bound launch
path types them), read from the store as fastema ships it (``kernels/device``: the CUDA 13 set's
sm_90 cubin, or the CUDA 12 set's): nothing is compiled here. The entry's cubin is disassembled by
``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, 13.5, which reads CUDA 12.0 cubins too) and read:
registers and frame size from the cubin's ``.nv.info``, spills, registers and shared memory from the
entry's figures (the linker's or ptxas' log, parsed once when the entry was built), and from the
SASS the loops (a backward branch closes one), their global loads and stores, their widths, and the
bytes a thread has in flight when it first waits for one of its loads.

Occupancy follows the sm_90 rules at ``CUDA_THREADS`` (256) threads a block (gpu.md §1.1): 65,536
registers per SM, allocated per warp in units of 256; at most 64 warps and 32 blocks per SM; 228 KiB
of shared memory with 1 KiB reserved per block. The bandwidth model is gpu.md §1.3 (Little's law,
calibrated on the 2026-11-22 H100 run): a prediction, not a measurement.

One concern a module: :mod:`.toolchain` (nvdisasm found and run), :mod:`.launches` (the variants, as
their launchers launch them), :mod:`.entries` (their shipped entries, disassembled),
:mod:`.cubin` (the cubin's ``.nv.info``), :mod:`.instructions` (the SASS read), :mod:`.flow` (its
loops), :mod:`.model` (sm_90's occupancy and the bandwidth model), :mod:`.report` (one variant's
figures), :mod:`.rules` (the checks), :mod:`.markdown` (the table), ``__main__`` (the command).
This package re-exports each module's public names: ``from bench.gpu import sass as S``.
"""
from __future__ import annotations

from .cubin import cubin_attributes
from .entries import Built, argument_types, build, build_all, shipped, temp_folder
from .flow import Loop, bursts, element_loops, is_vector, iteration, loops
from .instructions import GLOBAL_LOAD, GLOBAL_STORE, LOCAL, WIDTH, Instruction, parse
from .launches import Variant, variants
from .markdown import table
from .model import (
    ARCH,
    CC,
    COPY_GBS,
    LATENCY_NS,
    MAX_BLOCKS,
    MAX_WARPS,
    REG_UNIT,
    REGS_PER_SM,
    SMEM_PER_SM,
    SMEM_RESERVED,
    SMS,
    blocks_per_sm,
)
from .report import LoopFigures, Report, analyse
from .rules import CHECKS, IN_FLIGHT_MIN_KIB, OTHER_CHECKS, check, checks
from .toolchain import disassemble, nvdisasm, toolchain_problem

__all__ = [
    "ARCH", "CC", "CHECKS", "COPY_GBS", "GLOBAL_LOAD", "GLOBAL_STORE", "IN_FLIGHT_MIN_KIB",
    "LATENCY_NS", "LOCAL", "MAX_BLOCKS", "MAX_WARPS", "OTHER_CHECKS", "REGS_PER_SM", "REG_UNIT",
    "SMEM_PER_SM", "SMEM_RESERVED", "SMS", "WIDTH",
    "Built", "Instruction", "Loop", "LoopFigures", "Report", "Variant",
    "analyse", "argument_types", "blocks_per_sm", "build", "build_all", "bursts", "check", "checks",
    "cubin_attributes", "disassemble", "element_loops", "is_vector", "iteration", "loops",
    "nvdisasm", "parse", "shipped", "table", "temp_folder", "toolchain_problem", "variants",
]
