"""fastema.torchtitan.EMA's firing against torchtitan main's rule (issue 79): K copies of a GPT-2-sized
bfloat16 model, the copies in the parameters' dtype (main's), K = 1, 2, 4. torchtitan main
(``torchtitan/components/optim/ema.py``) lists the trainable parameters again at every firing and runs
one ``torch._foreach_lerp_`` pass per copy; fastema reads the parameters once for every copy. The
baseline is run once against fastema's result from the same start before it is timed (``check=``)."""
import pytest
import torch

from bench.suite.checked import checked, move_sources

from .conftest import devices, scenario_rounds
from .shapes import gpt2_small
from .test_bench_torch import Params

DECAYS = (0.999, 0.99, 0.9, 0.5)
MAIN = "torchtitan main (K _foreach_lerp_ passes)"


def _main_rule(model, decays):
    """torchtitan main's firing of constant-decay copies: the parameter list derived again, then one
    ``_foreach_lerp_`` pass per copy (the copies cloned in the parameters' dtype at construction)."""
    copies = [[p.detach().clone() for p in model.parameters()] for _ in decays]

    def fire():
        params = [p for p in model.parameters() if p.requires_grad]
        for copy, decay in zip(copies, decays):
            torch._foreach_lerp_(copy, params, 1.0 - decay)
    return fire, copies


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema.torchtitan", MAIN])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_titan_ema_k_copies_bfloat16(run, benchmark, device, impl, k):
    from fastema.torchtitan import EMA

    benchmark.group = f"torchtitan EMA firing, bfloat16 model, K copies ({device})"
    model = Params(gpt2_small(), torch.bfloat16, device)
    n = sum(p.numel() for p in model.parameters())
    decays = list(DECAYS[:k])
    ours = EMA.Config(decays=decays).build(model_parts=[model])
    check = None
    if impl == MAIN:
        fn, copies = _main_rule(model, decays)
        params = list(model.parameters())

        def check():
            move_sources(params)
            with torch.no_grad():
                checked({"fastema.torchtitan": lambda: ours.step(1), impl: fn},
                        {"fastema.torchtitan": lambda: [ours.shadow.view(t.fqn, r) for r in range(k)
                                                        for t in ours.tracked],
                         impl: lambda: [c for copy in copies for c in copy]},
                        ours="fastema.torchtitan", inputs=params)
    else:
        fn = lambda: ours.step(1)      # noqa: E731  (start_step 0, every step fires)
    with torch.no_grad():
        run(fn, device, impl=impl, case=f"gpt2-small, K={k}", nbytes=(2 + 4 * k) * n, elements=n,
            rounds=scenario_rounds("gpt2-small"), check=check)
