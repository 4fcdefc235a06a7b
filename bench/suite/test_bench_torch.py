"""fastema.torch.EMA.update against the model EMAs users run today (issue #3).

Baselines in the same run: torch's own foreach ops (``_foreach_lerp_``; for bfloat16 weights into a
float32 shadow ``_foreach_mul_`` + ``_foreach_add_``: every EMA group has its foreach row, issue 86),
torch.optim.swa_utils.AveragedModel with torch's get_ema_multi_avg_fn (the foreach path), timm
ModelEmaV3's arithmetic and its bfloat16 stochastic-rounding path (testkit/baselines.py; no foreach op
rounds stochastically), and the torch_ema and ema-pytorch packages (per-tensor loops). Also: swapping
the EMA in and out for evaluation against torch_ema's store / copy_to / restore. Each baseline update
is run once against fastema's EMA of the same start before it is timed (``check=``,
``bench/suite/checked.py``); the swap's baseline swaps the same average in and out beside fastema's swap.
"""
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.suite.checked import agree, checked, same_work
from fastema.torch import EMA
from testkit.baselines import TimmModelEmaV3Reference, timm_bfloat16_stochastic_update

from .conftest import devices, ema_check, scenario_rounds
from .shapes import MANY_NAME, gpt2_small, many_small

DECAY = 0.999
SCENARIOS = {"gpt2-small": gpt2_small, MANY_NAME: many_small}


class Params(nn.Module):
    def __init__(self, shapes, dtype, device):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, device=device, generator=g).to(dtype))
                                    for s in shapes])


def updater(impl, model, shadow_dtype):
    """``(update, check)`` of ``impl`` on ``model``: a baseline's check runs it once against
    fastema's EMA of the same start (``conftest.ema_check``); fastema's is None."""
    kw = {"shadow_dtype": shadow_dtype}
    if impl == "fastema":
        ema = EMA(model, DECAY, shadow_dtype=shadow_dtype)
        return ema.update, None
    if impl in ("torch._foreach_lerp_", "torch._foreach_mul_+_foreach_add_"):   # torch's own foreach ops
        params = list(model.parameters())
        shadows = [p.detach().to(torch.float32 if shadow_dtype == "float32" else p.dtype, copy=True) for p in params]

        def fn():
            with torch.no_grad():
                if impl == "torch._foreach_lerp_":
                    torch._foreach_lerp_(shadows, params, 1 - DECAY)
                else:                                    # a float32 shadow of bfloat16 weights: no mixed lerp
                    torch._foreach_mul_(shadows, DECAY)
                    torch._foreach_add_(shadows, params, alpha=1 - DECAY)
        return fn, ema_check(impl, fn, lambda: shadows, model, DECAY, **kw)
    if impl == "AveragedModel(foreach)":
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        avg.update_parameters(model)                    # the first call copies; time the EMA calls
        fn = lambda: avg.update_parameters(model)       # noqa: E731
        return fn, ema_check(impl, fn, lambda: list(avg.module.parameters()), model, DECAY, **kw)
    if impl == "timm ModelEmaV3":
        ref = TimmModelEmaV3Reference(model, DECAY, dtype=torch.float32 if shadow_dtype == "float32" else None)
        fn = lambda: ref.update(model)                  # noqa: E731
        return fn, ema_check(impl, fn, lambda: list(ref.module.parameters()), model, DECAY, **kw)
    if impl == "torch_ema":
        torch_ema = pytest.importorskip("torch_ema")
        ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=DECAY, use_num_updates=False)
        return ema.update, ema_check(impl, ema.update, lambda: ema.shadow_params, model, DECAY, **kw)
    if impl == "ema-pytorch":
        ema_pytorch = pytest.importorskip("ema_pytorch")
        ema = ema_pytorch.EMA(model, beta=DECAY, update_after_step=0, update_every=1, power=1.0,
                              inv_gamma=1e-9, allow_different_devices=True)
        ema.update()                                    # the first call copies; later ones use beta
        return ema.update, ema_check(impl, ema.update, lambda: list(ema.ema_model.parameters()), model,
                                     DECAY, **kw)
    raise ValueError(impl)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_lerp_", "AveragedModel(foreach)", "timm ModelEmaV3",
                                  "torch_ema", "ema-pytorch"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_model_ema_float32(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"EMA.update, float32 model ({device})"
    model = Params(SCENARIOS[scenario](), torch.float32, device)
    n = sum(p.numel() for p in model.parameters())
    fn, check = updater(impl, model, "same")
    run(fn, device, impl=impl, case=scenario, nbytes=12 * n, elements=n, rounds=rounds, check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_mul_+_foreach_add_", "timm ModelEmaV3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_model_ema_bfloat16_model_float32_shadow(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"EMA.update, bfloat16 model, float32 shadow ({device})"
    model = Params(SCENARIOS[scenario](), torch.bfloat16, device)
    n = sum(p.numel() for p in model.parameters())
    fn, check = updater(impl, model, "float32")
    run(fn, device, impl=impl, case=scenario, nbytes=10 * n, elements=n, rounds=rounds, check=check)


@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_lerp_"])
@pytest.mark.parametrize("count", [6, 148, 3000])
def test_ema_update_host_overhead(run, benchmark, count, impl):
    """Host-side cost of EMA.update() (tiny tensors: the kernel time is negligible; issue #23's
    targets: at or below ``_foreach_lerp_`` over lists built once at 6 tensors, <= 250 us at 3000),
    every call checking the model's tensors, against the bare foreach call, which checks nothing."""
    benchmark.group = "EMA.update host overhead (cpu)"
    model = Params([(4,)] * count, torch.float32, "cpu")
    check = None
    if impl == "fastema":
        fn = EMA(model, DECAY).update
    else:
        params = list(model.parameters())
        shadow = [p.detach().clone() for p in params]
        fn = lambda: torch._foreach_lerp_(shadow, params, 1 - DECAY)  # noqa: E731
        check = ema_check(impl, fn, lambda: shadow, model, DECAY)
    with torch.no_grad():
        run(fn, "cpu", impl=impl, case=f"{count} tensors", nbytes=0, elements=count, rounds=300, check=check)


@pytest.mark.parametrize("impl", ["fastema ema_update_many_", "torch._foreach_lerp_"])
def test_pair_update_host_overhead(run, benchmark, impl):
    """Host-side cost of one cached ema_update_many_ call over 3000 caller-owned pairs of tiny
    tensors (the layout cache's key and layout check; the kernel time is negligible), against the
    foreach call it replaces."""
    from fastema.ops import ema_update_many_

    benchmark.group = "ema_update_many_ host overhead (cpu)"
    sources = list(Params([(4,)] * 3000, torch.float32, "cpu").parameters())
    shadows = [p.detach().clone() for p in sources]
    check = None
    if impl == "torch._foreach_lerp_":
        fn = lambda: torch._foreach_lerp_(shadows, sources, 1 - DECAY)  # noqa: E731
        mine = [p.detach().clone() for p in sources]
        check = lambda: checked(  # noqa: E731
            {"fastema": lambda: ema_update_many_(mine, sources, DECAY), impl: fn},
            {"fastema": lambda: mine, impl: lambda: shadows}, ours="fastema", inputs=sources,
            move=lambda: [p.add_(torch.randn_like(p)) for p in sources])
    else:
        fn = lambda: ema_update_many_(shadows, sources, DECAY)  # noqa: E731
    with torch.no_grad():
        run(fn, "cpu", impl=impl, case="3000 tensors", nbytes=0, elements=len(sources), rounds=100, check=check)


@pytest.mark.parametrize("impl", ["fastema compat.ModelEmaV3", "timm ModelEmaV3"])
def test_model_ema_v3_host_overhead(run, benchmark, impl):
    """Host-side cost of ModelEmaV3.update(model) at 3000 tiny tensors: the drop-in's cached
    pairing check (an address and a layout check a tensor) against timm's arithmetic."""
    from fastema.torch.compat import ModelEmaV3

    benchmark.group = "ModelEmaV3.update host overhead (cpu)"
    model = Params([(4,)] * 3000, torch.float32, "cpu")
    ema = ModelEmaV3(model, decay=DECAY) if impl.startswith("fastema") else TimmModelEmaV3Reference(model, DECAY)
    check = None if impl.startswith("fastema") else \
        ema_check(impl, lambda: ema.update(model), lambda: list(ema.module.parameters()), model, DECAY)
    run(lambda: ema.update(model), "cpu", impl=impl, case="3000 tensors", nbytes=0, elements=3000, rounds=100,
        check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "timm ModelEmaV3 (stochastic)"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bfloat16_shadow_stochastic_rounding(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"EMA.update, bfloat16 model, bfloat16 shadow, stochastic rounding ({device})"
    model = Params(SCENARIOS[scenario](), torch.bfloat16, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    check = None
    if impl == "fastema":
        fn = EMA(model, DECAY, shadow_dtype="bfloat16", rounding="stochastic").update
    else:
        shadow = [p.detach().clone() for p in params]
        fn = lambda: timm_bfloat16_stochastic_update(shadow, params, DECAY)  # noqa: E731
        check = ema_check(impl, fn, lambda: shadow, model, DECAY, shadow_dtype="bfloat16", rounding="stochastic")
    run(fn, device, impl=impl, case=scenario, nbytes=6 * n, elements=n,
        rounds=rounds, check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema swap (in + out)", "torch_ema store/copy_to/restore"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_swap_for_evaluation(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"EMA weights in for evaluation and back, float32 ({device})"
    model = Params(SCENARIOS[scenario](), torch.float32, device)
    n = sum(p.numel() for p in model.parameters())
    if impl.startswith("fastema"):
        ema = EMA(model, DECAY)

        def fn():
            ema.swap()
            ema.swap()
    else:
        torch_ema = pytest.importorskip("torch_ema")
        ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=DECAY, use_num_updates=False)

        def fn():
            ema.store()
            ema.copy_to()
            ema.restore()
    check = None if impl.startswith("fastema") else _swap_check(impl, model, ema)
    # an exchange reads and writes both buffers: 16 B/element for the round trip (in + out)
    run(fn, device, impl=impl, case=scenario, nbytes=16 * n, elements=n,
        rounds=rounds, check=check)


def _swap_check(impl, model, theirs):
    """torch_ema's round trip against fastema's swap of the same EMA (both updated once after the
    weights moved): the weights swapped in, then the weights back, must agree."""
    ours = EMA(model, DECAY)
    params = list(model.parameters())

    def round_trip(swap_in, swap_out):
        swap_in()
        averaged = [p.detach().clone() for p in params]
        swap_out()
        return averaged + [p.detach().clone() for p in params]

    def check():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.1)
            ours.update()
            theirs.update()
        agree(impl, lambda: round_trip(ours.swap, ours.swap),
              lambda: round_trip(lambda: (theirs.store(), theirs.copy_to()), theirs.restore))
        same_work(lambda: (ours.swap(), ours.swap()))
    return check
