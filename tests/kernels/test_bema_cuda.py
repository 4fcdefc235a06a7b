"""BEMA's bias correction on CUDA: the kernel equals its CPU twin bit for bit, skips on the
flag, and FlatShadow.bias_correct on (padded) device shadows equals the packed CPU shadow.

Runs in the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, its own process) and unchanged
on a real GPU; launches are shrunk so tails, several blocks and the grid-stride loop run.
"""
import os

import numpy as np
import pytest
from numba import cuda

pytestmark = pytest.mark.cuda

if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from support.shipped import launch  # noqa: E402
from test_bema import assert_close, math_alpha, three_rows, values  # noqa: E402

import fastema  # noqa: E402
from fastema import _launch  # noqa: E402
from fastema.kernels import cpu as ema_cpu  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, F16, F32, F64  # noqa: E402
from fastema.kernels.layout import chunk_table, segment_offsets  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(autouse=True)
def small_launches():
    with _launch.config.tuned(CUDA_CHUNK=16, CUDA_THREADS=8,
                              CUDA_MAX_BLOCKS=3):            # fewer blocks than chunks: grid-stride
        yield


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value


def run_both(kind, counts, q, alpha, flag):
    """(CPU result, CUDA result) of the kernel over a packed (3, n) buffer ``q``."""
    off = segment_offsets(counts)
    cs, cb = chunk_table(off, 16)
    n = int(off[-1])
    a = math_alpha(alpha, kind)
    expected = q.copy()
    shadow = _launch.flat_shadow(expected.ctypes.data, counts, q.itemsize)
    no_src = np.zeros(len(counts), np.int64)                       # the kernel reads no source
    ema_cpu.bema_kernel(kind, False)(n, shadow, no_src, off, cs, cb, a, flag)
    d = cuda.to_device(q)
    tabs = [cuda.to_device(t) for t in (_launch.flat_shadow(dev_addr(d), counts, q.itemsize), no_src, off, cs, cb)]
    launch(ema_cuda.bema_kernel(kind), 2, 8, n, *tabs, a, cuda.to_device(flag))
    return expected, d.copy_to_host()


@pytest.mark.parametrize("kind", [F32, BF16, F16, F64])
def test_bema_kernel_matches_cpu_kernel(kind):
    counts = [5, 0, 40, 1, 17]
    q = three_rows(kind, sum(counts), np.random.default_rng(kind))
    expected, got = run_both(kind, counts, q, 0.37, np.zeros(1, np.int32))
    assert np.array_equal(got, expected)
    n = sum(counts)
    assert_close(values(got[:n], kind), *(values(q[r * n:(r + 1) * n], kind) for r in range(3)),
                 np.float64(math_alpha(0.37, kind)), kind)


@pytest.mark.parametrize("kind", [F32, BF16])
def test_bema_kernel_skips_when_the_flag_is_set(kind):
    q = three_rows(kind, 30, np.random.default_rng(1))
    expected, got = run_both(kind, [12, 18], q, 0.5, np.ones(1, np.int32))
    assert np.array_equal(got, q) and np.array_equal(expected, q)


@pytest.mark.parametrize("dtype", ["float32", "float16"])   # bfloat16 device shadows: torch only
def test_flat_shadow_bias_correct_on_device_arrays(dtype):
    """Padded device shadow (each source 16-byte aligned) vs the packed CPU shadow, every row."""
    rng = np.random.default_rng(9)
    host = [rng.standard_normal(s).astype(np.float32) for s in (7, 40, 1, 25)]
    dev = [cuda.to_device(h) for h in host]
    flat, ref = fastema.FlatShadow(dev, rows=3, dtype=dtype), fastema.FlatShadow(host, rows=3, dtype=dtype)
    for h, d in zip(host, dev):
        h += 1.0
        d.copy_to_device(h)
    for s in (flat, ref):                       # row 0 <- theta_t, row 1 an EMA, row 2 theta_0 kept
        s.update([0.0, 0.5, 1.0])
        s.bias_correct(0.3, skip_if=s.scan_nonfinite())
    for i in range(len(host)):
        for r in range(3):
            got = np.asarray(flat.view(i, r).copy_to_host())
            assert np.array_equal(got.view(np.uint8), np.asarray(ref.view(i, r)).view(np.uint8)), (i, r)
