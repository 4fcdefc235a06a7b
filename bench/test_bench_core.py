"""Core kernels against what users run today: torch.lerp_, torch._foreach_*.

Scenarios (issue #2): flat float32 sweep; 3000 tensors of 4096; bfloat16 sources into
a float32 shadow; the per-update host cost (address check) of FlatShadow.
"""
import pytest
import torch

import fastema
from conftest import QUICK, devices
from shapes import gpt2_small, many_small

DECAY = 0.999
SIZES = [16, 20, 24] if QUICK else [16, 18, 20, 22, 24, 26, 27]
FLAT_CASES = [2 ** p for p in SIZES] + ([] if QUICK else [10 ** 8])


def case_name(n):
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:.0e}"


def flat_pair(n, device):
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", FLAT_CASES, ids=case_name)
@pytest.mark.parametrize("impl", ["fastema", "torch.lerp_", "torch._foreach_lerp_"])
def test_flat_float32(run, benchmark, device, n, impl):
    benchmark.group = f"flat float32 ({device})"
    shadow, src = flat_pair(n, device)
    fn = {
        "fastema": lambda: fastema.ema_update_(shadow, src, decay=DECAY),
        "torch.lerp_": lambda: shadow.lerp_(src, 1 - DECAY),
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_([shadow], [src], 1 - DECAY),
    }[impl]
    rounds = 3 if n >= 2 ** 26 and QUICK else (8 if n >= 2 ** 26 else None)
    run(fn, device, impl=impl, case=case_name(n), nbytes=12 * n, elements=n, rounds=rounds)


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_lerp_", "per-tensor lerp_"])
def test_many_small_tensors(run, benchmark, device, impl):
    benchmark.group = f"3000 x 4096 float32 ({device})"
    params = make_params(many_small(), torch.float32, device)
    n = sum(p.numel() for p in params)
    if impl == "fastema":
        flat = fastema.FlatShadow(params)
        fn = lambda: flat.update(DECAY)  # noqa: E731
    else:
        shadows = [p.clone() for p in params]
        if impl == "torch._foreach_lerp_":
            fn = lambda: torch._foreach_lerp_(shadows, params, 1 - DECAY)  # noqa: E731
        else:
            def fn():
                for s, p in zip(shadows, params):
                    s.lerp_(p, 1 - DECAY)
    run(fn, device, impl=impl, case="3000x4096", nbytes=12 * n, elements=n)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_mul_+_foreach_add_"])
@pytest.mark.parametrize("scenario", ["gpt2-small", "3000x4096"])
def test_bfloat16_sources_float32_shadow(run, benchmark, device, impl, scenario):
    if QUICK and scenario == "gpt2-small":
        pytest.skip("full mode only")
    benchmark.group = f"bfloat16 sources, float32 shadow ({device})"
    params = make_params(gpt2_small() if scenario == "gpt2-small" else many_small(), torch.bfloat16, device)
    n = sum(p.numel() for p in params)
    if impl == "fastema":
        flat = fastema.FlatShadow(params, dtype="float32")
        fn = lambda: flat.update(DECAY)  # noqa: E731
    else:
        shadows = [p.float() for p in params]

        def fn():                               # timm ModelEmaV3's mixed-dtype path
            torch._foreach_mul_(shadows, DECAY)
            torch._foreach_add_(shadows, params, alpha=1 - DECAY)
    run(fn, device, impl=impl, case=scenario, nbytes=10 * n, elements=n,
        rounds=5 if scenario == "gpt2-small" else None)


@pytest.mark.parametrize("count", [50, 148, 3000])
def test_address_check_cost(run, benchmark, count):
    """The per-update price of never reading a stale address: one data_ptr() per tensor."""
    benchmark.group = "FlatShadow address check (cpu, host only)"
    flat = fastema.FlatShadow([torch.zeros(16) for _ in range(count)])
    run(flat._refresh, "cpu", impl="fastema", case=f"{count} tensors", nbytes=0, elements=count,
        rounds=200)


@pytest.mark.parametrize("count", [50])
def test_update_host_overhead(run, benchmark, count):
    """Whole update() of a 50-tensor model of tiny tensors: the host-side cost per call."""
    benchmark.group = "update() host overhead (cpu)"
    flat = fastema.FlatShadow([torch.zeros(16) for _ in range(count)])
    run(lambda: flat.update(DECAY), "cpu", impl="fastema", case=f"{count} tensors", nbytes=0,
        elements=count, rounds=200)
