"""Target-network soft updates (issue #27): ``target <- tau * online + (1 - tau) * target``.

``fastema.torch.TargetNetwork.update()`` against the two ways RL libraries do it:

- ``torch._foreach_lerp_(target_params, online_params, tau)`` over lists built once (TorchRL's
  ``SoftUpdate``; the best case for the baseline: no list building per call);
- the per-tensor loop of Stable-Baselines3's ``polyak_update`` (``mul_`` then ``add`` with
  ``alpha=tau``: two launches and two passes over each target tensor), written here as SB3
  writes it so the benchmark needs no SB3.

Targets: an MLP of 2 x 256x256 layers and a head (6 tensors, 132k parameters) and one of 14
such layers and a head (30 tensors, 0.9M parameters), float32 on the CPU. The sizes are the
point here: these updates run after every gradient step of small networks, so the per-call
host overhead counts as much as the bandwidth. Every update of TargetNetwork checks that both
networks still hold the tensors it paired (a lookup, an identity, one ``data_ptr()`` and a
layout check a tensor) before its one launch.
"""

import pytest
import torch
from conftest import QUICK
from shapes import RL_SCENARIOS, RL_TAU, rl_networks

TAU, SCENARIOS = RL_TAU, RL_SCENARIOS


def _networks(layers: int):
    online, target = rl_networks(layers)
    return online, target.requires_grad_(False)


def _sb3_polyak(params, target_params, tau):
    # stable_baselines3.common.utils.polyak_update, as of SB3 2.x
    with torch.no_grad():
        for param, target_param in zip(params, target_params, strict=True):
            target_param.data.mul_(1 - tau)
            torch.add(target_param.data, param.data, alpha=tau, out=target_param.data)


@pytest.mark.parametrize("impl", ["fastema TargetNetwork", "torch._foreach_lerp_", "SB3 polyak_update loop"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_target_soft_update(benchmark, impl, scenario):
    benchmark.group = "target network soft update, float32 (cpu)"
    online, target = _networks(SCENARIOS[scenario])
    params, target_params = list(online.parameters()), list(target.parameters())
    n = sum(p.numel() for p in params)
    if impl == "fastema TargetNetwork":
        from fastema.torch import TargetNetwork

        fn = TargetNetwork(online, target, tau=TAU).update
    elif impl == "torch._foreach_lerp_":
        def fn():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, params, TAU)
    else:
        def fn():
            _sb3_polyak(params, target_params, TAU)
    for _ in range(3):
        fn()                                           # compile / allocate outside the timing
    benchmark.extra_info.update(impl=impl, case=scenario, bytes=12 * n, device="cpu", elements=n,
                                tensors=len(params))
    benchmark.pedantic(fn, rounds=5 if QUICK else 30, iterations=20, warmup_rounds=2)
