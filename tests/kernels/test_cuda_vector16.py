"""The 16-bit-shadow lerp's vector path (issue 45 item 2): 8 elements a thread, 16-byte shadow loads and
stores, gives the CPU kernel's bits, stochastic rounding included (its noise keyed by each element's
index, as the scalar loop's), and falls back element by element where a chunk is not aligned.

Runs in the Numba CUDA simulator in CI (its vector accesses fail on a misaligned address, as the
hardware does) and unchanged on a GPU. Tunables shrunk so that tails, several blocks and the grid-stride
loop over chunks run on tiny inputs.
"""
import itertools
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

from fastema.kernels import _bits  # noqa: E402
from fastema.kernels import cpu as ema_cpu  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, F16, F32, KIND_NAMES  # noqa: E402
from fastema.kernels.layout import chunk_table, segment_offsets  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
UINT = {F32: np.uint32, BF16: np.uint16, F16: np.uint16}
COUNTS = {"aligned": (64, 8, 40, 32, 24, 48), "odd": (64, 7, 40, 33, 3, 49)}
"""Every shadow segment 16-byte aligned (n = 216); or from the second on, not (n = 196, odd rows)."""
CASES = [(BF16, xk, sr) for xk in (F32, BF16, F16) for sr in (False, True)] + [(F16, F16, False), (F16, F32, False)]


def random_bits(kind, n, rng, scale=2.0):
    v = (rng.standard_normal(n) * scale).astype(np.float32)
    v[rng.integers(0, n, max(1, n // 50))] = np.inf                      # a few specials: the encoders' branches
    if kind == F32:
        return v.view(np.uint32)
    return np.array([_bits.encode(b, kind) for b in v.view(np.uint32)], np.uint16)


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value


def run_case(sk, xk, sr, counts, rows, shift, device_key, rng, base=0):
    """The 16-bit-shadow lerp over one layout on the device and on the CPU: (device shadow, CPU shadow).
    ``base``: where the group's row starts in the noise index (the tables' offsets shifted by it, as a
    slice of a larger group's row; the addresses unchanged)."""
    srcs = [random_bits(xk, c + shift, rng) for c in counts]
    off = segment_offsets(counts)
    cs, cb = chunk_table(off, 16)
    n = int(off[-1])
    place = off[:-1] * 2                                                  # each segment's bytes into a row
    off, cb = off + base, cb + base
    flat = random_bits(sk, rows * n, rng, 1.0)
    weights = np.array([0.25, 0.003][:rows], np.float32)
    key = 0x9E3779B1
    host_shadow = flat.copy()
    host_src = [np.ascontiguousarray(x[shift:]) for x in srcs]
    ema_cpu.lerp_kernel(sk, xk, sr, False)(
        n, host_shadow.ctypes.data + place, np.array([h.ctypes.data for h in host_src], np.int64), off, cs, cb,
        tuple(weights), np.zeros(1, np.int32), np.uint32(key))
    d_src = [cuda.to_device(x) for x in srcs]
    d_shadow = cuda.to_device(flat)
    seg_addr = np.array([dev_addr(d) + shift * d.dtype.itemsize for d in d_src], np.int64)
    tables = [cuda.to_device(a) for a in (dev_addr(d_shadow) + place, seg_addr, off, cs, cb)]
    if device_key:
        w, k = cuda.to_device(weights), cuda.to_device(np.array([key | (7 << 32)], np.int64))   # the low 32 bits
    else:
        w, k = tuple(weights), np.uint32(key)
    launch(ema_cuda.lerp_kernel(sk, xk, sr, device_key), 3, 8, n, *tables, w,
           cuda.to_device(np.zeros(1, np.int32)), k)
    return d_shadow.copy_to_host(), host_shadow, n


@pytest.mark.parametrize("sk,xk,sr", CASES, ids=[f"{KIND_NAMES[s]}<-{KIND_NAMES[x]}{'-SR' * r}" for s, x, r in CASES])
def test_16bit_shadow_vector_path_gives_the_cpu_bits(sk, xk, sr):
    rng = np.random.default_rng(sk * 100 + xk * 10 + sr)
    for (layout, counts), rows, shift, device_key in itertools.product(COUNTS.items(), (1, 2), (0, 1), (False, True)):
        with vectors.counting() as used:
            got, want, n = run_case(sk, xk, sr, counts, rows, shift, device_key, rng)
        assert np.array_equal(got, want), (layout, rows, shift, device_key, np.flatnonzero(got != want)[:8])
        if SIM:                                    # the first segment is aligned whenever its source is
            assert (used["vectors"] > 0) == (shift == 0 and (rows == 1 or n % 8 == 0)), (layout, rows, shift)


@pytest.mark.parametrize("xk", [BF16, F32], ids=["bf16<-bf16-SR", "bf16<-f32-SR"])
def test_stochastic_bits_where_a_vector_crosses_a_multiple_of_2_to_the_32(xk):
    """The vector path hashes the noise's first round (which sees the index's high 32 bits only) once
    for a vector's 8 lanes, and again for the lanes past a multiple of 2**32: the scalar loop's bits
    (the CPU's) for a group whose row starts just below one, in every lane."""
    rng = np.random.default_rng(xk)
    for rows, device_key in ((1, False), (2, True)):
        for below in range(1, 8):
            for high in (1, 5):
                base = (high << 32) - below               # element ``below`` of the row is at high << 32
                got, want, n = run_case(BF16, xk, True, COUNTS["aligned"], rows, 0, device_key, rng, base)
                assert np.array_equal(got, want), (rows, below, high, np.flatnonzero(got != want)[:8])
