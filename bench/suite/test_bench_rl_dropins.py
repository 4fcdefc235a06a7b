"""The reinforcement-learning drop-ins (issue #27, item 2) against the originals they replace.

- ``fastema.torch.compat.polyak_update(online.parameters(), target.parameters(), tau)``, called
  as SB3 calls it (generators of ``.parameters()`` every call; the ``(lists)`` row: lists built
  once, as the ``_foreach_lerp_`` row has them), against Stable-Baselines3's own
  ``polyak_update`` (a per-tensor ``mul_`` + ``add``: two launches and two passes a tensor) and
  against ``torch._foreach_lerp_`` over lists built once (the best case for that baseline: no
  list building per call).
- ``fastema.torch.compat.SoftUpdate.step()`` against TorchRL's ``SoftUpdate.step()`` on a
  ``DDPGLoss`` holding the same MLP as its value network (the actor: a 3 -> 1 linear).

Targets: an MLP of 2 x 256x256 layers and a 256 -> 1 head (6 tensors, 132k parameters) and one
of 14 such layers and a head (30 tensors, 0.9M parameters), float32 on the CPU. These updates run
after every gradient step of small networks, so the per-call host overhead counts as much as
the bandwidth: the figures are microseconds a call (``bytes`` for GB/s: 12 bytes an element).
Issue #27's targets: >= 3x SB3's ``polyak_update`` and >= 1.0x ``_foreach_lerp_`` at 6 tensors.
Each baseline is run once against fastema's update of the same start before it is timed
(``bench/suite/checked.py``).
"""

import pytest
import torch
from torch import nn

from bench.suite.checked import checked

from .conftest import QUICK, checked_row, target_check, time_rounds
from .shapes import RL_SCENARIOS, RL_TAU, rl_networks

TAU, SCENARIOS = RL_TAU, RL_SCENARIOS
_networks = rl_networks


def _time(benchmark, fn, impl, scenario, n, tensors, check=None):
    ours = checked_row(benchmark, impl, check)         # a baseline: fastema's checked update, in its rounds
    benchmark.extra_info.update(impl=impl, case=scenario, bytes=12 * n, device="cpu", elements=n, tensors=tensors)
    time_rounds(benchmark, fn, ours, "cpu", 5 if QUICK else 30, calls=20, warm=3)


@pytest.mark.parametrize("impl", ["fastema compat.polyak_update", "fastema compat.polyak_update (lists)",
                                  "SB3 polyak_update", "torch._foreach_lerp_"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_polyak_update(benchmark, impl, scenario):
    benchmark.group = "polyak_update drop-in, float32 (cpu)"
    online, target = _networks(SCENARIOS[scenario])
    params, target_params = list(online.parameters()), list(target.parameters())
    n = sum(p.numel() for p in params)
    if impl == "torch._foreach_lerp_":
        def fn():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, params, TAU)
    elif impl == "fastema compat.polyak_update (lists)":   # lists built once, as the _foreach_lerp_ row
        from fastema.torch.compat import polyak_update

        def fn():
            polyak_update(params, target_params, TAU)
    else:
        if impl == "SB3 polyak_update":
            polyak_update = pytest.importorskip("stable_baselines3.common.utils").polyak_update
        else:
            from fastema.torch.compat import polyak_update

        def fn():
            polyak_update(online.parameters(), target.parameters(), TAU)
    check = None if impl.startswith("fastema") else target_check(impl, fn, online, target_params, TAU)
    _time(benchmark, fn, impl, scenario, n, len(params), check)


@pytest.mark.parametrize("impl", ["fastema compat.SoftUpdate", "TorchRL SoftUpdate"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_torchrl_soft_update(benchmark, impl, scenario):
    objectives = pytest.importorskip("torchrl.objectives")
    from torchrl.modules import Actor, ValueOperator

    benchmark.group = "TorchRL SoftUpdate drop-in, float32 (cpu)"
    value_net, _ = _networks(SCENARIOS[scenario])
    actor = Actor(nn.Linear(3, 1), in_keys=["observation"])
    value = ValueOperator(value_net, in_keys=["observation"])
    loss = objectives.DDPGLoss(actor, value, delay_actor=True, delay_value=True)
    if impl == "TorchRL SoftUpdate":
        updater = objectives.SoftUpdate(loss, tau=TAU)
    else:
        from fastema.torch.compat import SoftUpdate

        updater = SoftUpdate(loss, tau=TAU)
    n = sum(p.numel() for p in loss.value_network_params.values(True, True)) + 4
    check = None if impl.startswith("fastema") else _softupdate_check(objectives, actor, value, impl, updater)
    _time(benchmark, updater.step, impl, scenario, n, len(list(value_net.parameters())) + 2, check)


def _softupdate_check(objectives, actor, value, impl, updater):
    """TorchRL's ``SoftUpdate.step()`` against fastema's drop-in on a second ``DDPGLoss`` of the same
    networks and targets: the online parameters move, each steps once, the targets must agree."""
    from fastema.torch.compat import SoftUpdate

    mine = objectives.DDPGLoss(actor, value, delay_actor=True, delay_value=True)
    theirs_loss = updater.loss_module if hasattr(updater, "loss_module") else None

    def targets(loss):
        return [t for name in ("target_value_network_params", "target_actor_network_params")
                for t in getattr(loss, name).values(True, True)]

    with torch.no_grad():
        if theirs_loss is not None:
            for a, b in zip(targets(mine), targets(theirs_loss)):
                a.copy_(b)
    ours = SoftUpdate(mine, tau=TAU)
    online = list(actor.parameters()) + list(value.parameters())

    def check():
        with torch.no_grad():
            for p in online:
                p.add_(torch.randn_like(p), alpha=0.1)
        checked({"fastema": ours.step, impl: updater.step},
                {"fastema": lambda: targets(mine), impl: lambda: targets(theirs_loss)},
                ours="fastema", inputs=online)
    return check if theirs_loss is not None else None
