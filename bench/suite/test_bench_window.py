"""Window average of weights (issue #4): WindowAverage.update (one push) against torch loops.

The baselines keep the same ring of W snapshots and a running sum with torch ops, as
users write it: per tensor (``sum += p - ring[i]; ring[i].copy_(p)``) and with the
``torch._foreach_*`` calls.
"""
import pytest
import torch

from fastema.torch import WindowAverage

from .conftest import devices, scenario_rounds
from .shapes import gpt2_small, many_small
from .test_bench_torch import Params

SCENARIOS = {"gpt2-small": (gpt2_small, 4), "3000x4096": (many_small, 8)}


class TorchWindow:
    def __init__(self, params, window, foreach):
        self.params, self.window, self.foreach, self.i = params, window, foreach, 0
        self.sums = [p.detach().float().clone() for p in params]
        self.ring = [[p.detach().clone() for p in params] for _ in range(window)]

    @torch.no_grad()
    def push(self):
        slot = self.ring[self.i % self.window]
        if self.foreach:
            torch._foreach_add_(self.sums, self.params)
            torch._foreach_sub_(self.sums, slot)
            torch._foreach_copy_(slot, self.params)
        else:
            for s, old, p in zip(self.sums, slot, self.params):
                s.add_(p).sub_(old)
                old.copy_(p)
        self.i += 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch _foreach", "torch per-tensor"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_window_push(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario, large_rounds=3)
    shapes, window = SCENARIOS[scenario]
    benchmark.group = f"WindowAverage.update, W pushes per round, float32 ({device})"
    model = Params(shapes(), torch.float32, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    push = WindowAverage(model, window).update if impl == "fastema" else \
        TorchWindow(params, window, foreach=impl == "torch _foreach").push

    def fn():                   # W pushes: fastema's periodic exact recompute is inside every round
        for _ in range(window):
            push()

    # per push: read the weight and the evicted snapshot, write the snapshot, read+write sum and compensation
    run(fn, device, impl=impl, case=f"{scenario}, W={window}, {window} pushes", nbytes=28 * n * window,
        elements=n, rounds=rounds)
