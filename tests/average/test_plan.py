"""The decay plan counts its own calls: next() describes a call and records nothing, done()
records it, so a refused call changes nothing and every model EMA drives it the same way."""
import pytest
import torch

import fastema.torch
from fastema.average import Plan


def test_next_records_nothing_and_done_records_the_call():
    plan = Plan(0.9, update_every=2)
    first = plan.next()
    assert first.due and first.n == 1 and first.weights == pytest.approx([0.1])
    assert (plan.calls, plan.updates) == (0, 0)
    plan.done(first)
    assert (plan.calls, plan.updates) == (1, 1)
    skipped = plan.next()
    assert not skipped.due
    plan.done(skipped)
    assert (plan.calls, plan.updates) == (2, 1)
    with pytest.raises(ValueError):
        plan.next(step=-1)
    assert (plan.calls, plan.updates) == (2, 1)


def test_the_torch_ema_counts_through_its_plan():
    model = torch.nn.Linear(3, 2)
    ema = fastema.torch.EMA(model, 0.9, update_every=3)
    for _ in range(4):
        ema.update()
    assert ema.cadence is ema.plan.cadence
    assert (ema.calls, ema.updates) == (4, 2) == (ema.plan.calls, ema.plan.updates)
    with pytest.raises(AttributeError):
        ema.calls = 0                                   # read-only: the plan owns the count
    resumed = fastema.torch.EMA(model, 0.9, update_every=3)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.cadence is resumed.plan.cadence and (resumed.calls, resumed.updates) == (4, 2)


def test_window_average_counts_with_its_own_cadence():
    model = torch.nn.Linear(3, 2)
    avg = fastema.torch.WindowAverage(model, 4, every=2)
    for _ in range(5):
        avg.update()
    assert (avg.calls, avg.snapshots) == (5, 4)       # the construction, then calls 1, 3, 5


def test_fastema_average_exports_what_users_call_and_nothing_else():
    """fastema.average.__all__ is what users call (the options, the plan ema.plan is, the refusal
    table of the host-plan faces); the engine's building blocks a face is built from are importable
    from the package (its modules are private) but not public; the rest stays in its module."""
    import fastema.average

    assert sorted(fastema.average.__all__) == ["EMAOptions", "HOST_ONLY_REFUSALS", "Plan"]
    for name in ("Average", "Face", "ModelAdapter", "Cadence", "ModelSwap", "document", "OPTION_DOCS"):
        assert hasattr(fastema.average, name) and name not in fastema.average.__all__, name
    for name in ("PlanReader", "ShadowSettings", "Pending"):
        assert not hasattr(fastema.average, name), name
    with pytest.raises(AttributeError):
        fastema.average.NotAName


@pytest.mark.parametrize("change, said", [
    (dict(last_time=float("inf")), r"last_time must be finite and >= 0, got inf"),
    (dict(last_time=float("nan")), r"last_time must be finite and >= 0, got nan"),
    (dict(updates=10 ** 6), r"updates \(1000000\) must be at most calls \(3\)"),
    (dict(first_time=5.0), r"first_time \(5\.0\) must be at most last_time \(3\.0\)"),
])
def test_counters_and_times_no_run_can_have_are_refused_at_load_with_nothing_changed(change, said):
    """A checkpoint whose last update time is infinite loaded, and then every update(step=...) was
    refused as "before the last update's time inf", blaming the step; more updates than calls loaded
    as they were. Refused at load, naming the field."""
    from fastema.schedules import HalfLife

    model = torch.nn.Linear(4, 3)
    ema = fastema.torch.EMA(model, HalfLife(10.0))
    for step in (1, 2, 3):
        ema.update(step=step)
    state = ema.state_dict()
    before = {k: v for k, v in state.items() if k != "averaged"}
    with pytest.raises(ValueError, match=said):
        ema.load_state_dict({**state, **change})
    after = ema.state_dict()
    assert {k: v for k, v in after.items() if k != "averaged"} == before
    assert all(torch.equal(after["averaged"][k], state["averaged"][k]) for k in state["averaged"])
    ema.update(step=4)                                 # and it goes on
    assert ema.updates == 4


def test_a_step_schedule_whose_steps_went_back_round_trips():
    """The first_time <= last_time check reads timed schedules only: a constant decay's update(step=)
    may go back (as may a first update(step=10) followed by plain calls), and its state loads."""
    model = torch.nn.Linear(4, 3)
    ema = fastema.torch.EMA(model, 0.9)
    ema.update(step=10)
    ema.update(step=2)
    ema.update()
    state = ema.state_dict()
    assert state["first_time"] > state["last_time"]
    ema.load_state_dict(state)
    assert ema.updates == 3


def _folds_with(ema, model, said, step=None) -> None:
    """The next update (at ``step``) folds each row with the decay ``ema.decay`` said (``said``):
    against a float64 reference ``d * old + (1 - d) * x``."""
    said = said if isinstance(said, list) else [said]
    before = [{k: v.double() for k, v in ema.averaged_state_dict(r).items()} for r in range(ema.rows)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    x = {k: v.double() for k, v in model.state_dict().items()}
    ema.update(step=step)
    for r, d in enumerate(said):
        got = ema.averaged_state_dict(r)
        for k in x:
            assert torch.allclose(got[k].double(), d * before[r][k] + (1 - d) * x[k], atol=1e-6), (r, k, d)


@pytest.mark.parametrize("decay", ["half-life", "half-lives", "power"])
def test_decay_says_what_the_next_update_folds_with_after_a_step_past_the_calls(decay):
    """``ema.decay`` after ``update(step=30)`` of a schedule over training time: the next call with no
    step is refused, so it says the decay of an update at the last update's step (the earliest the
    next call may take: 1.0, it folds nothing), not one of a step 2 that update cannot have (16384.0
    for HalfLife(2.0)); with default steps, the next default update's (the closed form)."""
    from fastema.schedules import HalfLife, PowerFunction

    make = {"half-life": lambda: HalfLife(2.0), "half-lives": lambda: [HalfLife(2.0), HalfLife(5.0)],
            "power": lambda: PowerFunction(gamma=6.0)}[decay]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = fastema.torch.EMA(model, make())
    ema.update(step=30)
    said = ema.decay
    assert said == ([1.0, 1.0] if decay == "half-lives" else 1.0)
    with pytest.raises(ValueError, match="before the last update's time"):
        ema.update()
    _folds_with(ema, model, said, step=30)
    plain = fastema.torch.EMA(model, make())
    for _ in range(2):
        plain.update()                                 # steps 1 and 2: the next default one is 3
    said = plain.decay
    if decay != "power":
        lives = [2.0, 5.0] if decay == "half-lives" else [2.0]
        want = [2.0 ** (-1.0 / h) for h in lives]
        assert said == pytest.approx(want if decay == "half-lives" else want[0], rel=1e-12)
    else:
        assert said == pytest.approx((2 / 3) ** 7, rel=1e-12)
    _folds_with(plain, model, said)
