"""Core kernels against what users run today: torch.lerp_, torch._foreach_*.

Scenarios: flat float32 sweep (with a copy and an in-place ``add_``, whose device time sets the run's
ceiling on a GPU); GPT-2-small shapes and 3000 tensors of 4096; two decays in one pass; bfloat16 sources
into a float32 shadow; the per-update host cost (address check) of FlatShadow. Every baseline is
run once against fastema's result from the same inputs before it is timed (``check=``,
``bench/suite/checked.py``).
"""
import pytest
import torch

import fastema
from bench.suite.checked import checked

from .conftest import QUICK, devices, flat_check, scenario_rounds
from .shapes import MANY, MANY_NAME, gpt2_small, many_small

DECAY = 0.999
SIZES = [16, 20, 24] if QUICK else [16, 18, 20, 22, 24, 26, 27, 28]
FLAT_CASES = [2 ** p for p in SIZES] + ([] if QUICK else [10 ** 8])


def case_name(n):
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:.0e}"


def flat_pair(n, device):
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", FLAT_CASES, ids=case_name)
@pytest.mark.parametrize("impl", ["fastema", "torch.lerp_", "torch._foreach_lerp_", "copy (ceiling)", "add_ (ceiling)"])
def test_flat_float32(run, benchmark, device, n, impl):
    benchmark.group = f"flat float32 ({device})"
    shadow, src = flat_pair(n, device)
    fn = {
        "fastema": lambda: fastema.ema_update_(shadow, src, decay=DECAY),
        "torch.lerp_": lambda: shadow.lerp_(src, 1 - DECAY),
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_([shadow], [src], 1 - DECAY),
        "copy (ceiling)": lambda: shadow.copy_(src),
        "add_ (ceiling)": lambda: shadow.add_(src),               # a lerp's traffic (2 reads, 1 write)
    }[impl]
    rounds = 3 if n >= 2 ** 26 and QUICK else (8 if n >= 2 ** 26 else None)
    check = None
    if impl in ("torch.lerp_", "torch._foreach_lerp_"):      # against ema_update_ of a copy of the start
        mine = shadow.clone()
        check = lambda: checked({"fastema": lambda: fastema.ema_update_(mine, src, decay=DECAY), impl: fn},  # noqa: E731
                                {"fastema": lambda: [mine], impl: lambda: [shadow]}, ours="fastema", inputs=[src])
    # the copy moves 8 B/element (read + write), add_ 12 (a lerp's 2:1): on a GPU their fastest round by
    # device time at the largest size is the run's ceiling (``bench/suite/checked.py``)
    run(fn, device, impl=impl, case=case_name(n), nbytes=(8 if impl == "copy (ceiling)" else 12) * n, elements=n,
        rounds=rounds, check=check)


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]


SHAPES = {"gpt2-small": gpt2_small, MANY_NAME: many_small}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_lerp_", "per-tensor lerp_", "per-tensor mul_+add_"])
@pytest.mark.parametrize("scenario", list(SHAPES))
def test_many_tensors(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"many float32 tensors, FlatShadow ({device})"
    params = make_params(SHAPES[scenario](), torch.float32, device)
    n = sum(p.numel() for p in params)
    check = None
    if impl == "fastema":
        flat = fastema.FlatShadow(params)
        fn = lambda: flat.update(DECAY)  # noqa: E731
    else:
        shadows = [p.clone() for p in params]
        if impl == "torch._foreach_lerp_":
            fn = lambda: torch._foreach_lerp_(shadows, params, 1 - DECAY)  # noqa: E731
        elif impl == "per-tensor lerp_":
            def fn():
                for s, p in zip(shadows, params):
                    s.lerp_(p, 1 - DECAY)
        else:
            def fn():                           # the textbook loop: shadow = d * shadow + (1 - d) * p
                for s, p in zip(shadows, params):
                    s.mul_(DECAY).add_(p, alpha=1 - DECAY)
        check = flat_check(impl, fn, params, shadows)
    run(fn, device, impl=impl, case=scenario, nbytes=12 * n, elements=n,
        rounds=rounds, check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema (one pass)", "torch._foreach_lerp_ x2"])
def test_two_decays(run, benchmark, device, impl):
    benchmark.group = f"two decays (0.999, 0.9999), {MANY} x 4096 ({device})"
    params = make_params(many_small(), torch.float32, device)
    n = sum(p.numel() for p in params)
    check = None
    if impl.startswith("fastema"):
        flat = fastema.FlatShadow(params, rows=2)
        fn = lambda: flat.update([0.999, 0.9999])  # noqa: E731
    else:
        a, b = [p.clone() for p in params], [p.clone() for p in params]

        def fn():
            torch._foreach_lerp_(a, params, 1 - 0.999)
            torch._foreach_lerp_(b, params, 1 - 0.9999)
        check = flat_check(impl, fn, params, a + b, rows=2, decays=(0.999, 0.9999))
    # one pass: read the weights once, read + write two shadows
    run(fn, device, impl=impl, case=f"{MANY_NAME}, K=2", nbytes=20 * n, elements=n, check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_mul_+_foreach_add_"])
@pytest.mark.parametrize("scenario", ["gpt2-small", MANY_NAME])
def test_bfloat16_sources_float32_shadow(run, benchmark, device, impl, scenario):
    rounds = scenario_rounds(scenario)
    benchmark.group = f"bfloat16 sources, float32 shadow ({device})"
    params = make_params(gpt2_small() if scenario == "gpt2-small" else many_small(), torch.bfloat16, device)
    n = sum(p.numel() for p in params)
    check = None
    if impl == "fastema":
        flat = fastema.FlatShadow(params, dtype="float32")
        fn = lambda: flat.update(DECAY)  # noqa: E731
    else:
        shadows = [p.float() for p in params]

        def fn():                               # timm ModelEmaV3's mixed-dtype path
            torch._foreach_mul_(shadows, DECAY)
            torch._foreach_add_(shadows, params, alpha=1 - DECAY)
        check = flat_check(impl, fn, params, shadows, dtype="float32")
    run(fn, device, impl=impl, case=scenario, nbytes=10 * n, elements=n,
        rounds=rounds, check=check)


@pytest.mark.parametrize("count", [50, 148, 3000])
def test_address_check_cost(run, benchmark, count):
    """The per-update price of never reading a stale address: one data_ptr() per tensor."""
    benchmark.group = "FlatShadow address check (cpu, host only)"
    flat = fastema.FlatShadow([torch.zeros(16) for _ in range(count)])
    run(flat.refresh, "cpu", impl="fastema", case=f"{count} tensors", nbytes=0, elements=count,
        rounds=200)


@pytest.mark.parametrize("count", [50])
def test_update_host_overhead(run, benchmark, count):
    """Whole update() of a 50-tensor model of tiny tensors: the host-side cost per call."""
    benchmark.group = "update() host overhead (cpu)"
    flat = fastema.FlatShadow([torch.zeros(16) for _ in range(count)])
    run(lambda: flat.update(DECAY), "cpu", impl="fastema", case=f"{count} tensors", nbytes=0,
        elements=count, rounds=200)
