"""TorchRL's target-network updaters (``torchrl.objectives.SoftUpdate`` / ``HardUpdate``, 0.8-0.14)
on fastema's kernels.

The classes subclass TorchRL's, so they are ``TargetNetUpdater`` instances (TorchRL's trainers
check that) and keep TorchRL's constructor, ``init_``, ``state_dict``/``load_state_dict`` and
checks; only the arithmetic of ``step()`` changes: TorchRL lerps each ``target_*_params``
TensorDictParams towards its source with one ``torch._foreach_lerp_`` each, fastema lerps every
pair of all of them in one launch per (device, dtype) group, bit for bit what ``lerp_`` gives.
TorchRL is imported by this module: ``fastema.torch.compat`` imports it only when one of
these names is first used.
"""
from __future__ import annotations

try:
    from torchrl.objectives.utils import HardUpdate as _HardUpdate
    from torchrl.objectives.utils import SoftUpdate as _SoftUpdate
except ImportError as err:        # pragma: no cover - the rl extra is missing
    raise ImportError(f'fastema.torch.compat.SoftUpdate and HardUpdate subclass TorchRL\'s; pip install '
                      f'"fastema[rl]" (or torchrl) to use them ({err})') from err

import torch

from ._common import kernel_weight, lerp_pairs

__all__ = ["SoftUpdate", "HardUpdate"]


def _collect(updater, source, target) -> None:
    """Add the leaf tensors of one (source, target) TensorDictParams pair to ``updater._pending``,
    paired in the order ``TensorDictBase.lerp_`` pairs them (``values(include_nested=True,
    leaves_only=True)``). Called from ``_step``, inside TorchRL's ``step()`` and before its
    counter moves, so a refusal here changes nothing."""
    s = list(source.values(True, True))
    t = list(target.values(True, True))
    if len(s) != len(t):
        name = type(updater).__name__
        raise RuntimeError(f"{name}.step(): a target holds {len(t)} tensors but its source {len(s)}; was the loss "
                           f"module's network changed after the updater was made? make a new {name}(loss_module)")
    updater._pending[0].extend(s)
    updater._pending[1].extend(t)


class SoftUpdate(_SoftUpdate):
    """TorchRL's ``SoftUpdate`` (``torchrl.objectives.SoftUpdate``): after every optimisation step,
    ``target <- eps * target + (1 - eps) * source`` for every ``target_*_params`` of the loss
    module, in one fastema launch per (device, dtype) group.

    Same constructor as TorchRL's (``SoftUpdate(loss_module, eps=0.995)`` or ``tau=0.005``, one of
    them), same ``init_()``, ``step()``, ``state_dict()``; an instance of TorchRL's
    ``SoftUpdate`` and ``TargetNetUpdater``. Targets equal TorchRL's bit for bit: both compute
    ``target.lerp_(source, 1 - eps)`` with the weight rounded to the tensors' dtype.

    Args:
        loss_module: a TorchRL loss module with target parameters (``DQNLoss``, ``DDPGLoss``,
            ``SACLoss``, ``TD3Loss``, ... with ``delay_*=True``).
        eps: the decay of the target, in ``[0, 1]``; exclusive with ``tau``.
        tau: the Polyak coefficient, ``1 - eps``; exclusive with ``eps``.

    Difference from TorchRL: a target tensor listed under two sources (a tied weight) is
    averaged once per step.
    """

    def _step(self, p_source, p_target) -> None:
        _collect(self, p_source, p_target)

    def step(self) -> None:
        """Lerp every target tensor towards its source by ``1 - eps``: TorchRL's checks (initialised,
        targets outside any graph), then one fastema launch per (device, dtype) group."""
        self._pending: tuple[list, list] = ([], [])
        try:
            super().step()                              # TorchRL's checks; _step collects the pairs
            sources, targets = self._pending
        finally:
            del self._pending
        lerp_pairs(targets, sources, kernel_weight(1 - self.eps), names=("target_params", "source_params"))


class HardUpdate(_HardUpdate):
    """TorchRL's ``HardUpdate`` (``torchrl.objectives.HardUpdate``): every
    ``value_network_update_interval`` + 1 calls of ``step()``, the targets become copies of
    their sources.

    Same constructor (``HardUpdate(loss_module, value_network_update_interval=1000)``), counter,
    ``init_()``, ``state_dict()`` as TorchRL's, and an instance of it. The copy is one
    ``torch._foreach_copy_`` over every pair of every target (TorchRL: one ``copy_`` per target
    TensorDictParams); a copy has no arithmetic to round, so targets equal TorchRL's bit for bit.

    Args:
        loss_module: a TorchRL loss module with target parameters.
        value_network_update_interval: the number of ``step()`` calls between two copies.
    """

    def _step(self, p_source, p_target) -> None:
        if self.counter == self.value_network_update_interval:
            _collect(self, p_source, p_target)

    def step(self) -> None:
        """TorchRL's ``HardUpdate.step()``: count, and copy the sources into the targets when the
        count reaches ``value_network_update_interval``."""
        self._pending: tuple[list, list] = ([], [])
        try:
            super().step()                              # checks, collects, advances the counter
            sources, targets = self._pending
        finally:
            del self._pending
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, sources)
