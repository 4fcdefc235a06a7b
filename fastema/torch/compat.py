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
from ..ops import ema_update_many_, launch_pairs, pair_groups
from . import _unwrap, _watch

__all__ = ["ExponentialMovingAverage", "ModelEmaV3", "get_ema_multi_avg_fn"]


class ExponentialMovingAverage:
    """torch_ema's ``ExponentialMovingAverage(parameters, decay, use_num_updates=True)``.

    ``shadow_params`` are views into one flat buffer per (device, dtype), in the
    parameters' own dtype (as in torch_ema), laid out as the parameters are (channels_last
    stays channels_last). As in torch_ema, ``average_parameters()`` stores the raw
    weights, copies the averages in and restores on exit, so ``shadow_params`` keep the
    averages inside the block. Parameters passed to ``update``, ``copy_to``, ``store`` or
    ``restore`` act for that call only; without them the parameters given at
    construction are used. For an in-place swap with no stored copy, use
    :class:`fastema.torch.EMA`.

    Differences from torch_ema: the kernels read the parameters by address, so this
    class keeps them alive (torch_ema holds weak references and raises once they are
    collected); ``to(device)`` must name the parameters' device (the shadow lives beside
    them); ``load_state_dict`` refuses a state dict whose shapes do not match these
    parameters, before anything is loaded (torch_ema fails later, in ``copy_to``).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float, use_num_updates: bool = True):
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        params = [p for p in parameters]
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self._flat = FlatShadow(params, dtype="same")
        self._refs = [weakref.ref(p) for p in params]
        self._stored: FlatShadow | list | None = None     # store(): a flat copy, or clones of what it got

    @property
    def collected_params(self) -> list[torch.Tensor] | None:
        if isinstance(self._stored, FlatShadow):
            return list(self._stored.views().values())
        return self._stored

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

    def _own(self, params: list) -> bool:
        """True when ``params`` are the tracked parameters (the fast path of one flat launch)."""
        return all(a is b for a, b in zip(params, self._flat.sources))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """``shadow -= (1 - decay) * (shadow - param)`` with torch_ema's num_updates warm-up."""
        params = self._params(parameters)
        decay = self.decay
        if self.num_updates is not None:
            decay = S.NumUpdates(decay)(self.num_updates + 1)
        if parameters is None or self._own(params):
            self._flat.update(decay)
        else:                                    # other parameters, for this call only
            ema_update_many_(self.shadow_params, params, decay)
        if self.num_updates is not None:
            self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        params = self._params(parameters)
        if parameters is None or self._own(params):
            self._flat.copy_to_sources()
        else:
            for s, p in zip(self.shadow_params, params):
                p.data.copy_(s.data)

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Save the current parameters (a copy, as torch_ema) for :meth:`restore`; whatever is
        given is stored, in its own dtype."""
        params = self._params(parameters)
        if isinstance(self._stored, FlatShadow):
            try:
                self._stored.rebind(params)
                self._stored.copy_from_sources()
                return
            except (TypeError, ValueError):
                pass                             # other shapes or dtypes: store them as they are
        try:
            self._stored = FlatShadow(params, dtype="same")
        except (TypeError, ValueError):
            self._stored = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        if self._stored is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = self._params(parameters)
        if isinstance(self._stored, FlatShadow) and all(a is b for a, b in zip(params, self._stored.sources)):
            self._stored.copy_to_sources()
        else:
            for c, p in zip(self.collected_params, params):
                p.data.copy_(c.data)

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
        """Cast the shadow (and stored) copies to ``dtype`` as torch_ema does (float64 included);
        ``device`` must be the parameters' own device (after ``model.to(device)``)."""
        params = self._params(None)
        name = {None: "same", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}
        if dtype not in name:
            raise ValueError(f"dtype must be float64, float32, bfloat16 or float16, got {dtype}")
        if device is not None and any(p.device != torch.device(device) for p in params):
            raise ValueError(f"the parameters are on {params[0].device}, not {device}: fastema keeps the shadow "
                             f"beside the parameters; move the model first, then call ema.to({device!r})")
        old = self.shadow_params
        flat = FlatShadow(params, dtype=name[dtype])
        with torch.no_grad():
            for new, o in zip(flat.views().values(), old):
                new.copy_(o)
        self._flat = flat
        if dtype is not None and self._stored is not None:
            self._stored = [c.to(dtype=dtype) if c.is_floating_point() else c.clone() for c in self.collected_params]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params,
                "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch_ema's format; everything is checked before anything is loaded."""
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
        if collected is not None:
            if not isinstance(collected, list) or len(collected) != len(mine) or \
                    not all(isinstance(c, torch.Tensor) for c in collected):
                raise ValueError("collected_params must be None or a list of one tensor per parameter")
            for i, (c, m) in enumerate(zip(collected, mine)):
                if c.shape != m.shape:
                    raise ValueError(f"collected_params[{i}] has shape {tuple(c.shape)}, expected {tuple(m.shape)}")
        with torch.no_grad():
            for s, m in zip(shadow, mine):
                m.copy_(s)
            self._stored = None if collected is None else [c.detach().clone() for c in collected]
        self.decay, self.num_updates = decay, num_updates


class ModelEmaV3(nn.Module):
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
    update, where timm's foreach path averages it twice.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device=None, dtype=None, stochastic_rounding: bool = True,
                 stochastic_rounding_seed: int = 0, foreach: bool = True, exclude_buffers: bool = False):
        super().__init__()
        S.check_power_args(decay, min_decay, warmup_gamma, warmup_power, update_after_step)
        if isinstance(stochastic_rounding_seed, bool) or not isinstance(stochastic_rounding_seed, int) or \
                stochastic_rounding_seed < 0:
            raise ValueError(f"stochastic_rounding_seed must be an int >= 0, got {stochastic_rounding_seed!r}")
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
        self._cached = None          # (model, tensors, addresses, groups, copies) of the last update
        self._stale = False
        self._resync = False         # the model was wrapped in DDP after construction
        self._updates = 0            # updates made: the stochastic-rounding counter
        _watch(self.module, self)
        _watch(_unwrap(model), self)

    def get_decay(self, step: int | None = None) -> float:
        """timm's decay: ``decay`` without a step; with one, 0 until ``update_after_step``, then the
        warm-up ``1 - (1 + s / warmup_gamma) ** -warmup_power`` clamped to [min_decay, decay]."""
        if step is None:
            return self.decay
        return S.PowerWarmup(self.decay, self.min_decay, self.warmup_gamma, self.warmup_power,
                             self.update_after_step, warmup=self.use_warmup)(step)

    def _fresh(self) -> bool:
        return self._updates == 0

    def _restart(self, model: nn.Module) -> None:
        self.set(model)                          # DDP broadcast rank 0's weights after construction

    def _pairs(self, model):
        # Pairing by state_dict() order (as timm) costs a walk of both models; it is cached and
        # rebuilt when either model registers a new tensor or a tensor moves to other memory.
        cached = self._cached
        if cached is not None and cached[0] is model and not self._stale and \
                list(map(torch.Tensor.data_ptr, cached[1])) == cached[2]:
            return cached[3], cached[4]
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
        groups = pair_groups(ema_f, model_f)
        tensors = ema_f + model_f
        _watch(_unwrap(model), self)
        _watch(self.module, self)
        self._cached = (model, tensors, list(map(torch.Tensor.data_ptr, tensors)), groups, copies)
        self._stale = False
        return groups, copies

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        if self._resync:                         # DDP broadcast rank 0's weights after construction
            self._resync = False
            self._restart(model)
        groups, copies = self._pairs(model)
        decay = self.get_decay(step)
        rounding = "stochastic_bf16" if self.stochastic_rounding else "nearest"
        launch_pairs(groups, decay, None, rounding, self.stochastic_rounding_seed, self._updates)
        for e, m in copies:
            e.copy_(m)
        self._updates += 1

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
