"""diffusers' ``EMAModel`` (``diffusers.training_utils``, 0.3x-0.42) on fastema's kernels.

Deviations (documented on the class): the update is ``torch.lerp`` (one rounding) where diffusers
computes ``s - (1 - d) * (s - p)`` (two), so the two agree to float32 rounding, not bit for bit;
a shadow on another device than its parameter is refused at ``step`` with the fix;
``load_state_dict`` checks everything before changing anything, the settings' ranges too; the
deprecation warnings (``FutureWarning``) point at the caller (diffusers' at its own method).
"""
from __future__ import annotations

import copy as _copy
import warnings

import torch
from torch import nn

from ... import schedules as S
from ._common import check_loaded, lerp_pairs

__all__ = ["EMAModel"]


def _deprecated(message: str, frames: int = 1) -> None:
    """diffusers' ``deprecate(..., standard_warn=False)``: a ``FutureWarning`` with its message,
    pointing at the caller of the ``EMAModel`` method (diffusers' points inside the method),
    ``frames`` calls up from it (2 through ``torch.no_grad``'s wrapper)."""
    warnings.warn(message, FutureWarning, stacklevel=2 + frames)


class EMAModel:
    """diffusers' ``EMAModel`` (``diffusers.training_utils``, 0.3x-0.42): ``shadow_params`` are
    copies of the parameters in their own dtype and device, and ``step(parameters)`` updates
    them with diffusers' schedule (``get_decay``: 0 until ``update_after_step``, then
    ``(1 + s) / (10 + s)``, or the power warm-up with ``use_ema_warmup=True``, clamped to
    ``[min_decay, decay]``) in one fastema launch per (device, dtype) group; parameters with
    ``requires_grad=False`` are copied, as in diffusers. ``copy_to``, ``store``/``restore``,
    ``to``/``pin_memory`` (offloading the shadow as diffusers' ``--offload_ema`` does:
    ``to("cuda")`` before ``step``, ``to("cpu")`` after), ``state_dict``/``load_state_dict``
    (the same dict, accelerate-compatible) and ``save_pretrained``/``from_pretrained`` (with a
    diffusers model class) behave as diffusers'. ``foreach`` is accepted; the update is one
    launch per group either way.

    Numbers: diffusers computes ``s - (1 - d) * (s - p)`` (two float32 roundings); fastema
    computes ``torch.lerp`` (one rounding), so the two agree to float32 rounding (a relative
    ~1e-7 per update), not bit for bit. A shadow on another device than its parameter is
    refused at ``step`` with the fix (diffusers fails inside torch). ``load_state_dict`` checks
    the settings' ranges as the constructor does (``decay`` and ``min_decay`` in [0, 1],
    ``inv_gamma`` and ``power`` finite and > 0, ``update_after_step`` and ``optimization_step``
    ints >= 0) and refuses one out of range by name before anything changes: diffusers checks
    types only, and then clamps to ``min_decay 2.0`` (an average that extrapolates) or divides
    by ``inv_gamma 0`` at a later ``step``. What diffusers deprecates warns as diffusers 0.42 warns
    (the same ``FutureWarning`` messages): an ``nn.Module`` passed to the constructor (which then
    turns ``use_ema_warmup`` on, whatever was passed, as diffusers does) or to ``step``, and the
    ``max_value=``, ``min_value=`` and ``device=`` arguments.
    """

    def __init__(self, parameters, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3, foreach: bool = False,
                 model_cls=None, model_config=None, **kwargs):
        if isinstance(parameters, nn.Module):      # deprecated in diffusers, kept as diffusers keeps it
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. "
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
            use_ema_warmup = True                  # (whatever was passed: diffusers' backward compatibility)
        if kwargs.get("max_value") is not None:
            _deprecated("The `max_value` argument is deprecated. Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("The `min_value` argument is deprecated. Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        S.check_power_args(decay, min_decay, inv_gamma, power, update_after_step)
        parameters = list(parameters)
        self.shadow_params = [p.clone().detach() for p in parameters]
        if kwargs.get("device") is not None:
            _deprecated("The `device` argument is deprecated. Please use `to` instead.")
            self.to(device=kwargs["device"])
        self.temp_stored_params: list[torch.Tensor] | None = None
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0
        self.cur_decay_value: float | None = None
        self.foreach = foreach
        self.model_cls, self.model_config = model_cls, model_config

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False) -> "EMAModel":
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema.load_state_dict(ema_kwargs)
        return ema

    def save_pretrained(self, path) -> None:
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state = self.state_dict()
        state.pop("shadow_params", None)
        model.register_to_config(**state)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        if self.use_ema_warmup:                       # the warm-up of timm / ema-pytorch, as in diffusers
            return S.PowerWarmup(self.decay, self.min_decay, self.inv_gamma, self.power,
                                 self.update_after_step)(optimization_step)
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        return max(min((1 + step) / (10 + step), self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters) -> None:
        if isinstance(parameters, nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated. "
                        "Please pass the parameters of the module instead.", frames=2)
            parameters = parameters.parameters()
        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"step() got {len(parameters)} parameters, this EMAModel tracks "
                             f"{len(self.shadow_params)}")
        for i, (s, p) in enumerate(zip(self.shadow_params, parameters)):
            if s.device != p.device:
                raise RuntimeError(f"shadow_params[{i}] is on {s.device} and its parameter on {p.device}: move the "
                                   f"EMA beside the model first (ema.to({str(p.device)!r})), as diffusers' "
                                   f"--offload_ema does before step()")
        decay = self.get_decay(self.optimization_step + 1)
        grads = [i for i, p in enumerate(parameters) if p.requires_grad]
        if grads:
            lerp_pairs([self.shadow_params[i] for i in grads], [parameters[i] for i in grads], 1.0 - decay,
                       names=("shadow_params", "parameters"), at=grads)
        for s, p in zip(self.shadow_params, parameters):
            if not p.requires_grad:
                s.copy_(p)
        self.optimization_step += 1
        self.cur_decay_value = decay

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for s, p in zip(self.shadow_params, list(parameters)):
            p.data.copy_(s.to(p.device).data)

    def pin_memory(self) -> None:
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        self.shadow_params = [p.to(device=device, dtype=dtype, non_blocking=non_blocking) if p.is_floating_point()
                              else p.to(device=device, non_blocking=non_blocking) for p in self.shadow_params]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params}

    def store(self, parameters) -> None:
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        for c, p in zip(self.temp_stored_params, parameters):
            p.data.copy_(c.data)
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: dict) -> None:
        """diffusers' checks, all made before anything changes (diffusers sets fields as it
        checks them); the shadow tensors must match the tracked shapes."""
        state_dict = _copy.deepcopy(state_dict)
        new = {k: state_dict.get(k, getattr(self, k)) for k in
               ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                "power")}
        if not 0.0 <= new["decay"] <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        checks: dict[str, type | tuple[type, ...]] = {
            "min_decay": float, "optimization_step": int, "update_after_step": int, "use_ema_warmup": bool,
                  "inv_gamma": (float, int), "power": (float, int)}
        for key, kind in checks.items():
            if not isinstance(new[key], kind):
                raise ValueError(f"Invalid {key}")
        try:                                      # the constructor's ranges, whatever the warm-up
            S.check_power_args(*(new[k] for k in ("decay", "min_decay", "inv_gamma", "power",
                                                  "update_after_step")))
            S.check_count("optimization_step", new["optimization_step"])
        except ValueError as err:
            raise ValueError(f"load_state_dict: the state dict's {err}; nothing was loaded (a "
                             f"damaged checkpoint, or settings diffusers' step would fail or "
                             f"misbehave on)") from None
        shadow = state_dict.get("shadow_params")
        if shadow is not None:
            if not isinstance(shadow, list):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(p, torch.Tensor) for p in shadow):
                raise ValueError("shadow_params must all be Tensors")
            if len(shadow) != len(self.shadow_params) or \
                    any(a.shape != b.shape for a, b in zip(shadow, self.shadow_params)):
                raise ValueError(f"shadow_params do not match the {len(self.shadow_params)} tracked parameters' "
                                 f"shapes: a checkpoint of another model")
            for i, (a, b) in enumerate(zip(shadow, self.shadow_params)):
                check_loaded(f"shadow_params[{i}]", a, b)
        for k, v in new.items():
            setattr(self, k, v)
        if shadow is not None:
            self.shadow_params = shadow
