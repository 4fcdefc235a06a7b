"""channels_last (any dense layout) and float64 models: averaged in storage order, bit for bit
equal to the same model in contiguous format, float64 exact against float64 lerp_; swaps and
exports keep the layout. FlatShadow, EMA, WindowAverage and every compat class."""
import copy

import numpy as np
import torch
from torch import nn

import fastema
from fastema.torch import EMA, WindowAverage
from fastema.torch.compat import ExponentialMovingAverage, ModelEmaV3, get_ema_multi_avg_fn

CL = torch.channels_last


def convnet(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).to(dtype)


def train_twins(make_avg, steps=6, dtype=torch.float32):
    """Train a contiguous model; its channels_last twin gets the same weights every step."""
    model = convnet(dtype)
    twin = copy.deepcopy(model).to(memory_format=CL)
    assert twin[0].weight.is_contiguous(memory_format=CL) and not twin[0].weight.is_contiguous()
    a, b = make_avg(model), make_avg(twin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        twin.load_state_dict(model.state_dict())       # copies into the channels_last storage
        assert twin[0].weight.is_contiguous(memory_format=CL)
        yield model, twin, a, b


def test_flat_shadow_channels_last_views_and_swap_keep_the_layout():
    x = torch.randn(2, 3, 4, 5).to(memory_format=CL)
    f = fastema.FlatShadow({"x": x}, rows=2)
    assert f.view("x").is_contiguous(memory_format=CL) and f.view("x", None).shape == (2, 2, 3, 4, 5)
    ref = x.clone()
    with torch.no_grad():
        x.add_(1.0)
    f.update([0.5, 0.25])
    assert torch.equal(f.view("x", 0), ref.lerp(x, 0.5)) and torch.equal(f.view("x", 1), ref.lerp(x, 0.75))
    raw = x.clone()
    f.swap(1)
    assert torch.equal(x, ref.lerp(raw, 0.75)) and x.is_contiguous(memory_format=CL)
    f.swap(1)
    assert torch.equal(x, raw)


def test_numpy_fortran_order_is_averaged_in_place():
    a = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    f = fastema.FlatShadow([a])
    a += 1.0
    f.update(0.5)
    assert np.array_equal(f.view(0), a - 0.5) and f.view(0).flags.f_contiguous


def test_ema_channels_last_equals_contiguous_bit_for_bit():
    for model, twin, a, b in train_twins(lambda m: EMA(m, [0.9, 0.5], buffers="average")):
        a.update()
        b.update()
    for row in (0, 1):
        sa, sb = a.averaged_state_dict(row), b.averaged_state_dict(row)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert sb["0.weight"].is_contiguous(memory_format=CL)
    raw = twin[0].weight.detach().clone()
    with b.average_parameters():
        assert twin[0].weight.is_contiguous(memory_format=CL)
        assert torch.equal(twin[0].weight, a.averaged_state_dict()["0.weight"])
    assert torch.equal(twin[0].weight, raw) and twin[0].weight.is_contiguous(memory_format=CL)
    loaded = convnet().to(memory_format=CL)
    b.copy_to(loaded)
    assert torch.equal(loaded[0].weight, a.averaged_state_dict()["0.weight"])


def test_window_average_channels_last_equals_contiguous():
    for model, twin, a, b in train_twins(lambda m: WindowAverage(m, 3)):
        a.update()
        b.update()
    sa, sb = a.averaged_state_dict(), b.averaged_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    state = b.state_dict()
    assert state["ring"]["0.weight"].shape == (3, 8, 3, 3, 3)


def test_compat_classes_channels_last_equal_contiguous():
    for model, twin, (ta, va, ea), (tb, vb, eb) in train_twins(
            lambda m: (ModelEmaV3(m, 0.9), torch.optim.swa_utils.AveragedModel(
                m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True),
                ExponentialMovingAverage(m.parameters(), 0.9))):
        ta.update(model)
        tb.update(twin)
        va.update_parameters(model)
        vb.update_parameters(twin)
        ea.update()
        eb.update()
    for x, y in ((ta.module, tb.module), (va.module, vb.module)):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
    assert all(torch.equal(p, q) for p, q in zip(ea.shadow_params, eb.shadow_params))
    assert eb.shadow_params[0].is_contiguous(memory_format=CL)


def test_float64_ema_is_exact_against_float64_lerp():
    model = convnet(torch.float64)
    ema = EMA(model, [0.99, 0.9], buffers="average")
    refs = [{k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
            for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        model(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        for ref, d in zip(refs, (0.99, 0.9)):
            for k, v in model.state_dict().items():
                if k in ref:
                    ref[k].lerp_(v, 1 - d)
    for row, ref in enumerate(refs):
        sd = ema.averaged_state_dict(row)
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
        assert sd["0.weight"].dtype == torch.float64
    assert ema._avg.groups[0]["shadow_dtype"] == "float64"
    raw = model[0].weight.detach().clone()
    with ema.average_parameters(1):
        assert torch.equal(model[0].weight, refs[1]["0.weight"])
    assert torch.equal(model[0].weight, raw)


def test_float64_window_average_matches_the_exact_mean():
    model = nn.Linear(16, 16).double()
    w = WindowAverage(model, 4)
    snaps = [model.weight.detach().clone()]
    g = torch.Generator().manual_seed(3)
    for _ in range(9):
        with torch.no_grad():
            model.weight.add_(torch.randn(16, 16, generator=g, dtype=torch.float64))
        w.update()
        snaps.append(model.weight.detach().clone())
    exact = torch.stack(snaps[-4:]).mean(0)
    got = w.averaged_state_dict()["weight"]
    assert got.dtype == torch.float64
    assert torch.allclose(got, exact, rtol=1e-14, atol=1e-14)


def test_float64_compat_classes():
    model = nn.Linear(8, 8).double()
    t = ModelEmaV3(model, 0.9)
    e = ExponentialMovingAverage(model.parameters(), 0.9, use_num_updates=False)
    ref = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    t.update(model)
    e.update()
    ref.lerp_(model.weight.detach(), 1 - 0.9)
    assert torch.equal(t.module.weight, ref)
    assert torch.allclose(e.shadow_params[0], ref, rtol=0, atol=1e-15)
