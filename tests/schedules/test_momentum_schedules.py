"""Momentum schedules (issue 27): Cosine (DINO, BYOL), Linear (I-JEPA), PiecewiseConstant (Keras),
given as ``decay=``: the schedules against the codes they come from and their closed forms, the
host plan (update_every, irregular update(step=), debias, checkpoints), the device plan against the
host plan bit for bit, and a DINO-style student/teacher loop against a float64 reference.

A runnable example (the one in docs/guides/torch.md, executed by
``test_the_guide_example_runs``)::

    from fastema.schedules import Cosine
    from fastema.torch import EMA

    teacher = EMA(student, decay=Cosine(0.996, 1.0, total_steps=epochs * len(loader)))
    for batch in loader:
        ...; optimizer.step()
        teacher.update()                  # update k uses DINO's momentum_schedule[k - 1]
    with teacher.average_parameters():
        teacher_out = student(x)
"""
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import assert_same_averages
from models import device_step_model as model
from reference import assert_cuda_plan_kernel_equals_the_cpu_one
from support.schedules import ulps
from torch import nn

from fastema.average import EMAOptions, Plan
from fastema.average._device_plan import parameters
from fastema.kernels import cpu
from fastema.schedules import (
    BEMA,
    MAX_BOUNDARIES,
    Cosine,
    HalfLife,
    Linear,
    NumUpdates,
    PiecewiseConstant,
    PowerFunction,
    PowerWarmup,
    from_state,
)
from fastema.torch import EMA

ROOT = pathlib.Path(__file__).parents[2]


# ---------------------------------------------------------------- the originals, as their repositories write them

def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    """facebookresearch/dino utils.cosine_scheduler (no warm-up): one value per iteration."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


class Dinov2CosineScheduler:
    """facebookresearch/dinov2 dinov2/utils/utils.py CosineScheduler (no warm-up, no freeze)."""

    def __init__(self, base_value, final_value, total_iters):
        self.final_value, self.total_iters = final_value, total_iters
        iters = np.arange(total_iters)
        self.schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]


def ijepa_momentum_scheduler(ema, ipe, num_epochs, ipe_scale=1.0):
    """facebookresearch/ijepa src/train.py's momentum_scheduler."""
    return (ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)
            for i in range(int(ipe * num_epochs * ipe_scale) + 1))


# ---------------------------------------------------------------- the schedules

def test_cosine_is_dino_s_and_dinov2_s_teacher_momentum():
    epochs, niter = 3, 7
    total = epochs * niter
    s, dino, dinov2 = Cosine(0.996, 1.0, total), dino_cosine_scheduler(0.996, 1.0, epochs, niter), \
        Dinov2CosineScheduler(0.996, 1.0, total)
    for it in range(total + 5):
        got = s(it + 1)                               # update it + 1 reads t = it
        assert got == s.at(it)
        if it < total:                                # DINO's array: NumPy's cos, the last bit may differ
            assert ulps(got, float(dino[it])) <= 1, it
        assert ulps(got, float(dinov2[it])) <= 1, it  # DINOv2 holds final_value from total_iters on
    assert s(1) == 0.996 and s(total + 1) == 1.0 and s(10 ** 9) == 1.0
    assert s(0) == 0.996                              # update(step=0): t = -1 reads as t = 0


def test_cosine_closed_form_and_byol_s_form():
    s = Cosine(0.99, 0.999, 40)
    for t in range(45):
        ref = 0.999 + 0.5 * (0.99 - 0.999) * (1.0 + math.cos(math.pi * min(t, 40) / 40))
        assert s.at(t) == ref
        byol = 1 - (1 - 0.99) * (math.cos(math.pi * min(t, 40) / 40) + 1) / 2     # BYOL's tau, end 1
        assert abs(Cosine(0.99, 1.0, 40).at(t) - byol) < 1e-15


def test_linear_is_ijepa_s_momentum_scheduler():
    ipe, epochs = 5, 4
    total = ipe * epochs
    s = Linear(0.996, 1.0, total)
    values = list(ijepa_momentum_scheduler((0.996, 1.0), ipe, epochs))
    for i, m in enumerate(values[:-1]):
        assert s.at(i) == m                           # bit for bit, I-JEPA's order of operations
    assert abs(values[-1] - 1.0) <= 1e-16 and s.at(total) == 1.0 and s.at(total + 100) == 1.0
    assert Linear(0.9, 0.5, 4).at(2) == 0.9 + 2 * (0.5 - 0.9) / 4          # decreasing too


def test_piecewise_constant_is_keras_piecewise_constant_decay():
    keras = pytest.importorskip("keras")
    boundaries, values = [2, 5, 9], [0.5, 0.75, 0.875, 0.9375]     # exact in float32 as in float64
    s = PiecewiseConstant(boundaries, values)
    theirs = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    for t in range(14):                               # t: Keras' optimizer.iterations
        assert s.at(t) == float(keras.ops.convert_to_numpy(theirs(t))), t
        assert s(t + 1) == s.at(t)


finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1, **finite), st.floats(0, 1, **finite), st.integers(1, 10 ** 6), st.data())
def test_cosine_and_linear_are_monotone_with_exact_endpoints_and_hold_after_total_steps(start, end, total, data):
    for kind in (Cosine, Linear):
        s = kind(start, end, total)
        ts = sorted(data.draw(st.lists(st.integers(-1, 2 * total), min_size=2, max_size=20)))
        v = [s.at(t) for t in ts]
        lo, hi = min(start, end), max(start, end)
        assert all(0.0 <= x <= 1.0 and lo - math.ulp(hi) <= x <= hi + math.ulp(hi) for x in v)
        pairs = list(zip(v, v[1:]))
        assert all(a <= b for a, b in pairs) if start <= end else all(a >= b for a, b in pairs)
        assert s.at(-1) == s.at(0) == s(1) == s(0)
        # DINO's arithmetic gives start up to the rounding of start - end at t = 0; I-JEPA's exactly
        assert abs(s.at(0) - start) <= (math.ulp(hi) if kind is Cosine else 0)
        assert s.at(total) == end and s.at(total + data.draw(st.integers(0, 10 ** 9))) == end


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8, unique=True).map(sorted), st.data())
def test_piecewise_constant_steps_at_its_boundaries(boundaries, data):
    values = data.draw(st.lists(st.floats(0, 1, **finite), min_size=len(boundaries) + 1,
                                max_size=len(boundaries) + 1))
    s = PiecewiseConstant(boundaries, values)
    for i, b in enumerate(boundaries):
        assert s.at(b) == values[i] and s.at(b + 1) == values[i + 1]
    assert s.at(-1) == s.at(0) == values[0] and s.at(boundaries[-1] + 10 ** 6) == values[-1]


@pytest.mark.parametrize("make, match", [
    (lambda: Cosine(1.2, 1.0, 10), "start must be a float in \\[0, 1\\]"),
    (lambda: Cosine(0.9, -0.1, 10), "end must be a float in \\[0, 1\\]"),
    (lambda: Cosine(0.9, float("nan"), 10), "end must be"),
    (lambda: Linear(0.9, 1.0, 0), "total_steps must be an int >= 1"),
    (lambda: Linear(0.9, 1.0, -3), "total_steps must be an int >= 1"),
    (lambda: Cosine(0.9, 1.0, 10.0), "total_steps must be an int >= 1"),
    (lambda: Cosine(0.9, 1.0, True), "total_steps must be an int >= 1"),
    (lambda: Cosine("0.9", 1.0, 10), "start must be"),
    (lambda: PiecewiseConstant([], [0.9]), "1 to 64 boundaries"),
    (lambda: PiecewiseConstant(list(range(MAX_BOUNDARIES + 1)), [0.5] * (MAX_BOUNDARIES + 2)), "1 to 64"),
    (lambda: PiecewiseConstant([5, 5], [0.1, 0.2, 0.3]), "increase strictly"),
    (lambda: PiecewiseConstant([-1], [0.1, 0.2]), "a boundary must be an int >= 0"),
    (lambda: PiecewiseConstant([1.5], [0.1, 0.2]), "a boundary must be an int >= 0"),
    (lambda: PiecewiseConstant([1, 2], [0.1, 0.2]), "one value more than boundaries"),
    (lambda: PiecewiseConstant([1], [0.1, 1.5]), "each value must be a float in \\[0, 1\\]"),
])
def test_bad_arguments_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_piecewise_constant_takes_sequences_only():
    with pytest.raises(TypeError, match="boundaries must be a list or tuple"):
        PiecewiseConstant(3, [0.1, 0.2])


def test_as_decay_with_other_kinds_or_options_that_do_not_apply_is_refused():
    """A momentum schedule is one kind of decay= among others: beside a warm-up, a constant decay or a
    schedule over training time it is refused (one kind for every average); the warm-up's parameters
    are no options of their own any more (PowerWarmup's)."""
    c = Cosine(0.99, 1.0, 10)
    with pytest.raises(ValueError, match="one kind of schedule for every average, got Cosine, PowerWarmup"):
        Plan([c, PowerWarmup(0.99)])                    # a warm-up of constant decays is no momentum schedule's
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup'"):
        Plan(c, warmup="power")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['update_after_step'\]"):
        EMAOptions.of(c, update_after_step=5)
    with pytest.raises(ValueError, match="one kind of schedule for every average, got Cosine, Constant"):
        Plan([c, 0.5])
    with pytest.raises(ValueError, match="got Cosine, Linear"):
        Plan([c, Linear(0.9, 1.0, 3)])
    for timed in (PowerFunction(7.0), HalfLife(10.0), BEMA()):    # decay= takes them, alone: not beside c
        assert Plan(timed).timed
        with pytest.raises(ValueError, match=f"one kind of schedule for every average, got Cosine, "
                                             f"{type(timed).__name__}"):
            Plan([c, timed])
    with pytest.raises(ValueError, match="1 to 8 decays"):
        Plan([c] * 9)
    m = nn.Linear(3, 3)
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="one kind of schedule for every average, got Cosine, NumUpdates"):
        EMA(m, decay=[c, NumUpdates(0.99)])
    assert torch.equal(m.weight, before)


# ---------------------------------------------------------------- the host plan

SCHEDULES = {
    "cosine": Cosine(0.9, 0.999, 12),
    "linear": Linear(0.5, 0.99, 9),
    "piecewise": PiecewiseConstant([2, 5, 11], [0.3, 0.6, 0.9, 0.99]),
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("every, compensate", [(1, False), (3, False), (3, True)])
def test_host_plan_decays_are_the_closed_form(name, every, compensate):
    s = SCHEDULES[name]
    plan = Plan(s, update_every=every, compensate=compensate)
    updates = 0
    for call in range(40):
        p = plan.next()
        assert p.due == (call % every == 0)
        if p.due:
            updates += 1
            d = s.at(updates - 1)                     # the update count indexes the schedule
            d = d ** every if compensate and every > 1 else d
            assert p.decays == [d] and p.weights == [1.0 - d] and p.n == updates
        plan.done(p)
    assert plan.updates == updates


@pytest.mark.parametrize("name", SCHEDULES)
def test_explicit_irregular_steps_index_the_schedule(name):
    s = SCHEDULES[name]
    plan = Plan([s, s], debias=True)
    norm = 0.0
    for step in (1, 2, 5, 6, 13, 40, 41):
        p = plan.next(step)
        d = s.at(step - 1)
        c = d * norm + (1.0 - d)
        w = 1.0 if c == 0.0 else (1.0 - d) / c
        norm = c
        assert p.decays == [d, d] and p.weights == [w, w] and p.norms == [c, c]
        plan.done(p)


def test_plan_state_round_trips_through_json():
    import json

    for s in SCHEDULES.values():
        plan = Plan(s, update_every=2)
        for _ in range(5):
            plan.done(plan.next())
        state = json.loads(json.dumps(plan.state()))
        other = Plan(0.5, update_every=2)
        problems: list = []
        other.check_state(state, problems)
        assert problems == []
        other.load_state(state)
        assert other.schedules == [s] and from_state(s.state()) == s
        for step in range(6):
            a, b = plan.next(), other.next()
            assert a == b
            plan.done(a)
            other.done(b)
    problems = []
    Plan(0.5).check_state({**Plan(Cosine(0.9, 1.0, 3)).state(),
                           "schedules": [{"kind": "cosine", "start": 2.0, "end": 1.0, "total_steps": 3}]}, problems)
    assert problems and "start must be a float in [0, 1]" in problems[0]


# ---------------------------------------------------------------- the device plan

def drive_plan_kernel(plan, seed, steps, groups=2):
    """The CPU plan kernel (the device plan's CPU twin) beside the Python plan: call by call,
    the same skips, weights (float64, float32), counters and normalisers, bit for bit."""
    params, decays = parameters(plan, seed)
    ref = Plan(**{"decay": list(plan.schedules), "update_every": plan.update_every, "compensate": plan.compensate,
                  "debias": plan.debias})
    state = np.array([plan.calls, plan.updates, plan.last_time, *plan.norms], np.float64)
    w32, w64 = np.zeros(plan.rows, np.float32), np.zeros(plan.rows)
    flag, keys = np.zeros(1, np.int32), np.zeros(groups, np.int64)
    for step in steps:
        cpu.plan_kernel()(state, params, decays, -1 if step is None else step, w32, w64, flag, keys)
        p = ref.next(step)
        assert flag[0] == (0 if p.due else 1)
        if p.due:
            assert list(w64) == p.weights, step
            assert list(w32) == [np.float32(w) for w in p.weights]
        ref.done(p)
        assert list(state) == [ref.calls, ref.updates, ref.last_time, *ref.norms]


@pytest.mark.parametrize("name", SCHEDULES)
def test_device_plan_kernel_equals_the_host_plan(name):
    s = SCHEDULES[name]
    drive_plan_kernel(Plan(s), 7, [None] * 20)
    drive_plan_kernel(Plan([s, s], update_every=3, compensate=True, debias=True), 7, [None] * 25)
    drive_plan_kernel(Plan([s, s]), 7, [0, 1, 3, 4, 9, 12, 13, 50, 51, 10 ** 6])


def test_device_plan_rows_each_read_their_own_table():
    rows = [PiecewiseConstant([1, 3], [0.1, 0.2, 0.3]), PiecewiseConstant([2, 4, 6, 8], [0.5, 0.6, 0.7, 0.8, 0.9])]
    drive_plan_kernel(Plan(rows, debias=True), 3, [None] * 12)
    drive_plan_kernel(Plan([Cosine(0.9, 1.0, 5), Cosine(0.2, 0.7, 11)]), 3, [None] * 14)


def train_step(m, step):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m[1].running_mean.add_(0.01 * step)


def assert_same(a, b):
    assert_same_averages(a, b, keys=("updates", "calls", "norms", "schedules"))


@pytest.mark.parametrize("name", SCHEDULES)
def test_ema_device_step_equals_the_host_plan_bit_for_bit(name):
    kw = dict(decay=SCHEDULES[name], update_every=2, shadow_dtype="bfloat16", rounding="stochastic", seed=11)
    m = model()
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    dev.update()
    host.update()
    for step in range(13):
        train_step(m, step)
        dev._core.fold_on_device(None, dev._core.device_plan)   # what a CUDA graph replays: no Python of update()
        host.update()
    assert_same(dev, host)
    for step in (40, 41, 45):                         # then explicit, irregular steps
        train_step(m, step)
        dev.update(step=step)
        host.update(step=step)
    assert_same(dev, host)


def test_checkpoint_round_trip_keeps_the_device_plan():
    m = model()
    kw = dict(decay=[Cosine(0.9, 1.0, 8), Cosine(0.5, 0.99, 4)], debias=True)
    a, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    for step in range(3):
        train_step(m, step)
        a.update()
        host.update()
    # another kind and a longer table load into the parameter array the device plan already has
    b = EMA(m, decay=[PiecewiseConstant([1, 2, 3, 4, 5, 6], [0.5] * 7)] * 2, debias=True, device_step=True)
    array = b._plan_on_device.devices["cpu"].arrays["params"]
    b.load_state_dict(a.state_dict())
    assert b._plan_on_device.devices["cpu"].arrays["params"] is array
    assert b.plan.schedules == host.plan.schedules
    for step in range(8):
        train_step(m, step + 10)
        b.update()
        host.update()
    assert_same(b, host)


# ---------------------------------------------------------------- every face

def test_jax_face_takes_a_momentum_schedule():
    jnp = pytest.importorskip("jax.numpy")
    from fastema.jax import EMA as JaxEMA

    s = Linear(0.5, 0.9, 4)
    x = {"w": jnp.zeros(3, jnp.float32)}
    ema, ref = JaxEMA(x, decay=s), np.zeros(3)
    for k in range(1, 7):
        x = {"w": jnp.full(3, float(k), jnp.float32)}
        ema.update(x)
        d = s(k)
        ref = d * ref + (1 - d) * k
    np.testing.assert_allclose(np.asarray(ema.shadow()["w"]), ref, rtol=1e-6)


# ---------------------------------------------------------------- a DINO-style student / teacher loop

def test_dino_style_teacher_equals_a_float64_reference():
    """A student trained to match its EMA teacher's centred, sharpened outputs (DINO's loss on two
    noisy views), the teacher read through average_parameters() each step; after every update the
    teacher equals a float64 copy updated with DINO's ``param_k.mul_(m).add_((1 - m) * param_q)`` and
    ``m = cosine_scheduler(0.996, 1, epochs, niter)[it]``, to float32 rounding."""
    torch.manual_seed(0)
    epochs, niter = 2, 10
    total = epochs * niter
    student = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 16))
    teacher = EMA(student, decay=Cosine(0.996, 1.0, total))
    constant = EMA(student, decay=0.996)              # the same loop's teacher without the schedule
    reference = {k: v.detach().double().clone() for k, v in student.state_dict().items()}
    schedule = dino_cosine_scheduler(0.996, 1.0, epochs, niter)
    center = torch.zeros(16)
    for it in range(total):
        x = torch.randn(32, 8)
        with torch.no_grad(), teacher.average_parameters():
            t_out = student(x + 0.1 * torch.randn_like(x))
        s_out = student(x + 0.1 * torch.randn_like(x))
        targets = torch.softmax((t_out - center) / 0.04, dim=-1)
        loss = -(targets * torch.log_softmax(s_out / 0.1, dim=-1)).sum(-1).mean()
        student.zero_grad()
        loss.backward()
        with torch.no_grad():                         # SGD
            for p in student.parameters():
                p.sub_(0.5 * p.grad)
        center = 0.9 * center + 0.1 * t_out.mean(0)
        teacher.update()
        constant.update()
        m = float(schedule[it])
        with torch.no_grad():
            for k, q in student.state_dict().items():
                reference[k].mul_(m).add_((1 - m) * q.double())
        assert abs(teacher.decay - (schedule[it + 1] if it + 1 < total else 1.0)) < 1e-15
        for k, v in teacher.averaged_state_dict().items():
            torch.testing.assert_close(v.double(), reference[k], rtol=1e-6, atol=1e-7, msg=k)
    fixed = constant.averaged_state_dict()
    gap = max((fixed[k] - v).abs().max().item() for k, v in teacher.averaged_state_dict().items())
    assert gap > 1e-4, gap                            # the schedule made a difference the check can see
    assert teacher.decay == 1.0                       # held at the end after total_steps


def test_the_guide_example_runs():
    text = (ROOT / "docs" / "guides" / "torch.md").read_text()
    block = re.search(r"## Momentum schedules.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "guides/torch.md momentum schedules", "exec"), namespace)
    assert namespace["teacher"].updates == namespace["steps"]


# ---------------------------------------------------------------- the CUDA plan kernel (simulator or GPU)

@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not torch.cuda.is_available(),
                    reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("name", SCHEDULES)
def test_cuda_plan_kernel_equals_the_cpu_one(name):
    """Bit for bit in the simulator; on a GPU, CUDA's double cos may differ from the host's in
    the last bits (documented), so the cosine's float64 weights are compared to 4 ulps there."""
    s = SCHEDULES[name]
    plan = Plan([s, s], update_every=2, debias=True)
    exact = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or name != "cosine"
    assert_cuda_plan_kernel_equals_the_cpu_one(plan, 5, [-1] * 10 + [30, 31, 32, 33], exact)
