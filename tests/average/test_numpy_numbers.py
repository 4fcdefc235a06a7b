"""NumPy scalars (``np.float32(0.75)``, ``np.int64(100)``) are numbers to every schedule, option
and plan, and are kept as the Python numbers of their values: a state is plain JSON, equal to the
state of the same values given as Python numbers (reliability round 4, M5: NumPy scalars were kept,
and broke json.dumps in the HF callback's on_save, tf.train.Checkpoint and torch.load(weights_only=True)
later)."""
import io
import json

import numpy as np
import pytest

from fastema import schedules as S
from fastema.average import EMAOptions, Plan

f32, f64, i64, u64 = np.float32, np.float64, np.int64, np.uint64


def _plain(value) -> bool:
    """Every number in ``value`` (a state) is a Python bool, int or float: never a NumPy scalar."""
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if hasattr(value, "state"):                             # a schedule given as an option
        return _plain(value.state())
    return value is None or type(value) in (bool, int, float, str)


def _python(value):
    """``value`` with each NumPy scalar as the Python number of its value (what the state should hold)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_python(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


# (schedule class, arguments as NumPy scalars): every schedule with each of its numbers a NumPy scalar
SCHEDULES = [
    (S.Constant, (f32(0.75),)),
    (S.NumUpdates, (f64(0.5),)),
    (S.PowerWarmup, (f32(0.75), f32(0.25), f64(2.0), f32(0.5), i64(3))),
    (S.Cosine, (f32(0.99), f32(1.0), i64(100))),
    (S.Linear, (f64(0.5), f32(0.75), np.int32(100))),
    (S.PiecewiseConstant, ([i64(5), np.int32(9)], [f32(0.5), f32(0.75), f64(0.875)])),
    (S.PowerFunction, (f32(6.5),)),
    (S.HalfLife, (i64(10),)),
    (S.BEMA, (f32(0.5), f32(0.25), i64(10), f32(1.5), f64(0.125))),
]


@pytest.mark.parametrize("make, args", SCHEDULES, ids=[m.__name__ for m, _ in SCHEDULES])
def test_every_schedule_keeps_numpy_scalars_as_python_numbers(make, args):
    schedule = make(*args)
    state = schedule.state()
    assert _plain(state), state
    json.dumps(state)                                       # what EMACallback.on_save does
    assert state == make(*(_python(a) for a in args)).state()
    assert S.from_state(json.loads(json.dumps(state))) == schedule
    if make is S.Cosine:                                    # the same decays as the Python numbers' schedule
        assert [schedule(n) for n in (1, 50, 101)] == [make(*_python(args))(n) for n in (1, 50, 101)]


# EMAOptions with each number given as a NumPy scalar (``c``: as it is), and the same with Python
# numbers (``c=_python``; a schedule's numbers too)
OPTIONS = {
    "constant decays": lambda c: dict(decay=[c(f32(0.75)), c(f64(0.5))], update_every=c(i64(2)), seed=c(u64(7))),
    "power warm-up": lambda c: dict(decay=S.PowerWarmup(c(f32(0.99)), min_decay=c(f32(0.25)), inv_gamma=c(f64(2.0)),
                                                        power=c(f32(0.75)), update_after_step=c(i64(3))),
                                    update_every=c(i64(2))),
    "num_updates": lambda c: dict(decay=S.NumUpdates(c(f64(0.999))), update_every=c(np.int8(3)), compensate=True),
    "cosine": lambda c: dict(decay=S.Cosine(c(f32(0.99)), 1.0, c(i64(100))), update_every=c(i64(2))),
    "linear": lambda c: dict(decay=[S.Linear(0.5, c(f32(0.75)), total_steps=c(i64(100)))] * 2),
    "sigma_rel": lambda c: dict(decay=[S.PowerFunction.of(c(f32(0.05))), S.PowerFunction.of(c(f64(0.1)))]),
    "half_life": lambda c: dict(decay=S.HalfLife(c(i64(500)))),
    "bema": lambda c: dict(decay=S.BEMA(lag=c(f32(4.0))), update_every=c(i64(2))),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_keeps_numpy_scalars_as_python_numbers(name):
    given = OPTIONS[name](lambda v: v)
    opts = EMAOptions(**given)
    python = EMAOptions(**OPTIONS[name](_python))
    assert opts == python and _plain(opts.given()) and _plain(list(opts.shadow()))
    plan = opts.plan()
    for step in (None, i64(4), i64(6)):                     # a step given as a NumPy int too
        plan.done(plan.next(step))
    state = plan.state()
    assert _plain(state), state
    json.dumps(state)
    reference = python.plan()
    for step in (None, 4, 6):
        reference.done(reference.next(step))
    assert state == reference.state()
    loaded = opts.plan()
    loaded.load_state(json.loads(json.dumps(state)))
    assert loaded.state() == state


def test_a_plan_made_directly_keeps_numpy_scalars_as_python_numbers():
    plan = Plan(S.PowerWarmup(f32(0.5), update_after_step=i64(3)), update_every=i64(2))
    state = plan.state()
    assert _plain(state) and state["update_every"] == 2 and type(state["update_every"]) is int
    json.dumps(state)
    assert state == Plan(S.PowerWarmup(0.5, update_after_step=3), update_every=2).state()


def test_a_torch_ema_state_with_numpy_scalars_loads_with_weights_only():
    torch = pytest.importorskip("torch")
    from fastema.torch import EMA

    model = torch.nn.Linear(4, 3)
    for options in (dict(decay=S.PowerWarmup(f32(0.75), update_after_step=i64(3)), update_every=i64(2),
                         seed=u64(5)),
                    dict(decay=S.Cosine(f32(0.99), 1.0, i64(100)), update_every=i64(2)),
                    dict(decay=S.Linear(0.5, f32(0.75), total_steps=i64(100)))):
        ema = EMA(model, **options)
        for _ in range(3):
            with torch.no_grad():
                model.weight.add_(0.5)
            ema.update()
        buffer = io.BytesIO()
        torch.save(ema.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)       # refused NumPy scalars before
        again = EMA(model, **options)
        again.load_state_dict(state)
        assert again.updates == ema.updates >= 2 and again.plan.state() == ema.plan.state()
        assert torch.equal(again.averaged_state_dict()["weight"], ema.averaged_state_dict()["weight"])
