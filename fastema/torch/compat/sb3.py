"""Stable-Baselines3's ``polyak_update`` (``stable_baselines3.common.utils``, 2.x) on fastema's kernels.

Deviations (documented on the function): the update is one ``torch.lerp`` (one rounding) where
SB3 computes ``target * (1 - tau)`` and then ``+ tau * param`` (two), so the two agree to float32
rounding, not bit for bit (``tau=1`` and ``tau=0`` agree bit for bit); every check runs before
any tensor is written, so a refused call (lengths differ, ``tau`` outside ``[0, 1]``, an integer
target) changes nothing, where SB3 has updated the leading pairs when ``zip(strict=True)`` raises;
a tensor listed twice is averaged once. Stable-Baselines3 itself is not imported.
"""
from __future__ import annotations

import numbers
from typing import Iterable

import torch

from ._common import lerp_pairs

__all__ = ["polyak_update"]


def _tau(tau) -> float:
    if type(tau) is float and 0.0 <= tau <= 1.0:       # the usual call: no ABC check
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a Python float in [0, 1], got {type(tau).__name__}; pass tau=float(tau)")
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:              # also refuses NaN
        raise ValueError(f"tau must be in [0, 1] (0 keeps the target, 1 copies the parameters), got {tau!r}")
    return tau


def _check(i: int, target: torch.Tensor, param: torch.Tensor, fast: bool) -> None:
    """Refuse, before anything is written, a pair whose shapes differ, and one that SB3's arithmetic
    (``slow``: a pair the kernels do not take) would fail on midway."""
    if target.shape != param.shape:
        raise ValueError(f"target_params[{i}] has shape {tuple(target.shape)} but params[{i}] "
                         f"{tuple(param.shape)}; pass the two networks' tensors in the same order")
    if fast:
        return
    if not (target.is_floating_point() or target.is_complex()):
        raise TypeError(f"target_params[{i}] is {target.dtype}; polyak_update averages floating-point tensors: "
                        f"leave integer buffers such as num_batches_tracked out (SB3's "
                        f"get_parameters_by_name(model, ['running_']) does)")
    if param.is_complex() and not target.is_complex():
        raise TypeError(f"params[{i}] is complex but target_params[{i}] is {target.dtype}; make the target "
                        f"network's tensors complex too")
    if target.device != param.device:
        raise ValueError(f"target_params[{i}] is on {target.device} but params[{i}] on {param.device}; "
                         f"move the target network to the online network's device")


def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor], tau: float) -> None:
    """Stable-Baselines3's ``polyak_update``: ``target <- (1 - tau) * target + tau * param`` for every
    pair, in place and outside autograd (the kernels write the memory; no ``torch.no_grad()``
    context is entered, which alone costs several microseconds a call), in one fastema launch
    per (device, dtype) group.

    A drop-in for ``stable_baselines3.common.utils.polyak_update`` (same signature, same calls:
    ``polyak_update(critic.parameters(), critic_target.parameters(), tau)``, and
    ``polyak_update(batch_norm_stats, batch_norm_stats_target, 1.0)`` to copy the running
    statistics). The pairs' layout is cached by every tensor's address, so the usual training
    step, the same tensors again, costs one launch per group plus a key of the addresses.

    Args:
        params: the online network's tensors (read).
        target_params: the target network's tensors, in the same order (written in place).
        tau: the soft-update coefficient in ``[0, 1]``: ``0`` keeps the target, ``1`` copies
            ``params`` into it.

    Raises:
        ValueError: ``params`` and ``target_params`` differ in length (SB3's ``zip(strict=True)``
            error, with its words), a pair differs in shape or device, or ``tau`` is outside ``[0, 1]``.
        TypeError: ``tau`` is not a real number, or a target is an integer tensor.

    Differences from SB3 (2.x):

    - Rounding: the update is ``target.lerp_(param, tau)``, one rounding (bit for bit what
      ``torch.lerp_`` gives), where SB3 rounds ``target * (1 - tau)`` and then adds
      ``tau * param``; results agree to float32 rounding (a few ulp), not bit for bit.
      ``tau=1`` (SB3's hard copy of the batch-norm statistics) gives the parameters bit for bit
      and ``tau=0`` the target, as SB3's does, for finite values (a lerp of an inf gives NaN
      there: ``tau=1`` makes an online inf NaN, ``tau=0`` a target inf; SB3 keeps the inf).
    - A target that torch refuses to write in place (an inference tensor, made under
      ``torch.inference_mode()``) is refused at every call, as ``lerp_`` refuses it; SB3 writes
      its ``.data``.
    - Every check runs before any tensor is written: a refused call changes nothing, where
      SB3 has updated the pairs before the one ``zip(strict=True)`` stops at.
    - A pair listed twice (a tied weight) is averaged once; SB3 averages it twice.
    - Pairs fastema's kernels do not take (complex dtypes, two layouts, slices, meta tensors)
      are computed with SB3's own two operations.
    - A target that is its own parameter (a no-op in SB3) and a target listed twice with two
      parameters (SB3 applies both in turn) are refused, naming ``target_params[i]`` / ``params[i]``.
    """
    sources = list(params)
    targets = list(target_params)
    weight = _tau(tau)
    if len(sources) != len(targets):
        which = "2 is shorter than argument 1" if len(targets) < len(sources) else "2 is longer than argument 1"
        raise ValueError(f"zip() argument {which}: polyak_update got {len(sources)} params but {len(targets)} "
                         f"target_params; pass the online and the target network's tensors in the same order "
                         f"(e.g. critic.parameters(), critic_target.parameters())")
    lerp_pairs(targets, sources, weight, check=_check, slow=_sb3_arithmetic)


def _sb3_arithmetic(target: torch.Tensor, param: torch.Tensor, tau: float) -> None:
    """SB3's own two operations, for the pairs fastema's kernels do not take."""
    target.data.mul_(1 - tau)
    torch.add(target.data, param.data, alpha=tau, out=target.data)
