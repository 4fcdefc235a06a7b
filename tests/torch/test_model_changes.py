"""The defects of shared/design/reliability.md (H1-H3, M2-M5, M8-M10, L1-L10 for torch), each
as its reproduction there, now fixed or refused clearly with nothing changed."""
import copy
import os
import stat
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastema
from fastema.torch import EMA, WindowAverage


class Tied(nn.Module):
    """GPT-2-style tie: the head shares the embedding's Parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def moved(ema, model, by=1.0):
    """Move every weight by ``by``, update with decay 0.5; the average is then weight - by/2."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    ema.update()


# ------------------------------------------------------------------ H1, M1: tied weights

def test_tied_weights_export_the_average_under_every_name(tmp_path):
    m = Tied()
    ema = EMA(m, 0.5)
    moved(ema, m)
    average = m.emb.weight.detach() - 0.5
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["emb.weight"], average) and torch.equal(sd["head.weight"], average)
    ema.save(tmp_path / "ema.pt")
    m2 = Tied()
    m2.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert torch.equal(m2.emb.weight, average)
    assert torch.equal(ema.module().emb.weight, average)
    other = Tied()
    ema.copy_to(other)
    assert torch.equal(other.head.weight, average)


def test_tied_weights_in_model_ema_v3_are_averaged_once_and_deterministically():
    from fastema.torch.compat import ModelEmaV3

    torch.manual_seed(0)
    m = Tied()
    m.emb = nn.Embedding(4096, 256)
    m.head = nn.Linear(256, 4096, bias=False)
    m.head.weight = m.emb.weight
    results = []
    start = m.emb.weight.detach().clone()
    for _ in range(3):
        with torch.no_grad():
            m.emb.weight.copy_(start)
        ema = ModelEmaV3(m, decay=0.5)
        ref = m.emb.weight.detach().clone()
        for step in range(4):
            with torch.no_grad():
                m.emb.weight.add_(torch.ones_like(m.emb.weight) * (step + 1))
            ema.update(m)
            ref.lerp_(m.emb.weight.detach(), 0.5)
        results.append(ema.module.emb.weight.detach().clone())
        assert torch.equal(ema.module.emb.weight, ref)
        assert ema.module.head.weight is ema.module.emb.weight
    assert all(torch.equal(results[0], r) for r in results[1:])


# ------------------------------------------------------------------ H3, L6: replaced or reshaped parameters

@pytest.mark.parametrize("replace", ["meta", "parameters_dict", "overwrite_half"])
def test_parameters_replaced_without_hooks_are_followed_or_refused(replace):
    m = nn.Linear(64, 64)
    ema = EMA(m, 0.0)
    before = ema.state_dict()["averaged"]["weight"].clone()
    if replace == "parameters_dict":
        m._parameters["weight"] = nn.Parameter(torch.full((64, 64), 3.0))
        ema.update()                                    # followed: decay 0 copies the new tensor
        assert torch.equal(ema.averaged_state_dict()["weight"], torch.full((64, 64), 3.0))
        with ema.average_parameters():
            assert torch.equal(m.weight, torch.full((64, 64), 3.0))
        return
    if replace == "meta":
        m.to("meta")
        match = "meta"
    else:
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            m.half()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
        match = "now float16"
    with pytest.raises((ValueError, TypeError), match=match):
        ema.update()
    assert torch.equal(ema.state_dict()["averaged"]["weight"], before)
    assert ema.calls == 0


def test_same_address_reshape_is_named_at_export_and_copy_out():
    m = nn.Linear(128, 32)
    ema = EMA(m, 0.5)
    m.weight.data = m.weight.data.view(128, 32)
    with pytest.raises(ValueError, match=r"source 'weight' was float32 \(32, 128\).*now float32 \(128, 32\)"):
        ema.averaged_state_dict()
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="source 'weight'"):
        ema.copy_to()
    assert torch.equal(m.weight, before)


# ------------------------------------------------------------------ M2: wrappers named module

def test_a_submodule_named_module_is_not_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)
            self.weight = nn.Parameter(torch.zeros(4))

    m = Wrapper()
    ema = EMA(m, 0.5)
    moved(ema, m)
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["module.weight"], m.module.weight.detach() - 0.5)
    assert torch.equal(sd["weight"], m.weight.detach() - 0.5) and sd["weight"].shape == (4,)
    ddp_like = ema.state_dict()
    assert {"module.weight", "weight", "head.weight"} <= set(ddp_like["averaged"])


# ------------------------------------------------------------------ M3: aliases

def test_a_buffer_viewing_a_parameter_is_swapped_once():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1000))
            self.register_buffer("w_view", self.w.data)

    m = B()
    ema = EMA(m, 0.5)
    moved(ema, m)
    raw = m.w.detach().clone()
    with ema.average_parameters():
        assert torch.equal(m.w, raw - 0.5) and torch.equal(m.w_view, raw - 0.5)
    assert torch.equal(m.w, raw)
    assert torch.equal(ema.averaged_state_dict()["w_view"], raw - 0.5)


def test_a_buffer_viewing_part_of_a_parameter_is_refused():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1000))
            self.register_buffer("part", self.w.data[:500])

    with pytest.raises(ValueError, match="share memory"):
        EMA(B(), 0.5)


def test_flat_shadow_of_the_same_tensor_twice_is_refused():
    x = torch.zeros(1000)
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x, x])


# ------------------------------------------------------------------ M4: nesting

def test_nested_average_parameters_keeps_the_average_in():
    m = nn.Linear(4, 4)
    ema = EMA(m, 0.5)
    moved(ema, m)
    raw = m.weight.detach().clone()
    with ema.average_parameters():
        with ema.average_parameters():
            assert torch.equal(m.weight, raw - 0.5)
        assert torch.equal(m.weight, raw - 0.5)
    assert torch.equal(m.weight, raw) and not ema.swapped
    w = WindowAverage(m, 2)
    with w.average_parameters(), w.average_parameters():
        assert w.swapped
    assert torch.equal(m.weight, raw)


# ------------------------------------------------------------------ M5: guard over copied buffers

def test_skip_nonfinite_also_keeps_nan_statistics_out():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.9, skip_nonfinite=True)
    before = ema.averaged_state_dict()
    with torch.no_grad():
        m[0].weight.fill_(float("nan"))
        m[1].running_mean.fill_(float("nan"))
        m[1].num_batches_tracked.fill_(7)
    ema.update()
    after = ema.averaged_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not ema.module().eval()(torch.ones(2, 4)).isnan().any()
    with torch.no_grad():                               # NaN only in a buffer: skipped too
        m[0].weight.fill_(1.0)
        m[1].running_var.fill_(float("inf"))
    ema.update()
    assert torch.equal(ema.averaged_state_dict()["1.running_var"], before["1.running_var"])
    with torch.no_grad():
        m[1].running_var.fill_(2.0)
        m[1].running_mean.fill_(0.5)
    ema.update()                                        # a finite step goes through
    after = ema.averaged_state_dict()
    assert torch.equal(after["1.running_var"], torch.full((4,), 2.0))
    assert int(after["1.num_batches_tracked"]) == 7


# ------------------------------------------------------------------ M8: copy_to

def test_copy_to_a_compiled_model_writes_and_a_mismatch_raises_before_writing():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(m, 0.5)
    moved(ema, m)
    target = torch.compile(copy.deepcopy(m))
    ema.copy_to(target)
    assert torch.equal(target._orig_mod[0].weight, m[0].weight.detach() - 0.5)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="does not match.*nothing was copied"):
        ema.copy_to(other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


# ------------------------------------------------------------------ M9, L7: checkpoints

def _state_with(mutate):
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.5)
    state = ema.state_dict()
    state = {**state, "averaged": {k: v.clone() + 7 for k, v in state["averaged"].items()}}
    mutate(state)
    return ema, state


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.pop("rounding"), "no 'rounding'"),
    (lambda s: s.pop("seed"), "no 'rounding' or 'seed'"),
    (lambda s: s.pop("update_every"), "no 'update_every'"),
    (lambda s: s.pop("compensate"), "no 'compensate'"),
    (lambda s: s.pop("debias"), "no 'debias'"),
    (lambda s: s.update(update_every=0), "update_every must be an int >= 1"),
    (lambda s: s.update(updates=-3), "updates must be an int >= 0"),
    (lambda s: s.update(calls=-1), "calls must be an int >= 0"),
    (lambda s: s.update(seed=-1), "seed must be an int"),
    (lambda s: s.update(averaged=None), "averaged is a NoneType"),
    (lambda s: s["int_buffers"].update({"1.num_batches_tracked": torch.zeros(3, dtype=torch.long)}),
     "int_buffers '1.num_batches_tracked' has shape"),
    (lambda s: s["averaged"].update({"0.weight": torch.zeros(1, 4, 4, device="meta")}), "meta tensor"),
    (lambda s: s["averaged"]["0.weight"].__setitem__((0, 0, 0), float("nan")), "holds inf or NaN"),
])
def test_bad_checkpoints_load_nothing(mutate, match):
    ema, state = _state_with(mutate)
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    counters = (ema.calls, ema.updates, ema.rounding, ema.seed)
    with pytest.raises(ValueError, match=match):
        ema.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict()["averaged"].items())
    assert (ema.calls, ema.updates, ema.rounding, ema.seed) == counters


# ------------------------------------------------------------------ M10, L2: failed swap and update

def test_a_refused_swap_or_update_leaves_everything_as_it_was():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.5)
    moved(ema, m)
    raw = m[0].weight.detach().clone()
    avg = ema.state_dict()["averaged"]["0.weight"].clone()
    m[1].running_mean.data = m[1].running_mean.data.half()
    with pytest.raises(ValueError, match="running_mean"):
        with ema.average_parameters():
            pass
    assert torch.equal(m[0].weight, raw) and not ema.swapped
    with pytest.raises(ValueError, match="running_mean"):
        ema.update()
    assert torch.equal(ema.state_dict()["averaged"]["0.weight"], avg)
    assert ema.updates == 1 and ema.calls == 1
    m[1].running_mean.data = m[1].running_mean.data.float()
    with ema.average_parameters():
        assert torch.equal(m[0].weight, avg[0])
    assert torch.equal(m[0].weight, raw)


# ------------------------------------------------------------------ L1, L3, L4, L5

def test_refused_updates_are_not_counted_and_arguments_are_checked_early():
    ema = EMA(nn.Linear(4, 4), 0.5, warmup="num_updates")
    for step in ("abc", -10, float("nan"), 1.5):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            ema.update(step=step)
    assert ema.calls == 0 and ema.updates == 0
    ema.update(step=3)
    assert ema.calls == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(rounding="stochastic", shadow_dtype="bfloat16", seed=-1), "seed must be"),
    (dict(rounding="stochastic", shadow_dtype="bfloat16", seed="abc"), "seed must be"),
    (dict(min_decay=5), "min_decay must be"),
    (dict(inv_gamma=-1), "inv_gamma must be"),
    (dict(update_after_step=1.5), "update_after_step must be"),
    (dict(skip_nonfinite="yes"), "skip_nonfinite must be"),
])
def test_bad_constructor_arguments_are_refused_whatever_the_warmup(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMA(nn.Linear(4, 4), 0.5, **kwargs)


def test_numpy_decays_are_accepted():
    import numpy as np

    ema = EMA(nn.Linear(4, 4), np.float32(0.5))
    assert ema.decay == pytest.approx(0.5)


def test_exclude_and_copy_take_one_pattern_as_a_str():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(m, 0.5, exclude="0.weight", copy="1.*")
    names = ema.state_dict()
    assert ema.exclude == ("0.weight",)
    assert "0.weight" not in names["averaged"] and sorted(names["copied"]) == ["1.bias", "1.weight"]
    with pytest.raises(TypeError, match="name patterns"):
        EMA(m, 0.5, exclude=[3])


def test_complex_parameters_are_refused_unless_copied():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
            self.w = nn.Parameter(torch.zeros(3))

    with pytest.raises(TypeError, match="complex.*copy="):
        EMA(C(), 0.5)
    m = C()
    ema = EMA(m, 0.5, copy=["z"])
    moved(ema, m, 2.0)
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["z"], m.z.detach()) and torch.equal(sd["w"], torch.ones(3))


# ------------------------------------------------------------------ L8, L9, L10: save

def test_save_gets_the_umask_mode(tmp_path):
    ema = EMA(nn.Linear(4, 4), 0.5)
    old = os.umask(0o022)
    try:
        ema.save(tmp_path / "a.pt")
        ema.save(tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o644


def test_save_removes_temporaries_of_killed_saves_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    host = socket.gethostname()
    stale = tmp_path / f".fastema-a.pt.{dead}@{host}.x1.tmp"
    live = tmp_path / f".fastema-a.pt.{os.getpid()}@{host}.x2.tmp"      # a save in progress elsewhere
    other = tmp_path / f".fastema-b.pt.{dead}@{host}.x3.tmp"            # another target's
    remote = tmp_path / f".fastema-a.pt.{dead}@not-{host}.x4.tmp"       # another machine's (shared disk)
    for f in (stale, live, other, remote):
        f.write_bytes(b"partial")
    EMA(nn.Linear(4, 4), 0.5).save(tmp_path / "a.pt")
    assert not stale.exists() and live.exists() and other.exists() and remote.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == \
        sorted([live.name, other.name, remote.name])


def test_a_failed_write_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    ema = EMA(nn.Linear(4, 4), 0.5)
    ema.save(tmp_path / "a.pt")
    old = (tmp_path / "a.pt").read_bytes()

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(OSError, match="could not write .*a.pt.*bytes free.*No space left"):
        ema.save(tmp_path / "a.pt")
    monkeypatch.undo()
    assert (tmp_path / "a.pt").read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ names, caches, hooks (layout issue, item 6)

def test_sample_weight_is_the_smoother_argument_and_weight_is_deprecated():
    a, b = fastema.Smoother(decay=0.9, window=3), fastema.Smoother(decay=0.9, window=3)
    for v, w in ((1.0, 2.0), (4.0, 1.0), (2.0, 5.0)):
        a.update(torch.tensor([v]), sample_weight=w)
        with pytest.warns(DeprecationWarning, match="renamed sample_weight="):
            b.update(torch.tensor([v]), weight=w)
    assert torch.equal(a.ema, b.ema) and torch.equal(a.sma, b.sma)
    with pytest.raises(TypeError, match="sample_weight= only"):
        a.update(torch.tensor([1.0]), sample_weight=1.0, weight=1.0)
    t = fastema.Tracker(["loss"], ema=0.9, sma=3, every=None)
    with pytest.warns(DeprecationWarning):
        t.update(torch.tensor(1.0), weight=2.0)
    t.update(torch.tensor(3.0), sample_weight=2.0)


def test_clear_caches_drops_layouts_and_keeps_results():
    s, x = torch.zeros(100), torch.ones(100)
    fastema.ema_update_many_([s], [x], 0.5)
    fastema.ema_update_(s, x, 0.5)
    assert fastema.ops._PAIRS and fastema.ops._single_tables.cache_info().currsize
    fastema.clear_caches()
    assert not fastema.ops._PAIRS and fastema.ops._single_tables.cache_info().currsize == 0
    fastema.ema_update_many_([s], [x], 0.5)
    assert torch.equal(s, torch.full((100,), 0.875))


def test_without_registration_hooks_replaced_tensors_and_modules_are_still_followed():
    import fastema.torch as ft

    ft.registration_hooks(False)
    try:
        assert not ft._HOOKS
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        ema = EMA(m, 0.0)
        m[0].weight = nn.Parameter(torch.full((4, 4), 2.0))     # no hook fires: the identity check sees it
        ema.update()
        assert torch.equal(ema.averaged_state_dict()["0.weight"], torch.full((4, 4), 2.0))
        m[1] = nn.Linear(4, 4)                                   # a new submodule: the module check sees it
        with torch.no_grad():
            m[1].weight.fill_(5.0)
        ema.update()
        assert torch.equal(ema.averaged_state_dict()["1.weight"], torch.full((4, 4), 5.0))
    finally:
        ft.registration_hooks(True)
    assert len(ft._HOOKS) == 3
    with pytest.raises(TypeError, match="True or False"):
        ft.registration_hooks("no")
