"""Metric smoothers (issue #4): fastema.Smoother against a plain torch implementation and
torchmetrics' RunningMean.

The torch baseline keeps the same debiased EMA and a window ring in float64 with
the usual tensor ops (NaN skipping included), as users write it by hand. torchmetrics'
RunningMean is a windowed mean of one stream (a vector input is reduced to one mean),
so it is measured against an SMA-only Smoother at K = 1.
"""
import pytest
import torch

from fastema.smooth import Smoother
from tests.support.baselines import TorchSmoother

from .conftest import devices


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [1, 10 ** 6])
@pytest.mark.parametrize("impl", ["fastema", "torch ops"])
def test_smoother_update(run, benchmark, device, k, impl):
    benchmark.group = f"Smoother.update, EMA + SMA(50) ({device})"
    values = torch.randn(k, device=device)
    if impl == "fastema":
        s = Smoother(decay=0.99, window=50)
        fn = lambda: s.update(values)  # noqa: E731
    else:
        t = TorchSmoother(0.99, 50, k, device)
        fn = lambda: t.update(values)  # noqa: E731
    # bytes: read the value (4) and the EMA state (16) and write it (16), plus the SMA slot and sums (40)
    run(fn, device, impl=impl, case=f"K={k}", nbytes=76 * k if k > 1 else 0, elements=k,
        rounds=100 if k == 1 else 10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torchmetrics RunningMean"])
def test_running_mean_k1(run, benchmark, device, impl):
    benchmark.group = f"SMA(50) of one stream ({device})"
    value = torch.randn((), device=device)
    if impl == "fastema":
        s = Smoother(window=50)
        fn = lambda: s.update(value)  # noqa: E731
    else:
        tm = pytest.importorskip("torchmetrics.aggregation")
        m = tm.RunningMean(window=50, nan_strategy="ignore").to(device)
        fn = lambda: m.update(value)  # noqa: E731
    run(fn, device, impl=impl, case="K=1", nbytes=0, elements=1, rounds=200)
