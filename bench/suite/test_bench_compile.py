"""torch.compile (issue #15): a compiled training step with the EMA update inside the graph.

The step is an in-graph parameter update (``torch._foreach_add_`` of a fixed direction: the
part of a training step that writes every weight) followed by the EMA update, compiled with
``fullgraph=True``: fastema's ``EMA.update()`` against ``torch._foreach_lerp_`` over per-tensor
shadows (Inductor generates its kernel), same run. With the plan on the device (a GPU's default;
``device_step=True`` on the CPU) the update is written in the graph, fused with the parameter
update (issue 86 item 2); the CPU's default (the plan on the host) is one operator that runs the
eager update.
Compile time is excluded (the warm-up calls compile); bytes = the EMA's 12 B/element. The
baseline's compiled step runs once beside fastema's EMA of the same start, which must agree with its
shadows before it is timed (``bench/suite/checked.py``); a compiled step with fastema's update is timed in
the baseline's rounds (the speed-up's pair).
"""
import pytest
import torch

from bench.suite.checked import agree, same_work
from fastema.torch import EMA

from .conftest import QUICK, devices
from .shapes import many_small
from .test_bench_torch import DECAY, Params

# Inductor compiles a graph of thousands of in-place foreach updates slowly (~40 s for 3000
# tensors on this VM, ~5 s a row for 300): the quick (CI) mode keeps 30
SMALL = 30 if QUICK else 300
SCENARIOS = {f"{SMALL}x4096": lambda: many_small(count=SMALL), "3000x4096": lambda: many_small(count=3000)}


IN_GRAPH = "fastema, device_step=True (in the graph)"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", IN_GRAPH, "torch._foreach_lerp_ in the graph"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_compiled_step_with_ema(run, benchmark, device, impl, scenario):
    if QUICK and scenario == "3000x4096":
        pytest.skip("full mode only")
    if impl == IN_GRAPH and device != "cpu":
        pytest.skip("a GPU's default: the fastema row")
    benchmark.group = f"compiled step (parameter update + EMA update), float32 ({device})"
    model = Params(SCENARIOS[scenario](), torch.float32, device)
    params = list(model.parameters())
    direction = [torch.full_like(p, 1e-6) for p in params]
    n = sum(p.numel() for p in params)
    if impl in ("fastema", IN_GRAPH):
        ema = EMA(model, DECAY, device_step=True if impl == IN_GRAPH else None)

        def step():
            with torch.no_grad():
                torch._foreach_add_(params, direction)
                ema.update()
    check = None
    if impl not in ("fastema", IN_GRAPH):
        shadows = [p.detach().clone() for p in params]
        ref = EMA(model, DECAY)                  # the same start as the shadows

        def step():
            with torch.no_grad():
                torch._foreach_add_(params, direction)
                torch._foreach_lerp_(shadows, params, 1 - DECAY)

        ours_ema = EMA(model, DECAY)

        def ours_step():                          # fastema's compiled step, timed in the baseline's rounds
            with torch.no_grad():
                torch._foreach_add_(params, direction)
                ours_ema.update()

        def check():                              # the compiled step first, then fastema toward its weights
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn_like(p), alpha=0.1)
            compiled()
            with torch.no_grad():
                ref.update()
            agree(impl, lambda: list(ref.averaged_state_dict().values()), lambda: shadows, inputs=params)
            same_work(torch.compile(ours_step, fullgraph=True))
    compiled = torch.compile(step, fullgraph=True)
    run(compiled, device, impl=impl, case=scenario, nbytes=12 * n, elements=n, check=check)
