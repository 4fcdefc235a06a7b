"""The weighted-sum kernel of checkpoint merging (kernels/merge_cpu.py) against its element bodies
run as plain Python (kernels/_merge.py), and against a float64 reference: every input and output
kind, float32 and float64 sums, stochastic rounding, one launch or one input per launch."""
import itertools

import numpy as np
import pytest
from merge_helpers import UINT, bits_of

from fastema import _launch  # noqa: F401  (the kernel cache's trust set-up)
from fastema.kernels import _bits, _merge, merge_cpu
from fastema.kernels.kinds import BF16, F16, F32, F64

KINDS = (F32, BF16, F16, F64)




def as_f64(bits, kind):
    if kind == F64:
        return np.asarray(bits, np.float64)
    return np.array([np.uint32(_bits.decode(b, kind)).view(np.float32) for b in bits], np.float64)


def python_merge(xs, w, in_kind, out_kind, wide, stochastic, key):
    """The element bodies, called from Python, in the kernel's order."""
    n = xs[0].size
    out = np.zeros(n, UINT[out_kind])
    for j in range(n):
        acc = np.float64(0.0) if wide else np.float32(0.0)
        for x, wi in zip(xs, w):
            acc = (_merge.merge_term_wide(acc, x, j, np.float64(wi), in_kind) if wide else
                   _merge.merge_term(acc, x, j, np.float32(wi), in_kind))
        if wide:
            _merge.merge_store_wide(out, j, acc, out_kind, stochastic, key, j)
        else:
            out[j] = _merge.merge_bits(acc, out_kind, stochastic, key, j)
    return out


def run(xs, w, in_kind, out_kind, wide=False, stochastic=False, key=7, parallel=False, one_at_a_time=False,
        chunk=16, first=0):
    n = xs[0].size
    wide = wide or F64 in (in_kind, out_kind)
    out = np.zeros(n, UINT[out_kind])
    k = merge_cpu.merge_kernel(in_kind, out_kind, wide, stochastic, parallel)
    ws = np.asarray(w, np.float64 if wide else np.float32)
    if not one_at_a_time:
        addr = np.array([x.ctypes.data for x in xs], np.int64)
        k(n, out.ctypes.data, 0, addr, ws, True, True, np.uint32(key), first, chunk)
        return out
    acc = np.zeros(n, np.float64 if wide else np.uint32)
    for i, x in enumerate(xs):
        k(n, out.ctypes.data, acc.ctypes.data, np.array([x.ctypes.data], np.int64), ws[i:i + 1], i == 0,
          i == len(xs) - 1, np.uint32(key), first, chunk)
    return out


@pytest.mark.parametrize("in_kind, out_kind", [(a, b) for a in KINDS for b in KINDS if not (a != F64 and b == F64)])
def test_kernel_equals_its_bodies_and_the_float64_sum(rng, in_kind, out_kind):
    n, K = 53, 3
    xs = [bits_of(rng.standard_normal(n) * 3, in_kind) for _ in range(K)]
    w = [0.2, 0.3, 0.5]
    wide = F64 in (in_kind, out_kind)
    got = run(xs, w, in_kind, out_kind)
    want = python_merge(xs, w, in_kind, out_kind, wide, False, 7)
    assert np.array_equal(got, want)
    ref = sum(wi * as_f64(x, in_kind) for wi, x in zip(w, xs))
    scale = sum(abs(wi) * np.abs(as_f64(x, in_kind)) for wi, x in zip(w, xs))
    ulp = {F32: 2.0 ** -24, BF16: 2.0 ** -8, F16: 2.0 ** -11, F64: 2.0 ** -53}[out_kind]
    tol = ulp * np.abs(ref) + (K + 1) * 2.0 ** -24 * scale * (not wide) + 2.0 ** -24
    assert np.all(np.abs(as_f64(got, out_kind) - ref) <= tol)


@pytest.mark.parametrize("kind, wide", list(itertools.product((F32, BF16, F16), (False, True))))
def test_one_input_per_launch_gives_the_same_bits_as_one_launch(rng, kind, wide):
    xs = [bits_of(rng.standard_normal(101), kind) for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    together = run(xs, w, kind, kind, wide=wide)
    assert np.array_equal(together, run(xs, w, kind, kind, wide=wide, one_at_a_time=True))
    assert np.array_equal(together, run(xs, w, kind, kind, wide=wide, parallel=True, chunk=8))


def test_stochastic_rounding_is_reproducible_unbiased_and_indexed_by_position(rng):
    n = 4096
    x = bits_of(np.full(n, 1.0 + 2.0 ** -10), F32)         # between two bfloat16 values
    a = run([x], [1.0], F32, BF16, stochastic=True, key=11)
    assert np.array_equal(a, run([x], [1.0], F32, BF16, stochastic=True, key=11, parallel=True, chunk=64))
    assert not np.array_equal(a, run([x], [1.0], F32, BF16, stochastic=True, key=12))
    up = np.mean(as_f64(a, BF16) > 1.0)
    assert abs(up - 0.125) < 0.03                          # 2**-10 above 1 is 1/8 of bfloat16's step there
    assert np.array_equal(a, python_merge([x], [1.0], F32, BF16, False, True, 11))
    # an element's noise is its position in the tensor: a piece starting at 1000 rounds as the whole
    piece = run([x[1000:]], [1.0], F32, BF16, stochastic=True, key=11, first=1000)
    assert np.array_equal(piece, a[1000:])


def test_nan_and_inf_pass_through(rng):
    x = bits_of([np.nan, np.inf, -np.inf, 1.0], F32)
    got = as_f64(run([x, x], [0.5, 0.5], F32, BF16), BF16)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.0
