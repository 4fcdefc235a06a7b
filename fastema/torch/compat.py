"""Drop-in replacements for the EMA classes users already have, on fastema's kernels.

- :class:`ExponentialMovingAverage`: the torch_ema API (``shadow_params``, ``store``/``restore``, ...).
- :class:`ModelEmaV3`: the timm API (``module``, ``update(model, step)``, ``get_decay``, ``set``).
- :func:`get_ema_multi_avg_fn`: for ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=...)``
  (and so for Lightning's weight-averaging callbacks).

Same arguments and state as the originals; the per-parameter loops become one launch
per (device, dtype) group.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import weakref
from typing import Iterable

import torch
from torch import nn

from .. import schedules as S
from ..flat import FlatShadow
from ..ops import ema_update_many_
from . import _unwrap, _watch

__all__ = ["ExponentialMovingAverage", "ModelEmaV3", "get_ema_multi_avg_fn"]


class ExponentialMovingAverage:
    """torch_ema's ``ExponentialMovingAverage(parameters, decay, use_num_updates=True)``.

    ``shadow_params`` are views into one flat buffer per (device, dtype), in the
    parameters' own dtype (as in torch_ema). As in torch_ema, ``average_parameters()``
    stores the raw weights, copies the averages in and restores on exit, so
    ``shadow_params`` keep the averages inside the block; ``store()`` copies into a flat
    buffer that is reused (one launch). For an in-place swap with no stored copy, use
    :class:`fastema.torch.EMA`.

    One difference: torch_ema holds weak references and raises once the parameters are
    garbage collected; the kernels read the parameters by address, so this class keeps
    them alive instead (drop the EMA with the model).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float, use_num_updates: bool = True):
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        params = [p for p in parameters]
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self._flat = FlatShadow(params, dtype="same")
        self._refs = [weakref.ref(p) for p in params]
        self._stored: FlatShadow | None = None     # store() target, reused

    @property
    def collected_params(self) -> list[torch.Tensor] | None:
        return None if self._stored is None else list(self._stored.views().values())

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        return list(self._flat.views().values())

    def _params(self, parameters):
        if parameters is None:
            params = [r() for r in self._refs]
            if any(p is None for p in params):
                raise ValueError("(One of) the parameters with which this ExponentialMovingAverage was initialized "
                                 "no longer exists (was garbage collected); please either provide `parameters` "
                                 "explicitly or keep the model to which they belong from being garbage collected.")
            return params
        params = list(parameters)
        if len(params) != len(self._refs):
            raise ValueError("Number of parameters passed as argument is different from number of shadow "
                             "parameters maintained by this ExponentialMovingAverage")
        return params

    def _bind(self, parameters) -> None:
        if parameters is not None:
            self._flat.rebind(self._params(parameters))

    def update(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """``shadow -= (1 - decay) * (shadow - param)`` with torch_ema's num_updates warm-up."""
        self._bind(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = S.NumUpdates(decay)(self.num_updates)
        self._flat.update(decay)

    def copy_to(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        self._bind(parameters)
        self._flat.copy_to_sources()

    def store(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Save the current parameters (a copy, as torch_ema) for :meth:`restore`."""
        params = self._params(parameters)
        if self._stored is None:
            self._stored = FlatShadow(params, dtype="same")
        else:
            self._stored.rebind(params)
            self._stored.copy_from_sources()

    def restore(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        if self._stored is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        self._stored.rebind(self._params(parameters))
        self._stored.copy_to_sources()

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[torch.Tensor] | None = None):
        """Averaged weights in, raw weights back on exit (also when the block raises)."""
        params = self._params(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(self, device=None, dtype=None) -> None:
        """Follow parameters moved to ``device`` (after ``model.to(device)``); ``dtype`` casts the shadow."""
        params = self._params(None)
        old = self.shadow_params
        name = {None: "same", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        if dtype not in name:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if device is not None and any(p.device != torch.device(device) for p in params):
            raise ValueError(f"the parameters are on {params[0].device}, not {device}: fastema keeps the shadow "
                             f"beside the parameters; move the model first, then call ema.to({device!r})")
        flat = FlatShadow(params, dtype=name[dtype])
        for new, o in zip(flat.views().values(), old):
            new.copy_(o)
        self._flat = flat

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params,
                "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = _copy.copy(state_dict)
        decay = state_dict["decay"]
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        num_updates = state_dict["num_updates"]
        if num_updates is not None and not isinstance(num_updates, int):
            raise ValueError("Invalid num_updates")
        shadow = state_dict["shadow_params"]
        if not isinstance(shadow, list) or not all(isinstance(p, torch.Tensor) for p in shadow):
            raise ValueError("shadow_params must be a list of tensors")
        if len(shadow) != len(self._refs):
            raise ValueError(f"shadow_params has {len(shadow)} tensors, this EMA tracks {len(self._refs)}")
        mine = self.shadow_params
        for i, (s, m) in enumerate(zip(shadow, mine)):
            if s.shape != m.shape:
                raise ValueError(f"shadow_params[{i}] has shape {tuple(s.shape)}, expected {tuple(m.shape)}")
        collected = state_dict["collected_params"]
        if collected is not None and (not isinstance(collected, list) or len(collected) != len(mine)):
            raise ValueError("collected_params must be None or a list of one tensor per parameter")
        with torch.no_grad():
            for s, m in zip(shadow, mine):
                m.copy_(s)
            if collected is None:
                self._stored = None
            else:
                if self._stored is None:
                    self._stored = FlatShadow(self._params(None), dtype="same")
                for c, v in zip(collected, self._stored.views().values()):
                    v.copy_(c)
        self.decay, self.num_updates = decay, num_updates


class ModelEmaV3(nn.Module):
    """timm's ``ModelEmaV3``: ``module`` is an averaged copy of the model, updated in one launch
    per (device, dtype) group. Float tensors of ``state_dict()`` are averaged (only parameters
    with ``exclude_buffers=True``), the others copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device=None, dtype=None, foreach: bool = True,
                 exclude_buffers: bool = False):
        super().__init__()
        self.module = _copy.deepcopy(model)
        self.module.eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.foreach, self.exclude_buffers = foreach, exclude_buffers
        model_device = next(iter(model.parameters())).device
        if device is not None and torch.device(device) != model_device:
            raise ValueError(f"device={device!r} differs from the model's {model_device}: fastema updates the "
                             f"EMA where the weights are; keep device=None (offloading is not supported yet)")
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._warmup = S.PowerWarmup(decay, min_decay, warmup_gamma, warmup_power, update_after_step,
                                     warmup=use_warmup)
        self._cached = None          # (model, pairs) of the last update; dropped when the model re-registers
        self._stale = False

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        return self._warmup(step)

    def _pairs(self, model):
        # Pairing by state_dict() order (as timm) costs a walk of both models; it is cached
        # and rebuilt when the model registers a new parameter, buffer or submodule.
        if self._cached is not None and self._cached[0] is model and not self._stale:
            return self._cached[1]
        if self.exclude_buffers:
            pairs = (list(self.module.parameters()), list(model.parameters()), [], [])
        else:
            ema_vals = list(self.module.state_dict(keep_vars=True).values())
            model_vals = list(model.state_dict(keep_vars=True).values())
            if len(ema_vals) != len(model_vals):
                raise ValueError(f"the model has {len(model_vals)} state tensors but the EMA copy has "
                                 f"{len(ema_vals)}: it is not the model this ModelEmaV3 was made from")
            fl = [(e, m) for e, m in zip(ema_vals, model_vals) if e.is_floating_point()]
            other = [(e, m) for e, m in zip(ema_vals, model_vals) if not e.is_floating_point()]
            pairs = ([e for e, _ in fl], [m for _, m in fl], [e for e, _ in other], [m for _, m in other])
        _watch(_unwrap(model), self)
        self._cached, self._stale = (model, pairs), False
        return pairs

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        ema_f, model_f, ema_o, model_o = self._pairs(model)
        ema_update_many_(ema_f, model_f, self.get_decay(step))
        for e, m in zip(ema_o, model_o):
            e.copy_(m)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.copy_(m)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def get_ema_multi_avg_fn(decay: float = 0.999):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: the EMA of
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` in one fastema launch per group."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged):
        # AveragedModel groups by (device, dtype); fastema takes the float32/bfloat16/float16
        # groups, anything else (float64, integer buffers) gets torch's own arithmetic.
        if ema_param_list[0].dtype in (torch.float32, torch.bfloat16, torch.float16):
            ema_update_many_(ema_param_list, current_param_list, decay)
        elif torch.is_floating_point(ema_param_list[0]) or torch.is_complex(ema_param_list[0]):
            torch._foreach_lerp_(ema_param_list, current_param_list, 1 - decay)
        else:
            for p_ema, p_model in zip(ema_param_list, current_param_list):
                p_ema.copy_(p_ema * decay + p_model * (1 - decay))

    return ema_update
