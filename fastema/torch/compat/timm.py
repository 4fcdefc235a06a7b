"""timm's ``ModelEmaV3`` (``timm.utils.model_ema``, timm 1.0.31) on fastema's kernels.

Deviations (documented on the class): ``device`` must be the model's device; a tied weight is
averaged once per update (timm's foreach path averages it twice); stochastic rounding of
bfloat16 draws its bits from fastema's counter-based hash, not a torch Generator (same
expectation, other bits).
"""
from __future__ import annotations

import copy as _copy
from typing import Any, NamedTuple

import torch
from torch import nn

from ... import schedules as S
from ..._backends import address_key, layout_guard
from ...pairs import PairShadow
from .._tensors.hooks import unsynced, unwrap, watch
from .._tensors.slots import bump_versions
from ._common import AllOrNothingLoad, kernel_pair


class _Paired(NamedTuple):
    """The pairing of one model with the EMA copy (see ``ModelEmaV3._pairs``)."""
    model: nn.Module
    tensors: list                # the EMA copy's floating tensors, then the model's
    key: tuple | None            # their addresses
    pairs: PairShadow            # the pairs the kernels take
    written: list                # their EMA tensors (bumped after each update)
    copies: list                 # (EMA, model) of the other tensors
    slow: list                   # (EMA, model) of the floating pairs torch's lerp takes
    guard: Any                   # the tensors' layout check (None: no address key)

__all__ = ["ModelEmaV3"]


class ModelEmaV3(AllOrNothingLoad):
    """timm's ``ModelEmaV3`` (timm 1.0.31): ``module`` is an averaged copy of the model, updated in
    one launch per (device, dtype) group.

    As in timm, floating tensors of ``state_dict()`` are averaged and the others copied; with
    ``exclude_buffers=True`` the parameters are averaged and every buffer copied. ``decay``,
    ``min_decay``, ``update_after_step``, ``use_warmup``, ``warmup_gamma`` and ``warmup_power``
    are read at every update, so changing them takes effect. bfloat16 EMA tensors are rounded
    stochastically by default (``stochastic_rounding=True``), so updates far below bfloat16's
    resolution accumulate in expectation; the random bits come from fastema's counter-based
    hash of ``stochastic_rounding_seed`` and the update count (the same on every rank), not
    from a torch Generator, so the bits differ from timm's while the expectation is the same.
    ``dtype=torch.float32`` keeps a float32 EMA of a low-precision model.

    Differences from timm: ``device`` must be the model's device (fastema averages where the
    weights are); a tied weight (listed twice by ``state_dict()``) is averaged once per
    update, where timm's foreach path averages it twice. A pair the kernels cannot walk
    together (a weight laid out unlike its EMA copy, e.g. after ``p.data = p.data.t()``; a
    meta tensor) is averaged by torch, as timm does, rounded to nearest.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device=None, dtype=None, stochastic_rounding: bool = True,
                 stochastic_rounding_seed: int = 0, foreach: bool = True, exclude_buffers: bool = False):
        super().__init__()
        S.check_power_args(decay, min_decay, warmup_gamma, warmup_power, update_after_step,
                           names=("decay", "min_decay", "warmup_gamma", "warmup_power", "update_after_step"))
        if isinstance(stochastic_rounding_seed, bool) or not isinstance(stochastic_rounding_seed, int) or \
                not 0 <= stochastic_rounding_seed < 2 ** 64:
            raise ValueError(f"stochastic_rounding_seed must be an int in [0, 2**64), got "
                             f"{stochastic_rounding_seed!r}")
        model_device = next(iter(model.parameters())).device
        if device is not None and torch.device(device) != model_device:
            raise ValueError(f"device={device!r} differs from the model's {model_device}: fastema updates the "
                             f"EMA where the weights are; keep device=None (offloading is not supported yet)")
        self.module = _copy.deepcopy(model)
        self.module.eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.foreach, self.exclude_buffers = foreach, exclude_buffers
        self.device, self.dtype = device, dtype
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._cached: _Paired | None = None
        self.stale = False
        self.resync = False          # the model was wrapped in DDP after construction (see restart)
        self._updates = 0            # updates made: the stochastic-rounding counter
        watch((self.module, unwrap(model)), self)

    def get_decay(self, step: int | None = None) -> float:
        """timm's decay: ``decay`` without a step; with one, 0 until ``update_after_step``, then the
        warm-up ``1 - (1 + s / warmup_gamma) ** -warmup_power`` clamped to [min_decay, decay]."""
        if step is None:
            return self.decay
        return S.PowerWarmup(self.decay, self.min_decay, self.warmup_gamma, self.warmup_power,
                             self.update_after_step, warmup=self.use_warmup)(step)

    def restart(self, model: nn.Module) -> None:
        """After ``DistributedDataParallel(model)`` (``resync``, set by fastema's registration hooks),
        at its first forward or the next update: start over from ``model``'s weights (rank 0's,
        broadcast by the wrap) if no update was made yet; warn that the ranks may differ if one was."""
        if not self.resync:
            return
        self.resync = False
        if self._updates:
            unsynced(type(self).__name__)
        else:
            self.set(model)

    def _pairs(self, model):
        # Pairing by state_dict() order (as timm) costs a walk of both models; it is cached and
        # rebuilt when either model registers a new tensor, or a tensor moves to other memory or
        # takes another dtype, shape or layout (p.data = p.data.t(): same address, other strides).
        # Per step: one data_ptr and one batched layout check a tensor (~0.1 us), nothing kept.
        cached = self._cached
        if cached is not None and cached.model is model and not self.stale and cached.guard is not None and \
                address_key(cached.tensors) == cached.key and cached.guard(cached.tensors):
            return cached.pairs, cached.written, cached.copies, cached.slow
        if self.exclude_buffers:
            ema_f, model_f = list(self.module.parameters()), list(model.parameters())
            copies = list(zip(self.module.buffers(), model.buffers()))
        else:
            ema_vals = list(self.module.state_dict(keep_vars=True).values())
            model_vals = list(model.state_dict(keep_vars=True).values())
            if len(ema_vals) != len(model_vals):
                raise ValueError(f"the model has {len(model_vals)} state tensors but the EMA copy has "
                                 f"{len(ema_vals)}: it is not the model this ModelEmaV3 was made from")
            fl = [(e, m) for e, m in zip(ema_vals, model_vals) if e.is_floating_point()]
            copies = [(e, m) for e, m in zip(ema_vals, model_vals) if not e.is_floating_point()]
            ema_f, model_f = [e for e, _ in fl], [m for _, m in fl]
        if len(ema_f) != len(model_f):
            raise ValueError(f"the model has {len(model_f)} parameters but the EMA copy has {len(ema_f)}")
        fast = [kernel_pair(e, m) for e, m in zip(ema_f, model_f)]
        slow = [(e, m) for e, m, f in zip(ema_f, model_f, fast) if not f]     # torch's lerp, as timm's
        written = [e for e, f in zip(ema_f, fast) if f]
        pairs = PairShadow(written, [m for m, f in zip(model_f, fast) if f])
        tensors = ema_f + model_f
        watch((unwrap(model), self.module), self)
        key = address_key(tensors)
        self._cached = _Paired(model, tensors, key, pairs, written, copies, slow,
                               None if key is None else layout_guard(tensors))
        self.stale = False
        return pairs, written, copies, slow

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        if self.resync:                          # DDP broadcast rank 0's weights after construction
            self.restart(model)
        pairs, written, copies, slow = self._pairs(model)
        decay = self.get_decay(step)
        pairs.update(decay, seed=self.stochastic_rounding_seed, step=self._updates,
                      bf16_stochastic=self.stochastic_rounding)
        bump_versions(written)                   # as timm's _foreach_lerp_ does
        for e, m in slow:                        # timm's per-dtype forms (rounded to nearest)
            if e.dtype == m.dtype:
                e.lerp_(m, 1.0 - decay)
            else:
                e.mul_(decay).add_(m, alpha=1.0 - decay)
        for e, m in copies:
            e.copy_(m)
        self._updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.copy_(m)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
