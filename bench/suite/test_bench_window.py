"""Window average of weights (issue #4): WindowAverage.update (one push) against torch loops.

The baselines keep the same ring of W snapshots and a running sum with torch ops, as
users write it: per tensor (``sum += p - ring[i]; ring[i].copy_(p)``) and with the
``torch._foreach_*`` calls. Each baseline pushes W weights beside a ``WindowAverage`` and must read
the same mean before it is timed (``bench/suite/checked.py``).
"""
import pytest
import torch

from bench.suite.checked import agree, same_work
from fastema.torch import WindowAverage

from .conftest import devices, scenario_rounds
from .shapes import MANY_NAME, gpt2_small, many_small
from .test_bench_torch import Params

SCENARIOS = {"gpt2-small": (gpt2_small, 4), MANY_NAME: (many_small, 8)}


class TorchWindow:
    def __init__(self, params, window, foreach):
        self.params, self.window, self.foreach, self.i = params, window, foreach, 0
        self.sums = [p.detach().float() * window for p in params]      # the ring's sum: W copies of p
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
    check = None
    if impl == "fastema":
        push = WindowAverage(model, window).update
    else:
        base = TorchWindow(params, window, foreach=impl == "torch _foreach")
        push = base.push
        check = _check(impl, model, params, window, base)

    def fn():                   # W pushes: fastema's periodic exact recompute is inside every round
        for _ in range(window):
            push()

    # per push: read the weight and the evicted snapshot, write the snapshot, read+write sum and compensation
    run(fn, device, impl=impl, case=f"{scenario}, W={window}, {window} pushes", nbytes=28 * n * window,
        elements=n, rounds=rounds, check=check)


def _check(impl, model, params, window, base):
    """The baseline's W pushes of W different weights against ``WindowAverage``'s from the same
    start (``bench/suite/checked.py``): both read the mean of the W pushed weights."""
    ref = WindowAverage(model, window)
    feed = [[torch.randn_like(p) for p in params] for _ in range(window)]

    def pushes(push):
        with torch.no_grad():
            for new in feed:
                torch._foreach_copy_(params, new)
                push()

    def check():
        agree(impl, lambda: (pushes(ref.update), list(ref.averaged_state_dict().values()))[1],
              lambda: (pushes(base.push), [s / window for s in base.sums])[1], inputs=params)
        same_work(lambda: [ref.update() for _ in range(window)])          # W pushes, as the rows time
    return check
