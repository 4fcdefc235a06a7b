"""fastema.torch.EMA on real training loops, schedules, swap, copy_to, checkpoints and save, bad input
(what it does when the model changes: test_model_changes.py; refused tensors: test_refusals.py)."""
import copy
import math
import os
import socket
import stat
import subprocess
import sys

import models
import numpy as np
import pytest
import torch
from models import batches, cnn, moved, train
from reference import assert_close_to_reference
from torch import nn

from fastema import schedules as S
from fastema.torch import EMA, WindowAverage, normalize_name


def mlp():
    return models.mlp(6, 32, 1, act=nn.Tanh)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("decay", [0.99, S.NumUpdates(0.99), S.PowerWarmup(0.99, update_after_step=3)],
                         ids=["constant", "num_updates", "power"])
def test_training_loop_matches_float64_reference(make, decay):
    model = make()
    ema = EMA(model, decay)
    sched = ema.plan.schedules[0]
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss() if make is cnn else nn.MSELoss()
    for n, (x, y) in enumerate(batches(model, 60), start=1):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        d = sched(n)
        for name, p in model.named_parameters():
            ref[name] = d * ref[name] + (1 - d) * p.detach().double()
    state = ema.state_dict()
    for name, r in ref.items():
        assert_close_to_reference(state["averaged"][name][0].double().numpy(), r.numpy(), "float32",
                                  60 * (np.abs(r.numpy()) + 1e-3))
    if make is cnn:                       # BatchNorm statistics are copied by default
        bn = dict(model.named_buffers())
        assert torch.equal(state["copied"]["1.running_mean"], bn["1.running_mean"])
        assert torch.equal(state["int_buffers"]["1.num_batches_tracked"], bn["1.num_batches_tracked"])


def test_integer_parameters_are_copied_not_refused():
    # e.g. an RNG state or a step counter kept as a frozen nn.Parameter (Keras does this)
    model = nn.Linear(3, 2)
    model.seed = nn.Parameter(torch.tensor([7, 11], dtype=torch.int32), requires_grad=False)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.seed.add_(1)
        model.weight.add_(1.0)
    ema.update()
    avg = ema.averaged_state_dict()
    assert torch.equal(avg["seed"], torch.tensor([8, 12], dtype=torch.int32))
    assert ema.state_dict()["int_buffers"]["seed"].tolist() == [8, 12]
    ema.swap()                                   # averaged floats in; the integer tensor is left alone
    assert model.seed.tolist() == [8, 12]
    ema.swap()


def test_schedules_closed_forms():
    assert S.Constant(0.99)(1) == 0.99
    assert [S.NumUpdates(0.999)(n) for n in (1, 10, 10 ** 6)] == [2 / 11, 11 / 20, 0.999]
    p = S.PowerWarmup(0.9999, min_decay=0.1, update_after_step=5)
    assert p(6) == 0.0 and p(7) == pytest.approx(max(1 - 2 ** (-2 / 3), 0.1))
    assert p(10 ** 9) == 0.9999
    assert S.PowerWarmup(0.9, warmup=False, update_after_step=2)(3) == 0.0
    assert S.PowerWarmup(0.9, warmup=False, update_after_step=2)(4) == 0.9
    for s in (S.Constant(0.5), S.NumUpdates(0.9), p):
        assert S.from_state(s.state()) == s
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\]"):
        S.Constant(1.5)


def test_debias_equals_pandas_adjusted_ewm():
    pd = pytest.importorskip("pandas")
    values = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    param = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.p = param
    ema = EMA(model, 0.9, debias=True)
    out = []
    for v in values:
        with torch.no_grad():
            param.fill_(float(v))
        ema.update()
        out.append(ema.state_dict()["averaged"]["p"][0, 0].item())
    expected = pd.Series(values.astype(np.float64)).ewm(alpha=0.1, adjust=True).mean().to_numpy()
    np.testing.assert_allclose(out, expected, rtol=2e-6)


def test_update_every_with_compensation():
    model = mlp()
    ema = EMA(model, 0.9, update_every=3, compensate=True)
    assert ema.decay == pytest.approx(0.729)
    before = ema.state_dict()["averaged"]["0.weight"].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()                                     # call 1 updates
    after1 = ema.state_dict()["averaged"]["0.weight"].clone()
    assert not torch.equal(before, after1)
    ema.update()
    ema.update()                                     # calls 2, 3 skip
    assert torch.equal(ema.state_dict()["averaged"]["0.weight"], after1)
    assert ema.calls == 3 and ema.updates == 1


def test_several_decays_in_one_pass():
    model = mlp()
    ema = EMA(model, [0.9, 0.99])
    singles = [EMA(model, 0.9), EMA(model, 0.99)]
    train(model, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(model, 20):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        for s in singles:
            s.update()
    for r, s in enumerate(singles):
        for n, v in s.state_dict()["averaged"].items():
            assert torch.equal(ema.state_dict()["averaged"][n][r], v[0])
    assert ema.decay == [0.9, 0.99]


def test_average_parameters_restores_on_exception():
    model = cnn()
    ema = EMA(model, 0.9, buffers="average")
    train(model, 10, ema)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.state_dict()["averaged"]["0.weight"][0].clone()
    with pytest.raises(ZeroDivisionError):
        with ema.average_parameters() as m:
            assert m is model
            assert torch.equal(model[0].weight, averaged)
            with pytest.raises(RuntimeError, match="swapped"):
                ema.state_dict()
            1 / 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    assert not ema.swapped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_swap_exactly_and_keep_float32_shadow(dtype):
    model = mlp().to(dtype)
    ema = EMA(model, 0.9)
    train(model, 5, ema)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    assert ema.state_dict()["averaged"]["0.weight"].dtype == torch.float32
    for _ in range(3):
        with ema.average_parameters():
            for name, p in model.named_parameters():
                assert torch.allclose(p.float(), shadow[name][0], rtol=2 ** -7, atol=0)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, shadow[k]) for k, v in ema.state_dict()["averaged"].items())


def test_bfloat16_model_float32_shadow_keeps_moving():
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    model = nn.Module()
    model.p = p
    f32 = EMA(model, 0.999)
    rne = EMA(model, 0.999, shadow_dtype="same")
    sr = EMA(model, 0.999, shadow_dtype="bfloat16", rounding="stochastic")
    with torch.no_grad():
        p.fill_(1.0 + 2 ** -6)                       # two bfloat16 ulps up, then hold
    for _ in range(300):
        for e in (f32, rne, sr):
            e.update()
    target = 1.0 + 2 ** -6 * (1 - 0.999 ** 300)
    assert torch.equal(rne.state_dict()["averaged"]["p"], torch.ones(1, 1000, dtype=torch.bfloat16))   # frozen
    assert f32.state_dict()["averaged"]["p"].double().mean().item() == pytest.approx(target, rel=1e-6)
    assert sr.state_dict()["averaged"]["p"].double().mean().item() == pytest.approx(target, abs=2e-4)


def test_checkpoint_resume_is_bit_identical(tmp_path):
    model = cnn()
    ema = EMA(model, [S.PowerWarmup(0.9), S.PowerWarmup(0.99)], debias=False)
    opt = train(model, 15, ema)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, tmp_path / "c.pt")
    # uninterrupted
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    for x, y in list(batches(model, 25))[15:]:
        loss = nn.CrossEntropyLoss()(model(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        ema.update()
    # resumed in a fresh model
    ck = torch.load(tmp_path / "c.pt")
    model_b = cnn()
    model_b.load_state_dict(ck["model"])
    ema_b = EMA(model_b, [0.5, 0.5])                  # schedule and counters come from the checkpoint
    ema_b.load_state_dict(ck["ema"])
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9)
    opt_b.load_state_dict(ck["opt"])
    for x, y in list(batches(model_b, 25))[15:]:
        loss = nn.CrossEntropyLoss()(model_b(x), y)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
        ema_b.update()
    a, b = ema.state_dict(), ema_b.state_dict()
    for k in ("averaged", "copied", "int_buffers"):
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), (k, n)
    assert (a["calls"], a["updates"]) == (b["calls"], b["updates"])


def test_save_writes_a_model_checkpoint_atomically(tmp_path):
    model = cnn()
    ema = EMA(model, 0.9)
    train(model, 5, ema)
    ema.save(tmp_path / "ema.pt")
    fresh = cnn()
    fresh.load_state_dict(torch.load(tmp_path / "ema.pt"))
    for n, p in fresh.named_parameters():
        assert torch.equal(p, ema.state_dict()["averaged"][n][0])
    assert [f for f in os.listdir(tmp_path) if f.startswith(".fastema-")] == []
    standalone = ema.module()
    assert torch.equal(standalone[0].weight, fresh[0].weight) and standalone is not model


def test_save_failure_leaves_no_file(tmp_path, monkeypatch):
    model = mlp()
    ema = EMA(model, 0.9)
    (tmp_path / "ema.pt").write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    monkeypatch.setattr(torch.serialization, "_save", boom)          # the streamed .pt save: torch's serializer
    with pytest.raises(OSError, match="disk full"):
        ema.save(tmp_path / "ema.pt")
    assert (tmp_path / "ema.pt").read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["ema.pt"]


def test_safetensors_save(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = mlp()
    ema = EMA(model, 0.9)
    ema.save(tmp_path / "ema.safetensors")
    model.load_state_dict(st.load_file(tmp_path / "ema.safetensors"))


# reliability round 3, L3: save() streams .safetensors one tensor at a time (no model-sized copy); the file
# holds exactly averaged_state_dict(row) in the model's dtypes: bfloat16 weights of a float32 shadow, a
# channels_last conv, a tied weight under both names, an excluded tensor, BatchNorm and integer buffers
def test_streamed_save_loads_back_equal(tmp_path):
    st = pytest.importorskip("safetensors.torch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
            self.bn = nn.BatchNorm2d(4)
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.frozen = nn.Linear(2, 2)
            self.emb.weight = self.head.weight = nn.Parameter(torch.randn(5, 4, dtype=torch.bfloat16))  # tied

    model = Net()
    ema = EMA(model, [0.9, 0.5], exclude=["frozen.*"])
    for _ in range(3):
        moved(ema, model, by=0.25)
        model.bn.num_batches_tracked += 1
    for row in (0, 1):
        want = ema.averaged_state_dict(row)
        ema.save(tmp_path / f"ema{row}.safetensors", row=row)
        ema.save(tmp_path / f"ema{row}.pt", row=row)
        for got in (st.load_file(tmp_path / f"ema{row}.safetensors"), torch.load(tmp_path / f"ema{row}.pt")):
            assert got.keys() == want.keys()
            for k, v in want.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (row, k)
            fresh = Net()
            fresh.load_state_dict(got)
            assert torch.equal(fresh.head.weight, want["head.weight"]) and fresh.head.weight is fresh.emb.weight
    assert [f for f in os.listdir(tmp_path) if f.startswith(".fastema-")] == []


# L3, the memory itself (issue 25, second pass): a .safetensors save converts the tensors to host copies one at a
# time, each released before the next is written; a save that copied the whole dict first (what L3 was) would have
# every copy alive at the first write. Spied: the host copies Tensor.to makes, alive when each tensor is written.
def test_streamed_save_holds_one_host_copy_at_a_time(tmp_path, monkeypatch):
    import weakref

    from support.calls import watching

    import fastema._io.safetensors as writer

    pytest.importorskip("safetensors.torch")
    model = cnn()
    ema = EMA(model, 0.9)
    moved(ema, model, by=0.25)
    copies, alive_at_write = [], []
    to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if out.device.type == "cpu" and out is not self:
            copies.append(weakref.ref(out))
        return out

    def at_write(args):                     # each tensor's host copy checked, then written
        alive_at_write.append(sum(ref() is not None for ref in copies))

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    with watching(writer._check_range, on_call=at_write):
        ema.save(tmp_path / "ema.safetensors")
    monkeypatch.undo()
    entries = len(model.state_dict())
    assert entries > 5 and len(copies) == len(alive_at_write) == entries
    assert alive_at_write == [1] * entries               # the one being written, none before it


def test_streamed_save_keeps_the_dtypes_the_installed_safetensors_reads(tmp_path):
    # The streaming writer knows the portable names; a complex or uint16 buffer, which
    # safetensors.torch.save stored, must not be refused by it
    st = pytest.importorskip("safetensors.torch")
    if torch.uint16 not in getattr(st, "_TYPES", {}).values():
        pytest.skip("this safetensors has no uint16")
    model = nn.Linear(3, 3)
    model.register_buffer("c", torch.randn(2, dtype=torch.complex64))
    model.register_buffer("u", torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16))
    ema = EMA(model, 0.9, copy=["c"])
    moved(ema, model, by=0.25)
    ema.save(tmp_path / "ema.safetensors")
    got, want = st.load_file(tmp_path / "ema.safetensors"), ema.averaged_state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())


def test_compiled_model_names_and_checkpoints_move_between_wrappers():
    model = mlp()
    compiled = torch.compile(model)                 # names carry the _orig_mod. prefix
    ema_c = EMA(compiled, 0.9)
    assert sorted(ema_c.state_dict()["averaged"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    ema_b = EMA(mlp(), 0.9)
    ema_b.load_state_dict(ema_c.state_dict())
    assert normalize_name("_orig_mod.module.layer.weight") == "layer.weight"


def test_ddp_wrapped_model():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp, 0.9)
        train(ddp.module, 3, ema)
        assert "0.weight" in ema.state_dict()["averaged"]
        bare = EMA(mlp(), 0.9)
        bare.load_state_dict(ema.state_dict())
        fresh = mlp()
        fresh.load_state_dict(ema.averaged_state_dict())
        assert not hasattr(ema, "ema_state_dict")           # the old name is gone (0.1.0 was never released)
    finally:
        dist.destroy_process_group()


def test_exclude_copy_and_buffer_modes():
    model = cnn()
    ema = EMA(model, 0.5, exclude=["4.*"], copy=["0.bias"], buffers="ignore")
    names = ema.state_dict()
    assert sorted(names["averaged"]) == ["0.weight", "1.bias", "1.weight"]
    assert sorted(names["copied"]) == ["0.bias"]
    assert "1.num_batches_tracked" in names["int_buffers"]
    avg = EMA(model, 0.5, buffers="average")
    assert "1.running_var" in avg.state_dict()["averaged"]


# ------------------------------------------------------------------ bad input







@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.pop("format"), "not a fastema.torch.EMA state dict"),
    (lambda s: s.update(version=99), "version 99"),
    (lambda s: s["averaged"].pop("0.weight"), r"missing \['0.weight'\]"),
    (lambda s: s["averaged"].update(extra=torch.zeros(1, 1)), r"unexpected \['extra'\]"),
    (lambda s: s["averaged"].update({"0.bias": torch.zeros(1, 7)}), r"'0.bias' has shape \(1, 7\)"),
    (lambda s: s.update(schedules=s["schedules"] * 2), "2 decay"),
])
def test_wrong_checkpoint_is_refused_and_nothing_changes(mutate, match):
    model = mlp()
    ema = EMA(model, 0.9)
    train(model, 3, ema)
    good = ema.state_dict()
    bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
    mutate(bad)
    other = EMA(mlp(), 0.5)
    before = {k: v.clone() for k, v in other.state_dict()["averaged"].items()}
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict()["averaged"].items())
    assert other.updates == 0


def test_model_state_dict_is_not_an_ema_checkpoint():
    ema = EMA(mlp(), 0.9)
    with pytest.raises(ValueError, match="model.load_state_dict"):
        ema.load_state_dict(mlp().state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=1.1), r"decay must be"), (dict(warmup="power"), "unexpected keyword argument 'warmup'"),
    (dict(decay=[0.9, S.HalfLife(5.0)]), "decay= takes one kind of schedule for every average"),
    (dict(decay=S.BEMA(), debias=True), r"decay=BEMA\(\.\.\.\) keeps one average"),
    (dict(decay=S.HalfLife(5.0), update_every=2, compensate=True), r"decay=HalfLife\(\.\.\.\).*takes no compensate="),
    (dict(buffers="keep"), "buffers must be"), (dict(update_every=0), "update_every"),
    (dict(rounding="stochastic"), "shadow_dtype='bfloat16'"), (dict(exclude=["*"]), "no floating-point"),
    (dict(decay=[0.9] * 9), "1 to 8 decays"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMA(mlp(), **kwargs)


def test_update_while_swapped_is_refused():
    model = mlp()
    ema = EMA(model, 0.9)
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update()
    assert math.isfinite(ema.decay)


# ------------------------------------------------------------------ swap, copy_to, guard, arguments

# reliability review M4
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


# reliability review M5: the guard covers copied buffers too
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


# reliability review M8
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
    half = copy.deepcopy(m).bfloat16()            # another dtype: torch's load would cast, without a word
    before = [p.clone() for p in half.parameters()]
    with pytest.raises(ValueError, match=r"0\.weight: torch\.float32\[4, 4\] vs torch\.bfloat16.*nothing was copied"):
        ema.copy_to(half)
    assert all(torch.equal(a, b) for a, b in zip(before, half.parameters()))


# reliability review L1, L3-L5
def test_numpy_decays_are_accepted():
    import numpy as np

    ema = EMA(nn.Linear(4, 4), np.float32(0.5))
    assert ema.decay == pytest.approx(0.5)


def test_exclude_and_copy_select_a_tied_tensor_by_any_of_its_names():
    """exclude=["1.weight"] of a weight tied as 0.weight (GPT-2's lm_head.weight is wte.weight) did
    nothing: named_parameters() gives a tie's first name only, and the export under the excluded
    name held the average. Any of its names selects it now."""
    for pattern in ("0.weight", "1.weight"):
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        m[1].weight = m[0].weight
        assert sorted(EMA(m, 0.5, exclude=[pattern]).state_dict()["averaged"]) == ["0.bias", "1.bias"], pattern
        assert sorted(EMA(m, 0.5, copy=[pattern]).state_dict()["averaged"]) == ["0.bias", "1.bias"], pattern


class _TaggedParameter(nn.Parameter):
    """A plain Python subclass of nn.Parameter (a library's tagged parameter class)."""


@pytest.mark.parametrize("kind", ["ema", "window"])
def test_a_tie_of_a_parameter_subclass_exports_the_average_under_every_name(kind, tmp_path):
    """storage_key() gave None for any type but Tensor and Parameter, so the tie's second name was
    exported raw, and module() loaded the raw weight last into the tie (the average lost under both)."""
    def make():
        m = models.tied()
        m.emb.weight = m.head.weight = _TaggedParameter(torch.randn(10, 4))
        return m

    torch.manual_seed(0)
    m = make()
    avg = EMA(m, 0.9) if kind == "ema" else WindowAverage(m, 2)
    ref, seen = m.emb.weight.detach().double().clone(), []
    for _ in range(3):
        with torch.no_grad():
            m.emb.weight.add_(torch.randn(10, 4) * 0.1)
        avg.update()
        ref = 0.9 * ref + 0.1 * m.emb.weight.detach().double()
        seen.append(m.emb.weight.detach().double().clone())
    want = ref if kind == "ema" else sum(seen[-2:]) / 2

    def close(t):
        return torch.allclose(t.detach().double(), want, rtol=0, atol=1e-6)

    sd = avg.averaged_state_dict()
    assert close(sd["emb.weight"]) and close(sd["head.weight"])
    module = avg.module()
    assert close(module.emb.weight) and module.head.weight is module.emb.weight
    other = make()
    avg.copy_to(other)
    assert close(other.emb.weight) and close(other.head.weight)
    avg.save(tmp_path / "avg.pt")
    saved = torch.load(tmp_path / "avg.pt")
    assert close(saved["emb.weight"]) and close(saved["head.weight"])
    assert [n for n, _ in avg.iter_weights()] == ["emb.weight"] and close(dict(avg.iter_weights())["emb.weight"])


class _WithExtraState(nn.Module):
    """torch's documented hook for state that is not a tensor (FP8 scaling metadata, a config dict)."""

    def __init__(self, meta):
        super().__init__()
        self.lin, self.meta = nn.Linear(3, 3), meta

    def get_extra_state(self):
        return self.meta

    def set_extra_state(self, state):
        self.meta = state


@pytest.mark.parametrize("kind", ["ema", "window"])
def test_extra_state_that_is_not_a_tensor_passes_through_state_dicts_and_leaves_the_streams(kind, tmp_path):
    """Every export raised AttributeError ('dict' object has no attribute 'numel') from the storage-key
    lookup: the state dicts carry it as model.state_dict() does, a .pt save pickles it, a .safetensors
    save is refused by name, and the tensor streams leave it out."""
    torch.manual_seed(0)
    m = _WithExtraState({"scale": 2.0, "step": 7})
    avg = EMA(m, 0.5) if kind == "ema" else WindowAverage(m, 2)
    moved(avg, m)
    want = {"lin.weight": m.lin.weight.detach() - 0.5,                     # (moved: the average is 0.5 behind)
            "lin.bias": m.lin.bias.detach() - 0.5}
    for sd in (avg.averaged_state_dict(), avg.full_state_dict()):
        assert sd["_extra_state"] == {"scale": 2.0, "step": 7} and sd.keys() == m.state_dict().keys()
        assert all(torch.allclose(sd[k], v, rtol=0, atol=1e-6) for k, v in want.items())
    assert avg.module().meta == {"scale": 2.0, "step": 7}
    other = _WithExtraState(None)
    avg.copy_to(other)
    assert other.meta == {"scale": 2.0, "step": 7} and torch.allclose(other.lin.bias, want["lin.bias"], atol=1e-6)
    avg.save(tmp_path / "avg.pt")
    saved = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert saved["_extra_state"] == {"scale": 2.0, "step": 7} and list(saved) == list(m.state_dict())
    assert all(torch.allclose(saved[k], v, rtol=0, atol=1e-6) for k, v in want.items())
    with pytest.raises(TypeError, match=r"'_extra_state' is a module's extra state .*dict.*safetensors.*\.pt path"):
        avg.save(tmp_path / "avg.safetensors")
    assert not (tmp_path / "avg.safetensors").exists()
    assert [n for n, _ in avg.iter_weights()] == ["lin.weight", "lin.bias"]
    assert [w.name for w in avg.weights_metadata()] == ["lin.weight", "lin.bias"]


# reliability review L1, L3-L5
def test_exclude_and_copy_take_one_pattern_as_a_str():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(m, 0.5, exclude="0.weight", copy="1.*")
    names = ema.state_dict()
    assert ema.exclude == ("0.weight",)
    assert "0.weight" not in names["averaged"] and sorted(names["copied"]) == ["1.bias", "1.weight"]
    with pytest.raises(TypeError, match="name patterns"):
        EMA(m, 0.5, exclude=[3])


# ------------------------------------------------------------------ checkpoints that load nothing, save

# reliability review M9, L7
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


def _flat_state(average) -> dict:
    """Every value of an average's checkpoint, nested dicts flattened, tensors cloned."""
    out = {}
    for k, v in average.state_dict().items():
        for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):
            out[f"{k}/{kk}"] = vv.clone() if isinstance(vv, torch.Tensor) else vv
    return out


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


# reliability round 3, M1: dcp.load fills state_dict()'s copies, and load_state_dict copies them in only
# after every check: a refused load leaves the shadow (the window's ring too) and the counters as they were
@pytest.mark.parametrize("kind", ["ema", "window"])
def test_a_refused_dcp_load_changes_nothing(tmp_path, kind):
    import torch.distributed.checkpoint as dcp

    make = (lambda m: EMA(m, 0.9, buffers="average")) if kind == "ema" else (lambda m: WindowAverage(m, 3))
    diverged = mlp()
    bad = make(diverged)
    with torch.no_grad():
        diverged[0].weight.fill_(float("nan"))
    bad.update()
    dcp.save({"ema": bad}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    model = models.mlp(6, 32, 1, act=nn.Tanh, seed=1)
    average = make(model)
    train(model, 3, average)
    before = _flat_state(average)
    with pytest.raises(ValueError, match=r"'0.weight' holds inf or NaN.*Nothing was loaded"):
        dcp.load({"ema": average}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    _same_state(before, _flat_state(average))
    assert all(torch.isfinite(v).all() for v in average.averaged_state_dict().values())


# issue 25 (M1): state_dict() hands out host copies, never the shadow (dcp.load fills them, and
# load_state_dict writes them in after its checks); each entry is a contiguous tensor of its own, so
# safetensors' save_file takes the dict and torch.save of one entry writes that entry alone (views of one
# shared host copy of a flat buffer broke both)
def test_state_dict_hands_out_one_contiguous_host_copy_a_tensor_never_the_shadow(tmp_path):
    import torch.distributed.checkpoint as dcp
    st = pytest.importorskip("safetensors.torch")

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3).to(torch.bfloat16))
        return model, EMA(model, [0.9, 0.99])       # two rows: the shadow's (rows, *shape) views are strided

    model, ema = make()
    moved(ema, model, by=0.5)
    sd = ema.state_dict()
    entries = [v for part in ("averaged", "copied", "int_buffers") for v in sd[part].values()]
    shadow = {g.buffer.untyped_storage().data_ptr() for g in ema._avg.layout.groups}
    storages = [v.untyped_storage().data_ptr() for v in entries]
    assert len(set(storages)) == len(entries) and not set(storages) & shadow
    assert all(v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in entries)
    st.save_file(dict(sd["averaged"]), tmp_path / "averaged.safetensors")
    want = _flat_state(ema)
    for k, v in sd["averaged"].items():
        assert torch.equal(v, ema._avg.state_view(k))
    torch.save(sd, tmp_path / "ema.pt")
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    for v in sd["averaged"].values():
        v.fill_(7.0)                                  # the copies, not the shadow
    _same_state(want, _flat_state(ema))
    for restore in (lambda e: e.load_state_dict(torch.load(tmp_path / "ema.pt")),
                    lambda e: dcp.load({"ema": e}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)):
        other_model, other = make()
        moved(other, other_model, by=-1.0)
        restore(other)
        _same_state(want, _flat_state(other))
    ema.load_state_dict(sd)                            # the copies load as any tensors
    assert all((v == 7.0).all() for v in ema.state_dict()["averaged"].values())


# reliability round 3, M9: with skip_nonfinite=True a NaN step moves no exported value of BEMA (its output row
# was corrected on the host regardless of the skip): averaged_state_dict, save and the swap read the same
def test_bema_skipped_nan_step_moves_no_export(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = nn.Linear(4, 3)
    ema = EMA(model, S.BEMA(), skip_nonfinite=True)
    for _ in range(3):
        moved(ema, model, by=0.1)
    before = ema.averaged_state_dict()
    with ema.average_parameters():
        swapped_in = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(0.1)
        model.weight[0, 0] = float("nan")
    ema.update()
    after = ema.averaged_state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    ema.save(tmp_path / "ema.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in st.load_file(tmp_path / "ema.safetensors").items())
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    with ema.average_parameters():
        assert all(torch.equal(v, swapped_in[k]) for k, v in model.state_dict().items())


# reliability review L8
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


def test_save_to_a_folder_or_a_missing_one_is_refused_before_anything_is_read(tmp_path):
    # a bare IsADirectoryError / NotADirectoryError naming the temporary file, after the whole file was
    # written; "X.SAFETENSORS" was written in torch's format
    ema = EMA(nn.Linear(4, 4), 0.5)
    for target, says in ((tmp_path, "is a directory: give a file name in it"),
                         (f"{tmp_path / 'x.safetensors'}/", "is a directory: give a file name in it"),
                         (tmp_path / "missing" / "x.pt", "does not exist; create it first")):
        with pytest.raises(ValueError, match=rf"^save\(\) .*{says}"):
            ema.save(target)
    assert sorted(os.listdir(tmp_path)) == []
    ema.save(tmp_path / "X.SAFETENSORS")
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "X.SAFETENSORS"))) == ["bias", "weight"]


def test_save_over_a_file_keeps_its_mode_as_torch_save_does(tmp_path):
    # the replacement got 0666 less the umask: a private 0600 checkpoint became readable by everyone
    ema = EMA(nn.Linear(4, 4), 0.5)
    for name in ("a.pt", "a.safetensors"):
        (tmp_path / name).write_bytes(b"old")
        os.chmod(tmp_path / name, 0o600)
        ema.save(tmp_path / name)
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    torch.save({}, tmp_path / "b.pt")                           # torch's own, for comparison
    os.chmod(tmp_path / "b.pt", 0o600)
    torch.save({}, tmp_path / "b.pt")
    assert stat.S_IMODE(os.stat(tmp_path / "b.pt").st_mode) == 0o600



def test_save_to_a_symbolic_link_replaces_the_link_and_leaves_its_target_as_documented(tmp_path):
    """The atomic write renames over the name it is given: a link there becomes the file and its target
    keeps its bytes (EMA.save's docstring; torch.save writes through the link instead). Nothing of the
    target is lost or changed."""
    from safetensors.torch import load_file

    model = nn.Linear(4, 4)
    ema = EMA(model, 0.5)
    for name in ("a.pt", "a.safetensors"):
        target = tmp_path / f"target-{name}"
        target.write_bytes(b"old")
        (tmp_path / name).symlink_to(target.name)
        ema.save(tmp_path / name)
        assert not (tmp_path / name).is_symlink() and target.read_bytes() == b"old"
        loaded = torch.load(tmp_path / name) if name.endswith(".pt") else load_file(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in ema.averaged_state_dict().items())

# reliability review L9
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


# reliability review L10
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

        def close(self):
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


# reliability round 4, M8: copy_to() wrote the model through the kernels without bumping autograd's version
# counters, so a backward through a graph that saved the old weights ran silently with the averaged ones; torch's
# own in-place copy (what load_state_dict does under no_grad) makes it raise, and so does copy_to now
def test_copy_to_bumps_autograd_versions_so_a_stale_backward_raises_as_with_torch_copy():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = EMA(model, 0.5, buffers="average")
    moved(ema, model)
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4, requires_grad=True)
    for net, write in ((reference, lambda: reference.load_state_dict(ema.averaged_state_dict())),
                       (model, ema.copy_to)):
        y = net(x).sum()
        with torch.no_grad():
            write()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    for (n, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b) or not a.is_floating_point(), n          # (copy_to leaves the counters)
    model(x).sum().backward()                                            # a graph made after the copy is fine


# reliability round 3 leftover: save() to a .pt path held a host copy of every averaged tensor while torch.save
# wrote them (+258 MiB peak for a 256 MiB model, +32 MiB for .safetensors). Now the tensors are converted and
# copied one at a time, as torch writes each record (torch's own writer, stand-ins that take no memory). Measured in
# a fresh process: the peak resident memory over the save, against the model's size (float32, and bfloat16 weights
# of a float32 shadow: a conversion per tensor)
_PT_SAVE_PEAK = r"""
import json, sys, torch
from torch import nn
from fastema.torch import EMA
dtype, layers = getattr(torch, sys.argv[2]), int(sys.argv[3])
model = nn.Sequential(*[nn.Linear(1024, 2048, bias=False) for _ in range(layers)]).to(dtype)   # 8 or 4 MiB each
ema = EMA(model, 0.9)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ema.update()

def status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])        # KiB

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                                                          # peak RSS := RSS now
start = status("VmRSS:")
ema.save(sys.argv[1])
print(json.dumps([(status("VmHWM:") - start) / 1024, sum(p.numel() * p.element_size() for p in model.parameters())
                  / 2 ** 20]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc/self: Linux")
@pytest.mark.parametrize("dtype, layers", [("float32", 12), ("bfloat16", 16)])     # 96 and 64 MiB models
def test_pt_save_holds_no_model_sized_copy(tmp_path, dtype, layers):
    import json

    path = tmp_path / "ema.pt"
    res = subprocess.run([sys.executable, "-c", _PT_SAVE_PEAK, str(path), dtype, str(layers)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    peak, model_mib = json.loads(res.stdout.splitlines()[-1])
    assert peak < model_mib / 3, (peak, model_mib)                       # was model_mib + 1.5
    got = torch.load(path, weights_only=True)
    assert len(got) == layers and all(v.dtype == getattr(torch, dtype) and torch.all(v != 0) for v in got.values())


def test_pt_save_writes_the_records_torch_save_writes(tmp_path):
    """The streamed .pt file holds what ``torch.save`` of the host copies held (the previous save()): the
    same zip records with the same bytes (torch's per-file serialization id aside), so it loads the same,
    mmap=True included: bfloat16 weights of a float32 shadow, a channels_last conv, a tied weight under
    both names, an excluded tensor, an empty one, BatchNorm and integer buffers."""
    import zipfile

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
            self.bn = nn.BatchNorm2d(4)
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.frozen = nn.Linear(2, 2)
            self.empty = nn.Parameter(torch.zeros(0, 3))
            self.emb.weight = self.head.weight = nn.Parameter(torch.randn(5, 4, dtype=torch.bfloat16))  # tied

    model = Net()
    ema = EMA(model, [0.9, 0.5], exclude=["frozen.*"])
    for _ in range(3):
        moved(ema, model, by=0.25)
        model.bn.num_batches_tracked += 1
    for row in (0, 1):
        ema.save(tmp_path / "ema.pt", row=row)
        torch.save({k: v.to("cpu", copy=True).contiguous() for k, v in ema.averaged_state_dict(row).items()},
                   tmp_path / "torch.pt")
        with zipfile.ZipFile(tmp_path / "ema.pt") as ours, zipfile.ZipFile(tmp_path / "torch.pt") as theirs:
            names = [i.filename.split("/", 1)[1] for i in ours.infolist()]
            assert names == [i.filename.split("/", 1)[1] for i in theirs.infolist()]
            for a, b in zip(ours.infolist(), theirs.infolist()):
                if not a.filename.endswith("serialization_id"):
                    assert ours.read(a) == theirs.read(b), (row, a.filename)
        for got in (torch.load(tmp_path / "ema.pt", weights_only=True),
                    torch.load(tmp_path / "ema.pt", weights_only=True, mmap=True)):
            want = ema.averaged_state_dict(row)
            assert list(got) == list(want)
            for k, v in want.items():
                assert got[k].dtype == v.dtype and got[k].is_contiguous() and torch.equal(got[k], v), (row, k)


@pytest.mark.parametrize("dtype, there, back", [(torch.float32, torch.float64, torch.float32),
                                                (torch.float16, torch.float32, torch.float16)])
@pytest.mark.parametrize("cls", [EMA, WindowAverage])
def test_a_cast_inside_the_block_is_refused_on_the_way_back_saying_how_to_get_the_raw_weights(cls, dtype, there, back):
    """A cast inside ``average_parameters()`` made the way back fail with the update's advice ("make a new
    shadow ... Nothing was updated"): followed, it lost the raw weights, which only the average object then
    held. The refusal says the model holds the average and how to put the raw weights back; doing so gives
    them back bit for bit (an exact swap, and float16's backup)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).to(dtype)
    avg = cls(model, 0.9) if cls is EMA else cls(model, window=3)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    avg.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    inside = {k: v.clone() for k, v in avg.averaged_state_dict().items()}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: the raw weights cannot go back: the model changed while "
                                         rf"average 0 was in it \(source '0.weight' was .* and is now .*\)\. The model "
                                         rf"holds average 0 and its raw weights are in the {cls.__name__}: undo the "
                                         rf"change .* and call swap\(\) to put them back") as info:
        with avg.average_parameters():
            model.to(there)
    assert "make a new shadow" not in str(info.value) and "Nothing was updated" not in str(info.value)
    assert avg.swapped
    model.to(back)
    assert all(torch.equal(v.to(back), inside[k].to(back)) for k, v in model.state_dict().items())
    avg.swap()
    assert not avg.swapped
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
