"""fastema.Smoother against pandas, TensorBoard's formula and closed forms."""
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastema
from fastema.smooth import Smoother, alpha_from
from testkit.fake_gpu import OnAGpu, on_a_gpu_params

SERIES = st.lists(st.one_of(st.floats(-1e3, 1e3, allow_nan=False, width=32), st.just(float("nan"))),
                  min_size=1, max_size=60)


def run(smoother, values, weights=None):
    ema, sma = [], []
    for i, v in enumerate(values):
        smoother.update(np.array(v, np.float64), sample_weight=None if weights is None else float(weights[i]))
        ema.append(float(smoother.ema) if smoother.alpha is not None else np.nan)
        sma.append(float(smoother.sma) if smoother.window is not None else np.nan)
    return np.array(ema), np.array(sma)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9, equal_nan=True)


@given(values=SERIES, span=st.floats(1, 50), window=st.integers(1, 12), min_periods=st.integers(1, 12))
def test_debiased_ema_and_sma_equal_pandas(values, span, window, min_periods):
    min_periods = min(min_periods, window)
    ema, sma = run(Smoother(span=span, window=window, min_periods=min_periods), values)
    s = pd.Series(values, dtype=np.float64)
    close(ema, s.ewm(span=span, adjust=True, ignore_na=True).mean().to_numpy())
    close(sma, s.rolling(window, min_periods=min_periods).mean().to_numpy())


@given(values=SERIES, alpha=st.floats(0.01, 1))
def test_seeded_ema_equals_pandas_adjust_false(values, alpha):
    ema, _ = run(Smoother(alpha=alpha, mode="seeded"), values)
    close(ema, pd.Series(values, dtype=np.float64).ewm(alpha=alpha, adjust=False, ignore_na=True).mean().to_numpy())


def test_tensorboard_smoothing():
    rng = np.random.default_rng(0)
    ys = rng.standard_normal(300).tolist()
    ys[40] = float("inf")
    w = 0.6
    last, n, expected = 0.0, 0, []
    for y in ys:                                    # TensorBoard's scalar-dashboard smoothing
        if math.isfinite(y):
            last = last * w + (1 - w) * y
            n += 1
        expected.append(last / (1 - w ** n))
    ema, _ = run(Smoother(decay=w), ys)
    close(ema, expected)


def test_zero_init_closed_form_and_parameters():
    ema, _ = run(Smoother(decay=0.9, mode="zeros"), [2.0] * 30)
    close(ema, 2.0 * (1 - 0.9 ** np.arange(1, 31)))
    assert alpha_from(span=9) == 0.2 and alpha_from(com=4) == 0.2 and alpha_from(decay=0.8) == pytest.approx(0.2)
    assert alpha_from(halflife=1) == pytest.approx(0.5)


def test_weighted_updates_are_sample_weighted_means():
    rng = np.random.default_rng(1)
    ys, cs = rng.standard_normal(40), rng.integers(1, 64, 40).astype(float)
    d, window = 0.8, 5
    ema, sma = run(Smoother(decay=d, window=window), ys, cs)
    for t in range(40):
        pw = d ** np.arange(t, -1, -1) * cs[:t + 1]
        assert ema[t] == pytest.approx((pw * ys[:t + 1]).sum() / pw.sum(), rel=1e-12)
        lo = max(0, t - window + 1)
        assert sma[t] == pytest.approx((cs[lo:t + 1] * ys[lo:t + 1]).sum() / cs[lo:t + 1].sum(), rel=1e-12)


def test_propagate_policy():
    ys = [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0]
    ema, sma = run(Smoother(decay=0.5, window=2, nonfinite="propagate"), ys)
    assert not np.isnan(ema[1]) and np.isnan(ema[2:]).all()          # the EMA stays NaN
    assert np.isnan(sma[2]) and np.isnan(sma[3]) and sma[4] == 3.5     # the SMA recovers once it leaves


def test_streams_are_independent_and_stay_on_the_device():
    torch.manual_seed(0)
    many = Smoother(span=5, window=3)
    singles = [Smoother(span=5, window=3) for _ in range(6)]
    for _ in range(10):
        v = torch.randn(2, 3)
        many.update(v)
        for s, x in zip(singles, v.reshape(-1)):
            s.update(x.double())
    assert isinstance(many.ema, torch.Tensor) and many.ema.shape == (2, 3)
    for i, s in enumerate(singles):
        assert many.ema.reshape(-1)[i].item() == pytest.approx(s.ema.item(), rel=1e-7)
        assert many.sma.reshape(-1)[i].item() == pytest.approx(s.sma.item(), rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_value_dtypes(dtype):
    s = Smoother(decay=0.5)
    for v in (1.0, 3.0):
        s.update(torch.tensor([v], dtype=dtype))
    assert s.ema.item() == pytest.approx((0.5 * 1 + 3) / 1.5)


def test_numpy_number_values_are_taken_as_python_numbers_are():
    """Smoother.update(np.float32(1.0)) was refused ("values must be a Python float, a NumPy array or a
    torch tensor, got float32") where np.float64 (a float) and 0-d NumPy arrays were taken: a NumPy
    number is a number, averaged as a Python one (a stream of one), against the float64 recursion."""
    values = [np.float32(1.5), np.int64(3), np.float16(-2.0), 4.25]
    s = Smoother(decay=0.5, window=2)
    for v in values:
        s.update(v)
    num = den = 0.0
    for v in values:
        num, den = 0.5 * num + float(v), 0.5 * den + 1.0
    assert s.ema.shape == (1,) and float(s.ema[0]) == pytest.approx(num / den, rel=1e-15)
    assert float(s.sma[0]) == pytest.approx((-2.0 + 4.25) / 2, rel=1e-15)
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"got a JAX array \(.*ArrayImpl\).*pass np\.asarray\(values\), a host copy"):
        s.update(jnp.ones(1))
    assert s.count == 4


def test_compensated_window_after_a_spike():
    # One early spike among small values: a plain float32 running sum keeps a large error
    # (REFERENCE: 72%); the compensated float64 sum must match the exact window mean.
    rng = np.random.default_rng(2)
    ys = np.concatenate([[1e4], 0.01 + 0.001 * rng.standard_normal(20_000)])
    s = Smoother(window=100)
    for y in ys:
        s.update(np.array([y]))
    exact = ys[-100:].mean()
    assert abs(float(s.sma[0]) - exact) <= 4 * np.spacing(exact)


def test_state_dict_resume_continues_exactly():
    rng = np.random.default_rng(3)
    ys = rng.standard_normal(30)
    a = Smoother(span=4, window=5)
    for y in ys[:12]:
        a.update(torch.tensor([y]))
    b = Smoother(span=4, window=5)
    b.load_state_dict({k: (v if k != "state" else {n: t.clone() for n, t in v.items()})
                       for k, v in a.state_dict().items()})
    for y in ys[12:]:
        a.update(torch.tensor([y]))
        b.update(torch.tensor([y]))
    assert torch.equal(a.ema, b.ema) and torch.equal(a.sma, b.sma)
    with pytest.raises(ValueError, match="alpha, mode, window"):
        Smoother(span=5, window=5).load_state_dict(a.state_dict())


@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_a_state_dict_kept_in_memory_is_the_state_it_was_saved_with(make):
    """A "best so far" kept in memory: later updates leave it as it was (it held the live arrays,
    so restoring it gave the later sums under the earlier count)."""
    s = Smoother(decay=0.8, window=3)
    for y in (1.0, 2.0, 3.0):
        s.update(make([y]))
    kept = s.state_dict()
    saved = {n: np.array(_host(v)) for n, v in kept["state"].items()}
    ema, sma = _host(s.ema).copy(), _host(s.sma).copy()
    s.update(make([100.0]))
    assert all(np.array_equal(_host(v), saved[n]) for n, v in kept["state"].items())
    s.load_state_dict(kept)
    assert s.count == 3 and np.array_equal(_host(s.ema), ema) and np.array_equal(_host(s.sma), sma)


def _host(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "give an EMA parameter"), (dict(span=5, decay=0.9), "exactly one of"),
    (dict(span=0.5), "span must be >= 1"), (dict(decay=1.0), r"decay must be \[0, 1\)"),
    (dict(window=0), "window must be"), (dict(window=3, min_periods=4), "min_periods"),
    (dict(span=3, mode="up"), "mode must be"), (dict(span=3, nonfinite="zero"), "nonfinite must be"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Smoother(**kwargs)


def test_bad_updates_change_nothing():
    s = Smoother(span=3, window=2)
    s.update(torch.tensor([1.0, 2.0]))
    before = (s.ema.clone(), s.sma.clone(), s.count)
    for bad, err in ((torch.tensor([1.0, 2.0, 3.0]), "holds"), (np.array([1.0, 2.0]), "holds"),
                     (torch.tensor([1, 2]), "floating"), ("x", "must be")):
        with pytest.raises((TypeError, ValueError), match=err):
            s.update(bad)
    with pytest.raises(ValueError, match="weight"):
        s.update(torch.tensor([1.0, 2.0]), sample_weight=-1.0)
    assert torch.equal(s.ema, before[0]) and torch.equal(s.sma, before[1]) and s.count == before[2]
    with pytest.raises(RuntimeError, match="update"):
        _ = Smoother(span=3).ema


def test_bad_weights_values_and_checkpoints_change_nothing():
    # reliability L12 and M9
    s = fastema.Smoother(decay=0.9, window=3)
    s.update(torch.tensor([1.0, 2.0]))
    state = s.state_dict()
    with pytest.raises(ValueError, match="sample_weight must be a finite number >= 0"):
        s.update(torch.tensor([1.0, 2.0]), sample_weight=float("inf"))
    with pytest.raises(ValueError, match="meta tensor"):
        s.update(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="numpy \\(2,\\) on cpu but this smoother holds torch"):
        s.update(np.array([1.0, 2.0]))
    assert s.count == 1
    bad = dict(state)
    del bad["count"]
    fresh = fastema.Smoother(decay=0.9, window=3)
    with pytest.raises(ValueError, match="no \\['count'\\]"):
        fresh.load_state_dict(bad)
    wrong = {**state, "state": {k: v[:1] for k, v in state["state"].items()}}
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict(wrong)
    fresh.update(np.array([5.0, 6.0, 7.0]))          # still unallocated: any stream layout is accepted
    assert fresh.count == 1


# ------------------------------------------------------------------ names

def test_sample_weight_is_the_smoother_argument_and_weight_is_not_taken():
    a = fastema.Smoother(decay=0.9, window=3)
    a.update(torch.tensor([1.0]), sample_weight=2.0)
    a.update(torch.tensor([4.0]), sample_weight=1.0)
    assert torch.allclose(a.ema, torch.tensor([5.8 / 2.8], dtype=a.ema.dtype))    # (0.9 * 2 * 1 + 4) / (0.9 * 2 + 1)
    with pytest.raises(TypeError, match="weight"):
        a.update(torch.tensor([1.0]), weight=1.0)  # type: ignore[call-arg]  # 0.1's name, gone before 0.2.0
    t = fastema.Tracker(["loss"], ema=0.9, sma=3, every=None)
    with pytest.raises(TypeError, match="by position or by name"):   # weight= is a metric's name now, as any
        t.update(torch.tensor(1.0), weight=2.0)
    t.update(torch.tensor(3.0), sample_weight=2.0)


# ------------------------------------------------------------------ L5: bad per-stream weights, overflow

@pytest.mark.parametrize("make", [np.array, lambda w: torch.tensor(w, dtype=torch.float64)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_per_stream_weights_are_refused_and_change_nothing(make, bad):
    # L5: accepted before, and the stream's EMA and SMA were NaN for good
    s = Smoother(decay=0.9, window=3)
    s.update(np.array([1.0, 2.0]), sample_weight=np.array([1.0, 2.0]))
    state = {k: v.copy() for k, v in s.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=r"sample_weight\[1\] is .*finite number >= 0.*nothing was updated"):
        s.update(np.array([3.0, 4.0]), sample_weight=make([1.0, bad]))
    assert s.count == 1 and all(np.array_equal(v, state[k]) for k, v in s.state_dict()["state"].items())
    fresh = Smoother(decay=0.9, window=3)          # refused at the first update: nothing allocated either
    with pytest.raises(ValueError, match=r"sample_weight\[0\]"):
        fresh.update(np.array([3.0, 4.0]), sample_weight=make([bad, 1.0]))
    with pytest.raises(ValueError, match="finite number >= 0"):
        fresh.update(np.array([3.0, 4.0]), sample_weight=bad)          # a scalar: refused before, too
    fresh.update(np.array([3.0, 4.0, 5.0]))
    assert fresh.count == 1 and fresh.shape == (3,)
    s.update(np.array([3.0, 4.0]), sample_weight=make([0.0, 2.0]))     # 0 is fine: the value is left out
    np.testing.assert_allclose(s.ema, [1.0, (0.9 * 2 * 2 + 2 * 4) / (0.9 * 2 + 2)], rtol=1e-15)


def test_a_window_sum_that_overflows_float64_does_not_poison_the_sma():
    # L5: two finite values of 1e308 overflowed the window sum, and the SMA read NaN for good.
    # (pandas' rolling sums overflow and stay NaN too: the reference is the exact mean, then pandas
    # over the values after the big ones)
    ys = [1e308, 1e308, 1.0, 2.0, 3.0, 4.0]
    _, sma = run(Smoother(window=2), ys)
    assert sma[0] == 1e308 and sma[1] == 1e308 and sma[2] == 5e307
    close(sma[3:], pd.Series(ys[2:]).rolling(2).mean().to_numpy()[1:])
    _, sma = run(Smoother(window=3), [1.7e308, -1.7e308, 1.7e308, 1.0])
    assert sma.tolist() == pytest.approx([1.7e308, 0.0, 1.7e308 / 3, 1.0 / 3], rel=1e-15)


def test_the_debiased_ema_of_values_near_the_float64_maximum_is_finite():
    # L5: the debiased EMA of two 1.7e308 was inf (the weighted sum overflowed); the reference is the
    # EMA in lerp form (m <- m + w / b (v - m)), which cannot overflow, in float64
    ys = [1.7e308, 1.7e308, 1.0e308, -1.7e308, 5.0]
    ema, _ = run(Smoother(decay=0.9), ys)
    m, b, ref = 0.0, 0.0, []
    for y in ys:
        b = 0.9 * b + 1.0
        m = m + (y - m) / b if abs(y - m) < 1.7e308 else m * (1 - 1 / b) + y / b
        ref.append(m)
    assert ema[0] == 1.7e308 and ema[1] == pytest.approx(1.7e308, rel=1e-15)
    np.testing.assert_allclose(ema, ref, rtol=1e-14)


V2 = pathlib.Path(__file__).parent / "data" / "smoother-v2.npz"


def _v2_cases():
    """The version 2 checkpoints of ``data/make_smoother_v2.py`` (written by a2c5924's Smoother): per case,
    ``(kwargs, state dict, [(values, weight, {"ema": ..., "sma": ...}) ...])``."""
    d = np.load(V2)
    meta = json.loads(str(d["cases"]))
    for name, kw in meta["cases"].items():
        header = json.loads(str(d[f"{name}/header"]))
        prefix = f"{name}/state/"
        state = {**header, "state": {k[len(prefix):]: d[k] for k in d.files if k.startswith(prefix)}}
        weights = [d[f"{name}/weight/{i}"] if f"{name}/weight/{i}" in d.files else None for i in range(meta["after"])]
        weights = [float(w) if w is not None and w.ndim == 0 else w for w in weights]    # a float, or per stream
        steps = [(d[f"{name}/values/{i}"], weights[i],
                  {kind: d[f"{name}/{kind}/{i}"] for kind in ("ema", "sma") if f"{name}/{kind}/{i}" in d.files})
                 for i in range(meta["after"])]
        yield name, kw, state, steps


@pytest.mark.parametrize("version", [2, 1])
def test_a_version_2_or_1_checkpoint_resumes_with_the_bits_it_had(version):
    # checkpoint version 3 (one kernel, pairs interleaved, int32 counts, no weights until the first
    # sample_weight); versions 2 (a2c5924's, committed as written) and 1 (its sums unscaled: before L5)
    # are converted when loaded and go on with the very bits the smoother that wrote them read
    compared = 0
    for name, kw, state, steps in _v2_cases():
        if version == 1:
            debiased = kw.get("mode", "debiased") == "debiased"
            state = {**state, "version": 1, "state": {
                n: v * 2.0 ** 64 if n in ("ring_v", "ring_w", "s", "comp", "ws", "wcomp") or
                (n in ("a", "b") and debiased) else v for n, v in state["state"].items()}}
        s = Smoother(**kw)
        s.load_state_dict(state)
        assert s.count == state["count"] and s.state_dict()["version"] == 3
        # a stream's EMA from its first update of weight 0 on is not the old one's: a weight of 0
        # now leaves the EMA as it was (tests/array/test_smooth_weight_zero.py), where the old one
        # decayed it (debiased) or took a step (seeded, zeros)
        same = np.ones(np.shape(steps[0][0]), bool)
        for i, (v, w, want) in enumerate(steps):
            s.update(v, sample_weight=w)
            same &= np.asarray(w if w is not None else 1.0) != 0.0
            for kind, x in want.items():
                got = getattr(s, kind)
                if kind == "ema":
                    got, x = got[same], x[same]
                    compared += got.size
                assert np.array_equal(got, x, equal_nan=True), (name, version, i, kind)
    assert compared >= 40                              # 49 of the 54 EMA reads: no weight 0 yet
    bad = next(_v2_cases())[2]
    with pytest.raises(ValueError, match=r"unknown arrays \['x'\].*Nothing was loaded"):
        Smoother(span=4, window=5).load_state_dict({**bad, "state": {**bad["state"], "x": np.zeros(3)}})
    with pytest.raises(ValueError, match="does not match"):
        Smoother(span=4, window=5).load_state_dict({**bad, "state": {k: v for k, v in bad["state"].items()
                                                                      if k != "ring_w"}})


def test_no_weights_are_kept_until_the_first_sample_weight():
    # the unweighted layout (issue 86 item 4): ring_v, (s, comp) and an int32 n, 96 bytes a stream per
    # update with the EMA; the weights' arrays come with the first sample_weight other than 1
    s = Smoother(span=4, window=3)
    for v in ([1.0, 2.0], [3.0, np.nan]):
        s.update(np.array(v))
    s.update(np.array([1.0, 1.0]), sample_weight=1.0)                  # a weight of 1 is every weight
    st = s.state_dict()["state"]
    assert sorted(st) == ["ab", "n", "ring_v", "sc"] and st["n"].dtype == np.int32
    s.update(np.array([5.0, 6.0]), sample_weight=np.array([1.0, 2.0]))
    assert sorted(s.state_dict()["state"]) == ["ab", "bad", "n", "ring_v", "ring_w", "sc", "wsc"]
    again = Smoother(span=4, window=3)
    again.load_state_dict(s.state_dict())
    assert again._weighted and np.array_equal(again.sma, s.sma)


@given(values=SERIES, window=st.integers(1, 6), first=st.integers(0, 60), skip=st.booleans(),
       mode=st.sampled_from(["debiased", "seeded", "zeros"]))
def test_unweighted_streams_read_the_bits_of_weights_of_one(values, window, first, skip, mode):
    # every weight 1 from update ``first`` on (the state widened there) against no weights at all
    kw = dict(alpha=0.3, mode=mode, window=window, nonfinite="skip" if skip else "propagate")
    plain, weighted = Smoother(**kw), Smoother(**kw)
    ones = np.ones(2)
    for i, v in enumerate(values):
        y = np.array([v, -2.0 * v])
        plain.update(y)
        weighted.update(y, sample_weight=ones if i >= first else None)
        for kind in ("ema", "sma"):
            assert np.array_equal(getattr(plain, kind), getattr(weighted, kind), equal_nan=True), (i, kind)
    assert weighted._weighted == (first < len(values)) and not plain._weighted


def test_a_checkpoint_of_either_layout_loads_into_a_smoother_of_the_other():
    rng = np.random.default_rng(5)
    plain, weighted = Smoother(span=3, window=4), Smoother(span=3, window=4)
    for _ in range(6):
        y = rng.standard_normal(3)
        plain.update(y)
        weighted.update(y, sample_weight=np.ones(3))
    for src, dst in ((plain, weighted), (weighted, plain)):
        copy = Smoother(span=3, window=4)
        copy.load_state_dict(dst.state_dict())                         # allocated in dst's layout
        copy.load_state_dict(src.state_dict())                         # then src's
        assert copy._weighted == src._weighted and copy.count == src.count
        y = rng.standard_normal(3)
        copy.update(y)
        src.update(y)
        assert np.array_equal(copy.ema, src.ema) and np.array_equal(copy.sma, src.sma)


ON_A_GPU = on_a_gpu_params()


@pytest.mark.parametrize("where", ON_A_GPU)
def test_bad_per_stream_weights_on_a_gpu_count_as_zero_without_a_host_sync(where):
    # L5 on a GPU: looking at the weights would be a host sync per update, so they are checked on
    # the device, where a NaN, inf or negative weight leaves that stream's value out
    with OnAGpu(where) as gpu:
        s, ref = Smoother(decay=0.5, window=3), Smoother(decay=0.5, window=3)
        v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64, device=gpu.device)
        w = torch.tensor([[1.0, float("nan"), -2.0], [2.0, float("inf"), 1.0]], dtype=torch.float64,
                         device=gpu.device)
        s.update(v[0], sample_weight=torch.ones(3, dtype=torch.float64, device=gpu.device))
        with gpu.no_sync():
            s.update(v[1], sample_weight=w[0])
            s.update(v[0], sample_weight=w[1])
        assert s.count == 3
    ref.update(v[0].cpu(), sample_weight=torch.ones(3, dtype=torch.float64))
    for x, c in ((v[1], w[0]), (v[0], w[1])):
        c = c.cpu()
        ref.update(x.cpu(), sample_weight=torch.where(torch.isfinite(c) & (c >= 0), c, 0.0))
    if gpu.real:
        torch.testing.assert_close(s.ema.cpu(), ref.ema, rtol=1e-15, atol=0)
        torch.testing.assert_close(s.sma.cpu(), ref.sma, rtol=1e-15, atol=0)


@pytest.mark.parametrize("where", ON_A_GPU)
def test_smoother_on_gpu_without_host_sync(where):
    """(Was in tests/kernels/test_cuda.py, GPU-only, calling ``update(v, weight=3.0)``: a TypeError on
    the H100 run of 2026-11-26.)"""
    with OnAGpu(where) as gpu:
        s = Smoother(span=10, window=5)
        ref = Smoother(span=10, window=5)
        vals = torch.randn(20, 1000, device=gpu.device)
        s.update(vals[0])
        with gpu.no_sync():
            for v in vals[1:]:
                s.update(v, sample_weight=3.0)
        assert s.count == 20
    ref.update(vals[0].cpu())
    for v in vals[1:]:
        ref.update(v.cpu(), sample_weight=3.0)
    if gpu.real:
        torch.testing.assert_close(s.ema.cpu(), ref.ema, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.sma.cpu(), ref.sma, rtol=1e-12, atol=1e-12)


_VIEWS = {"aten.detach.default", "aten.view.default", "aten.view.dtype", "aten.alias.default",
          "aten._reshape_alias.default", "aten.reshape.default"}


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_per_stream_weights_cost_no_tensor_operation_per_update(device):
    # 2c: the per-stream weights were checked and scaled by torch operations at every update (on a
    # GPU ~5 launches and temporaries: where(ok, w * SCALE, 0)); the kernel scales them and applies
    # the bad-weight rule now, so an update with per-stream weights runs no torch operation but views
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    s, ref = Smoother(decay=0.9, window=3), Smoother(decay=0.9, window=3)
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device)
    w = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.5, 2.0]], dtype=torch.float64, device=device)
    s.update(v[0], sample_weight=w[0])
    x, c = v[1], w[1]
    with Record() as rec:
        s.update(x, sample_weight=c)
    assert set(rec.ops) <= _VIEWS, rec.ops
    for x, c in zip(v, w):
        ref.update(x.cpu().numpy(), sample_weight=c.cpu().numpy())
    np.testing.assert_array_equal(s.ema.cpu().numpy(), ref.ema)
    np.testing.assert_array_equal(s.sma.cpu().numpy(), ref.sma)


@pytest.mark.cuda
def test_per_stream_weights_on_the_device_are_scaled_and_checked_in_the_kernel():
    # 2c, on the device (the Numba CUDA simulator in CI, run as its own process): Numba device
    # arrays of per-stream weights were refused (fastema scaled them with array operations); the
    # kernel scales them now and counts a NaN, inf or negative weight as 0, with the same sums
    # (checkpoint version 3) as a CPU smoother given those weights as 0
    from numba import cuda

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        to_device = cuda.to_device                             # the simulator's device arrays
    elif torch.cuda.is_available():
        to_device = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    else:
        pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1 (set before numba is imported)")
    vals = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, -1.0, 0.5], [2.0, 2.0, 2.0]])
    ws = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, -2.0], [2.0, np.inf, 1.0], [0.5, 1.0, 0.0]])
    for kw in (dict(span=3, window=2), dict(alpha=0.5, mode="seeded", window=3), dict(decay=0.5, mode="zeros")):
        dev, host = Smoother(**kw), Smoother(**kw)
        for y, c in zip(vals, ws):
            dev.update(to_device(y), sample_weight=to_device(c))
            host.update(y, sample_weight=np.where(np.isfinite(c) & (c >= 0), c, 0.0))
        a, b = dev.state_dict(), host.state_dict()
        assert a["version"] == b["version"] == 3 and a["count"] == b["count"] == len(vals)
        for name, x in b["state"].items():
            got = a["state"][name]
            got = got.cpu().numpy() if torch.is_tensor(got) else \
                got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
            np.testing.assert_array_equal(got, x, err_msg=f"{kw} {name}")
