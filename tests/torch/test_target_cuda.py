"""TargetNetwork on a GPU (issue #27): a TD3-style learner step captured in one CUDA graph with the
target update inside, replayed with a momentum schedule that advances on the device; the target
after each replay is the lerp of the online network with that step's tau. Needs a real GPU
(torch CUDA): skipped in the simulator run. The update's own test runs its Python in CI too, on the
fake GPU (``testkit.fake_gpu.OnAGpu``)."""
import copy

import pytest
import torch
from torch import nn

from testkit.fake_gpu import OnAGpu, on_a_gpu_params


def _busy_after(fn) -> bool:
    """True when the GPU was still busy once ``fn`` returned: ``fn`` made no host sync."""
    torch.cuda._sleep(int(3e8))
    fn()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return busy


def _critic(device: str = "cuda"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)).to(device)


@pytest.mark.parametrize("where", on_a_gpu_params())
def test_update_makes_no_host_sync_and_is_the_lerp(where):
    from fastema.torch import TargetNetwork

    with OnAGpu(where) as gpu:
        online = _critic(gpu.device)
        target = copy.deepcopy(online).requires_grad_(False)
        tn = TargetNetwork(online, target, tau=0.05)
        assert tn.device_step
        tn.update()
        if gpu.real:
            torch.cuda.synchronize()
        ref = [t.detach().double().clone() for t in target.parameters()]

        def steps():
            for _ in range(3):
                with torch.no_grad():
                    torch._foreach_add_(list(online.parameters()), 0.01)
                tn.update()
                for r, p in zip(ref, online.parameters()):
                    r.lerp_(p.detach().double(), 0.05)

        if gpu.real:
            assert _busy_after(steps)
        else:
            with gpu.no_sync():
                steps()
        assert tn.updates == 4
    if gpu.real:
        for r, t in zip(ref, target.parameters()):
            torch.testing.assert_close(t.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware: a CUDA graph captured and replayed")
def test_learner_step_captured_with_the_target_update_inside():
    from fastema.schedules import Cosine
    from fastema.torch import TargetNetwork

    critic = _critic()
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    schedule = Cosine(0.9, 0.99, total_steps=6)
    tn = TargetNetwork(critic, critic_target, momentum=schedule)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, capturable=True)
    s_in, r_in = torch.randn(64, 9, device="cuda"), torch.randn(64, 1, device="cuda")

    def step():
        with torch.no_grad():
            y = r_in + 0.99 * critic_target(s_in)
        loss = (critic(s_in) - y).square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        tn.update()

    side = torch.cuda.Stream()                            # warm-up on a side stream, as torch's graph docs do
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert tn.updates == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()                                            # recorded, not run
    for n in range(2, 9):
        before = [t.detach().clone() for t in critic_target.parameters()]
        s_in.copy_(torch.randn(64, 9, device="cuda"))
        r_in.copy_(torch.randn(64, 1, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        tau = 1.0 - schedule(n)                           # the update count advanced on the device
        for b, t, p in zip(before, critic_target.parameters(), critic.parameters()):
            torch.testing.assert_close(t, b.lerp(p.detach(), tau), rtol=1e-6, atol=1e-7)
    state = tn.state_dict()                               # the device plan read back: 8 updates
    assert state["plan"]["updates"] == 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="hardware: a device plan across a real GPU and the CPU (torch.cuda.synchronize)")
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_buffers_on_a_device_with_no_averaged_tensor_sit_behind_the_device_plan(skip_nonfinite):
    """The parameters on the GPU, a BatchNorm with no parameters (its buffers only) on the CPU: the
    device plan has a flag on the CPU too, so construction writes nothing there (its warm-up
    update is skipped; before, with ``skip_nonfinite`` it raised ``KeyError``), and the buffers are
    copied on due calls only (``update_every=2``)."""
    from fastema.torch import TargetNetwork

    online = nn.Sequential(nn.Linear(4, 8).cuda(), nn.BatchNorm1d(8, affine=False))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        online[1].running_mean.add_(1.0)
        online[1].num_batches_tracked.add_(3)
    tn = TargetNetwork(online, target, tau=0.5, update_every=2, skip_nonfinite=skip_nonfinite)
    assert tn.device_step and sorted(tn._core.device_plan.devices) == ["cpu", "cuda:0"]
    torch.cuda.synchronize()
    assert torch.equal(target[1].running_mean, torch.zeros(8)) and target[1].num_batches_tracked.item() == 0
    tn.update()                                            # call 1: due, copies
    torch.cuda.synchronize()
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert target[1].num_batches_tracked.item() == 3
    with torch.no_grad():
        online[1].running_mean.add_(1.0)
        online[1].num_batches_tracked.add_(1)
    tn.update()                                            # call 2: skipped by update_every, on every device
    torch.cuda.synchronize()
    assert torch.equal(target[1].running_mean, torch.ones(8)) and target[1].num_batches_tracked.item() == 3
