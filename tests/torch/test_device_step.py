"""EMA(device_step=True): the plan (count, schedule weights, update_every skips, rounding key)
kept in device memory and advanced by a kernel, so a captured CUDA graph replays the schedule.

On the CPU the same kernels run, so the contract is checked here: the device plan equals
the host plan bit for bit, and calls that replay only the launches (what a graph holds)
advance the schedule and the counts as eager calls do. GPU capture tests are in
tests/kernels/test_cuda.py.
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import assert_same_averages
from models import device_step_model as model
from support.calls import watching
from torch import nn

from fastema.schedules import HalfLife, NumUpdates, PowerFunction, PowerWarmup
from fastema.torch import EMA

CASES = {
    "constant": dict(),
    "power": dict(decay=PowerWarmup(0.9, update_after_step=2, inv_gamma=1.5, power=0.75, min_decay=0.1)),
    "power no warmup": dict(decay=PowerWarmup(0.9, update_after_step=3, power=0.75, inv_gamma=1.0)),
    "power start only": dict(decay=PowerWarmup(0.9, update_after_step=3, warmup=False)),
    "num_updates": dict(decay=NumUpdates(0.9)),
    "every 3 compensated": dict(update_every=3, compensate=True, decay=PowerWarmup(0.9)),
    "debias, two decays": dict(debias=True, decay=[0.9, 0.99]),
    "bf16 stochastic": dict(shadow_dtype="bfloat16", rounding="stochastic", seed=(7 << 32) + 5,
                            decay=PowerWarmup(0.9)),
    "guarded": dict(skip_nonfinite=True, decay=NumUpdates(0.9)),
}


def train_step(m, step):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if step == 4:
            m[0].weight[0, 0] = float("inf")             # a diverged step (kept by unguarded EMAs too)
        if step == 5:
            m[0].weight[0, 0] = 0.5
        m[1].running_mean.add_(0.01 * step)              # the BatchNorm statistics move
        m[1].num_batches_tracked.add_(1)


def assert_same(a, b):
    assert_same_averages(a, b, parts=("averaged", "copied"), equal_nan=True)


@pytest.mark.parametrize("case", CASES)
def test_device_plan_equals_host_plan_bit_for_bit(case):
    kw = {"decay": 0.9, **CASES[case]}
    m = model()
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    assert dev.device_step and not host.device_step
    for step in range(10):
        train_step(m, step)
        dev.update()
        host.update()
        assert (dev.updates, dev.calls) == (host.updates, host.calls)
    assert_same(dev, host)


def test_replayed_launches_advance_the_schedule_and_the_counts():
    """What a CUDA graph holds is the launches of one call (plan kernel, guard, update, buffer
    copy), not its Python: replaying them N times must equal N eager calls, the warm-up
    schedule and the stochastic-rounding key included; state_dict() reads the device's counts."""
    kw = dict(decay=PowerWarmup(0.99), update_every=2, shadow_dtype="bfloat16", rounding="stochastic",
              skip_nonfinite=True)
    m = model()
    replayed, eager = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    replayed.update()
    eager.update()
    for step in range(9):
        train_step(m, step)
        replayed._core.fold_on_device(None, replayed._core.device_plan)   # a replay: no Python of update() runs
        eager.update()
    assert replayed.updates == 1                          # the host counts eager calls only...
    assert_same(replayed, eager)                          # ...the checkpoint has the device's
    assert replayed.updates == eager.updates == 5


def test_explicit_step_drives_the_device_schedule():
    kw = dict(decay=PowerWarmup(0.999), shadow_dtype="bfloat16", rounding="stochastic")
    m = model()
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    for step in (10, 20, 35, 1000):
        train_step(m, 0)
        dev.update(step=step)
        host.update(step=step)
    assert_same(dev, host)


def test_checkpoint_round_trip_keeps_the_device_plan():
    kw = dict(decay=[PowerWarmup(0.9), PowerWarmup(0.999)], debias=True)
    m = model()
    a, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    for step in range(4):
        train_step(m, step)
        a.update()
        host.update()
    b = EMA(m, **kw, device_step=True)
    b.load_state_dict(a.state_dict())                     # the loaded plan goes to the device
    for step in range(4):
        train_step(m, step + 10)
        b.update()
        host.update()
    assert_same(b, host)
    assert all(math.isfinite(x) for x in b.state_dict()["norms"])


def test_a_checkpoint_the_device_plan_cannot_run_is_refused_before_anything_is_written():
    """Reliability round 4, M4: a BEMA checkpoint loaded into an EMA with the plan on the device was
    refused only by the device plan, after the shadow and the host plan had taken the checkpoint's
    values (the shadow moved, the host plan said BEMA). Now the device plan's check runs with the
    others: refused, nothing changed."""
    from fastema.schedules import BEMA

    m = model()
    dev = EMA(m, 0.9, device_step=True)
    for step in range(3):
        train_step(m, step)
        dev.update()
    saved = dev.state_dict()
    saved["averaged"] = {n: v + 5 for n, v in saved["averaged"].items()}     # other values than dev's
    saved["schedules"] = [BEMA().state()]                                      # a host plan takes it
    before, plan = dev.state_dict(), dev.plan.state()
    with pytest.raises(ValueError, match=r"decay=BEMA\(\.\.\.\) keeps its bias correction on the host.*"
                                         r"Nothing was loaded"):
        dev.load_state_dict(saved)
    after = dev.state_dict()
    assert dev.plan.state() == plan
    for n, v in before["averaged"].items():
        assert torch.equal(after["averaged"][n], v), n
    assert {k: v for k, v in after.items() if k not in ("averaged", "copied", "integer")} == \
        {k: v for k, v in before.items() if k not in ("averaged", "copied", "integer")}


def test_device_step_is_off_on_the_cpu_by_default_and_checked():
    assert not EMA(model(), 0.9).device_step
    with pytest.raises(TypeError, match="device_step must be True, False or None"):
        EMA(model(), 0.9, device_step="yes")


@pytest.mark.parametrize("given", [None, "steps"])
def test_plan_kernel_equals_the_python_plan_and_sr_key(given):
    import numpy as np

    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels import cpu
    from fastema.ops import sr_key

    kw = dict(update_every=2, compensate=True, debias=True)
    decays = [PowerWarmup(d, update_after_step=1, inv_gamma=2.0) for d in (0.9, 0.999)]
    plan, seed, groups = Plan(decays, **kw), (3 << 32) + 9, 3
    params, decays = parameters(plan, seed)
    state = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    w32, w64 = np.zeros(2, np.float32), np.zeros(2)
    flag, keys = np.zeros(1, np.int32), np.zeros(groups, np.int64)
    for call in range(12):
        step = None if given is None else 7 * call + 3
        cpu.plan_kernel()(state, params, decays, -1 if step is None else step, w32, w64, flag, keys)
        pending = plan.next(step)
        assert flag[0] == (0 if pending.due else 1)
        if pending.due:
            assert list(w64) == pending.weights
            assert list(w32) == [np.float32(w) for w in pending.weights]
            assert list(keys) == [sr_key(seed + (g << 32), pending.n) for g in range(groups)]
        plan.done(pending)
        assert list(state) == [plan.calls, plan.updates, plan.last_time, *plan.norms]


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the fake GPU stands in for numba-cuda")
def test_a_host_plan_refuses_to_be_captured():
    """device_step=False on a GPU model inside a CUDA-graph capture would freeze the schedule
    and the rounding key in the graph: refused before anything is launched or counted (on the fake
    GPU, its driver capturing torch's stream; the test set a private flag and patched torch's query)."""
    pytest.importorskip("numba.cuda.dispatcher")
    from testkit.fake_gpu import fake_gpu

    with fake_gpu() as fake:
        m = model()
        ema = EMA(m, PowerWarmup(0.9), device_step=False)
        train_step(m, 0)
        fake.launches.clear()
        fake.capture = True
        with pytest.raises(RuntimeError, match="device_step=True"):
            ema.update()
        assert ema.updates == 0 and ema.calls == 0
        assert not [e for e in fake.launches if e[0] in ("launch", "dispatcher")]
        fake.capture = False
        ema.update()
        assert ema.updates == 1 and [e for e in fake.launches if e[0] == "launch"]


def _run_plan_kernel(plan, seed, steps, groups=2):
    """Drive the CPU plan kernel and the Python Plan side by side; yield what each call gave."""
    import numpy as np

    from fastema.average._device_plan import parameters
    from fastema.kernels import cpu

    params, decays = parameters(plan, seed)
    k = plan.rows
    state = np.array([plan.calls, plan.updates, plan.last_time, *plan.norms], np.float64)
    w32, w64 = np.zeros(k, np.float32), np.zeros(k)
    flag, keys = np.zeros(1, np.int32), np.zeros(groups, np.int64)
    for step in steps:
        cpu.plan_kernel()(state, params, decays, -1 if step is None else step, w32, w64, flag, keys)
        yield step, state.copy(), w64.copy(), w32.copy(), int(flag[0]), keys.copy()


def _assert_kernel_follows(plan, ref, seed, steps):
    """The plan kernel driven from ``plan`` gives, call by call, the Python Plan ``ref``'s skips,
    weights (float64 and float32), rounding keys, counts, time and normalisers, bit for bit."""
    from fastema.ops import sr_key

    for step, state, w64, w32, flag, keys in _run_plan_kernel(plan, seed, steps):
        pending = ref.next(step)
        assert flag == (0 if pending.due else 1)
        if pending.due:
            assert list(w64) == pending.weights
            assert list(w32) == [np.float32(w) for w in pending.weights]
            assert list(keys) == [sr_key(seed + (g << 32), pending.n) for g in range(len(keys))]
        ref.done(pending)
        assert list(state) == [ref.calls, ref.updates, ref.last_time, *ref.norms]


@given(decays=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
       warmup=st.sampled_from([None, "num_updates", "power", "start only"]),
       after=st.integers(0, 5), inv_gamma=st.floats(0.5, 10.0), power=st.floats(0.1, 1.5),
       min_decay=st.floats(0.0, 0.5), every=st.integers(1, 4), compensate=st.booleans(), debias=st.booleans(),
       seed=st.integers(0, 2 ** 63), steps=st.lists(st.one_of(st.none(), st.integers(0, 10 ** 6)), max_size=12))
def test_plan_kernel_equals_the_python_plan_for_any_schedule(decays, warmup, after, inv_gamma, power, min_decay, every,
                                                             compensate, debias, seed, steps):
    """Property: whatever the schedule, cadence, debiasing, seed and steps (given or counted),
    the device plan's weights, skips, counts, normalisers and rounding keys equal the Python
    Plan's bit for bit (the graph-replayed EMA and the eager one read the same numbers)."""
    from fastema.average import Plan

    power_kw = dict(update_after_step=after, inv_gamma=inv_gamma, power=power, min_decay=min_decay)
    schedules = {None: lambda d: d, "num_updates": NumUpdates, "power": lambda d: PowerWarmup(d, **power_kw),
                 "start only": lambda d: PowerWarmup(d, **power_kw, warmup=False)}[warmup]
    decay = [schedules(d) for d in decays]
    kw = dict(update_every=every, compensate=compensate, debias=debias)
    _assert_kernel_follows(Plan(decay, **kw), Plan(decay, **kw), seed, steps)


@given(kind=st.sampled_from(["sigma_rel", "half_life"]), values=st.lists(st.floats(0.01, 0.28), min_size=1, max_size=3),
       every=st.integers(1, 4), debias=st.booleans(), seed=st.integers(0, 2 ** 63),
       given_steps=st.booleans(), gaps=st.lists(st.integers(0, 1000), max_size=12))
@example(kind="half_life", values=[0.03910089373628414], every=1, debias=False, seed=0, given_steps=False,
         gaps=[1, 1])                           # 2 ** (-1 / 39.1...): pow and exp2 differ by an ulp
def test_plan_kernel_equals_the_python_plan_for_timed_schedules(kind, values, every, debias, seed, given_steps, gaps):
    """Property: the power-function and half-life schedules (time = calls, or steps that never go
    back) give the same weights, skips, times and counts on the device as in the Python Plan."""
    from fastema.average import Plan

    decay = [PowerFunction.of(v) for v in values] if kind == "sigma_rel" else [HalfLife(v * 1000) for v in values]
    kw = {"decay": decay, "update_every": every, "debias": debias}
    steps = [int(s) for s in np.cumsum(gaps)] if given_steps else [None] * len(gaps)
    _assert_kernel_follows(Plan(**kw), Plan(**kw), seed, steps)


def test_half_life_on_the_host_is_the_kernels_bit_for_bit_where_pow_and_exp2_differ():
    """HalfLife's decay on the host equals the plan kernel's where it matters: at half-lives whose
    ``2 ** (-1 / h)`` is an ulp off ``exp2`` in C (LLVM compiles the kernel's ``2 ** x`` as
    ``exp2(x)``; the host computed ``pow`` before), chosen here from random candidates."""
    from fastema.average import Plan

    rng = np.random.default_rng(0)
    halves = [h for h in rng.uniform(10.0, 280.0, 20000) if 2.0 ** (-1.0 / h) != math.exp2(-1.0 / h)]
    assert len(halves) >= 10
    for h in halves[:20]:
        _assert_kernel_follows(Plan([HalfLife(h)]), Plan([HalfLife(h)]), 0, [None, None, None])


@pytest.mark.parametrize("guarded", [True, False])
def test_training_loop_with_the_plan_on_the_device_equals_the_host_plan(guarded):
    """A real loop (forward, loss, backward, AdamW, BatchNorm): an EMA whose plan lives on the
    device, half of whose updates are only the launches a graph would replay, ends equal to the
    host-planned EMA, weights, BatchNorm statistics and counters alike; the evaluation swap
    puts the same average in the model. Unguarded, the plan step rides in the lerp launch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    kw = dict(decay=PowerWarmup(0.99), update_every=2, skip_nonfinite=guarded)
    dev, host = EMA(net, **kw, device_step=True), EMA(net, **kw, device_step=False)
    x = torch.randn(256, 8)
    y = x.sum(1, keepdim=True).sin()
    for step in range(40):
        batch = torch.randint(0, 256, (32,))
        loss = nn.functional.mse_loss(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2:
            dev._core.fold_on_device(None, dev._core.device_plan)   # what a replayed graph runs
        else:
            dev.update()
        host.update()
    assert_same(dev, host)
    net.eval()
    with dev.average_parameters():
        a = net(x)
    with host.average_parameters():
        b = net(x)
    assert torch.equal(a, b)


class _Mixed(nn.Module):
    """An empty float16 parameter first (a group with no elements, which cannot carry the plan),
    then float32 and bfloat16 layers: three groups on one device, the second carrying the step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.empty = nn.Parameter(torch.zeros(0, dtype=torch.float16))
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8).to(torch.bfloat16)


@pytest.mark.parametrize("guarded", [False, True])
def test_the_plan_step_rides_in_the_first_lerp_launch(guarded):
    """Issue #23 item 2: unguarded, one update() makes one launch for the plan and the first
    group's lerp (no plan kernel), and the other groups read what it wrote; behind a non-finite
    scan the plan kernel runs first, alone. Either way the averages, the counters and the keys
    equal the host plan's bit for bit, skipped calls (update_every) and stochastic rounding included."""
    from fastema._launch.cpu import launch as C

    counts = {"plan": 0, "fused": 0}
    fused: list = []                       # the fused launches made (the CPU's "plan_lerp" prepare function's)

    def counted(step):                     # a device's plan kernel on its own (bound once: DevicePlan)
        def plan(given):
            counts["plan"] += 1
            step(given)
        return plan

    def called(arguments):
        if any(arguments["self"] is run for run in fused):
            counts["fused"] += 1

    m = _Mixed()
    kw = dict(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, shadow_dtype="bfloat16",
              rounding="stochastic", seed=3, skip_nonfinite=guarded)
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    assert len(dev._avg.layout.groups) == 3 and dev._avg.layout.groups[0].tables.chunks == 0
    assert dev._plan_on_device.carriers == {"cpu": 1}
    for d in dev._plan_on_device.devices.values():
        d.step = counted(d.step)
    with watching(C._plan_lerp, on_return=lambda _, run: fused.append(run)), \
            watching(C.CpuLaunch.__call__, on_call=called):
        for step in range(7):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
            dev.update(step=10 + step if step == 5 else None)
            host.update(step=10 + step if step == 5 else None)
    assert counts == ({"plan": 7, "fused": 0} if guarded else {"plan": 0, "fused": 7})
    assert_same_averages(dev, host)
    assert host.updates == 4


def test_the_steady_step_binds_its_launches_once_a_plan_and_follows_moved_sources():
    """Issue 86 item 3's steady step: the launches of an update with the plan on the device are bound
    once per plan, groups, rounding and carriers (not looked up per call), read the group's tables at
    each call (a parameter given new memory is followed) and equal the host plan's bits; a plan made
    to run its kernel apart (``DevicePlan.apart``, the benchmark's comparison) binds them again and
    runs its kernel at every call (the kept launches ignored the change: the GPU benchmark's row
    then ran no plan kernel, review of round 10, session 4)."""
    from fastema._steps import StepLaunches

    bound: list = []
    m = _Mixed()
    kw = dict(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, seed=3)
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    with watching(StepLaunches._plan_launches, on_call=lambda a: bound.append(a["plan"])):
        for step in range(6):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
            if step == 3:
                m.a.weight.data = m.a.weight.data.clone()       # new memory, same layout
            dev.update()
            host.update()
    assert bound == [dev._plan_on_device]                       # once (construction warmed a scratch plan's)
    assert dev._avg._plan_kept[0] is dev._plan_on_device and dev._avg._plan_kept[1] is dev._avg.layout.groups
    assert_same_averages(dev, host)
    plan, ran = dev._plan_on_device, []
    for d in plan.devices.values():
        d.step = (lambda step: lambda given: (ran.append(given), step(given)))(d.step)
    plan.apart()
    with watching(StepLaunches._plan_launches, on_call=lambda a: bound.append(a["plan"])):
        for _ in range(3):
            dev.update()
            host.update()
    assert len(bound) == 2 and len(ran) == 3
    assert_same_averages(dev, host)


def test_integer_buffers_behind_a_flag_take_one_where_each_and_one_foreach_copy():
    """The copied integer buffers (BatchNorm counters, a bool mask, complex copies) of a guarded or
    device-planned update: every pair copied when the flag is clear, none when it is set, the others
    of a device with no flag always; the flag read once, one ``where`` per tensor and one
    ``_foreach_copy_`` (it was four operations per tensor, each a launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastema.torch._tensors.slots import copy_unless_flagged_

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def pairs():
        srcs = [torch.tensor(7), torch.arange(5, dtype=torch.uint8), torch.tensor([True, False]),
                torch.tensor([1 + 2j]), torch.tensor([2 ** 62, -2 ** 63])]
        return [torch.zeros_like(s) for s in srcs], srcs

    for flag_value, want_copied in ((0, True), (1, False)):
        dsts, srcs = pairs()
        flags = {"cpu": torch.tensor([flag_value], dtype=torch.int32)}
        with Count() as count:
            copy_unless_flagged_(dsts, srcs, flags)
        for d, s in zip(dsts, srcs):
            assert torch.equal(d, s if want_copied else torch.zeros_like(s))
        assert count.ops.count("where") == len(srcs) and count.ops.count("_foreach_copy_") == 1
        assert len(count.ops) <= len(srcs) + 3, count.ops
    dsts, srcs = pairs()
    copy_unless_flagged_(dsts, srcs, {"cuda:0": torch.ones(1, dtype=torch.int32)})   # no flag for this device
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


@pytest.mark.parametrize("kw", [dict(skip_nonfinite=True), dict(device_step=True), dict(device_step=True,
                                                                                       skip_nonfinite=True)])
def test_no_value_is_read_on_the_host_during_an_update(kw):
    """No operation of an update reads a tensor's value on the host (``.item()``, ``bool(t)``, a tensor
    compared with ``==``): on a GPU each is a sync. A BatchNorm model, guarded or device-planned."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "equal", "is_nonzero", "nonzero"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.9, **kw)
    ema.update()
    with Reads() as reads:
        for _ in range(3):
            ema.update()
    assert reads.ops == []


# ------------------------------------------------ construction compiles what the first update launches

WARM_CHILD = r"""
import copy, json, sys
import torch
from numba.core import dispatcher
from fastema.torch import EMA, TargetNetwork

def pair():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    online(torch.randn(16, 4))                            # running statistics and a counter that differ
    return online, copy.deepcopy(online).requires_grad_(False)

made = []
for guarded in (False, True):
    online, target = pair()
    with torch.no_grad():                                 # the online network moves away from the target
        for p in online.parameters():
            p.add_(0.25)
    online(torch.randn(16, 4))                            # (its statistics and counter too)
    if sys.argv[1] == "target":
        before = {k: v.clone() for k, v in target.state_dict().items()}
        avg = TargetNetwork(online, target, tau=0.5, skip_nonfinite=guarded, device_step=True)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "construction wrote"
        plan = avg.state_dict()["plan"]                   # read back from the device
    else:
        before = {k: v.clone() for k, v in online.state_dict().items()}
        avg = EMA(online, 0.5, skip_nonfinite=guarded, device_step=True)
        with avg.average_parameters():                    # the average: the weights it was made from
            assert all(torch.equal(v, before[k]) for k, v in online.state_dict().items()), "construction wrote"
        plan = avg.state_dict()                           # (the swap kernel is no update's: compiled here)
    assert (plan["calls"], plan["updates"]) == (0, 0), plan
    made.append((avg, online, target, before))

def refuse(self, *args, **kwargs):                        # from here on, no kernel may be compiled or loaded
    raise AssertionError(f"{self.py_func.__name__} compiled by the first update, not at construction")
dispatcher._DispatcherBase._compile_for_args = refuse

out = []
for avg, online, target, before in made:
    assert (avg.updates, avg.calls) == (0, 0)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    avg.update()
    out.append(avg.updates)
    if sys.argv[1] == "target":                           # tau 0.5 on every parameter
        for (k, v), p in zip(target.named_parameters(), online.parameters()):
            assert torch.equal(v, before[k].lerp(p.detach(), 0.5)), k
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["ema", "target"])
def test_construction_compiles_every_kernel_the_first_update_launches(kind):
    """With the plan on the device (the GPU default) the first update must not compile inside a
    graph capture: construction runs one update against a scratch plan whose call is skipped,
    so every kernel is compiled and nothing is written. In a fresh process (kernels are compiled
    once per process), with numba's compile path refused after construction."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WARM_CHILD, kind], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [1, 1]


def test_skip_nonfinite_switched_on_after_construction_guards_the_device_plan():
    """With the plan on the device, ``ema.skip_nonfinite = True`` after construction makes the next
    update scan and skip a diverged step (the face's attribute was no longer read by the engine)."""
    m = nn.Linear(4, 3)
    ema = EMA(m, 0.5, device_step=True)
    ema.skip_nonfinite = True
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    ema.update()
    assert all(torch.isfinite(t).all() for t in ema.averaged_state_dict().values())
    assert ema.updates == 1
