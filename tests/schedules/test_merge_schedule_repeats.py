"""The merge schedules (``WSM``, ``EmaDecaySqrt``) under the calls a training loop really makes
(reliability round 5, M10 and M11).

A loop that calls ``update(step=global_step)`` per micro-batch repeats a step: an update at the
step of the last one writes nothing, so its checkpoint counts once, on the host plan and the
device plan alike, and the average stays the offline ``wsm:`` merge. ``update_every != 1`` would
skip some checkpoints' calls: it is refused with the fix (leave it at 1) on every face (the
contract suite checks the faces of the other frameworks).
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from fastema.average import EMAOptions, Plan
from fastema.average._device_plan import parameters
from fastema.kernels import cpu
from fastema.kernels.kinds import S_NORMS, S_UPDATES
from fastema.merge import merge_weights
from fastema.schedules import WSM, EmaDecaySqrt
from fastema.torch import EMA, TargetNetwork

LOOP = (1, 2, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10)        # update(step=global_step) per micro-batch (M10)
SCHEDULES = [WSM("linear", 2, 10, 2), EmaDecaySqrt(3, 4, beta=0.5), [WSM("cosine", 1, 9, 2), WSM("1-sqrt", 2, 4, 1)]]
IDS = ["wsm", "levanter", "two-rows"]


def _host(decay, steps):
    """The host plan over ``steps``: each call's due flag and weights, and the plan."""
    plan, calls = Plan(decay), []
    for t in steps:
        p = plan.next(t)
        calls.append((p.due, p.weights if p.due else None))
        plan.done(p)
    return calls, plan


def _kernel(decay, steps):
    """The CPU plan kernel (the device plan's twin) over ``steps``: each call's flag and weights, and
    the device state."""
    params, decays = parameters(Plan(decay), 7)
    rows = decays.size
    state = np.zeros(S_NORMS + rows)
    w32, w64, flag, keys = np.zeros(rows, np.float32), np.zeros(rows), np.zeros(1, np.int32), np.zeros(2, np.int64)
    calls = []
    for t in steps:
        cpu.plan_kernel()(state, params, decays, t, w32, w64, flag, keys)
        calls.append((flag[0] == 0, list(w64) if flag[0] == 0 else None))
    return calls, state


def _at_single_steps(calls):
    """The calls of ``LOOP`` but the repeated ones (a step's first call)."""
    return [c for c, t, before in zip(calls, LOOP, (None, *LOOP)) if t != before]


@pytest.mark.parametrize("decay", SCHEDULES, ids=IDS)
def test_an_update_at_the_last_updates_step_writes_nothing_on_the_host_plan(decay):
    repeated, plan = _host(decay, LOOP)
    single, once = _host(decay, sorted(set(LOOP)))
    assert [due for (due, _), t, before in zip(repeated, LOOP, (None, *LOOP)) if t == before] == [False, False]
    assert _at_single_steps(repeated) == single                        # the same weights, bit for bit
    assert (plan.norms, plan.updates, plan.last_time) == (once.norms, once.updates, once.last_time)
    assert plan.calls == len(LOOP)


@pytest.mark.parametrize("decay", SCHEDULES, ids=IDS)
def test_an_update_at_the_last_updates_step_writes_nothing_on_the_device_plan(decay):
    repeated, state = _kernel(decay, LOOP)
    single, once = _kernel(decay, sorted(set(LOOP)))
    assert [due for (due, _), t, before in zip(repeated, LOOP, (None, *LOOP)) if t == before] == [False, False]
    assert _at_single_steps(repeated) == single
    assert list(state[S_UPDATES:]) == list(once[S_UPDATES:])           # updates, last time, running totals
    assert [(due, w) for due, w in repeated] == _host(decay, LOOP)[0]   # and the host plan's, bit for bit


def test_the_first_update_at_step_0_is_not_taken_for_a_repeat():
    steps = [0, 0, 1, 1, 2]
    host, plan = _host(WSM("linear", 0, 2, 1), steps)
    kernel, state = _kernel(WSM("linear", 0, 2, 1), steps)
    assert host == kernel and [due for due, _ in host] == [True, False, True, False, True]
    assert plan.updates == state[S_UPDATES] == 3 and plan.norms == [pytest.approx(1.0)]


def _offline_merge(schedule, checkpoints):
    """The offline ``wsm:`` merge (float64) of ``checkpoints`` (step -> state dict of float64 arrays)."""
    grid = list(range(schedule.start, schedule.end + 1, schedule.every))
    coefficients = merge_weights(f"wsm:{schedule.shape}", len(grid), steps=grid).values
    return {n: sum(c * checkpoints[t][n] for c, t in zip(coefficients, grid)) for n in checkpoints[grid[0]]}


@pytest.mark.parametrize("face", ["ema", "target"])
@pytest.mark.parametrize("device_step", [False, True])
def test_update_per_micro_batch_at_the_global_step_keeps_the_offline_merge(face, device_step):
    """The reproduction of M10: the weights change at every call (the second call at a step sees other
    weights, which must not count); the average is the merge of each step's first call."""
    schedule = WSM("linear", 2, 10, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if face == "ema":
        avg = EMA(model, decay=schedule, device_step=device_step)
        read = avg.averaged_state_dict
    else:
        avg = TargetNetwork(model, copy.deepcopy(model).requires_grad_(False), momentum=schedule,
                            device_step=device_step)
        read = avg.target.state_dict
    checkpoints: dict = {}
    for t in LOOP:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        checkpoints.setdefault(t, {n: v.detach().double().numpy().copy() for n, v in model.state_dict().items()})
        avg.update(step=t)
    merged = _offline_merge(schedule, checkpoints)
    for n, v in read().items():
        np.testing.assert_allclose(v.detach().double().numpy(), merged[n], rtol=1e-6, atol=1e-6, err_msg=n)
    assert avg.plan.updates == 5 and avg.plan.calls == len(LOOP)


# ---------------------------------------------------------------- update_every (M11)

REFUSED = r"update_every=3.*misses checkpoints.*leave update_every at 1.*between checkpoints already write nothing"


@pytest.mark.parametrize("decay", SCHEDULES, ids=IDS)
def test_a_merge_schedule_with_update_every_is_refused_with_the_fix(decay):
    for make in (lambda: Plan(decay, update_every=3), lambda: EMAOptions.of(decay, update_every=3)):
        with pytest.raises(ValueError, match=REFUSED):
            make()
    assert Plan(decay, update_every=1).update_every == 1


def test_torch_ema_and_target_network_refuse_a_merge_schedule_with_update_every():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=REFUSED):
        EMA(model, decay=WSM("linear", 2, 10, 2), update_every=3)
    with pytest.raises(ValueError, match=REFUSED):
        TargetNetwork(model, copy.deepcopy(model), momentum=EmaDecaySqrt(3, 4), update_every=3)
    assert torch.equal(model.weight, before)


def test_a_checkpoint_of_a_merge_schedule_with_update_every_is_refused_and_changes_nothing():
    """A plan saved before the refusal existed would bring ``update_every`` back on a load."""
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=WSM("linear", 2, 10, 2))
    ema.update(step=2)
    before = ema.state_dict()
    with pytest.raises(ValueError, match=REFUSED):
        ema.load_state_dict({**before, "update_every": 3})
    after = ema.state_dict()
    assert ema.plan.update_every == 1 and after["updates"] == 1 and after["norms"] == before["norms"]
    assert torch.equal(after["averaged"]["weight"], before["averaged"]["weight"])
