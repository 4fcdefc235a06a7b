"""The host's counters after compiled steps that advanced the plan in the graph alone (the plain case,
``DevicePlan.in_graph``): every reader of the update count or the last update's time reads the device's
first (``Average.plan_now()``), so a step before the last update's time is refused, a DDP wrap keeps an
average already updated, and a stream of the average notices a compiled update made while it is read."""
import datetime
import sys

import pytest
import torch
import torch._dynamo as dynamo
from models import mlp
from torch import nn

from fastema.schedules import HalfLife, PowerFunction
from fastema.torch import EMA

pytestmark = pytest.mark.filterwarnings("ignore")


def _model(seed=0):
    return mlp(8, 16, 4, seed=seed)

def _compiled_plain_steps(model, ema, n):
    """``n`` steps of a function compiled with ``fullgraph=True`` (Dynamo's graph, no Inductor) that moves
    every parameter and calls ``ema.update()``: the plain case, counted on the device alone (``in_graph``);
    nothing of the EMA is read between them."""
    params = list(model.parameters())

    def step():
        with torch.no_grad():
            torch._foreach_add_(params, 1.0)
            ema.update()

    dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for _ in range(n):
        compiled()
    assert ema._core.device_plan.in_graph


@pytest.mark.parametrize("decay", [PowerFunction(7.0), HalfLife(3.0)], ids=["power_function", "half_life"])
def test_a_step_before_the_last_update_is_refused_after_compiled_steps(decay):
    """A schedule over training time refuses ``update(step=)`` before the last update's time (an eager EMA
    does, naming it). After compiled steps that advanced the plan in the graph alone, the eager call checks
    the step against the host's counters, never read back from the device (time 0): the step is accepted,
    and the plan kernel computes a decay above 1 from the device's last time (the average leaves the
    weights: a negative weight)."""
    model = _model()
    ema = EMA(model, decay, device_step=True)
    _compiled_plain_steps(model, ema, 5)
    with pytest.raises(ValueError, match="before the last update's time"):
        ema.update(step=2)


def test_a_ddp_wrap_after_compiled_steps_keeps_the_averages(tmp_path):
    """A DDP wrap after construction restarts an average from the model's weights only while nothing but the
    construction went into it (``Restart``: no update call yet); an average already updated is kept (and a
    warning says the ranks may differ). After compiled steps counted in the graph alone, the host's call count
    is still 0: the wrap's first forward starts the average over, silently throwing the updates away, while
    ``updates`` still reads 3."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, twin_model = _model(), _model()               # the same weights; the twin updated eagerly
    ema, twin = EMA(model, 0.5, device_step=True), EMA(twin_model, 0.5, device_step=True)
    _compiled_plain_steps(model, ema, 3)
    twin_params = list(twin_model.parameters())
    for _ in range(3):
        with torch.no_grad():
            torch._foreach_add_(twin_params, 1.0)
        twin.update()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        DDP(model)(torch.randn(2, 8))                    # the wrap's first forward: the restart
        DDP(twin_model)(torch.randn(2, 8))
    finally:
        dist.destroy_process_group()
    assert ema.updates == twin.updates == 3
    got, want = ema.averaged_state_dict(), twin.averaged_state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_an_iter_weights_stream_refuses_an_update_compiled_while_it_is_read():
    """``iter_weights()`` refuses to go on once the average changed under it (an ``update()`` between two
    tensors: the tensors yielded so far are of the earlier state), as an eager update shows. It compares the
    host's call count, which a compiled step counted in the graph alone does not advance: the stream yields
    the earlier state's first tensor and the later state's others, with no error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(model, 0.5, device_step=True)
    params = list(model.parameters())

    def step():
        with torch.no_grad():
            torch._foreach_add_(params, 1.0)
            ema.update()

    for run in (step, torch.compile(step, backend="eager", fullgraph=True)):
        dynamo.reset()
        run()
        assert ema._core.device_plan.in_graph == (run is not step)      # the compiled one counts on the device
        stream = ema.iter_weights(bucket_bytes=16)
        next(stream)
        run()                                            # the average changes while it is read
        with pytest.raises(RuntimeError, match="changed while it was streamed"):
            list(stream)


def test_a_stream_reads_the_device_at_its_start_and_end_only():
    """After compiled steps (the counts on the device alone), ``iter_weights()`` reads the device's counters
    twice, at its start and after its last tensor (a sync each on a GPU), not before every tensor (it did:
    a sync a tensor), and still refuses a compiled update made while it streamed (above)."""
    from fastema.average import DevicePlan

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])       # 8 tensors
    ema = EMA(model, 0.5, device_step=True)
    _compiled_plain_steps(model, ema, 1)
    reads = []
    watched = DevicePlan.read_into.__code__

    def watch(frame, event, arg):                      # observes the calls (no name of fastema replaced)
        if event == "call" and frame.f_code is watched:
            reads.append(1)
    sys.setprofile(watch)
    try:
        names = [n for n, _ in ema.iter_weights(bucket_bytes=16)]
    finally:
        sys.setprofile(None)
    assert len(names) == 8 and len(reads) == 2, (names, len(reads))


def test_the_graphs_mark_takes_no_argument_is_torchs_own_and_marks_by_the_trace():
    """The plain update marks its device plan ``in_graph`` by a function Dynamo calls for real while
    tracing, marked as ``torch.compiler.assume_constant_result`` marks one, with no argument: Dynamo
    before torch 2.12 calls such a function with Python constants alone, and the device plan it was
    handed failed every compiled ``ema.update()`` there (``AsPythonConstantNotImplementedError``, seen on
    torch 2.11 and 2.10). The plan is marked by the trace, not by construction nor by eager updates."""
    import inspect

    model = _model()
    ema = EMA(model, 0.9, device_step=True)
    mark = ema.compiled.lowered.in_graph
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert not inspect.signature(mark).parameters
    assert all(getattr(mark, a, None) == v for a, v in vars(marked).items()) and vars(marked)
    ema.update()
    assert not ema._core.device_plan.in_graph
    _compiled_plain_steps(model, ema, 3)
    assert ema.updates == 4


def _same(ema, twin):
    """``ema``'s state is ``twin``'s: the counters and times, and the averages bit for bit."""
    got, want = ema.state_dict(), twin.state_dict()
    arrays = ("averaged", "copied", "int_buffers")
    assert {k: v for k, v in got.items() if k not in arrays} == {k: v for k, v in want.items() if k not in arrays}
    for k, v in want["averaged"].items():
        assert torch.equal(got["averaged"][k], v), k
    assert (ema.updates, ema.calls, ema.decay) == (twin.updates, twin.calls, twin.decay)


@pytest.mark.parametrize("decay", [PowerFunction(7.0), HalfLife(3.0)], ids=["power_function", "half_life"])
def test_a_plain_update_before_a_given_steps_time_is_refused_compiled_as_in_eager(decay):
    """A schedule over training time refuses a plain ``update()`` whose time (the calls + 1) is before the last
    update's, made by ``update(step=100)`` (eager names it; nothing changes). The plain compiled update wrote
    the update in the graph with no check: accepted, a decay above 1, the last time going back to 5; and after
    compiled steps an eager ``update()`` checked the host's counters, never read back: accepted too. Both now
    refuse as eager does, change nothing, and the steps go on equal to an eager twin's; so does a plain update
    traced after an ``update(step=)`` in the same function, before any step was given, and one of an average
    loaded from such a checkpoint."""
    model, twin_model = _model(), _model()
    ema, twin = EMA(model, decay, device_step=True), EMA(twin_model, decay, device_step=True)
    params, twin_params = list(model.parameters()), list(twin_model.parameters())

    def nudge(i):
        with torch.no_grad():
            torch._foreach_mul_(params, 1.0 + 0.1 * i)
            torch._foreach_mul_(twin_params, 1.0 + 0.1 * i)

    dynamo.reset()
    plain = torch.compile(lambda: ema.update(), backend="eager", fullgraph=True)
    stepped = torch.compile(lambda s: ema.update(step=s), backend="eager", fullgraph=True)
    both = torch.compile(lambda s: (ema.update(step=s), ema.update()), backend="eager", fullgraph=True)
    for i in range(3):
        nudge(i)
        plain()
        twin.update()
    assert ema._core.device_plan.in_graph
    nudge(3)
    for two in (both, lambda s: (twin.update(step=s), twin.update())):     # the step's update made, then refused
        with pytest.raises(ValueError, match="step=None is before the last update's time 100"):
            two(100)
    _same(ema, twin)
    nudge(4)
    for run in (twin.update, plain, ema.update):
        with pytest.raises(ValueError, match="step=None is before the last update's time 100"):
            run()
        _same(ema, twin)
    stepped(101)
    twin.update(step=101)
    _same(ema, twin)
    loaded = EMA(_model(), decay, device_step=True)                # a checkpoint past its calls' time
    loaded.load_state_dict(twin.state_dict())
    with pytest.raises(ValueError, match="step=None is before the last update's time 101"):
        torch.compile(lambda: loaded.update(), backend="eager", fullgraph=True)()
    assert loaded.calls == twin.calls


@pytest.mark.parametrize("decay", [PowerFunction(7.0), HalfLife(3.0), 0.9], ids=["power_function", "half_life",
                                                                                  "constant"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager steps", "compiled steps"])
def test_the_first_updates_time_after_compiled_steps_is_eagers(decay, compiled):
    """``state_dict()["first_time"]``, the time of the first update: after a compiled plain step (the plan
    counted on the device, which keeps no first time) and a checkpoint load, updates at ``step=5, 6, 9``
    (eager, or compiled: the operator) gave 1.0, a guess from the host's calls, where an eager EMA gives 5.0.
    The host keeps the first update's time itself; the counts and the averages equal the eager twin's."""
    model, twin_model = _model(), _model()
    ema, twin = EMA(model, decay, device_step=True), EMA(twin_model, decay, device_step=True)
    fresh = EMA(_model(), decay, device_step=True).state_dict()
    _compiled_plain_steps(model, ema, 1)
    twin_model.load_state_dict(model.state_dict())                 # the weights the compiled step moved
    ema.load_state_dict(fresh)
    twin.load_state_dict(fresh)
    update = torch.compile(lambda s: ema.update(step=s), backend="eager", fullgraph=True) if compiled else \
        (lambda s: ema.update(step=s))
    for step in (5, 6, 9):
        with torch.no_grad():
            torch._foreach_mul_(list(model.parameters()), 1.0 + 0.1 * step)
            torch._foreach_mul_(list(twin_model.parameters()), 1.0 + 0.1 * step)
        update(step)
        twin.update(step=step)
    assert twin.state_dict()["first_time"] == 5.0
    _same(ema, twin)
