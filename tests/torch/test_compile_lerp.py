"""The plain update's lerp in a compiled graph is written by fastema (``fastema/torch/_face/lowered.py``:
the difference, then one ``addcmul_``), not left to what Dynamo writes for ``torch._foreach_lerp_``:
torch 2.10 and 2.11 wrote that as sub, mul, add (two roundings), so a graph run as it is (no Inductor)
was not eager's update on the releases the GPU machines run. Here torch's polyfill is put back as those
releases had it, and the update still equals eager bit for bit on the CPU: a low weight, a high one
(0.5 or more: eager ``lerp_`` starts from the source), one that is 0.5 only in float32 (eager judges
the float32 weight) and a tensor weight (a schedule the graph computes, from above 0.5 to below)."""
import pytest
import torch
import torch._dynamo as dynamo
import torch._dynamo.polyfills as polyfills
from models import mlp

from fastema.schedules import NumUpdates
from fastema.torch import EMA

pytestmark = pytest.mark.filterwarnings("ignore")


def _foreach_lerp_before_2_12(self, end, weight):
    """torch 2.10's and 2.11's ``torch._dynamo.polyfills.foreach_lerp_inplace``, verbatim."""
    result = torch._foreach_sub(end, self)
    result = torch._foreach_mul(result, weight)
    return torch._foreach_add_(self, result)


def _graphs_run_as_they_are(fn):
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def _targets(graphs) -> set:
    """The names of the functions the graphs call, and their qualified names (an operator's)."""
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    return {getattr(t, "__name__", "") for t in calls} | {str(t) for t in calls}


@pytest.fixture
def old_polyfill(monkeypatch):
    """torch's polyfill as 2.10-2.11 had it, seen to take effect: ``torch._foreach_lerp_`` traced
    becomes sub, mul, add, and its result is no longer eager's."""
    if not hasattr(polyfills, "foreach_lerp_inplace"):
        pytest.skip(f"torch {torch.__version__} has no polyfill of _foreach_lerp_ to put back")
    monkeypatch.setattr(polyfills, "foreach_lerp_inplace", _foreach_lerp_before_2_12)
    dynamo.reset()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)

    def lerp(x):
        torch._foreach_lerp_([x], [b], 0.1)

    traced, graphs = _graphs_run_as_they_are(lerp)
    x, y = a.clone(), a.clone()
    traced(x)
    y.lerp_(b, 0.1)
    assert {"_foreach_mul", "_foreach_add_"} <= _targets(graphs) and not torch.equal(x, y)
    yield
    dynamo.reset()


@pytest.mark.parametrize("decay", [0.9, 0.3, 0.5 + 2.0 ** -27, NumUpdates(0.999)],
                         ids=["weight 0.1", "weight 0.7", "weight 0.5 in float32", "a tensor weight"])
def test_the_plain_update_is_eager_bit_for_bit_whatever_dynamo_writes_for_foreach_lerp(old_polyfill, decay):
    model = mlp(8, 16, 4, seed=0)
    ea, eb = EMA(model, decay, device_step=True), EMA(model, decay, device_step=True)

    def step():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5).add_(0.25)
            ea.update()

    traced, graphs = _graphs_run_as_they_are(step)
    for i in range(12):                         # NumUpdates: weight 9/11 at first, below 0.5 from 9
        traced()
        eb.update()
        sa, sb = ea.state_dict(), eb.state_dict()
        assert (sa["updates"], sa["calls"]) == (sb["updates"], sb["calls"]) == (i + 1, i + 1)
        for k in sa["averaged"]:
            assert torch.equal(sa["averaged"][k], sb["averaged"][k]), (k, i)
    targets = _targets(graphs)
    assert len(graphs) == 1 and "_foreach_addcmul_" in targets and "_foreach_mul" not in targets
    assert not any("fastema" in t for t in targets)          # no operator of fastema's
