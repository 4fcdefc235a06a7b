"""``ema.attach(optimizer)`` under accelerate on the CPU, with no fastema callback
(nothing registered for checkpointing): ``Accelerator.save_state`` writes the average in
``optimizer.bin`` (read with ``torch.load(weights_only=True)``), and ``load_state`` into new
objects resumes it bit for bit against an uninterrupted run, a float32 average of bfloat16 weights
(offloaded or not). The optimizer may be attached before ``accelerator.prepare`` (whose
device placement saves and reloads the optimizer's state at once, before any step: the average's
entry goes through that round trip) or after it (the ``AcceleratedOptimizer`` it returns is
attached through the optimizer it wraps)."""
import pytest
import torch
from support.attach import batches, net

from fastema.torch import ATTACH_KEY, EMA, Offload

STEPS, SAVED = 6, 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: a Trainer run earlier in the same
    worker leaves ``GradientState.end_of_dataloader`` set, and every later ``accumulate()`` then
    syncs on every micro-batch. Reset them around each test, as accelerate's own tests do."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()

def run(folder, *, when, offload=None, save=False, resume=False):
    """Train a bfloat16 model with AdamW and an attached float32 EMA (attached ``when`` "before" or
    "after" ``prepare``); ``save``: ``save_state`` after step SAVED; ``resume``: new objects (other
    weights), ``load_state``, then the steps after SAVED."""
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model = net(torch.bfloat16, 5 if resume else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)

    def attach(m, o):
        return EMA(m, 0.9, shadow_dtype="float32", offload=offload).attach(o)

    ema = attach(model, opt) if when == "before" else None
    model, opt = acc.prepare(model, opt)
    ema = ema or attach(model, opt)
    assert ema.updates == 0
    if resume:
        acc.load_state(str(folder))
        assert ema.updates == SAVED
    for i, x in enumerate(batches(STEPS, torch.bfloat16)[SAVED if resume else 0:], 1):
        acc.backward(model(x).float().square().mean())
        opt.step()
        opt.zero_grad()
        if save and i == SAVED:
            acc.save_state(str(folder))
    return model, ema


def same(a, b):
    x, y = a.state_dict(), b.state_dict()
    assert {k: v for k, v in x.items() if k != "averaged"} == \
        {k: v for k, v in y.items() if k != "averaged"}
    return x["averaged"].keys() == y["averaged"].keys() and \
        all(torch.equal(t, y["averaged"][n]) for n, t in x["averaged"].items())


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("offload", [None, Offload(chunk=96)], ids=["device", "offload"])
def test_save_state_and_load_state_resume_the_attached_average_bit_for_bit(tmp_path, when, offload):
    full_model, full = run(tmp_path, when=when, offload=offload, save=True)
    assert full.updates == STEPS
    saved = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    avg = saved[ATTACH_KEY]["averaged"]
    assert saved[ATTACH_KEY]["updates"] == SAVED
    assert all(t.dtype == torch.float32 for t in avg.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in avg.values())   # bf16 loses it
    model, resumed = run(tmp_path, when=when, offload=offload, resume=True)
    assert resumed.updates == STEPS and same(resumed, full)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), full_model.parameters()))
    assert (offload is not None) == ("staging chunks" in resumed.memory(parts=True)["cpu"])


def test_a_prepared_optimizer_is_attached_through_the_one_it_wraps_once_a_real_step():
    """Under gradient accumulation the prepared optimizer's step() steps the optimizer it wraps
    on the last micro-batch only: one update each, as an EMA updated by hand after those steps."""
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net(torch.bfloat16, 0).float()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ema = EMA(model, 0.9).attach(opt)
    assert ema.attached is opt.optimizer and ema.attached is not opt
    by_hand = EMA(model, 0.9)
    for x in batches(STEPS, torch.bfloat16):
        with acc.accumulate(model):
            acc.backward(model(x.float()).square().mean())
            opt.step()
            opt.zero_grad()
        if acc.sync_gradients:
            by_hand.update()
    assert ema.updates == by_hand.updates == STEPS // 2 and same(ema, by_hand)
    assert ATTACH_KEY in opt.state_dict()
    with pytest.raises(ValueError, match="already carries an attached EMA"):
        EMA(model, 0.9).attach(opt)


def test_an_optimizer_without_hooks_is_refused_by_name():
    class NoHooks(torch.optim.Optimizer):          # a wrapper that ran no Optimizer.__init__
        def __init__(self, params):
            self.param_groups = [{"params": list(params)}]

    model = net(torch.bfloat16, 0)
    with pytest.raises(TypeError, match=r"NoHooks has no optimizer hooks.*attach\(\) the torch "
                                        r"optimizer it wraps"):
        EMA(model, 0.9).attach(NoHooks(model.parameters()))
