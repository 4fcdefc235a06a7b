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
