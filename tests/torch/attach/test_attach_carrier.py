"""The attached average's carrier in the optimizer state dict, one process (round 8 of the
reliability campaign, ``../shared/design/reliability.md``): DCP's flattened load without a get
first and a stateless optimizer (H1), averaged buffers (H2), frozen parameters inside the
optimizer (H3), a save while a start-over is pending (H4), a load torch refuses after the
pre-hook (M1), ``optimizer.step()`` inside ``average_parameters()`` (M2), a deeply nested record
(M3), NaN counters (L1). Each resumed bit for bit against an uninterrupted run, or refused with
nothing changed."""
import warnings

import pytest
import torch
from support.attach import averaged, batches, same, save_load
from torch import nn

from fastema.torch import ATTACH_KEY as KEY
from fastema.torch import EMA

sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
D = 0.5


def make(seed=0, *, frozen=False, bn=False, sgd=False, ema_kw=None, attach=True):
    torch.manual_seed(seed)
    mid = nn.BatchNorm1d(8) if bn else nn.Tanh()
    model = nn.Sequential(nn.Linear(6, 8), mid, nn.Linear(8, 3))
    if frozen:
        model[0].requires_grad_(False)          # a frozen backbone inside the optimizer
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    ema = EMA(model, D, **(ema_kw or {}))
    return model, opt, (ema.attach(opt) if attach else ema)


def step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def strict():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("error")                # carried: no start-over warning
    return w


FLAT = sd.StateDictOptions(flatten_optimizer_state_dict=True)
CASES = {"flat-no-get-adam": dict(opts=FLAT, get=False),
         "flat-no-get-sgd": dict(opts=FLAT, get=False, sgd=True),
         "flat-get-sgd": dict(opts=FLAT, get=True, sgd=True),
         "default-frozen": dict(opts=None, get=True, frozen=True),
         "flat-frozen": dict(opts=FLAT, get=False, frozen=True),
         "default-bn": dict(opts=None, get=True, bn=True, ema_kw={"buffers": "average"}),
         "flat-bn-sgd": dict(opts=FLAT, get=False, bn=True, sgd=True,
                             ema_kw={"buffers": "average"}),
         "default-sgd-exclude": dict(opts=None, get=True, sgd=True,   # DCP's strict load
                                     ema_kw={"exclude": ("2.*",)}),
         "ignore-frozen": dict(opts=sd.StateDictOptions(ignore_frozen_params=True, strict=False), get=True,
                               frozen=True, seed=0),      # the model's frozen part not saved
         "offload-bn": dict(opts=sd.StateDictOptions(cpu_offload=True), get=False, bn=True,
                            ema_kw={"buffers": "average"})}


@pytest.mark.parametrize("case", list(CASES))
def test_dcp_carries_the_average_whole_into_a_fresh_run(case):
    """H1 (a flattened load without a get; plain SGD keeps no state), H2 (averaged buffers),
    H3 (frozen parameters inside the optimizer): saved by DCP's getter at step 3 (through
    ``torch.save``), set into fresh objects, and 2 more steps, bit for bit."""
    c = CASES[case]
    kw = {k: c[k] for k in ("frozen", "bn", "sgd", "ema_kw") if k in c}
    opts = c["opts"] or sd.StateDictOptions()
    xs = batches(5)
    model, opt, ema = make(**kw)
    for x in xs[:3]:
        step(model, opt, x)
    msd, osd = sd.get_state_dict(model, opt, options=opts)
    saved = save_load({"m": msd, "o": osd})
    at3 = averaged(ema)
    for x in xs[3:]:
        step(model, opt, x)
    model2, opt2, ema2 = make(seed=c.get("seed", 7), **kw)   # other weights: a fresh process
    w = strict()
    try:
        if c["get"]:
            sd.get_state_dict(model2, opt2, options=opts)
        sd.set_model_state_dict(model2, saved["m"], options=opts)
        sd.set_optimizer_state_dict(model2, opt2, saved["o"], options=opts)
    finally:
        w.__exit__(None, None, None)
    assert ema2.updates == 3 and same(averaged(ema2), at3)
    for x in xs[3:]:
        step(model2, opt2, x)
    assert ema2.updates == ema.updates == 5 and same(averaged(ema2), averaged(ema))
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), model.parameters()))


def test_a_flattened_load_into_an_optimizer_that_stepped_without_a_get():
    """H1: the live state made by real steps is marked, so the flattened entries are read."""
    model, opt, ema = make()
    for x in batches(3):
        step(model, opt, x)
    saved = save_load(sd.get_optimizer_state_dict(model, opt, options=FLAT))
    model2, opt2, ema2 = make(seed=3)
    step(model2, opt2, batches(1)[0])
    w = strict()
    try:
        sd.set_optimizer_state_dict(model2, opt2, saved, options=FLAT)
    finally:
        w.__exit__(None, None, None)
    assert ema2.updates == 3 and same(averaged(ema2), averaged(ema))


def test_the_live_markers_never_reach_a_plain_state_dict_nor_break_adams_first_step():
    model, opt, ema = make()
    sd.get_optimizer_state_dict(model, opt, options=FLAT)    # DCP's dummy step: every one marked
    plain = opt.state_dict()
    assert KEY in plain and all(KEY not in v for v in plain["state"].values())
    model2, opt2, _ = make(seed=1)
    opt2.zero_grad()
    step(model2, opt2, batches(1)[0])             # Adam's state of a never-stepped parameter
    assert all("step" in v for v in opt2.state.values())
    s = make(sgd=True)
    step(s[0], s[1], batches(1)[0])
    assert s[1].state_dict()["state"] == {}       # plain SGD: no state of its own, none added
    s[2].detach()
    assert len(s[1].state) == 0


@pytest.mark.parametrize("when", ["attach", "dcp get", "dcp load"])
def test_a_marker_alone_never_keeps_adams_first_step_from_filling_its_state(when):
    """A backward before the first step, then attach() or a DCP get / flattened load (their
    dummy step is skipped: the gradients exist): a parameter with a gradient and no state got a
    state holding the marker alone, and Adam, which fills a state only where it is empty, raised
    KeyError: 'exp_avg' at its first step (found by review). The marker is taken out before the
    step and put back after; the step is Adam's own, the average updated once."""
    xs = batches(3)
    ref, ref_opt, ref_ema = make(seed=5)
    for x in xs[:2]:
        step(ref, ref_opt, x)
    model, opt, ema = make(seed=5, attach=False)
    model(xs[0]).square().mean().backward()           # a backward before anything is attached
    ema.attach(opt)
    if when == "dcp get":
        sd.get_optimizer_state_dict(model, opt, options=FLAT)
    elif when == "dcp load":
        sd.set_optimizer_state_dict(model, opt, sd.get_optimizer_state_dict(model, opt, options=FLAT),
                                    options=FLAT)
    opt.step()
    opt.zero_grad()
    assert all({"exp_avg", "exp_avg_sq", "step", KEY} <= set(st) for st in opt.state.values())
    step(model, opt, xs[1])
    assert ema.updates == ref_ema.updates == 2
    assert same(averaged(ema), averaged(ref_ema)) and same(model.state_dict(), ref.state_dict())
    got = sd.get_optimizer_state_dict(model, opt, options=FLAT)       # flatten's keys still there
    assert any(f".{KEY}" in k for k in got), sorted(got)[:6]


def test_a_save_while_a_start_over_is_pending_re_arms_it():
    """H4: a checkpoint without the average loaded, then saved before any step: that save must
    not pass the fresh average off as the run's."""
    xs = batches(4)
    old, old_opt, _ = make(seed=3)
    old_opt_plain = torch.optim.Adam(old.parameters(), lr=1e-2)
    step(old, old_opt_plain, xs[0])
    plain = save_load((old.state_dict(), old_opt_plain.state_dict()))
    model, opt, ema = make(seed=4)
    with pytest.warns(UserWarning, match="holds no 'fastema' entry"):
        opt.load_state_dict(plain[1])
    model.load_state_dict(plain[0])
    again = save_load((model.state_dict(), opt.state_dict()))     # a preemption save
    for form, load in (("top level", lambda m, o: o.load_state_dict(again[1])),
                       ("dcp", None)):
        m3, o3, e3 = make(seed=5)
        m3.load_state_dict(again[0])
        if load is None:                           # the same, through DCP's per-parameter form
            m4, o4, e4 = make(seed=4)
            with pytest.warns(UserWarning, match="holds no 'fastema' entry"):
                o4.load_state_dict(plain[1])
            m4.load_state_dict(plain[0])
            got = save_load(sd.get_optimizer_state_dict(m4, o4))
            with pytest.warns(UserWarning, match="waited to start over"):
                sd.set_optimizer_state_dict(m3, o3, got)
        else:
            with pytest.warns(UserWarning, match="waited to start over"):
                load(m3, o3)
        ref_m, ref_o, _ = make(seed=5, attach=False)
        ref_m.load_state_dict(again[0])
        ref_o.load_state_dict(save_load(unattached(o3.state_dict())))
        ref = EMA(ref_m, D)                        # started over from the loaded weights
        step(m3, o3, xs[1])
        step(ref_m, ref_o, xs[1])
        ref.update()
        assert same(averaged(e3), averaged(ref)), form


def unattached(state):
    return {k: v for k, v in state.items() if k != KEY}


def test_a_load_torch_refuses_after_the_checks_changes_nothing():
    """M1: an SGD-with-momentum run's state dict into Adam: torch raises KeyError('step') after
    the pre-hook; the average is written only after torch took the rest."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    e = EMA(m, D).attach(o)
    for x in batches(3):
        step(m, o, x)
    other = save_load(o.state_dict())
    model, opt, ema = make(seed=2)
    step(model, opt, batches(1)[0])
    before = averaged(ema)
    with pytest.raises(KeyError, match="step"):
        opt.load_state_dict(other)
    assert ema.updates == 1 and same(averaged(ema), before)     # not the other run's (3)
    assert e.updates == 3


def test_optimizer_step_inside_average_parameters_is_refused_before_it_steps():
    """M2: the step pre-hook refuses, naming optimizer.step(); the average, the weights and
    Adam's moments are as they were."""
    model, opt, ema = make()
    step(model, opt, batches(1)[0])
    before, weights = averaged(ema), [p.detach().clone() for p in model.parameters()]
    moments = [v["exp_avg"].clone() for v in opt.state.values()]
    model(batches(2)[1]).square().mean().backward()
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match=r"Adam.step\(\) inside average_parameters\(\)"):
            opt.step()
    assert same(averaged(ema), before) and ema.updates == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(v["exp_avg"], m) for v, m in zip(opt.state.values(), moments))
    opt.step()                                     # outside: steps and updates
    assert ema.updates == 2


def _damaged_record(record):
    model, opt, ema = make()
    step(model, opt, batches(1)[0])
    got = sd.get_optimizer_state_dict(model, opt)
    first = next(k for k, v in got["state"].items() if "meta" in v[KEY])
    entry = dict(got["state"][first][KEY], meta=record)
    bad = {**got, "state": {**got["state"], first: {**got["state"][first], KEY: entry}}}
    return model, opt, ema, bad


@pytest.mark.parametrize("what", ["deep", "nan-norms", "nan-first-time"])
def test_a_damaged_record_is_refused_as_damage_and_nothing_changes(what):
    """M3 (a deeply nested JSON record raised RecursionError), L1 (NaN norms / first_time were
    accepted)."""
    import json

    from fastema.torch._state.attached import META_BYTES
    record = torch.zeros(META_BYTES, dtype=torch.uint8)
    if what == "deep":
        raw = b"[" * 50000
    else:
        model, opt, ema = make(ema_kw={"debias": True})
        step(model, opt, batches(1)[0])
        got = sd.get_optimizer_state_dict(model, opt)
        meta = next(v[KEY]["meta"] for v in got["state"].values() if "meta" in v[KEY])
        state = json.loads(bytes(meta.numpy()).rstrip(b"\0"))
        if what == "nan-norms":
            state["norms"] = [float("nan")]
        else:
            state["first_time"] = float("nan")
        raw = json.dumps(state).encode()
    record[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    model, opt, ema, bad = _damaged_record(record)
    before = averaged(ema)
    match = "damaged" if what == "deep" else ("norms" if what == "nan-norms" else "first_time")
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert ema.updates == 1 and same(averaged(ema), before)


def test_a_replaced_submodule_not_in_the_optimizer_is_refused_before_the_step():
    """L3: ``model[2] = nn.Linear(8, 3)`` after attach, the new head not in the optimizer: the
    next step blended the old head's average with the new weights, silently. attach()'s rule is
    checked again at the first step after a registration: refused, nothing stepped."""
    model, opt, ema = make()
    step(model, opt, batches(1)[0])
    before = averaged(ema)
    model[2] = nn.Linear(8, 3)
    weights = [p.detach().clone() for p in model.parameters()]
    model(batches(2)[1]).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"\['2.weight', '2.bias'\].*not stepped by this "
                                           r"optimizer after attach\(\).*nothing was stepped"):
        opt.step()
    assert ema.updates == 1 and same(averaged(ema), before)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    opt.add_param_group({"params": list(model[2].parameters())})   # the way on: step it too
    opt.step()
    assert ema.updates == 2


def test_optimizer_state_dict_inside_average_parameters_is_refused_naming_the_optimizer():
    """The state-dict post-hook read the average while it was in the model and was refused in the EMA's own
    words ("state_dict() while the EMA weights are swapped ..."), naming neither the optimizer nor the
    attachment. Refused naming ``Adam.state_dict()``; outside the block the dict is as before."""
    model, opt, ema = make()
    step(model, opt, batches(1)[0])
    outside = opt.state_dict()
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match=r"Adam.state_dict\(\) inside average_parameters\(\) \(or after "
                                               r"swap\(\)\): the attached EMA's average is in the model"):
            opt.state_dict()
    again = opt.state_dict()
    assert again.keys() == outside.keys() and same(again["fastema"]["averaged"], outside["fastema"]["averaged"])
