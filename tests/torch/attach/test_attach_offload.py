"""``ema.attach(optimizer)`` with ``offload="cpu"`` (an average held in host memory, fed through two
staging chunks and folded on a worker thread): every real step updates once, bit for bit as the
synchronous average updated by hand, through the CPU ring and through a GPU ring's pipeline run on
the CPU (two host slots, as ``placement/test_offload.py`` runs it); a step a non-fused
``GradScaler`` skips does not update, and a fused one's is refused naming the offload; the
optimizer's state dict resumes a float32 average of bfloat16 weights bit for bit into new objects,
still offloaded; ``detach()`` hands the offloaded average back to ``update()`` by hand."""

import pytest
import torch
from support.attach import averaged, batches, net, resumes_bit_for_bit, same, save_load, step

from fastema.torch import ATTACH_KEY, EMA, Offload
from fastema.torch._placement import offload_ring

D = 0.75
CHUNK = Offload(chunk=96)     # the 6-8-3 model's 83 weights cut into several windows of the ring


@pytest.fixture(params=["cpu ring", "host slots"])
def pipeline(request):
    """The CPU ring, or a GPU ring's pipeline on the CPU (its chunks copied into two host slots)."""
    with offload_ring.pipeline(host_slots=request.param == "host slots"):
        yield request.param


def offloaded(avg) -> dict:
    """Where the average's bytes are, by part (the launch tables, made as they are needed, left
    out): the host shadow and the two staging chunks."""
    parts = avg.memory(parts=True)
    assert list(parts) == ["cpu"] and parts["cpu"]["shadow"] > 0, parts
    assert parts["cpu"]["staging chunks"] == 2 * CHUNK.chunk, parts
    return {k: v for k, v in parts["cpu"].items() if k != "tables"}


def test_every_step_updates_once_as_the_synchronous_average_by_hand(pipeline):
    a, b = net(), net()
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    ema = EMA(a, D, offload=CHUNK).attach(opt_a)
    by_hand = EMA(b, D)
    assert ("host slots" in offloaded(ema)) == (pipeline == "host slots")
    for i, x in enumerate(batches(5), 1):
        step(a, opt_a, x)
        step(b, opt_b, x)
        by_hand.update()
        assert ema.updates == i
        assert same(averaged(ema), averaged(by_hand))       # each read waits for the folds
    with pytest.raises(RuntimeError, match="attached EMA"):
        ema.update()
    assert ema.updates == 5


def test_a_step_gradscaler_skips_does_not_update_and_a_fused_skip_is_refused_by_name():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, D, offload=CHUNK).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x = batches(1)[0]
    step(model, opt, x, scaler)
    before, weights = averaged(ema), [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    scaler.step(opt)                               # inf gradients: step() not run
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert ema.updates == 1 and same(averaged(ema), before)
    step(model, opt, x, scaler)                    # a finite step updates again
    assert ema.updates == 2 and not same(averaged(ema), before)

    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ema.detach()
    ema.attach(fused)
    now = averaged(ema)
    with pytest.raises(RuntimeError, match=r"cannot skip on the device \(its folds run on a host "
                                           r"thread \(offload\)\).*non-fused"):
        step(model, fused, x, torch.amp.GradScaler("cpu"))
    assert ema.updates == 2 and same(averaged(ema), now)


def train_bf16(state=None, offload=CHUNK):
    """A bfloat16 model, AdamW, a float32 average attached; ``state``: (model, optimizer) to resume
    into new objects (made from other weights, so a load that misses shows)."""
    model = net(torch.bfloat16, seed=0 if state is None else 5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    ema = EMA(model, 0.9, shadow_dtype="float32", offload=offload).attach(opt)
    if state is not None:
        opt.load_state_dict(state[1])              # before the model: no order is needed
        model.load_state_dict(state[0])
    return model, opt, ema


def test_a_float32_average_of_bf16_weights_resumes_offloaded_bit_for_bit(pipeline):
    xs = batches(8, torch.bfloat16)
    model, opt, ema = train_bf16()
    sync_model, sync_opt, sync = train_bf16(offload=None)
    for x in xs:
        step(model, opt, x)
        step(sync_model, sync_opt, x)
    assert same(averaged(ema), averaged(sync))     # the offloaded run is the synchronous one

    def still_offloaded(saved_ema, resumed):
        assert offloaded(resumed) == offloaded(saved_ema)   # in host memory, the same parts

    saved = resumes_bit_for_bit(train_bf16, xs, loaded=still_offloaded)
    assert all(t.device.type == "cpu" for t in saved[1][ATTACH_KEY]["averaged"].values())


def test_an_offloaded_checkpoint_resumes_into_a_synchronous_average_and_back():
    """The optimizer's entry does not depend on where the average lives: a run may resume with or
    without offload."""
    xs = batches(6, torch.bfloat16)
    model, opt, ema = train_bf16(offload=None)
    for x in xs:
        step(model, opt, x)
    first, first_opt, _ = train_bf16()
    for x in xs[:2]:
        step(first, first_opt, x)
    second, second_opt, _ = train_bf16(save_load((first.state_dict(), first_opt.state_dict())),
                                       offload=None)
    for x in xs[2:4]:
        step(second, second_opt, x)
    state = save_load((second.state_dict(), second_opt.state_dict()))
    third, third_opt, resumed = train_bf16(state)
    for x in xs[4:]:
        step(third, third_opt, x)
    offloaded(resumed)
    assert resumed.updates == 6 and same(averaged(resumed), averaged(ema))


def test_detach_hands_the_offloaded_average_back_to_update_by_hand(pipeline):
    a, b = net(), net()
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    ema, by_hand = EMA(a, D, offload=CHUNK).attach(opt_a), EMA(b, D)
    xs = batches(4)
    for x in xs[:2]:
        step(a, opt_a, x)
        step(b, opt_b, x)
        by_hand.update()
    ema.detach()
    assert ema.attached is None and ATTACH_KEY not in opt_a.state_dict()
    step(a, opt_a, xs[2])                          # no hook left: not an update
    step(b, opt_b, xs[2])
    assert ema.updates == 2 and same(averaged(ema), averaged(by_hand))
    for x in xs[3:]:
        ema.update()                               # by hand again, folded on the worker
        by_hand.update()
    assert ema.updates == by_hand.updates == 3 and same(averaged(ema), averaged(by_hand))
    offloaded(ema)
