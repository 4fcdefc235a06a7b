"""``ema.attach(optimizer)`` (fastema.torch._face.attach): every real step updates once, against the
same average updated by hand and a float64 reference; GradScaler's skipped steps (non-fused:
step() not run; fused: run with found_inf set) and DCP's lr-0 dummy step do not update; the
optimizer's state dict carries the whole average (weights_only) and resumes a float32 average of
bfloat16 weights bit for bit; an old checkpoint starts over with one warning; the refusals."""
import copy
import warnings

import pytest
import torch
from support.attach import averaged, batches, net, resumes_bit_for_bit, same, save_load, step
from torch import nn

from fastema.torch import ATTACH_KEY as KEY
from fastema.torch import EMA, PostHocEMA, WindowAverage

D = 0.75


def test_every_step_updates_once_as_by_hand_and_as_float64():
    a, b = net(), net()
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    ema = EMA(a, D)
    assert ema.attach(opt_a) is ema and ema.attached is opt_a
    by_hand = EMA(b, D)
    ref = {n: p.detach().double().clone() for n, p in a.named_parameters()}
    for x in batches(5):
        step(a, opt_a, x)
        step(b, opt_b, x)
        by_hand.update()
        for n, p in a.named_parameters():
            ref[n] = D * ref[n] + (1 - D) * p.detach().double()
    assert ema.updates == by_hand.updates == 5
    assert same(averaged(ema), averaged(by_hand))
    for n, t in averaged(ema).items():
        torch.testing.assert_close(t[0].double(), ref[n], rtol=0, atol=1e-6)


def test_update_by_hand_is_refused_while_attached_and_detach_undoes_it():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, D).attach(opt)
    refused = r"attached EMA \(attached to an optimizer, SGD\).*detach\(\)"
    with pytest.raises(RuntimeError, match=refused):
        ema.update()
    assert ema.updates == 0
    ema.detach()
    assert ema.attached is None
    step(model, opt, batches(1)[0])
    assert ema.updates == 0                         # no hook left
    ema.update()
    assert ema.updates == 1
    ema.detach()                                    # a no-op
    assert "fastema" not in opt.state_dict()


def test_a_step_gradscaler_skips_does_not_update_fused_or_not():
    for fused in (False, True):
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        ema = EMA(model, D).attach(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
        x = batches(1)[0]
        step(model, opt, x, scaler)
        before, weights = averaged(ema), [p.detach().clone() for p in model.parameters()]
        loss = model(x).square().mean() * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)                           # inf gradients: skipped (fused: on the device)
        scaler.update()
        opt.zero_grad()
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        assert same(averaged(ema), before), fused
        # non-fused: step() not run, not counted; fused: run, counted, written nothing
        assert ema.updates == (2 if fused else 1)
        step(model, opt, x, scaler)                # a finite step updates again
        assert not same(averaged(ema), before)


@pytest.mark.parametrize("make", [lambda m, p: WindowAverage(m, 3),
                                  lambda m, p: PostHocEMA(m, snapshot_every=None, path=p),
                                  lambda m, p: EMA(m, D, debias=True)],
                         ids=["WindowAverage", "PostHocEMA", "debias"])
def test_a_fused_skip_is_refused_where_the_face_cannot_skip_on_the_device(make, tmp_path):
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    avg = make(model, tmp_path).attach(opt)
    before, weights = averaged(avg), [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="GradScaler with found_inf.*cannot skip.*non-fused"):
        step(model, opt, batches(1)[0], scaler)
    assert same(averaged(avg), before)
    # refused before the optimizer wrote anything (the post-hook's refusal came after the step)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)) and not opt.state
    # and GradScaler's attributes gone with it: a later step would read them (refused again, or a
    # fused step unscaling twice)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def test_a_gradscaler_step_refused_inside_the_block_leaves_no_scale_behind():
    """A fused step under GradScaler refused inside average_parameters() left GradScaler's grad_scale
    and found_inf on the optimizer (GradScaler removes them after a step that returns): the next
    scaler.step multiplied the old scale in, and the fused step unscaled by its square."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ema = EMA(model, D).attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    with ema.average_parameters(), pytest.raises(RuntimeError, match="inside average_parameters"):
        step(model, opt, batches(1)[0], scaler)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def test_dcp_dummy_step_is_not_an_update_but_a_first_step_at_lr_0_is():
    sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, D).attach(opt)
    start = averaged(ema)
    got = sd.get_optimizer_state_dict(model, opt)  # its dummy step: lr 0, zero grads, hooks fire
    assert ema.updates == 0 and same(averaged(ema), start)
    fresh = net()
    opt1 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ema1 = EMA(fresh, D).attach(opt1)
    assert KEY not in got                          # DCP keeps 'state' and 'param_groups' only:
    assert all(KEY in v for v in got["state"].values())   # the average is per parameter there
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # carried: no start-over
        sd.set_optimizer_state_dict(fresh, opt1, got)
    assert ema1.updates == 0 and same(averaged(ema1), start)
    old = {**got, "state": {k: {kk: vv for kk, vv in v.items() if kk != KEY}
                            for k, v in got["state"].items()}}
    with pytest.warns(UserWarning, match="holds no 'fastema' entry"):   # an older checkpoint
        sd.set_optimizer_state_dict(fresh, opt1, old)
    warm = net()
    opt2 = torch.optim.AdamW(warm.parameters(), lr=0.0)   # a warm-up from lr 0: a real step
    ema2 = EMA(warm, D).attach(opt2)
    step(warm, opt2, batches(1)[0])
    assert ema2.updates == 1


def test_only_dcp_is_taken_for_dcp_not_a_function_under_the_same_decorator():
    """DCP's ``_get_optim_state_dict`` is decorated by ``@torch.no_grad()``, whose wrapper's code
    every function it decorates shares: a save in a user's ``@torch.no_grad()`` function was taken
    for DCP's (the per-parameter form, markers written into the live optimizer state)."""
    pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    EMA(model, D).attach(opt)
    step(model, opt, batches(1)[0])

    @torch.no_grad()
    def save():
        return opt.state_dict()

    got = save()
    assert KEY in got and all(KEY not in v for v in got["state"].values())
    assert all(v.get(KEY, {}) == {} for v in opt.state.values())   # only the empty markers
    opt.load_state_dict(save_load(got))
    assert all(v.get(KEY, {}) == {} for v in opt.state.values())


def test_a_damaged_per_parameter_entry_is_refused_by_name_and_nothing_changes():
    sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, D).attach(opt)
    step(model, opt, batches(1)[0])
    got = sd.get_optimizer_state_dict(model, opt)
    before, moments = averaged(ema), [v["exp_avg"].clone() for v in opt.state.values()]
    first = next(iter(got["state"]))
    for bad in (torch.ones(3), "fastema"):     # a tensor's truth value raised a bare RuntimeError
        damaged = {**got, "state": {**got["state"], first: {**got["state"][first], KEY: bad}}}
        with pytest.raises(ValueError, match=f"entry of parameter {first!r} is a"):
            opt.load_state_dict(damaged)
        assert ema.updates == 1 and same(averaged(ema), before)
        assert all(torch.equal(v["exp_avg"], m) for v, m in zip(opt.state.values(), moments))


def train_bf16(state=None):
    """A bf16 model, AdamW, a float32 EMA attached; ``state``: (model, optimizer) to resume."""
    model = net(torch.bfloat16, seed=0 if state is None else 5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    ema = EMA(model, 0.9, shadow_dtype="float32").attach(opt)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    return model, opt, ema


def test_a_float32_average_of_bf16_weights_resumes_through_the_optimizer_bit_for_bit():
    resumes_bit_for_bit(train_bf16, batches(8, torch.bfloat16))


def test_per_parameter_state_would_come_back_in_the_parameters_dtype():
    """The trap the top-level entry avoids (torch's load cast, design note §4.1)."""
    model, opt, _ = train_bf16()
    step(model, opt, batches(1, torch.bfloat16)[0])
    p = next(model.parameters())
    opt.state[p]["naive_ema"] = p.detach().float() + 1e-3
    state = save_load(opt.state_dict())
    opt.load_state_dict(state)
    assert opt.state[p]["naive_ema"].dtype == torch.bfloat16


def test_an_old_checkpoint_starts_over_from_the_loaded_weights_with_one_warning():
    xs = batches(3)
    old = net(seed=3)
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-2)
    step(old, old_opt, xs[0])
    saved = save_load((old.state_dict(), old_opt.state_dict()))
    model = net(seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, D).attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved[1])                 # before the model: the start-over waits
        model.load_state_dict(saved[0])
    assert len(caught) == 1 and "holds no 'fastema' entry" in str(caught[0].message)
    ref_model = net(seed=4)
    ref_model.load_state_dict(saved[0])
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    ref_opt.load_state_dict(save_load(saved[1]))    # its own tensors: torch's load keeps the dict's
    ref = EMA(ref_model, D)                          # made from the loaded weights
    for x in xs[1:]:
        step(model, opt, x)
        step(ref_model, ref_opt, x)
        ref.update()
    assert same(averaged(ema), averaged(ref))


@pytest.mark.parametrize("make", [lambda m, p: WindowAverage(m, 3),
                                  lambda m, p: PostHocEMA(m, (0.05, 0.1), snapshot_every=None,
                                                          path=p)],
                         ids=["WindowAverage", "PostHocEMA"])
def test_window_and_posthoc_attach_as_by_hand_and_resume(make, tmp_path):
    a, b = net(), net()
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    avg, by_hand = make(a, tmp_path / "a").attach(opt_a), make(b, tmp_path / "b")
    for x in batches(4):
        step(a, opt_a, x)
        step(b, opt_b, x)
        by_hand.update()
    assert same(averaged(avg), averaged(by_hand))
    c = net(seed=9)
    opt_c = torch.optim.SGD(c.parameters(), lr=0.1)
    resumed = make(c, tmp_path / "a").attach(opt_c)
    opt_c.load_state_dict(save_load(opt_a.state_dict()))
    assert same(averaged(resumed), averaged(avg))
    with pytest.raises(RuntimeError, match="attached"):
        resumed.update()


def test_refusals_by_name():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, D)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ema.attach(object())
    ema.attach(opt)
    with pytest.raises(ValueError, match="attached to an optimizer already.*average of each part"):
        ema.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already carries an attached EMA"):
        EMA(model, D).attach(opt)
    with pytest.raises(ValueError, match="steps none of the tensors"):
        EMA(net(), D).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)   # two optimizers, one per part
    with pytest.raises(ValueError, match=r"\['2.weight', '2.bias'\].*not stepped by this"):
        EMA(model, D).attach(first)
    part = EMA(model[0], D).attach(first)                # one average per part: fine
    model[2].requires_grad_(False)
    EMA(model, D, exclude=()).attach(torch.optim.SGD(model[0].parameters(), lr=0.1))  # frozen: fine
    assert part.attached is first


def test_a_refused_load_changes_nothing_and_several_groups_work():
    model = net()
    opt = torch.optim.AdamW([{"params": model[0].parameters()},
                             {"params": model[2].parameters(), "lr": 1e-3}], lr=1e-2)
    ema = EMA(model, D).attach(opt)
    for x in batches(2):
        step(model, opt, x)
    state = save_load(opt.state_dict())
    step(model, opt, batches(3)[2])
    now = averaged(ema)
    bad = dict(state, param_groups=state["param_groups"][:1])
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt.load_state_dict(bad)
    assert same(averaged(ema), now) and ema.updates == 3
    nan = {**state, KEY: {**state[KEY], "averaged": {k: v * float("nan")
                                                     for k, v in state[KEY]["averaged"].items()}}}
    with pytest.raises(ValueError):
        opt.load_state_dict(nan)
    assert same(averaged(ema), now) and ema.updates == 3
    opt.load_state_dict(state)
    assert ema.updates == 2 and KEY in state       # the caller's dict is left whole


def test_the_guides_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[3] / "docs" / "guides" / "attach.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "guides/attach.md", "exec"), {})


def test_a_compiled_optimizer_step_updates_as_by_hand():
    """Two averages of one model, one attached to a compiled step, one updated by hand after it
    (a compiled SGD step is eager's to the bit from torch 2.12 on only: not a second model)."""
    a = net()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    ema, by_hand = EMA(a, D).attach(opt), EMA(a, D)
    compiled = torch.compile(opt.step, backend="aot_eager")     # the hook traced with the step
    for x in batches(3):
        a(x).square().mean().backward()
        compiled()
        opt.zero_grad()
        by_hand.update()
    assert ema.updates == by_hand.updates == 3 and same(averaged(ema), averaged(by_hand))


def test_a_fused_skip_leaves_the_copied_buffers_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ema = EMA(model, D).attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    x = batches(1)[0]
    step(model, opt, x, scaler)
    copied = {k: v.clone() for k, v in ema.state_dict()["copied"].items()}
    assert copied and all(torch.equal(v, model.state_dict()[k]) for k, v in copied.items()
                          if v.is_floating_point())
    scaler.scale(model(x * 2).square().mean() * float("inf")).backward()   # BN's stats move
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model[1].running_mean, copied["1.running_mean"])
    assert all(torch.equal(v, ema.state_dict()["copied"][k]) for k, v in copied.items())


def test_an_entryless_load_mid_run_keeps_the_average_and_says_so():
    """An optimizer state without the entry loaded mid-run into an attached EMA with updates: the load
    warned that the average starts over, then the next step kept it with a second warning saying the
    opposite (review of round 10). The first warning now says which: kept where this process updated
    it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_attach = copy.deepcopy(opt.state_dict())
    ema = EMA(model, decay=0.9).attach(opt)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    with pytest.warns(UserWarning, match=r"holds no 'fastema' entry.*unless it holds updates made in "
                                         r"this process \(then it is kept as it is\)"):
        opt.load_state_dict(before_attach)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match="kept as it is, not started over"):
        opt.step()
    assert ema.updates == 4
