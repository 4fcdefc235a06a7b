"""The ema-pytorch (``EMA``, ``KarrasEMA``, ``PostHocEMA``) and diffusers (``EMAModel``) drop-ins
of ``fastema.torch.compat`` against the packages themselves, over real training loops."""
import math
import os
import threading
import warnings

import numpy as np
import pytest
import torch
from models import mlp, train_sampled
from torch import nn

from fastema.torch import compat

ema_pytorch = pytest.importorskip("ema_pytorch")


def _net(seed=0):
    return mlp(6, 12, 1, norm=nn.BatchNorm1d, seed=seed)


def _loop(nets, steps, each, seed=1):
    """The same real training loop (forward, loss, backward, AdamW, BatchNorm) on identical
    copies ``nets``; ``each(i)`` after every optimizer step (i = 0, 1, ...)."""
    train_sampled(nets, steps, lambda i: each(i - 1), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                  seed=seed)


def _equal_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kw", [
    dict(),                                                      # ema-pytorch's defaults
    dict(beta=0.99, update_after_step=5, update_every=3, power=3 / 4, min_value=0.1),
    dict(beta=0.95, update_after_step=0, update_every=1, param_or_buffer_names_no_ema={"0.bias"},
         ignore_names={"3.weight"}, update_model_with_ema_every=7, update_model_with_ema_beta=0.5),
])
def test_ema_pytorch_EMA_equals_the_original_bit_for_bit(kw):
    theirs_net, ours_net = _net(), _net()
    theirs = ema_pytorch.EMA(theirs_net, **kw)
    ours = compat.EMA(ours_net, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _loop([theirs_net, ours_net], 150, lambda i: (theirs.update(), ours.update()))
    _equal_state(ours.state_dict(), theirs.state_dict())
    _equal_state(ours_net.state_dict(), theirs_net.state_dict())
    assert ours.get_current_decay() == theirs.get_current_decay()
    x = torch.randn(4, 6)
    assert torch.equal(ours.forward_eval(x), theirs.forward_eval(x))
    resumed = compat.EMA(_net(), **kw)                         # their checkpoint resumes ours
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.get_current_decay() == theirs.get_current_decay()


@pytest.mark.parametrize("make", [_net, lambda: torch.randn(5, generator=torch.Generator().manual_seed(0))],
                         ids=["EMA", "EMAPytree"])
def test_ema_pytorch_warmup_settings_are_checked_at_construction_and_a_refused_update_counts_no_step(make):
    """inv_gamma, power, min_value and update_after_step were taken unchecked: a NaN or negative
    inv_gamma gave a NaN decay, and every later update() was refused ("weight must be in [0, 1], got
    nan") while its step counted. ema-pytorch takes them and averages NaN in."""
    kw = dict(beta=0.99, update_after_step=0, update_every=1)
    peer = ema_pytorch.EMA(make(), **kw, inv_gamma=-1.0)
    for _ in range(3):
        peer.update()
    assert math.isnan(peer.get_current_decay())                  # what the check keeps out
    for bad, message in [(dict(inv_gamma=-1.0), "inv_gamma must be a finite float > 0, got -1.0"),
                         (dict(inv_gamma=float("nan")), "inv_gamma must be a finite float > 0, got nan"),
                         (dict(inv_gamma=0), "inv_gamma must be a finite float > 0, got 0"),
                         (dict(power=float("nan")), "power must be a finite float > 0, got nan"),
                         (dict(power=-0.5), "power must be a finite float > 0, got -0.5"),
                         (dict(power=float("inf")), "power must be a finite float > 0, got inf"),
                         (dict(min_value=float("nan")), r"min_value must be a float in \[0, 1\], got nan"),
                         (dict(min_value=-3.0), r"min_value must be a float in \[0, 1\], got -3.0"),
                         (dict(update_after_step=-1), "update_after_step must be an int >= 0, got -1"),
                         (dict(update_after_step=1.5), "update_after_step must be an int >= 0, got 1.5")]:
        with pytest.raises(ValueError, match=message):
            compat.EMA(make(), **{**kw, **bad})
    sources = [make(), make()]
    ours, theirs = compat.EMA(sources[0], **kw), ema_pytorch.EMA(sources[1], **kw)

    def steps(n):
        for _ in range(n):
            with torch.no_grad():
                for src in sources:
                    for t in (src.parameters() if isinstance(src, nn.Module) else [src]):
                        t.mul_(0.5).add_(1.0)
            ours.update(), theirs.update()

    def averaged(ema):                                            # (ema-pytorch's pytree keeps it out of state_dict)
        copy = ema.ema_model
        return [int(ema.step), *(copy.state_dict().values() if isinstance(copy, nn.Module) else [copy])]

    steps(3)
    before = [t.clone() if torch.is_tensor(t) else t for t in averaged(ours)]
    ours.inv_gamma = float("nan")                                 # set after construction
    with pytest.raises(ValueError, match=r"warm-up decay at step 4 is nan .*inv_gamma=nan.*step did not count"):
        ours.update()
    assert [torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(averaged(ours), before)] == \
        [True] * len(before)
    assert before[0] == 3
    ours.inv_gamma = 1.0
    steps(3)
    for a, b in zip(averaged(ours), averaged(theirs)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_karras_ema_with_update_every_1_equals_the_original_bit_for_bit():
    theirs_net, ours_net = _net(), _net()
    theirs = ema_pytorch.KarrasEMA(theirs_net, sigma_rel=0.1, update_every=1)
    ours = compat.KarrasEMA(ours_net, sigma_rel=0.1, update_every=1)
    _loop([theirs_net, ours_net], 60, lambda i: (theirs.update(), ours.update()))
    _equal_state(ours.state_dict(), theirs.state_dict())
    assert ours.beta == pytest.approx(theirs.beta, rel=1e-15)


def _realised_sigma_rel(cls, sigma, every, T):
    """Each call's sample weight, read off a one-hot parameter; the width of the resulting
    profile (each sample standing for the interval since the previous update) relative to T."""
    holder = nn.Module()
    holder.p = nn.Parameter(torch.zeros(T, dtype=torch.float64))
    ema = cls(holder, sigma_rel=sigma, update_every=every)
    with torch.no_grad():
        for c in range(T):
            holder.p.zero_()
            holder.p[c] = 1.0
            ema.update()
    w = ema.ema_model.p.detach().numpy()
    t = np.arange(1, T + 1, dtype=np.float64)
    mid = t - every / 2
    mean = (w * mid).sum() / w.sum()
    return math.sqrt((w * mid ** 2).sum() / w.sum() - mean ** 2) / T


def test_karras_ema_with_update_every_10_realises_the_requested_profile_and_the_original_does_not():
    T = 20001
    ours = _realised_sigma_rel(compat.KarrasEMA, 0.05, 10, T)
    theirs = _realised_sigma_rel(ema_pytorch.KarrasEMA, 0.05, 10, T)
    assert ours == pytest.approx(0.05, abs=1e-3)
    assert abs(theirs - 0.05) > 0.1                              # REFERENCE 7.1: ~0.246


def test_post_hoc_ema_equals_the_original_checkpoints_and_synthesis(tmp_path):
    theirs_net, ours_net = _net(), _net()
    kw = dict(sigma_rels=(0.05, 0.15), checkpoint_every_num_steps=20, update_every=1)
    theirs = ema_pytorch.PostHocEMA(theirs_net, checkpoint_folder=str(tmp_path / "theirs"), **kw)
    ours = compat.PostHocEMA(ours_net, checkpoint_folder=str(tmp_path / "ours"), **kw)
    _loop([theirs_net, ours_net], 100, lambda i: (theirs.update(), ours.update()))
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir()) and len(names) == 10
    for name in names:
        _equal_state(torch.load(tmp_path / "ours" / name), torch.load(tmp_path / "theirs" / name))
    a = ours.synthesize_ema_model(sigma_rel=0.1)
    b = theirs.synthesize_ema_model(sigma_rel=0.1)
    for (k, x), (_, y) in zip(a.ema_model.state_dict().items(), b.ema_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)   # their file order is the disk's
    ours.checkpoint_folder = tmp_path / "theirs"                 # their folder, synthesised by ours
    c = ours.synthesize_ema_model(sigma_rel=0.1, step=60)
    d = theirs.synthesize_ema_model(sigma_rel=0.1, step=60)
    for (k, x), (_, y) in zip(c.ema_model.state_dict().items(), d.ema_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="less than the max timestep"):
        ours.synthesize_ema_model(sigma_rel=0.1, step=101)


def test_post_hoc_ema_checks_its_checkpoint_arguments_before_anything_is_made(tmp_path):
    """checkpoint_every_num_steps 0, "Manual" or None was taken, and each update() then averaged,
    counted its step and raised ZeroDivisionError / TypeError; checkpoint_dtype=torch.int8 was taken
    and synthesis gave zeros; "float16" failed at the first checkpoint with torch's error (ema-pytorch
    takes them all too). Refused at construction now, naming the argument; no folder is made."""
    kw = dict(sigma_rels=(0.05, 0.15), update_every=1)
    peer = ema_pytorch.PostHocEMA(_net(), checkpoint_folder=str(tmp_path / "peer"), checkpoint_every_num_steps=0, **kw)
    with pytest.raises(ZeroDivisionError):
        peer.update()
    assert int(peer.step) == 1                                    # what the check keeps out
    every = r"checkpoint_every_num_steps must be an int >= 1 \(checkpoint every that many updates\) or 'manual'"
    dtype = r"checkpoint_dtype must be a floating torch.dtype"
    for bad, message in [(dict(checkpoint_every_num_steps=0), every + ".*got 0$"),
                         (dict(checkpoint_every_num_steps="Manual"), every + ".*got 'Manual'$"),
                         (dict(checkpoint_every_num_steps=None), every + ".*got None$"),
                         (dict(checkpoint_every_num_steps=-5), every + ".*got -5$"),
                         (dict(checkpoint_every_num_steps=2.5), every + ".*got 2.5$"),
                         (dict(checkpoint_every_num_steps=True), every + ".*got True$"),
                         (dict(checkpoint_dtype=torch.int8), dtype + ".*got torch.int8$"),
                         (dict(checkpoint_dtype=torch.complex64), dtype + ".*got torch.complex64$"),
                         (dict(checkpoint_dtype="float16"), dtype + r".*got 'float16': pass torch.float16$"),
                         (dict(checkpoint_dtype="half"), dtype + ".*got 'half': pass torch.half$"),
                         (dict(checkpoint_dtype="f16"), dtype + r".*got 'f16'$")]:
        with pytest.raises(ValueError, match=message):
            compat.PostHocEMA(_net(), checkpoint_folder=str(tmp_path / "ours"), **kw, **bad)
        assert not (tmp_path / "ours").exists()
    theirs_net, ours_net = _net(), _net()                         # what it takes, as ema-pytorch does
    kw.update(checkpoint_every_num_steps=np.int64(3), checkpoint_dtype=torch.float8_e4m3fn)
    theirs = ema_pytorch.PostHocEMA(theirs_net, checkpoint_folder=str(tmp_path / "theirs"), **kw)
    ours = compat.PostHocEMA(ours_net, checkpoint_folder=str(tmp_path / "ours"), **kw)
    _loop([theirs_net, ours_net], 9, lambda i: (theirs.update(), ours.update()))
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["0.3.pt", "0.6.pt", "0.9.pt",
                                                                             "1.3.pt", "1.6.pt", "1.9.pt"]
    for name in names:
        _equal_state(torch.load(tmp_path / "ours" / name), torch.load(tmp_path / "theirs" / name))
    manual = compat.PostHocEMA(_net(), checkpoint_folder=str(tmp_path / "manual"),
                               **{**kw, "checkpoint_every_num_steps": "manual"})
    manual.update()
    assert list((tmp_path / "manual").iterdir()) == []


class _Unblock(threading.Thread):
    """Opens a FIFO's write end whenever a reader waits on it (non-blocking: only then does it
    succeed) and closes it, so that the reader reads an empty file: a reader that opens the FIFO
    fails the test instead of hanging it (a blocked ``open`` releases the GIL). ``opened``: it did."""

    def __init__(self, fifo):
        super().__init__(daemon=True)
        self.fifo, self.done, self.opened = str(fifo), threading.Event(), False

    def run(self):
        while not self.done.wait(0.02):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
                self.opened = True
            except OSError:                                  # ENXIO: no reader has it open
                pass


@pytest.mark.parametrize("stray", ["notes.pt", "7.6.pt", "fifo 0.9.pt", "folder 0.9.pt"])
def test_post_hoc_synthesis_refuses_a_stray_in_its_folder_by_name_and_never_opens_a_fifo(tmp_path, stray):
    """M2, L4 (issue 85): a FIFO named like a checkpoint hung synthesize_ema_model (torch.load of every
    ``*.pt``; ema-pytorch's too); a stray ``notes.pt`` raised a bare ``int()`` error naming no file
    (ema-pytorch's too), an index past the profiles an IndexError. Each is refused naming the file and
    what the folder must hold, before any checkpoint is read; the FIFO is never opened. Refused as
    ema-pytorch refuses it (it reads every ``*.pt`` too), not skipped; without it the folder synthesises."""
    net = _net()
    ours = compat.PostHocEMA(net, sigma_rels=(0.05, 0.15), checkpoint_every_num_steps="manual",
                             checkpoint_folder=str(tmp_path / "run"), update_every=1)
    for _ in range(2):
        for _ in range(3):
            ours.update()
        ours.checkpoint()
    kind, _, name = stray.rpartition(" ")
    victim = tmp_path / "run" / name
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "folder":
        victim.mkdir()
    else:
        torch.save({"notes": torch.zeros(1)}, victim)
    theirs = ema_pytorch.PostHocEMA(_net(), sigma_rels=(0.05, 0.15), checkpoint_every_num_steps=10,
                                    checkpoint_folder=str(tmp_path / "run"), update_every=1)
    if not kind:                                             # ema-pytorch refuses it too, naming no file
        with pytest.raises((ValueError, IndexError)) as bare:
            theirs.synthesize_ema_model(sigma_rel=0.1)
        assert name not in str(bare.value)
    why = {"notes.pt": "its name is not", "7.6.pt": "its index 7 is not one of this PostHocEMA's 2 profiles"}
    match = (rf"{name}' is a FIFO \(named pipe\), not a regular file" if kind == "fifo" else
             rf"{name}' is a directory, not a regular file" if kind == "folder" else
             rf"{name}' is not a checkpoint of this PostHocEMA \({why[name]}.*must hold only .*"
             rf"index}}\.{{step}}\.pt with index 0 to 1; move it out")
    unblock = _Unblock(victim)
    unblock.start()
    try:
        with pytest.raises(ValueError, match=match):
            ours.synthesize_ema_model(sigma_rel=0.1)
    finally:
        unblock.done.set()
        unblock.join()
    assert not unblock.opened
    (victim.rmdir if kind == "folder" else victim.unlink)()
    got, want = ours.synthesize_ema_model(sigma_rel=0.1), theirs.synthesize_ema_model(sigma_rel=0.1)
    for (k, x), (_, y) in zip(got.ema_model.state_dict().items(), want.ema_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- diffusers

def _diffusers():
    return pytest.importorskip("diffusers.training_utils")


@pytest.mark.parametrize("kw", [
    dict(),
    dict(decay=0.99, use_ema_warmup=True, power=3 / 4, update_after_step=3, min_decay=0.05),
    dict(decay=0.9, foreach=True),
])
def test_diffusers_EMAModel_equals_the_original(kw):
    training_utils = _diffusers()
    theirs_net, ours_net = _net(), _net()
    for n in (theirs_net, ours_net):
        n[0].bias.requires_grad_(False)                          # a frozen parameter: copied, as diffusers
    theirs = training_utils.EMAModel(theirs_net.parameters(), **kw)
    ours = compat.EMAModel(ours_net.parameters(), **kw)

    def each(i):
        theirs.step(theirs_net.parameters())
        ours.step(ours_net.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        if i % 7 == 0:                                           # the frozen one moves by hand now and then
            with torch.no_grad():
                for n in (theirs_net, ours_net):
                    n[0].bias.add_(0.01)

    _loop([theirs_net, ours_net], 60, each)
    assert ours.optimization_step == theirs.optimization_step == 60
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)   # lerp vs diffusers' two roundings
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for net, ema in ((ours_net, ours), (theirs_net, theirs)):   # store / copy_to / restore
        raw = [p.detach().clone() for p in net.parameters()]
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        assert all(torch.equal(p, s) for p, s in zip(net.parameters(), ema.shadow_params))
        ema.restore(net.parameters())
        assert all(torch.equal(p, r) for p, r in zip(net.parameters(), raw))
    resumed = compat.EMAModel(_net().parameters(), **kw)
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.optimization_step == 60
    assert all(torch.equal(a, b) for a, b in zip(resumed.shadow_params, theirs.shadow_params))


@pytest.mark.parametrize("use_ema_warmup", [False, True])
def test_diffusers_EMAModel_warns_where_the_original_deprecates(use_ema_warmup):
    """A module given to the constructor (which turns use_ema_warmup on, even over False) or to
    step(), and max_value= / min_value= / device=, were taken silently; diffusers 0.42 raises a
    FutureWarning for each. The same warnings, messages and settings now."""
    training_utils = _diffusers()
    seen = []
    for cls in (training_utils.EMAModel, compat.EMAModel):
        net = _net()
        with pytest.warns(FutureWarning) as record:
            ema = cls(net, use_ema_warmup=use_ema_warmup, max_value=0.9, min_value=0.1, device="cpu")
            ema.step(net)
        assert all(r.category is FutureWarning for r in record)
        assert [r.filename == __file__ for r in record] == [cls is compat.EMAModel] * 5   # ours: the caller
        seen.append(([str(r.message) for r in record], ema.use_ema_warmup, ema.decay, ema.min_decay,
                     [s.clone() for s in ema.shadow_params]))
    assert seen[1][0] == seen[0][0] == [
        "Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. Please pass the parameters of the "
        "module instead.",
        "The `max_value` argument is deprecated. Please use `decay` instead.",
        "The `min_value` argument is deprecated. Please use `min_decay` instead.",
        "The `device` argument is deprecated. Please use `to` instead.",
        "Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated. Please pass the parameters "
        "of the module instead."]
    assert seen[1][1:4] == seen[0][1:4] == (True, 0.9, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(seen[0][4], seen[1][4]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # parameters, decay, min_decay: no warning
        ours = compat.EMAModel(_net().parameters(), decay=0.9, min_decay=0.1)
        ours.step(_net().parameters())


def test_diffusers_EMAModel_refuses_bad_state_and_devices_and_changes_nothing():
    ours = compat.EMAModel(_net().parameters(), decay=0.9)
    state = ours.state_dict()
    before = [s.clone() for s in ours.shadow_params]
    for bad, match in ((dict(state, decay=1.5), "Decay must be between"),
                       (dict(state, optimization_step=1.0), "Invalid optimization_step"),
                       (dict(state, shadow_params=[torch.zeros(2)]), "do not match"),
                       (dict(state, shadow_params=(1, 2)), "must be a list"),
                       # taken before, as diffusers takes them; their first step failed or was no average
                       (dict(state, shadow_params=[(s + 1j).to(torch.complex64) for s in before]), "dtype"),
                       (dict(state, shadow_params=[s.to(torch.int64) for s in before]), "dtype"),
                       (dict(state, shadow_params=[torch.empty_like(s, device="meta") for s in before]),
                        "meta tensor")):
        with pytest.raises(ValueError, match=match):
            ours.load_state_dict(bad)
    assert ours.decay == 0.9 and all(torch.equal(a, b) for a, b in zip(ours.shadow_params, before))
    net = _net()
    ema = compat.EMAModel(net.parameters())
    ema.shadow_params = [s.to(torch.float64) for s in ema.shadow_params]   # another dtype: fine
    ema.step(net.parameters())
    ema.shadow_params[0] = ema.shadow_params[0].to("meta")
    with pytest.raises(RuntimeError, match="move the EMA beside the model"):
        ema.step(net.parameters())


def test_diffusers_EMAModel_refusals_name_shadow_params_at_their_positions():
    # the trained parameters' pairs were named by their place among them (shadows[0]), the frozen ones left out
    net = _net()
    ema = compat.EMAModel(net.parameters())
    first = next(net.parameters())
    first.requires_grad_(False)                     # frozen: copied, not averaged
    ema.shadow_params[1] = list(net.parameters())[1]      # the average is the parameter itself
    with pytest.raises(ValueError, match=r"^shadow_params\[1\] and parameters\[1\] share memory"):
        ema.step(net.parameters())


def _transposed_midway(nets, each, steps=20):
    """The training loop, with the square weight ``nets[i][3].weight`` transposed in place of its
    storage (``p.data = p.data.t()``: same address and count, other strides) halfway."""
    def step(i):
        if i == steps // 2:
            for n in nets:
                n[3].weight.data = n[3].weight.data.t()
        each(i)

    _loop(nets, steps, step)


@pytest.mark.parametrize("make", ["ema_pytorch.EMA", "diffusers.EMAModel"])
def test_a_transposed_square_weight_is_averaged_by_index_as_the_original_does(make):
    # H4: the layout cache was keyed by address, count and dtype, so after p.data = p.data.t() the
    # cached storage-order walk averaged the transposed weight against the untransposed EMA copy
    # silently (max |ours - theirs| ~2). Now a pair in two layouts is averaged by torch, as upstream.
    theirs_net, ours_net = mlp(6, 12, 12, 1, norm=nn.BatchNorm1d), mlp(6, 12, 12, 1, norm=nn.BatchNorm1d)
    if make == "ema_pytorch.EMA":
        kw = dict(beta=0.9, update_after_step=0, update_every=1)
        theirs, ours = ema_pytorch.EMA(theirs_net, **kw), compat.EMA(ours_net, **kw)
        _transposed_midway([theirs_net, ours_net], lambda i: (theirs.update(), ours.update()))
        _equal_state(ours.state_dict(), theirs.state_dict())
    else:
        training_utils = _diffusers()
        theirs = training_utils.EMAModel(theirs_net.parameters(), decay=0.9)
        ours = compat.EMAModel(ours_net.parameters(), decay=0.9)
        _transposed_midway([theirs_net, ours_net],
                           lambda i: (theirs.step(theirs_net.parameters()), ours.step(ours_net.parameters())))
        for a, b in zip(ours.shadow_params, theirs.shadow_params):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("make", ["ema_pytorch.EMA", "ema_pytorch.KarrasEMA", "diffusers.EMAModel"])
def test_meta_models_are_taken_as_the_originals_take_them(make):
    # L7: the drop-ins refused meta parameters ("is on meta"); the originals average them (shapes only)
    def run(lib):
        net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to("meta")
        if make == "diffusers.EMAModel":
            ema = getattr(_diffusers() if lib == "theirs" else compat, "EMAModel")(net.parameters(), decay=0.9)
            for _ in range(4):
                ema.step(net.parameters())
            ema.copy_to(net.parameters())
            ema.load_state_dict(ema.state_dict())
            return ema.optimization_step, [(s.shape, s.device.type) for s in ema.shadow_params]
        kind = make.split(".")[1]
        kw = dict(update_after_step=0, update_every=1) if kind == "EMA" else dict(sigma_rel=0.1, update_every=1)
        ema = getattr(ema_pytorch if lib == "theirs" else compat, kind)(net, **kw)
        for _ in range(4):
            ema.update()
        ema.copy_params_from_ema_to_model()
        ema.load_state_dict(ema.state_dict())
        return int(ema.step), [(t.shape, t.device.type) for t in ema.ema_model.state_dict().values()]

    assert run("ours") == run("theirs")


@pytest.mark.parametrize("road", ["cpu", "device"])
@pytest.mark.parametrize("kind", ["EMA", "KarrasEMA"])
def test_direct_writes_to_the_step_and_initted_buffers_are_followed_as_in_the_original(kind, road):
    # L8: the host mirror of step / initted ignored ema.step.zero_() and ema.initted.fill_(False)
    # (first weight 3.154 against ema-pytorch's 3.626); now the buffers' version counters are
    # compared at each update (host integers: no device read) and the buffers read again on a change
    kw = dict(beta=0.9, update_after_step=3, update_every=2) if kind == "EMA" else dict(sigma_rel=0.2, update_every=1)
    theirs_net, ours_net = _net(), _net()
    theirs, ours = getattr(ema_pytorch, kind)(theirs_net, **kw), getattr(compat, kind)(ours_net, **kw)
    ours._read_on_cpu = road == "cpu"            # "device": a GPU's road, counters and addresses watched
    writes = {8: lambda e: e.step.zero_(), 14: lambda e: e.initted.fill_(False), 20: lambda e: e.step.fill_(100),
              26: lambda e: setattr(e, "step", torch.tensor(3)), 32: lambda e: e.step.add_(5),
              # writes no version counter sees (ema-pytorch's own idiom: .data), followed on the CPU, where
              # the buffers are read at every update (they were not: 62.8 against ema-pytorch's 95.3)
              46: lambda e: setattr(e.step, "data", torch.tensor(7))}             # (an address: both roads)
    if road == "cpu":
        writes.update({38: lambda e: e.step.data.zero_(), 42: lambda e: e.initted.data.copy_(torch.tensor(False)),
                       50: lambda e: e.step.numpy().fill(1)})

    def each(i):
        for e in (theirs, ours):
            if i in writes:
                writes[i](e)
            e.update()
        _equal_state(ours.state_dict(), theirs.state_dict())

    _loop([theirs_net, ours_net], 56, each)
    if kind == "EMA":
        assert ours.get_current_decay() == theirs.get_current_decay()


def test_no_host_read_per_update(tmp_path):
    """After the first call, the drop-ins' updates (and PostHocEMA's between snapshots) read no
    tensor value on the host: ema-pytorch's .item() per update is gone."""
    from reference import no_host_reads

    from fastema.torch import PostHocEMA

    net = _net()
    made = [compat.EMA(net, update_after_step=2, update_every=1), compat.KarrasEMA(net, sigma_rel=0.1, update_every=2),
            compat.PostHocEMA(net, sigma_rels=(0.05, 0.1), checkpoint_every_num_steps="manual",
                              checkpoint_folder=str(tmp_path / "ph"), update_every=1),
            PostHocEMA(net, (0.05, 0.1), snapshot_every=None, path=tmp_path / "native")]
    diffusers_like = compat.EMAModel(net.parameters(), use_ema_warmup=True)
    for e in made:
        e.update()
    diffusers_like.step(net.parameters())
    with no_host_reads():
        for _ in range(5):
            for e in made:
                e.update()
            diffusers_like.step(net.parameters())
