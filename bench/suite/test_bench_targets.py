"""Target-network soft updates (issue #27): ``target <- tau * online + (1 - tau) * target``.

``fastema.torch.TargetNetwork.update()`` against the two ways RL libraries do it:

- ``torch._foreach_lerp_(target_params, online_params, tau)`` over lists built once (TorchRL's
  ``SoftUpdate``; the best case for the baseline: no list building per call);
- the per-tensor loop of Stable-Baselines3's ``polyak_update`` (``mul_`` then ``add`` with
  ``alpha=tau``: two launches and two passes over each target tensor), written here as SB3
  writes it so the benchmark needs no SB3.

Targets: an MLP of 2 x 256x256 layers and a head (6 tensors, 132k parameters) and one of 14
such layers and a head (30 tensors, 0.9M parameters), float32, on the CPU and (when one is
present) on the GPU, end to end and synchronised per call there. The sizes are the point here:
these updates run after every gradient step of small networks, so the per-call host overhead
counts as much as the bandwidth. Every update of TargetNetwork checks that both networks still
hold the tensors it paired (a dict lookup, one ``data_ptr()`` and a layout check a tensor) before
its one launch.

On a GPU also: a TD3-style critic step replayed from a CUDA graph with the target update
captured inside it, against the same graph with the update called after each replay (issue
#27: "the gain reported").

Each baseline is run once against ``TargetNetwork`` of the same start before it is timed
(``conftest.target_check``, ``bench/suite/checked.py``).
"""

import pytest
import torch

from .conftest import QUICK, checked_row, devices, sync, target_check, time_rounds
from .shapes import RL_SCENARIOS, RL_TAU, rl_networks

TAU, SCENARIOS = RL_TAU, RL_SCENARIOS


def _networks(layers: int, device: str = "cpu"):
    online, target = rl_networks(layers)
    return online.to(device), target.to(device).requires_grad_(False)


def _sb3_polyak(params, target_params, tau):
    # stable_baselines3.common.utils.polyak_update, as of SB3 2.x
    with torch.no_grad():
        for param, target_param in zip(params, target_params, strict=True):
            target_param.data.mul_(1 - tau)
            torch.add(target_param.data, param.data, alpha=tau, out=target_param.data)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema TargetNetwork", "torch._foreach_lerp_", "SB3 polyak_update loop"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_target_soft_update(benchmark, impl, scenario, device):
    benchmark.group = f"target network soft update, float32 ({device})"
    online, target = _networks(SCENARIOS[scenario], device)
    params, target_params = list(online.parameters()), list(target.parameters())
    n = sum(p.numel() for p in params)
    if impl == "fastema TargetNetwork":
        from fastema.torch import TargetNetwork

        update = TargetNetwork(online, target, tau=TAU).update
    elif impl == "torch._foreach_lerp_":
        def update():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, params, TAU)
    else:
        def update():
            _sb3_polyak(params, target_params, TAU)

    def fn():
        update()
        sync(device)                                   # on a GPU: end to end, synchronised per call
    ours = checked_row(benchmark, impl, None if impl.startswith("fastema") else
                       target_check(impl, update, online, target_params, TAU))
    benchmark.extra_info.update(impl=impl, case=scenario, bytes=12 * n, device=device, elements=n,
                                tensors=len(params))
    pair = None if ours is None else (lambda: (ours(), sync(device)))
    time_rounds(benchmark, fn, pair, device, 5 if QUICK else 30, calls=20, warm=3)


@pytest.mark.skipif("cuda" not in devices(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["fastema TargetNetwork inside the graph", "fastema TargetNetwork after each replay",
                                  "torch._foreach_lerp_ after each replay"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_graphed_learner_step_cuda(benchmark, impl, scenario):
    """A TD3-style critic step (forward, backward, capturable Adam) replayed from a CUDA graph, with
    the target update captured inside it (the device plan advances tau at each replay) against the
    same graph with the update called eagerly after each replay: the gain of capturing it."""
    benchmark.group = "graphed learner step with the target update (cuda)"
    fn, critic, tn, target_params = _graphed(scenario, impl)
    ours = checked_row(benchmark, impl, None if impl.startswith("fastema") else
                       target_check(impl, fn.after, critic, target_params, TAU))
    if ours is not None:                        # the pair: fastema's update captured in a graph of its own
        ours = _graphed(scenario, "fastema TargetNetwork inside the graph")[0]
    n = sum(p.numel() for p in critic.parameters())
    benchmark.extra_info.update(impl=impl, case=scenario, bytes=12 * n, device="cuda", elements=n,
                                tensors=len(target_params))
    time_rounds(benchmark, fn, ours, "cuda", 5 if QUICK else 30, calls=20, warm=1)


def _graphed(scenario, impl):
    """``(fn, critic, tn, target params)``: a learner step of ``impl`` replayed from a CUDA graph, with
    ``fn.after`` the update called after each replay (None: captured inside)."""
    from fastema.torch import TargetNetwork

    critic, critic_target = _networks(SCENARIOS[scenario], "cuda")
    params, target_params = list(critic.parameters()), list(critic_target.parameters())
    tn = TargetNetwork(critic, critic_target, tau=TAU)
    opt = torch.optim.Adam(params, lr=1e-4, capturable=True)
    s_in, r_in = torch.randn(256, 256, device="cuda"), torch.randn(256, 1, device="cuda")
    inside = impl.endswith("inside the graph")

    def step():
        with torch.no_grad():
            y = r_in + 0.99 * critic_target(s_in)
        loss = (critic(s_in) - y).square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if inside:
            tn.update()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    if inside:
        after = None
    elif impl.startswith("fastema"):
        after = tn.update
    else:
        def after():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, params, TAU)

    def fn():
        graph.replay()
        if after is not None:
            after()
        torch.cuda.synchronize()
    fn.after = after
    return fn, critic, tn, target_params
