"""fastema.torchtitan.EMA's step inside a captured optimizer step: on the fake GPU in CI (the launches,
no host sync, no device allocation), captured and replayed on a GPU (a lent GPU's check). Imports no
torchtitan: the simulator's run collects this file."""
import copy

import pytest
import torch
from titan_models import FIELDS, Net, _ulps

from fastema.torchtitan import EMA


def test_the_device_step_on_the_fake_gpu_launches_once_a_call_with_no_host_sync():
    """Structurally what a captured optimizer step holds: the rule's torch operations and one launch per
    group reading the weights and the skip flag from device memory, no host wait. (The kernels run only
    on a real GPU; a lent GPU's check: the graph captured and replayed, docs/guides/torchtitan.md.)"""
    pytest.importorskip("numba.cuda.dispatcher")
    from testkit.fake_gpu import fake_gpu

    with fake_gpu() as fake:
        m = Net()
        ema = EMA.Config(**FIELDS).build(model_parts=[m])
        assert {g["device"] for g in ema.shadow.groups} == {"cuda:0"}
        counter = torch.zeros((), dtype=torch.int64)
        ema.step(counter)                              # the warm-up call makes the rule's buffers
        before, counts = len(fake.launches), dict(fake.counters)
        for _ in range(3):
            counter += 1
            ema.step(counter)
        launched = [e for e in fake.launches[before:] if e[0] == "launch"]
        assert len(launched) == 3 * len(ema.shadow.groups)
        assert fake.counters["host_syncs"] == counts.get("host_syncs", 0)
        assert fake.counters["device_allocs"] == counts.get("device_allocs", 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware: a CUDA graph captured and replayed")
def test_the_step_inside_a_captured_optimizer_step_replays_mains_rule():
    """The update inside the captured step (torchtitan main's ``Optim(enable_cuda_graph=True)``): the
    parameters' change, the device counter and ``ema.step(counter)`` captured once and replayed; the copies
    then match an eager run stepped with the host's steps (the half-life rows' ``2 ** x`` on the device
    within one ulp)."""
    model = Net().cuda()
    eager = copy.deepcopy(model)
    ema = EMA.Config(**FIELDS).build(model_parts=[model])
    ref = EMA.Config(**FIELDS).build(model_parts=[eager])
    params = [p for p in model.parameters() if p.requires_grad]
    deltas = [torch.randn_like(p) * 0.1 for p in params]
    counter = torch.zeros((), dtype=torch.int64, device="cuda")

    def body():
        with torch.no_grad():
            torch._foreach_add_(params, deltas)
        counter.add_(1)
        ema.step(counter)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                             # torchtitan's warm-up iterations, eager
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(12):
        graph.replay()
    eager_params = [p for p in eager.parameters() if p.requires_grad]
    for step in range(1, 16):
        with torch.no_grad():
            torch._foreach_add_(eager_params, deltas)
        ref.step(step)
    torch.cuda.synchronize()
    for row in range(len(ema.keys)):
        for t in ema.tracked:
            assert _ulps(ema.shadow.view(t.fqn, row).cpu(), ref.shadow.view(t.fqn, row).cpu()) <= 1, (row, t.fqn)
