"""fastema.torch.compat against the libraries it replaces."""
import contextlib
import copy

import pytest
import torch
from models import tied
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_multi_avg_fn

import fastema
from fastema.torch import compat
from testkit.baselines import TimmModelEmaV3Reference


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


@pytest.mark.parametrize("params", ["none", "meta"])
def test_exponential_moving_average_takes_no_parameters_and_meta_ones_as_torch_ema_does(params):
    # L7: [] was refused ("sources is empty") and meta parameters ("is on meta"); torch_ema takes both
    torch_ema = pytest.importorskip("torch_ema")
    make = (lambda: []) if params == "none" else (lambda: list(nn.Linear(3, 2, device="meta").parameters()))
    for cls in (torch_ema.ExponentialMovingAverage, compat.ExponentialMovingAverage):
        ps = make()
        ema = cls(ps, decay=0.9)
        ema.update()
        ema.update(ps)
        ema.copy_to()
        with ema.average_parameters():
            pass
        ema.to(dtype=torch.float64)
        assert ema.num_updates == 2
        assert [(tuple(s.shape), s.device.type, s.dtype) for s in ema.shadow_params] == \
            [(tuple(p.shape), "meta", torch.float64) for p in ps]
    ours = compat.ExponentialMovingAverage(make(), decay=0.5)
    ours.load_state_dict(ours.state_dict())          # (torch_ema cannot deepcopy its meta clones here)
    assert ours.num_updates == 0


@pytest.mark.parametrize("case", ["tied", "complex", "slice"])
def test_exponential_moving_average_takes_what_the_kernels_cannot_hold_as_torch_ema_does(case):
    """A tensor listed twice (an encoder and a decoder sharing an embedding), a complex parameter
    and a slice were refused at construction ("share memory", "complex64", "not dense"); torch_ema
    takes each. Its own arithmetic then, bit for bit, through every method."""
    torch_ema = pytest.importorskip("torch_ema")

    def make():
        torch.manual_seed(0)
        if case == "tied":
            shared = nn.Embedding(5, 3)
            enc, dec = nn.Sequential(shared, nn.Linear(3, 3)), nn.Sequential(shared, nn.Linear(3, 3))
            return [*enc.parameters(), *dec.parameters()]
        if case == "complex":
            return [nn.Parameter(torch.randn(4, dtype=torch.complex64)), nn.Parameter(torch.randn(3))]
        return [nn.Parameter(torch.randn(4, 4)[:, :2]), nn.Parameter(torch.randn(3))]

    def run(cls):
        ps = make()
        ema = cls(ps, decay=0.9)
        seen = []
        for i in range(4):
            with torch.no_grad():
                for p in ps:
                    p.mul_(0.5).add_(i)
            ema.update()
            seen.append([s.clone() for s in ema.shadow_params])
        with torch.no_grad(), ema.average_parameters():     # (torch_ema's stored clones: leaves, to deepcopy)
            seen.append([p.detach().clone() for p in ps])
        seen.append([p.detach().clone() for p in ps])
        state = ema.state_dict()
        ema.update()
        ema.load_state_dict(state)
        seen.append([s.clone() for s in ema.shadow_params])
        return seen

    for a, b in zip(run(torch_ema.ExponentialMovingAverage), run(compat.ExponentialMovingAverage)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_exponential_moving_average_load_casts_to_the_parameters_dtypes_as_torch_ema_does():
    """After to(dtype=torch.float64), a load kept the float64 shadow; torch_ema casts the loaded
    shadow (and stored copies) to the parameters' dtypes, as torch.optim does."""
    torch_ema = pytest.importorskip("torch_ema")
    for cls in (torch_ema.ExponentialMovingAverage, compat.ExponentialMovingAverage):
        m = nn.Linear(3, 2)
        ema = cls(m.parameters(), decay=0.9)
        ema.update()
        ema.to(dtype=torch.float64)
        with torch.no_grad():
            ema.store()
        ema.load_state_dict(ema.state_dict())
        assert [s.dtype for s in ema.shadow_params] == [torch.float32] * 2, cls
        assert [c.dtype for c in ema.collected_params] == [torch.float32] * 2, cls


def test_exponential_moving_average_to_keeps_the_shadow_dtype_and_tensors_as_torch_ema_does():
    """After to(dtype=torch.float64), to(device=...) and a bare to() rebuilt the shadow in the
    parameters' float32, rounding the average; and a to() that changed nothing made new tensors,
    so a state_dict() taken before stopped following the updates. torch_ema casts only where a
    dtype is given and keeps the tensors nothing changes."""
    torch_ema = pytest.importorskip("torch_ema")

    def same(xs, ys):                                  # the same memory (fastema's views are made anew)
        return all(x.data_ptr() == y.data_ptr() and x.dtype == y.dtype for x, y in zip(xs, ys, strict=True))

    seen = []
    for cls in (torch_ema.ExponentialMovingAverage, compat.ExponentialMovingAverage):
        torch.manual_seed(0)
        m = nn.Linear(3, 2)
        ema = cls(m.parameters(), decay=0.5, use_num_updates=False)
        early = ema.state_dict()["shadow_params"]
        ema.to(device="cpu")
        ema.to()
        ema.to(dtype=torch.float32)
        assert same(early, ema.shadow_params), cls
        ema.to(dtype=torch.float64)
        with torch.no_grad():
            for s in ema.shadow_params:
                s.fill_(1.0 + 1e-12)                  # float32 cannot hold it
        ema.store()
        sd = ema.state_dict()
        ema.to(device="cpu")
        ema.to()
        assert [s.dtype for s in ema.shadow_params] == [torch.float64] * 2, cls
        assert [c.dtype for c in ema.collected_params] == [torch.float32] * 2, cls
        assert same(sd["collected_params"], ema.collected_params), cls
        ema.to(dtype=torch.float64)                   # the stored float32 copies are cast, not the shadow
        assert [c.dtype for c in ema.collected_params] == [torch.float64] * 2, cls
        assert same(sd["shadow_params"], ema.shadow_params), cls
        with torch.no_grad():
            m.weight.add_(1.0)
        ema.update()
        for s, p in zip(sd["shadow_params"], m.parameters()):      # the earlier state dict follows the update
            ref = (1.0 + 1e-12) - 0.5 * ((1.0 + 1e-12) - p.detach().double())   # naive float64
            assert s.dtype == torch.float64 and torch.equal(s, ref), cls
        seen.append([s.clone() for s in ema.shadow_params])
    assert all(torch.equal(a, b) for a, b in zip(*seen))


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



@pytest.mark.parametrize("bad, name", [(dict(warmup_gamma=-1.0), "warmup_gamma"),
                                       (dict(warmup_power=0), "warmup_power")])
def test_model_ema_v3_names_its_own_warmup_arguments_in_a_refusal(bad, name):
    """timm's ``warmup_gamma`` / ``warmup_power`` were refused as ``inv_gamma`` / ``power`` (the checker's
    own names), arguments ModelEmaV3 does not have."""
    model, _ = model_and_data()
    with pytest.raises(ValueError, match=rf"^{name} must be a finite float > 0, got "):
        compat.ModelEmaV3(model, decay=0.99, use_warmup=True, **bad)

@pytest.fixture(params=["torch", "streamed"])
def layout_checks(request):
    """The layout check of a cached pairing: torch's batched C++ guard, or fastema's streamed one."""
    import fastema._backends.torch as tb

    if request.param == "torch" and tb._tensor_guards() is None:
        pytest.skip("this torch has no batched tensor guard that passes the self-test")
    with tb.streamed_layout_checks() if request.param == "streamed" else contextlib.nullcontext():
        yield request.param


def test_model_ema_v3_follows_a_weight_transposed_in_place_as_timm_does(layout_checks):
    # H4: ModelEmaV3 cached its pairs by data_ptr alone, so after p.data = p.data.t() on a square
    # weight (same address, other strides) it reused the storage-order walk: silently wrong
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    _, data = model_and_data()
    ours = compat.ModelEmaV3(model, decay=0.9)
    theirs = TimmModelEmaV3Reference(model, 0.9)

    def each(i):
        if i == 5:
            model[0].weight.data = model[0].weight.data.t()
        ours.update(model, step=i)
        theirs.update(model, step=i)

    sgd_steps(model, [(x, y.repeat(1, 4)) for x, y in data[:10]], each)
    for (n, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), n


def test_model_ema_v3_update_leaves_the_garbage_collector_alone(layout_checks):
    # 2a: the H4 check read every tensor's (dtype, shape) and strides into a key held per update,
    # ~1 collection an update at 400 tensors (3000 tensors: 0.36 -> 12.5 ms an update)
    import gc

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    ema = compat.ModelEmaV3(model, decay=0.9)
    ema.update(model)
    starts = []

    def cb(phase, info):
        starts.append(phase == "start")

    gc.collect()
    gc.callbacks.append(cb)
    try:
        for _ in range(20):
            ema.update(model)
    finally:
        gc.callbacks.remove(cb)
    assert sum(starts) <= 2


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


# ------------------------------------------------------------------ drop-in behaviours (torch_ema 0.3, timm 1.0.31)

def test_torch_ema_explicit_parameters_act_for_that_call_only():
    torch_ema = pytest.importorskip("torch_ema")
    model, eval_model = nn.Linear(4, 4), nn.Linear(4, 4)
    ours = compat.ExponentialMovingAverage(model.parameters(), 0.9, use_num_updates=False)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), 0.9, use_num_updates=False)
    for ema in (ours, theirs):
        ema.copy_to(eval_model.parameters())          # evaluation copy: must not rebind the EMA
    with torch.no_grad():
        model.weight.add_(1.0)
        eval_model.weight.fill_(-5.0)
    for ema in (ours, theirs):
        ema.update()                                   # averages `model`, not `eval_model`
    assert torch.allclose(ours.shadow_params[0], theirs.shadow_params[0], atol=1e-6)
    other = nn.Linear(4, 4)
    with torch.no_grad():
        other.weight.fill_(1.0)
    for ema in (ours, theirs):
        ema.update(other.parameters())                 # explicit: for this call
        ema.update()                                   # and back to `model`
    assert torch.allclose(ours.shadow_params[0], theirs.shadow_params[0], atol=1e-6)


def test_torch_ema_store_keeps_whatever_it_gets_and_to_casts():
    m = nn.Linear(11, 3)
    ema = compat.ExponentialMovingAverage(m.parameters(), decay=0.9)
    ema.to(dtype=torch.float16)
    assert ema.shadow_params[0].dtype == torch.float16
    ema.store()
    assert ema.collected_params[0].dtype == torch.float32
    m16 = nn.Linear(11, 3).half()
    ema.store(m16.parameters())
    assert ema.collected_params[0].dtype == torch.float16
    ema.to(dtype=torch.float64)
    assert ema.collected_params[0].dtype == torch.float64 and ema.shadow_params[0].dtype == torch.float64
    ref = ema.shadow_params[0].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()                                        # a float64 shadow of float32 parameters
    decay = min(0.9, 2 / 11)
    assert torch.allclose(ema.shadow_params[0], ref + (1 - decay) * (m.weight.double() - ref), rtol=0,
                          atol=1e-12)
    with pytest.raises(ValueError, match="beside the parameters"):
        ema.to(device="meta")


def test_model_ema_v3_rounds_bfloat16_stochastically_by_default():
    model = nn.Linear(256, 256).bfloat16()
    with torch.no_grad():
        model.weight.fill_(1.0)                        # bfloat16 ulp 2**-7 here
    ema = compat.ModelEmaV3(model, decay=0.999)
    nearest = compat.ModelEmaV3(model, decay=0.999, stochastic_rounding=False)
    assert ema.stochastic_rounding and ema.stochastic_rounding_seed == 0
    with torch.no_grad():
        model.weight.fill_(1.5)                        # each update moves 0.0005: below half an ulp
    n = 200
    for _ in range(n):
        ema.update(model)
        nearest.update(model)
    exact = 1.5 - 0.5 * 0.999 ** n                    # the EMA in exact arithmetic
    assert torch.equal(nearest.module.weight, torch.ones(256, 256, dtype=torch.bfloat16))
    mean = ema.module.weight.float().mean().item()
    assert abs(mean - exact) < 0.002 and mean - 1.0 > 0.08


def test_model_ema_v3_stochastic_rounding_is_keyed_by_seed():
    runs = {}
    for seed in (0, 0, 1):
        model = nn.Linear(64, 64).bfloat16()
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = compat.ModelEmaV3(model, decay=0.99, stochastic_rounding_seed=seed)
        with torch.no_grad():
            model.weight.add_(0.3)
        for _ in range(5):
            ema.update(model)
        runs.setdefault(seed, []).append(ema.module.weight.detach().clone())
    assert torch.equal(runs[0][0], runs[0][1]) and not torch.equal(runs[0][0], runs[1][0])


def test_model_ema_v3_attributes_and_float32_copy_of_a_bfloat16_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).bfloat16()
    ema = compat.ModelEmaV3(model, decay=0.5, dtype=torch.float32)
    assert ema.device is None and ema.dtype == torch.float32
    assert ema.module[0].weight.dtype == torch.float32
    ref = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.module[0].weight, ref.lerp(model[0].weight.float(), 0.5))


def test_model_ema_v3_exclude_buffers_copies_the_buffers():
    model, data = model_and_data()
    ema = compat.ModelEmaV3(model, decay=0.99, exclude_buffers=True)
    sgd_steps(model, data[:3], lambda i: ema.update(model, step=i))
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)


def test_model_ema_v3_attribute_changes_take_effect():
    model = nn.Linear(4, 4)
    ema = compat.ModelEmaV3(model, decay=0.9)
    ema.decay = 0.5                                    # e.g. a schedule written by the training script
    ema.use_warmup, ema.update_after_step = True, 2
    assert ema.get_decay(2) == 0.0 and 0.0 < ema.get_decay(10) <= 0.5
    ref = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, ref.lerp(model.weight.detach(), 0.5))


def test_model_ema_v3_follows_a_reregistered_parameter_of_its_module():
    model = nn.Linear(4, 4)
    ema = compat.ModelEmaV3(model, decay=0.5)
    ema.update(model)
    ema.module.weight = nn.Parameter(torch.zeros(4, 4))   # e.g. loading EMA weights with assign=True
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.ones(4, 4))


# ------------------------------------------------------------------ tied weights

# reliability review H1, M1
def test_tied_weights_in_model_ema_v3_are_averaged_once_and_deterministically():
    from fastema.torch.compat import ModelEmaV3

    torch.manual_seed(0)
    m = tied()
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
def test_multi_avg_fn_takes_a_tensor_decay_of_any_float_dtype_as_torch_does(dtype):
    """A float64 or bfloat16 0-d decay was taken by get_ema_multi_avg_fn and failed at the second
    update ("weight must hold 1 element(s) of float32"); torch's takes it. Now read as the kernels
    read a weight: bit for bit torch's."""
    averaged = []
    for fn in (compat.get_ema_multi_avg_fn, torch_multi_avg_fn):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        avg = AveragedModel(model, multi_avg_fn=fn(torch.tensor(0.9, dtype=dtype)))
        for _ in range(3):
            with torch.no_grad():
                model.weight.add_(1.0)
            avg.update_parameters(model)
        averaged.append(avg.module.state_dict())
    for k, v in averaged[1].items():
        assert torch.equal(averaged[0][k], v), k


@pytest.mark.parametrize("change", ["channels_last", "transposed"])
def test_multi_avg_fn_takes_what_torch_takes_after_the_model_changed_layout(change):
    """``get_ema_multi_avg_fn`` refused a model moved to channels_last after its AveragedModel was
    made, and a weight transposed in place (``p.data = p.data.t()``): "laid out differently". As
    the other drop-ins, the pairs the kernels do not take get torch's own lerp: the result is
    torch's get_ema_multi_avg_fn's, bit for bit."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    averaged = []
    for fn in (compat.get_ema_multi_avg_fn(0.9), torch_multi_avg_fn(0.9)):
        model = copy.deepcopy(base)
        avg = AveragedModel(model, multi_avg_fn=fn)
        if change == "channels_last":
            model.to(memory_format=torch.channels_last)
        else:
            model[1].weight.data = model[1].weight.data.t()
        torch.manual_seed(1)                          # the same steps on both sides
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            avg.update_parameters(model)
        averaged.append(avg.module.state_dict())
    for k, v in averaged[1].items():
        assert torch.equal(averaged[0][k], v), k
