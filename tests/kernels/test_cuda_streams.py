"""The smoother's fused streams kernel (issue 86 item 4) on the device gives the CPU kernel's bits: the
EMA and the SMA in one launch, unweighted (every weight the scale, no weights kept), then widened in
place at the first weighted update and weighted after; non-finite values skipped or propagated.

Runs in the Numba CUDA simulator in CI and unchanged on a GPU (one stream a thread, 2 blocks of 8).
"""
import os

import numpy as np
import pytest
from numba import cuda

pytestmark = [pytest.mark.cuda,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]   # inf - inf in Python

if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from support.shipped import launch  # noqa: E402

from fastema.kernels import _bits  # noqa: E402
from fastema.kernels import cpu as smooth_cpu  # noqa: E402
from fastema.kernels import cuda as smooth_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, EMA_PART, F32, F64, SMA_PART, STREAM_SCALE  # noqa: E402

CASES = [(kind, EMA_PART | SMA_PART, skip) for kind in (F32, BF16, F64) for skip in (True, False)] + \
    [(F64, EMA_PART, False), (F64, SMA_PART, True)]
NAMES = ("ab", "ring_v", "sc", "n", "ring_w", "wsc", "bad")


def values(kind, k, step, rng):
    v = rng.standard_normal(k)
    v[step % k], v[(3 * step + 1) % k] = np.nan, np.inf
    if kind == F64:
        return v
    bits = v.astype(np.float32).view(np.uint32)
    return bits if kind == F32 else np.array([_bits.encode(b, BF16) for b in bits], np.uint16)


@pytest.mark.parametrize("kind,parts,skip", CASES, ids=[f"{k}-{p}-{'skip' if s else 'propagate'}" for k, p, s in CASES])
def test_streams_kernel_matches_cpu(kind, parts, skip):
    rng = np.random.default_rng(kind * 10 + parts)
    k, window, weighted_from = 37, 4, 5                  # 5 unweighted updates (the ring wraps), then weighted
    mode, d = (kind + parts) % 3, 0.8                    # DEBIASED, SEEDED, ZEROS across the cases
    cpu = dict(ab=np.zeros(2 * k), ring_v=np.zeros(window * k), sc=np.zeros(2 * k), n=np.zeros(k, np.int32),
               ring_w=np.zeros(window * k), wsc=np.zeros(2 * k), bad=np.zeros(k, np.int32))
    dev = {n: cuda.to_device(a) for n, a in cpu.items()}
    for step in range(9):
        y = values(kind, k, step, rng)
        weighted = step >= weighted_from
        per_stream = weighted and step % 2 == 0
        c = rng.integers(0, 4, k).astype(np.float64)     # 0: the value left out
        w0 = STREAM_SCALE * (1.0 if per_stream or not weighted else 3.0)
        args = (w0, c, per_stream, mode, d)
        tail = (step % window, min(step, window), step == weighted_from)
        smooth_cpu.streams_kernel(kind, parts, skip, weighted, False)(y, *args, *[cpu[n] for n in NAMES], *tail)
        launch(smooth_cuda.streams_kernel(kind, parts, skip, weighted), 2, 8, cuda.to_device(y), w0,
               cuda.to_device(c), per_stream, mode, d, *[dev[n] for n in NAMES], *tail)
        for n, a in cpu.items():
            assert np.array_equal(dev[n].copy_to_host(), a, equal_nan=True), (step, n)
    assert cpu["n"].any() or not parts & SMA_PART
