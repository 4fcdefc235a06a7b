"""BEMA's bias correction ``row0 <- row1 + alpha * (row0 - row2)`` (``_elementwise.bema_at``):
the element body against a float64 reference, the CPU kernel (serial and parallel, many chunks
and groups) against the body, the non-finite guard, FlatShadow's checks, and torch's EMA(decay=BEMA()).

Tolerance against the float64 reference ``ema + alpha * (out - first)`` of the stored values
(for float64 shadows: in rational arithmetic, rounded once to float64): the difference rounds
once and the FMA once in the math type (unit roundoff ``u``: 2**-24 for
float32 math, 2**-53 for float64), then the store rounds to the shadow kind (``u_store``:
2**-8 bfloat16, 2**-11 float16, 0 when the math type is the store type), so
``|got - ref| <= u * (|alpha (out - first)| + 2 |ref|) + u_store * |got|`` plus one subnormal step
(one ``u |ref|`` is the reference's own rounding to float64).
"""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import faults
from support.calls import watching

from fastema import FlatShadow, _launch
from fastema.kernels import _bits, _elementwise
from fastema.kernels import cpu as ema_cpu
from fastema.kernels.kinds import BF16, F16, F32, F64

KINDS = (F32, BF16, F16, F64)
U_MATH = {F32: 2.0 ** -24, BF16: 2.0 ** -24, F16: 2.0 ** -24, F64: 2.0 ** -53}
U_STORE = {F32: 0.0, BF16: 2.0 ** -8, F16: 2.0 ** -11, F64: 0.0}
TINY = {F32: 2.0 ** -149, BF16: 2.0 ** -133, F16: 2.0 ** -24, F64: 5e-324}
DTYPE_NAMES = {F32: "float32", BF16: "bfloat16", F16: "float16", F64: "float64"}


# ---------------------------------------------------------------- storage helpers


def to_kind(v: np.ndarray, kind) -> np.ndarray:
    """float64 values -> storage of ``kind`` (bits for the narrow kinds), rounded to nearest even."""
    if kind == F64:
        return v.astype(np.float64)
    f32 = v.astype(np.float32)
    if kind == F32:
        return f32.view(np.uint32)
    return np.array([_bits.encode(b, kind) for b in f32.view(np.uint32)], np.uint16)


def values(stored: np.ndarray, kind) -> np.ndarray:
    """Storage of ``kind`` -> its float64 values (exact)."""
    if kind == F64:
        return stored.astype(np.float64)
    bits = np.array([_bits.decode(b, kind) for b in stored], np.uint32) if kind != F32 else stored
    return bits.view(np.float32).astype(np.float64)


def naive(out, ema, first, alpha):
    """The float64 reference: BEMA's output from its three rows."""
    return ema + alpha * (out - first)


def exact(out, ema, first, alpha):
    """:func:`naive` in rational arithmetic, rounded once to float64: the reference of float64 shadows."""
    a = Fraction(float(alpha))
    return np.array([float(Fraction(e) + a * (Fraction(o) - Fraction(f)))
                     for o, e, f in zip(out.tolist(), ema.tolist(), first.tolist())])


def assert_close(got, out, ema, first, alpha, kind):
    ref = (exact if kind == F64 else naive)(out, ema, first, alpha)
    tol = U_MATH[kind] * (np.abs(alpha * (out - first)) + 2 * np.abs(ref)) + U_STORE[kind] * np.abs(got) + TINY[kind]
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (kind, alpha, got[bad][:4], ref[bad][:4])


def three_rows(kind, n, rng, scale=1.0):
    """A (3 * n,) stored buffer: rows theta_t, EMA, theta_0 (the EMA and theta_t near theta_0)."""
    first = rng.standard_normal(n) * scale
    rows = np.concatenate([first + 0.1 * rng.standard_normal(n) * scale,
                           first + 0.05 * rng.standard_normal(n) * scale, first])
    return to_kind(rows, kind)


def math_alpha(alpha, kind):
    return np.float64(alpha) if kind == F64 else np.float32(alpha)


# ---------------------------------------------------------------- the element body


@pytest.mark.parametrize("kind", KINDS)
@given(n=st.integers(1, 24), alpha=st.floats(0.0, 1.5), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2 ** 16))
def test_element_body_matches_the_float64_reference(kind, n, alpha, scale, seed):
    q = three_rows(kind, n, np.random.default_rng(seed), scale)
    out, ema, first = (values(q[r * n:(r + 1) * n], kind) for r in range(3))
    a = math_alpha(alpha, kind)
    body = _elementwise.bema_at_wide if kind == F64 else _elementwise.bema_at
    for j in range(n):
        body(q, n, j, a, kind)
    assert_close(values(q[:n], kind), out, ema, first, np.float64(a), kind)
    assert np.array_equal(values(q[n:], kind), np.concatenate([ema, first]))   # rows 1, 2 only read


def test_float32_rounds_the_product_sum_once():
    """alpha * d + ema with one rounding (body and CPU kernel): 3 * (1 + 2**-23) - 3 is 3 * 2**-23
    in float32; rounding the product first would give 2**-21."""
    for run in (lambda q: _elementwise.bema_at(q, 1, 0, np.float32(3.0), F32),
                lambda q: cpu_launch(F32, [1], q, 3.0)):
        q = np.array([1 + 2.0 ** -23, -3.0, 0.0], np.float32).view(np.uint32)
        run(q)
        assert q.view(np.float32)[0] == np.float32(3 * 2.0 ** -23)


# ---------------------------------------------------------------- the CPU kernel


def cpu_launch(kind, counts, q, alpha, flag=None, parallel=False):
    """The CPU kernel over a packed (3, n) buffer ``q`` of ``kind`` with segments ``counts``."""
    n = int(sum(counts))
    t = _launch.tables(np.zeros(len(counts), np.int64), counts,
                       _launch.flat_shadow(q.ctypes.data, counts, q.itemsize), "cpu")
    flag = np.zeros(1, np.int32) if flag is None else flag
    ema_cpu.bema_kernel(kind, parallel)(*t.args(), math_alpha(alpha, kind), flag)
    return n


@pytest.fixture
def small_cpu_chunks():
    with _launch.config.tuned(CPU_CHUNK=16):                         # many chunks, tails
        yield


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.usefixtures("small_cpu_chunks")
def test_cpu_kernel_equals_the_element_body(kind, parallel):
    rng = np.random.default_rng(kind)
    counts = [5, 0, 40, 1, 17, 33]
    n = sum(counts)
    q = three_rows(kind, n, rng)
    expected = q.copy()
    body = _elementwise.bema_at_wide if kind == F64 else _elementwise.bema_at
    for j in range(n):
        body(expected, n, j, math_alpha(0.37, kind), kind)
    cpu_launch(kind, counts, q, 0.37, parallel=parallel)
    assert np.array_equal(q, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_skips_when_the_flag_is_set(kind):
    q = three_rows(kind, 50, np.random.default_rng(3))
    before = q.copy()
    cpu_launch(kind, [20, 30], q, 0.5, flag=np.ones(1, np.int32))
    assert np.array_equal(q, before)


def test_nonfinite_values_propagate():
    """An inf or NaN in any row gives a non-finite output there, and only there."""
    q = three_rows(F32, 4, np.random.default_rng(0)).view(np.float32)
    q[0], q[4 + 1], q[8 + 2] = np.inf, np.nan, -np.inf
    cpu_launch(F32, [4], q.view(np.uint32), 0.5)
    assert np.isinf(q[0]) and np.isnan(q[1]) and np.isinf(q[2]) and np.isfinite(q[3])


# ---------------------------------------------------------------- FlatShadow.bias_correct


def rows_of(shadow: FlatShadow) -> np.ndarray:
    """The (3, n) float64 values of every group (torch buffers), concatenated along the rows."""
    return np.concatenate([g.buffer.double().numpy() for g in shadow.layout.groups], axis=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
       alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_flat_shadow_bias_correct(dtype, counts, alpha, seed):
    rng = np.random.default_rng(seed)
    src_dtype = torch.float64 if dtype == "float64" else torch.float32
    srcs = [torch.from_numpy(rng.standard_normal(c)).to(src_dtype) for c in counts]
    fs = FlatShadow(srcs, rows=3, dtype="float32" if dtype == "float64" else dtype)
    for r, scale in ((0, 0.1), (1, 0.05)):                   # rows 0 and 1 away from theta_0
        for i, s in enumerate(srcs):
            fs.view(i, r).copy_(s + scale * torch.from_numpy(rng.standard_normal(s.numel())).to(s.dtype))
    before = rows_of(fs)
    fs.bias_correct(alpha)
    after = rows_of(fs)
    kind = {"float32": F32, "bfloat16": BF16, "float64": F64}[dtype]
    assert_close(after[0], *before, np.float64(math_alpha(alpha, kind)), kind)  # type: ignore[call-arg]
    assert np.array_equal(after[1:], before[1:])


def test_flat_shadow_bias_correct_every_group(rng):
    """float32, float64 and bfloat16-kept sources: three groups, each corrected by one launch."""
    srcs = [torch.randn(30), torch.randn(7, dtype=torch.float64), torch.randn(5).bfloat16(), torch.randn(3)]
    fs = FlatShadow(srcs, rows=3, dtype="same")
    assert len(fs.layout.groups) == 3
    for g in fs.layout.groups:
        g.buffer[0].add_(1.0)
        g.buffer[1].add_(0.5)
    fs.bias_correct(0.25)
    for i, s in enumerate(srcs):
        expected = (s.double() + 0.5) + 0.25 * ((s.double() + 1.0) - s.double())
        tol = 2 ** -8 if s.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(fs.view(i, 0).double(), expected.to(s.dtype).double(), rtol=tol, atol=tol)


def test_flat_shadow_bias_correct_skips_a_flagged_device():
    srcs = [torch.randn(40), torch.tensor([1.0, float("nan")])]
    fs = FlatShadow(srcs, rows=3)
    fs.layout.groups[0].buffer[0].add_(1.0)
    before = fs.layout.groups[0].buffer.clone()
    flags = fs.scan_nonfinite()
    fs.bias_correct(0.5, skip_if=flags)
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (the NaN compares equal by its bits)
    assert torch.equal(bits(fs.layout.groups[0].buffer), bits(before))
    fs.bias_correct(0.5, skip_if={"cpu": torch.zeros(1, dtype=torch.int32)})
    assert not torch.equal(bits(fs.layout.groups[0].buffer[0]), bits(before[0]))


def test_flat_shadow_bias_correct_on_numpy_sources():
    """Any face: a NumPy (JAX/TensorFlow on the CPU) source gets a NumPy shadow and the same kernel."""
    x = np.linspace(-1, 1, 101)
    fs = FlatShadow([x], rows=3, dtype="float32")
    buf = fs.layout.groups[0].buffer
    buf[0] += 2.0
    buf[1] += 1.0
    fs.bias_correct(0.5)
    np.testing.assert_allclose(buf[0], x + 1.0 + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2])
def test_bias_correct_needs_three_rows(rows):
    fs = FlatShadow([torch.randn(4)], rows=rows)
    with pytest.raises(ValueError, match=f"at least 3 rows .* rows={rows}"):
        fs.bias_correct(0.5)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "0.5", None, True])
def test_bias_correct_refuses_a_bad_alpha(alpha):
    fs = FlatShadow([torch.randn(4)], rows=3)
    with pytest.raises(ValueError, match="alpha must be a finite float"):
        fs.bias_correct(alpha)


def test_bias_correct_refused_while_swapped():
    p = torch.randn(8)
    fs = FlatShadow([p], rows=3)
    fs.swap(0)
    with pytest.raises(RuntimeError, match="bias_correct"):
        fs.bias_correct(0.5)
    fs.swap(0)
    fs.bias_correct(0.5)


# ---------------------------------------------------------------- torch EMA(decay=BEMA())


def test_torch_bema_skipped_step_leaves_every_row():
    """skip_nonfinite: a step with a NaN weight writes no row, the output included (the
    correction is skipped with the update's flag)."""
    from fastema.schedules import BEMA
    from fastema.torch import EMA

    net = torch.nn.Linear(4, 3)
    ema = EMA(net, BEMA(), skip_nonfinite=True)
    for _ in range(3):
        with torch.no_grad():
            net.weight.add_(0.1)
        ema.update()
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}   # every row: output, EMA, theta_0
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    ema.update()
    for k, v in ema.state_dict()["averaged"].items():
        assert torch.equal(v, before[k]), k


def test_torch_bema_output_is_the_corrected_ema(request):
    """EMA(decay=BEMA()) corrects row 0 through FlatShadow.bias_correct: the rows it is handed give
    the output within float32 rounding (see the module docstring), rows 1 and 2 untouched."""
    from fastema.schedules import BEMA
    from fastema.torch import EMA

    seen = []

    def rows(args):
        return [g.buffer.double().clone() for g in args["self"].layout.groups]

    faults.held(request, watching(FlatShadow.bias_correct,                    # each call: before, after
                                  on_call=lambda args: seen.append((args["alpha"], rows(args))),
                                  on_return=lambda args, _: seen.__setitem__(-1, seen[-1] + (rows(args),))))
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 8)
    ema = EMA(net, BEMA())
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
    assert len(seen) == 4 and 0 < seen[-1][0] < 1
    for alpha, before, after in seen:
        for b, a in zip(before, after):
            assert_close(a[0].numpy(), *b.numpy(), np.float64(np.float32(alpha)), F32)  # type: ignore[call-arg]
            assert torch.equal(a[1:], b[1:])
