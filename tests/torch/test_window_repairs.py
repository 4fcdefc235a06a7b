"""A window average's checkpoint checked in full before anything is written, and its repair.

A ring entry that was a meta tensor was refused by torch's copy after the averages and the counters
were written (a refused load that changed the average); a ring holding NaN beside a finite average,
or ``pushes`` other than ``snapshots``, loaded and gave a wrong or NaN mean from the next update on;
and ``repair_nonfinite()`` reset the mean alone, so the ring and the running sum brought the NaN back
at each of the next W updates (review of round 10)."""
import copy

import pytest
import torch
from torch import nn

from fastema.torch import WindowAverage


def _run(bumps: int, window=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    avg = WindowAverage(model, window)
    for _ in range(bumps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        avg.update()
    return model, avg


def _held(avg) -> tuple:
    sd = avg.state_dict()
    return (avg.snapshots, sd["pushes"], {k: v.clone() for k, v in sd["averaged"].items()},
            {k: v.clone() for k, v in sd["ring"].items()})


def _same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and all(torch.equal(a[i][k], b[i][k]) for i in (2, 3) for k in a[i])


@pytest.mark.parametrize("damage, match", [
    (lambda sd: sd["ring"].__setitem__("0.bias", torch.empty(sd["ring"]["0.bias"].shape, device="meta")),
     r"ring '0.bias' is a meta tensor of torch.float32"),
    (lambda sd: sd["ring"]["0.weight"].view(-1).__setitem__(0, float("nan")),
     r"ring '0.weight' holds inf or NaN \(as it lands in float32\) where its average is finite"),
    (lambda sd: sd["ring"].__setitem__("0.weight", sd["ring"]["0.weight"].double().fill_(1e300)),
     r"ring '0.weight' holds inf or NaN \(as it lands in float32\)"),
    (lambda sd: sd["ring"].__setitem__("0.bias", sd["ring"]["0.bias"].to(torch.complex64)),
     r"ring '0.bias' is a tensor of torch.complex64"),
    (lambda sd: sd.__setitem__("pushes", 1), r"pushes 1 and snapshots 5 differ"),
])
def test_a_damaged_ring_or_count_is_refused_and_nothing_changes(damage, match):
    sd = copy.deepcopy(_run(4)[1].state_dict())
    damage(sd)
    _, avg = _run(1)
    before = _held(avg)
    with pytest.raises(ValueError, match=match + r".*Nothing was loaded"):
        avg.load_state_dict(sd)
    assert _same(before, _held(avg))


def test_a_window_not_full_yet_loads_and_resumes_bit_for_bit():
    # the slots not pushed yet are zeros (they were the ring's uninitialised memory, NaN at times,
    # which the ring's finiteness check would have refused): only the pushed ones are checked
    model, avg = _run(1, window=5)
    sd = copy.deepcopy(avg.state_dict())
    assert torch.equal(sd["ring"]["0.bias"][2:], torch.zeros(3, 2))
    other = WindowAverage(model, 5)
    other.load_state_dict(sd)
    with torch.no_grad():
        model[0].bias.add_(0.5)
    avg.update()
    other.update()
    assert torch.equal(avg.averaged_state_dict()["0.bias"], other.averaged_state_dict()["0.bias"])


def test_repair_starts_the_window_over_from_the_live_weights():
    model, avg = _run(2, window=4)
    with torch.no_grad():
        model[0].bias[0] = float("nan")                   # a diverged step
    avg.update()
    with torch.no_grad():
        model[0].bias[0] = 0.5                            # finite again
    assert avg.repair_nonfinite() == ["0.bias"]
    pushed = [model[0].bias.detach().double().clone()] * 4     # the window as if pushed each time
    for k in range(6):
        with torch.no_grad():
            model[0].bias.add_(0.25)
        avg.update()
        pushed = pushed[1:] + [model[0].bias.detach().double().clone()]
        mean = avg.averaged_state_dict()["0.bias"].double()
        torch.testing.assert_close(mean, sum(pushed) / 4, rtol=0, atol=1e-6)
    sd = avg.state_dict()
    assert "nonfinite" not in sd and all(torch.isfinite(v).all() for v in sd["ring"].values())
    WindowAverage(model, 4).load_state_dict(sd)          # loads: nothing of the NaN is left
