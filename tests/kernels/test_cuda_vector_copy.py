"""The copy and swap kernels' vector path (issue 86 item 4): 16-byte vectors, two a thread, give the CPU
kernel's bits for every kind pair and mode (bits as they are, conversions, bfloat16 packing), and fall
back element by element where a chunk is not aligned (an unaligned source, rows whose stride is not a
multiple of 16 bytes) and in each chunk's tail.

Runs in the Numba CUDA simulator in CI (its vector accesses fail on a misaligned address, as the
hardware does) and unchanged on a GPU. Chunks of 16 elements, 3 blocks of 8 threads: tails, several
blocks and the grid-stride loop over chunks on tiny inputs.
"""
import itertools
import os

import numpy as np
import pytest
from numba import cuda

pytestmark = [pytest.mark.cuda]

if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from support import vectors  # noqa: E402
from support.shipped import launch  # noqa: E402

from fastema.kernels import _bits  # noqa: E402
from fastema.kernels import cpu as ema_cpu  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, EXCHANGE, F16, F32, ITEMSIZE, KIND_NAMES, PACK, UNPACK  # noqa: E402
from fastema.kernels.layout import chunk_table, segment_offsets  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
COUNTS = {"aligned": (64, 8, 40, 32, 24, 48), "odd": (64, 7, 40, 33, 3, 49)}
"""Every shadow segment 16-byte aligned (n = 216); or from the second on, not (n = 196)."""
SWAPS = [(F32, F32, EXCHANGE), (BF16, BF16, EXCHANGE), (F16, F16, EXCHANGE), (F32, BF16, PACK),
         (F32, BF16, UNPACK), (F32, BF16, EXCHANGE), (F32, F16, EXCHANGE), (BF16, F32, EXCHANGE),
         (BF16, F16, EXCHANGE)]
COPIES = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32), (F16, BF16)]
MODES = {EXCHANGE: "", PACK: "-pack", UNPACK: "-unpack"}
LAYOUTS = (("aligned", 0), ("odd", 0), ("aligned", 1))
"""(counts, shift): each source starts ``shift`` elements into its allocation (unaligned at 1)."""


def random_bits(kind, n, rng):
    v = (rng.standard_normal(n) * 2.0).astype(np.float32)
    v[rng.integers(0, n, max(1, n // 40))] = np.inf                      # specials: the encoders' branches
    v[rng.integers(0, n, max(1, n // 40))] = np.nan
    bits = v.view(np.uint32)
    if kind == F32:
        return bits ^ rng.integers(0, 1 << 16, n).astype(np.uint32)     # low halves: the packing's rounding
    return np.array([_bits.encode(b, kind) for b in bits], np.uint16)


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value


def run_case(sk, xk, run_cpu, run_gpu, counts, rows, shift, rng):
    """One kernel over one layout on the device and on the CPU, shadow rows and sources after:
    ``((device shadow, device sources), (CPU shadow, CPU sources), n)``. ``shift``: each source starts
    that many elements into its allocation (unaligned at 1)."""
    srcs = [random_bits(xk, c + shift, rng) for c in counts]
    off = segment_offsets(counts)
    cs, cb = chunk_table(off, 16)
    n = int(off[-1])
    place = off[:-1] * ITEMSIZE[sk]                                       # each segment's bytes into a row
    flat = random_bits(sk, rows * n, rng)
    host_shadow, host_src = flat.copy(), [x.copy() for x in srcs]
    host_addr = np.array([h.ctypes.data + shift * h.itemsize for h in host_src], np.int64)
    run_cpu(n, host_shadow.ctypes.data + place, host_addr, off, cs, cb)
    d_src, d_shadow = [cuda.to_device(x) for x in srcs], cuda.to_device(flat)
    seg_addr = np.array([dev_addr(d) + shift * d.dtype.itemsize for d in d_src], np.int64)
    tables = [cuda.to_device(a) for a in (dev_addr(d_shadow) + place, seg_addr, off, cs, cb)]
    run_gpu(n, *tables)
    return (d_shadow.copy_to_host(), [d.copy_to_host() for d in d_src]), (host_shadow, host_src), n


def check(sk, got, want, n, rows, shift, used, what, row=0):
    assert np.array_equal(got[0], want[0]), (what, np.flatnonzero(got[0] != want[0])[:8])
    for a, b in zip(got[1], want[1]):
        assert np.array_equal(a, b), (what, np.flatnonzero(a != b)[:8])
    if SIM:                                        # the first segment is aligned whenever its source and rows are
        stride = n * ITEMSIZE[sk]
        aligned = shift == 0 and row * stride % 16 == 0 and (rows == 1 or stride % 16 == 0)
        assert (used["vectors"] > 0) == aligned, (what, used)


@pytest.mark.parametrize("sk,xk,mode", SWAPS, ids=[f"{KIND_NAMES[s]}-{KIND_NAMES[x]}{MODES[m]}" for s, x, m in SWAPS])
def test_swap_vector_path_gives_the_cpu_bits(sk, xk, mode):
    rng = np.random.default_rng(sk * 100 + xk * 10 + mode)
    for layout, shift in LAYOUTS:
        counts = COUNTS[layout]
        with vectors.counting() as used:
            got, want, n = run_case(
                sk, xk, lambda *t: ema_cpu.swap_kernel(sk, xk, mode, False)(*t, 1),
                lambda *t: launch(ema_cuda.swap_kernel(sk, xk, mode), 3, 8, *t, 1), counts, 2, shift, rng)
        check(sk, got, want, n, 1, shift, used, (layout, shift), row=1)


@pytest.mark.parametrize("sk,xk", COPIES, ids=[f"{KIND_NAMES[s]}-{KIND_NAMES[x]}" for s, x in COPIES])
def test_copy_vector_path_gives_the_cpu_bits(sk, xk):
    rng = np.random.default_rng(sk * 10 + xk)
    flag = np.zeros(1, np.int32)
    for (layout, shift), (to, lo, hi) in itertools.product(LAYOUTS, ((True, 1, 3), (False, 2, 0))):
        counts = COUNTS[layout]
        with vectors.counting() as used:
            got, want, n = run_case(
                sk, xk, lambda *t: ema_cpu.copy_kernel(sk, xk, to, False)(*t, lo, hi, flag),
                lambda *t: launch(ema_cuda.copy_kernel(sk, xk, to), 3, 8, *t, lo, hi, cuda.to_device(flag)),
                counts, 3, shift, rng)
        check(sk, got, want, n, hi - lo if to else 1, shift, used, (layout, shift, to, lo, hi), row=lo)
