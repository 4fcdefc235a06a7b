"""Metric smoothers (issue #4): fastema.Smoother against a plain torch implementation and
torchmetrics' RunningMean.

The torch baseline keeps the same debiased EMA and a window ring in float64 with
the usual tensor ops (NaN skipping included), as users write it by hand. torchmetrics'
RunningMean is a windowed mean of one stream (a vector input is reduced to one mean),
so it is measured against an SMA-only Smoother at K = 1. Each baseline is fed the same values as
a fastema smoother and must agree with it before it is timed (``bench/suite/checked.py``).
"""
import pytest
import torch

from bench.suite.checked import agree, same_work
from fastema.smooth import Smoother
from testkit.baselines import TorchSmoother

from .conftest import devices


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [1, 10 ** 6])
@pytest.mark.parametrize("impl", ["fastema", "torch ops"])
def test_smoother_update(run, benchmark, device, k, impl):
    benchmark.group = f"Smoother.update, EMA + SMA(50) ({device})"
    values = torch.randn(k, device=device)
    check = None
    if impl == "fastema":
        s = Smoother(decay=0.99, window=50)
        fn = lambda: s.update(values)  # noqa: E731
    else:
        t = TorchSmoother(0.99, 50, k, device)
        fn = lambda: t.update(values)  # noqa: E731
        ref = Smoother(decay=0.99, window=50)
        check = lambda: _agree(impl, lambda v: ref.update(v), lambda: [ref.ema, ref.sma], fn, t.read,  # noqa: E731
                               values)
    # no bytes counted: each implementation moves its own (fastema's two kernels about 152 B a stream of
    # float32 values, the torch ops another layout; gpu_speed.md section 7.3): a shared count would misstate both
    run(fn, device, impl=impl, case=f"K={k}", nbytes=0, elements=k,
        rounds=100 if k == 1 else 10, check=check)


def _agree(impl, ours, ours_result, fn, theirs_result, values, steps=4):
    """``bench.suite.checked.agree`` of the baseline ``fn`` (which reads ``values``) against fastema's
    smoother fed the same ``steps`` values (one of them NaN in every stream of several), from the
    same start."""
    feed = [torch.randn_like(values) for _ in range(steps)]
    if values.numel() > 1:
        feed[1][::3] = float("nan")

    def mine():
        for v in feed:
            ours(v)
        return ours_result()

    def theirs():
        for v in feed:
            values.copy_(v)
            fn()
        return list(theirs_result())
    agree(impl, mine, theirs, inputs=[values])
    same_work(lambda: ours(values))                 # fastema's update, timed in the baseline's rounds


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torchmetrics RunningMean"])
def test_running_mean_k1(run, benchmark, device, impl):
    benchmark.group = f"SMA(50) of one stream ({device})"
    value = torch.randn((), device=device)
    check = None
    if impl == "fastema":
        s = Smoother(window=50)
        fn = lambda: s.update(value)  # noqa: E731
    else:
        tm = pytest.importorskip("torchmetrics.aggregation")
        m = tm.RunningMean(window=50, nan_strategy="ignore").to(device)
        fn = lambda: m.update(value)  # noqa: E731
        ref = Smoother(window=50)
        check = lambda: _agree(impl, lambda v: ref.update(v), lambda: [ref.sma.reshape(())], fn,  # noqa: E731
                               lambda: [m.compute()], value)
    run(fn, device, impl=impl, case="K=1", nbytes=0, elements=1, rounds=200, check=check)
