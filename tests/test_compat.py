"""fastema.torch.compat against the libraries it replaces."""
import pathlib
import sys

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn as torch_multi_avg_fn

import fastema
from fastema.torch import compat

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "bench"))
from baselines import TimmModelEmaV3Reference  # noqa: E402


def model_and_data(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 2, generator=g).to(dtype))
            for _ in range(40)]
    return model, data


def sgd_steps(model, data, after_step):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(data, start=1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(i)


# ------------------------------------------------------------------ torch_ema

def test_exponential_moving_average_matches_torch_ema():
    torch_ema = pytest.importorskip("torch_ema")
    model, data = model_and_data()
    ours = compat.ExponentialMovingAverage(model.parameters(), decay=0.99)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.99)

    def both(_):
        ours.update()
        theirs.update()

    sgd_steps(model, data, both)
    assert ours.num_updates == theirs.num_updates == 40
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        # torch_ema computes s - (s - p) * w in three roundings, fastema one FMA: last-bit differences
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    raw = [p.clone() for p in model.parameters()]
    for ema in (ours, theirs):                     # same semantics: shadow_params keep the averages inside
        with ema.average_parameters():
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
            assert all(torch.equal(c, r) for c, r in zip(ema.collected_params, raw))
        assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    ours.store()
    ours.copy_to()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ours.shadow_params))
    ours.restore()
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))


def test_exponential_moving_average_state_dict_interchanges_with_torch_ema():
    torch_ema = pytest.importorskip("torch_ema")
    model, data = model_and_data()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    sgd_steps(model, data[:5], lambda _: theirs.update())
    ours = compat.ExponentialMovingAverage(model.parameters(), decay=0.5, use_num_updates=False)
    ours.load_state_dict(theirs.state_dict())
    assert ours.decay == 0.9 and ours.num_updates == 5
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params))
    back = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.1)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.shadow_params, theirs.shadow_params))


def test_exponential_moving_average_errors_match_torch_ema():
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="Decay must be between 0 and 1"):
        compat.ExponentialMovingAverage(model.parameters(), decay=1.5)
    ema = compat.ExponentialMovingAverage(model.parameters(), decay=0.9)
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ema.restore()
    with pytest.raises(ValueError, match="Number of parameters"):
        ema.update(list(model.parameters())[:2])
    before = [s.clone() for s in ema.shadow_params]
    bad = ema.state_dict()
    bad["shadow_params"] = bad["shadow_params"][:-1]
    with pytest.raises(ValueError, match="shadow_params has"):
        ema.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, before))


def test_exponential_moving_average_to_dtype():
    model, _ = model_and_data(dtype=torch.bfloat16)
    ema = compat.ExponentialMovingAverage(model.parameters(), decay=0.9)
    assert ema.shadow_params[0].dtype == torch.bfloat16
    ema.to(dtype=torch.float32)
    assert ema.shadow_params[0].dtype == torch.float32
    assert torch.equal(ema.shadow_params[0], next(model.parameters()).float())


# ------------------------------------------------------------------ timm ModelEmaV3

@pytest.mark.parametrize("kwargs", [dict(), dict(use_warmup=True, update_after_step=3, min_decay=0.5),
                                    dict(exclude_buffers=True)])
def test_model_ema_v3_matches_timm_bit_for_bit(kwargs):
    model, data = model_and_data()
    ours = compat.ModelEmaV3(model, decay=0.99, **kwargs)
    theirs = TimmModelEmaV3Reference(model, 0.99, **kwargs)
    sgd_steps(model, data, lambda i: (ours.update(model, step=i), theirs.update(model, step=i)))
    for (n, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), n
    assert ours.get_decay(10) == theirs.get_decay(10)
    x = data[0][0]
    assert torch.equal(ours(x), theirs.module(x))


def test_model_ema_v3_follows_replaced_parameters():
    model, data = model_and_data()
    ema = compat.ModelEmaV3(model, decay=0.0)
    ema.update(model)
    model.load_state_dict({k: torch.ones_like(v) for k, v in model.state_dict().items()}, assign=True)
    ema.update(model)
    assert all((p == 1).all() for p in ema.module.parameters())
    with pytest.raises(ValueError, match="device="):
        compat.ModelEmaV3(model, device="meta")


# ------------------------------------------------------------------ AveragedModel

@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_multi_avg_fn_equals_torch(use_buffers):
    model, data = model_and_data()
    ours = AveragedModel(model, multi_avg_fn=compat.get_ema_multi_avg_fn(0.95), use_buffers=use_buffers)
    theirs = AveragedModel(model, multi_avg_fn=torch_multi_avg_fn(0.95), use_buffers=use_buffers)
    sgd_steps(model, data, lambda _: (ours.update_parameters(model), theirs.update_parameters(model)))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        compat.get_ema_multi_avg_fn(2.0)


def test_ema_update_many_validates_and_refuses_mismatches():
    a, b = [torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(5)]
    with pytest.raises(ValueError, match=r"sources\[1\] has shape \(5,\)"):
        fastema.ema_update_many_(a, b, 0.5)
    assert all((t == 0).all() for t in a)
    with pytest.raises(ValueError, match="2 shadows but 1 sources"):
        fastema.ema_update_many_(a, b[:1], 0.5)
