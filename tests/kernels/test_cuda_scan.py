"""The ``skip_nonfinite`` scan's vector path (issue 45 item 2): 16-byte loads, two a thread before any
test, a register flag stored once. It must find an inf or NaN wherever it lies: in the elements before
a source's first 16-byte boundary (an unaligned start), in a first or second vector, in a chunk's last
whole vector or in the elements after it, in either half of a 32-bit word of 16-bit elements; and never
flag a finite value (the largest finite ones included). Checked against a numpy reference and the CPU
kernel, on sources shifted by every element offset within 16 bytes.

Runs in the Numba CUDA simulator in CI (its vector loads fail on a misaligned address, as the hardware
does) and unchanged on a GPU. Small chunks and blocks, so heads, tails, several chunks a segment, the
grid-stride loop over chunks and threads with one or two vectors all run on tiny inputs.
"""
import os

import numpy as np
import pytest
from numba import cuda

pytestmark = [pytest.mark.cuda,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]   # inf - inf in Python

if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from support import vectors  # noqa: E402
from support.shipped import launch  # noqa: E402

from fastema.kernels import cpu as ema_cpu  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, F16, F32, F64, ITEMSIZE, KIND_NAMES  # noqa: E402
from fastema.kernels.layout import chunk_table, segment_offsets  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPE = {F32: np.uint32, BF16: np.uint16, F16: np.uint16, F64: np.float64}
COUNTS = (300, 3, 67)
"""Three sources: several chunks (the last one partial), one shorter than any vector, one with a tail."""
THREADS = 8
BAD = {F32: (0x7F800000, 0xFF800000, 0x7FC00001), BF16: (0x7F80, 0xFF80, 0x7FC1), F16: (0x7C00, 0xFC00, 0x7E01),
       F64: (np.inf, -np.inf, np.nan)}
"""+inf, -inf and a NaN of each kind (bits; float64 as values)."""
LARGEST = {F32: 0x7F7FFFFF, BF16: 0x7F7F, F16: 0x7BFF, F64: np.finfo(np.float64).max}
"""The largest finite value of each kind: one bit short of the exponent an inf or NaN has."""


def chunk_for(kind):
    """A chunk of 16 vectors of 16 bytes (32 float64): each of 8 threads takes two vectors a pass (one
    where an unaligned start leaves 15)."""
    return 16 * 16 // ITEMSIZE[kind]


def finite_sources(kind, rng):
    """Finite sources (largest finite values sprinkled in), each with 16 bytes to spare in front."""
    out = []
    for c in COUNTS:
        spare = 16 // ITEMSIZE[kind]
        if kind == F64:
            x = rng.standard_normal(c + spare)
        else:
            x = rng.integers(0, 0x3F00 if kind != F32 else 0x3F000000, c + spare).astype(DTYPE[kind])
        x[rng.integers(0, c + spare, 3)] = LARGEST[kind]
        out.append(x)
    return out


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value


def scan(kind, srcs, shift):
    """(device flag, CPU flag, numpy reference) for the sources ``srcs[i][shift:shift + COUNTS[i]]``."""
    off = segment_offsets(COUNTS)
    cs, cb = chunk_table(off, chunk_for(kind))
    views = [np.ascontiguousarray(x[shift:shift + c]) for x, c in zip(srcs, COUNTS)]
    if kind == F64:
        want = any(not np.isfinite(v).all() for v in views)
    else:
        exponent = 0x7F800000 if kind == F32 else 0x7F80 if kind == BF16 else 0x7C00
        want = any(((v & exponent) == exponent).any() for v in views)
    cpu_flag = np.zeros(1, np.int32)
    ema_cpu.nonfinite_kernel(kind, False)(np.array([v.ctypes.data for v in views], np.int64), off, cs, cb, cpu_flag)
    d_src = [cuda.to_device(x) for x in srcs]
    assert all(dev_addr(d) % 16 == 0 for d in d_src)       # so ``shift`` decides each source's head
    addr = np.array([dev_addr(d) + shift * ITEMSIZE[kind] for d in d_src], np.int64)
    flag = cuda.to_device(np.zeros(1, np.int32))
    tables = [cuda.to_device(a) for a in (addr, off, cs, cb)]
    launch(ema_cuda.nonfinite_kernel(kind), 3, THREADS, *tables, flag)
    return bool(flag.copy_to_host()[0]), bool(cpu_flag[0]), want


def positions(kind, shift):
    """Source positions that probe every part of the vector path for this start: the head before the
    first 16-byte boundary, the first and last element of the first and the second vector of a thread,
    a chunk's last whole vector, the tail after it, both halves of a 16-bit word, every source."""
    per = 16 // ITEMSIZE[kind]
    head = (-shift) % per                        # the arrays' own 16-byte alignment: shift elements past it
    chunk = chunk_for(kind)
    first = [(0, j) for j in range(min(head, 3))]
    vector = [(0, head), (0, head + 1), (0, head + per - 1), (0, head + THREADS * per),
              (0, head + THREADS * per + per - 1), (0, chunk - 1), (0, chunk), (0, chunk + head)]
    tail = [(0, COUNTS[0] - 1), (0, COUNTS[0] - 2), (1, 0), (1, 2), (2, COUNTS[2] - 1), (2, COUNTS[2] // 2)]
    return sorted({(s, j) for s, j in first + vector + tail if j < COUNTS[s]})


@pytest.mark.parametrize("kind", [F32, BF16, F16, F64], ids=KIND_NAMES)
def test_scan_finds_every_nonfinite_wherever_it_lies(kind):
    rng = np.random.default_rng(kind)
    per = 16 // ITEMSIZE[kind]
    for shift in range(per):
        srcs = finite_sources(kind, rng)
        with vectors.counting() as used:
            assert scan(kind, srcs, shift) == (False, False, False), shift
        if SIM:                                  # the vector path ran, at every start (float64: never)
            assert (used["vectors"] > 0) == (kind != F64), shift
        for n, (s, j) in enumerate(positions(kind, shift)):
            poisoned = [x.copy() for x in srcs]
            poisoned[s][shift + j] = BAD[kind][n % 3]
            assert scan(kind, poisoned, shift) == (True, True, True), (shift, s, j)


def test_a_set_flag_is_kept_and_never_cleared():
    """The scan only ever sets the flag: a flag already set stays set over finite sources."""
    rng = np.random.default_rng(0)
    srcs = finite_sources(F32, rng)
    off = segment_offsets(COUNTS)
    cs, cb = chunk_table(off, chunk_for(F32))
    d_src = [cuda.to_device(x) for x in srcs]
    addr = np.array([dev_addr(d) for d in d_src], np.int64)
    flag = cuda.to_device(np.ones(1, np.int32))
    tables = [cuda.to_device(a) for a in (addr, off, cs, cb)]
    launch(ema_cuda.nonfinite_kernel(F32), 3, THREADS, *tables, flag)
    assert flag.copy_to_host()[0] == 1
