"""ema-pytorch's model EMAs, ``EMA`` and ``KarrasEMA``: an averaged copy ``ema_model`` of an
``nn.Module``, updated towards it with one fastema launch per (device, dtype) group."""
from __future__ import annotations

import copy as _copy
import typing

import torch
from torch import nn

from .... import schedules as S
from .._common import AllOrNothingLoad
from ._base import AssertionTypeError, AssertionValueError, _Counters, _device_options, _lerp_towards, _Warmup
from ._pytree import EMAPytree


class _EmaPytorchBase(AllOrNothingLoad, _Counters):
    """What ema-pytorch's ``EMA`` and ``KarrasEMA`` share: the averaged copy ``ema_model``, the
    name filters, the ``initted`` / ``step`` buffers, copies both ways, and the update of one
    module towards another (one fastema launch per group instead of a per-tensor loop)."""

    ema_model: nn.Module | None

    def _made(self) -> nn.Module:
        """The averaged copy, or a clear error while a lazy one (``lazy_init_ema=True``) is not made yet."""
        if self.ema_model is None:
            raise RuntimeError("the EMA copy is not made yet (lazy_init_ema=True): call update() once first")
        return self.ema_model

    def _setup(self, model, ema_model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names,
               allow_different_devices, move_ema_to_online_device, coerce_dtype=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastema.torch.compat.{type(self).__name__} takes an nn.Module, got "
                            f"{type(model).__name__}; for a tree of tensors (a tensor, or a dict / list / tuple "
                            f"of them) use fastema.torch.compat.EMA(tree), which makes an EMAPytree")
        if not isinstance(param_or_buffer_names_no_ema, (set, list)):
            raise AssertionTypeError(f"param_or_buffer_names_no_ema must be a set or a list of names, got "
                                     f"{type(param_or_buffer_names_no_ema).__name__}")
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.move_ema_to_online_device = move_ema_to_online_device
        _device_options(self, allow_different_devices, coerce_dtype)
        self._init_counters()

    def _make_ema_model(self, ema_model):
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        if ema_model is None:
            try:
                ema_model = _copy.deepcopy(self.model)
            except Exception as err:             # as ema-pytorch, but raised, not exit()
                raise TypeError(f"could not deepcopy the model ({err}); pass ema_model= (a module, or a "
                                f"function returning one), e.g. when it has LazyLinear layers") from err
        for p in ema_model.parameters():
            p.detach_()
        self.ema_model = ema_model
        self.parameter_names = {n for n, p in ema_model.named_parameters()
                                if torch.is_floating_point(p) or torch.is_complex(p)}
        self.buffer_names = {n for n, b in ema_model.named_buffers()
                             if torch.is_floating_point(b) or torch.is_complex(b)}

    def eval(self):
        return self._made().eval()

    def restore_ema_model_device(self):
        self._made().to(self.initted.device)

    def get_params_iter(self, model):
        for name, param in model.named_parameters():
            if name in self.parameter_names:
                yield name, param

    def get_buffers_iter(self, model):
        for name, buffer in model.named_buffers():
            if name in self.buffer_names:
                yield name, buffer

    def _tensors(self, model):
        return list(self.get_params_iter(model)) + list(self.get_buffers_iter(model))

    def _paired(self, a_model, b_model) -> list:
        """``(name, a, b)`` of the tracked tensors of both models, paired by name (ema-pytorch pairs
        them by position: a tensor removed from one model since shifts every pair after it), or a
        RuntimeError naming what one of them lacks."""
        a, b = self._tensors(a_model), dict(self._tensors(b_model))
        if len(a) != len(b) or any(n not in b for n, _ in a):
            names = {n for n, _ in a}
            gone = sorted((names ^ set(b)))
            raise RuntimeError(f"the model and its EMA copy no longer hold the same tracked tensors "
                               f"({gone} in one of them only: removed or added since the EMA was "
                               f"made); make the EMA again from the model as it is now")
        return [(n, t, b[n]) for n, t in a]

    def _skipped(self, name: str) -> bool:
        return name in self.ignore_names or any(name.startswith(p) for p in self.ignore_startswith_names)

    @torch.no_grad()
    def _copy_all(self, dst_model, src_model) -> None:
        for _, d, s in self._paired(dst_model, src_model):
            d.data.copy_(s.data if d.device == s.device else s.data.to(d.device))

    def copy_params_from_model_to_ema(self):
        self._copy_all(self._made(), self.model)

    def copy_params_from_ema_to_model(self):
        self._copy_all(self.model, self._made())

    def iter_all_ema_params_and_buffers(self):
        for name, t in self._tensors(self._made()):
            if not self._skipped(name) and name not in self.param_or_buffer_names_no_ema:
                yield t

    @torch.no_grad()
    def _move_towards(self, ma_model, current_model, decay: float) -> None:
        """``ma <- lerp(ma, current, 1 - decay)`` for the tracked tensors; names in
        ``param_or_buffer_names_no_ema`` copied; ignored names left alone."""
        if self.move_ema_to_online_device:
            here, there = next(ma_model.parameters()).device, next(current_model.parameters()).device
            if here != there:
                ma_model.to(there)
        lerp_t, lerp_s = [], []
        for name, c, m in self._paired(current_model, ma_model):
            if self._skipped(name):
                continue
            if name in self.param_or_buffer_names_no_ema:
                m.data.copy_(c.data.to(m.device) if self.allow_different_devices else c.data)
                continue
            if not self.allow_different_devices and c.device != m.device:
                raise RuntimeError(f"{name}: the EMA copy is on {m.device} and the model on {c.device}; pass "
                                   f"allow_different_devices=True (as in ema-pytorch) or move them together")
            lerp_t.append(m.data)
            lerp_s.append(c.data)
        _lerp_towards(lerp_t, lerp_s, decay)

    def __call__(self, *args, **kwargs):
        return self._made()(*args, **kwargs)


class EMA(_EmaPytorchBase, _Warmup):
    """lucidrains ema-pytorch's ``EMA`` (0.8): ``ema_model`` is an averaged copy of the model, with
    the same arguments, schedule (``beta``, ``update_after_step=100``, ``update_every=10``,
    ``inv_gamma``, ``power``, ``min_value``), methods and ``state_dict()`` keys. Each due update
    is one fastema launch per (device, dtype) group over the tracked tensors, bit for bit
    ``torch.lerp_`` (what ema-pytorch runs per tensor); the step counter is mirrored on the
    host, so no ``.item()`` sync per update. Writes to the ``step`` / ``initted`` buffers
    (``ema.step.zero_()``, ``ema.initted.fill_(False)``, a new tensor, a load) are followed: on
    the CPU the buffers are read at every update, as ema-pytorch reads them; on a GPU again when
    their version counters (host integers) or addresses show a change. A GPU buffer written in
    place through ``.data`` (ema-pytorch's own idiom; it bumps no version counter) is not seen
    without that sync: write the buffer itself there (``ema.step.zero_()``; a deviation).

    ``use_foreach`` and ``coerce_dtype`` are accepted (the launch is already one per group, and
    the kernels read any float dtype). As in ema-pytorch 0.8.3, ``EMA(tree, ...)`` with a tensor or
    a tree of tensors (not an ``nn.Module``) makes an :class:`EMAPytree`.

    The warm-up settings are checked at construction (a deviation): ``inv_gamma`` and ``power``
    finite and > 0, ``beta`` and ``min_value`` in [0, 1], ``update_after_step`` an int >= 0.
    ema-pytorch takes a NaN or negative ``inv_gamma`` and averages NaN in; it also takes a
    negative ``min_value`` (no effect) and a float or negative ``update_after_step`` (pass an int
    >= 0; a negative one starts the warm-up early there). An ``update()`` whose decay is
    not in [0, 1] (settings changed after construction) is refused before its step counts.
    """

    def __new__(cls, *args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        if model is not None and not isinstance(model, nn.Module):
            return EMAPytree(*args, **{("pytree" if k == "model" else k): v for k, v in kwargs.items()})
        return super().__new__(cls)

    def __init__(self, model: nn.Module, ema_model=None, beta: float = 0.9999, update_after_step: int = 100,
                 update_every: int = 10, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
                 param_or_buffer_names_no_ema=set(), ignore_names=set(), ignore_startswith_names=set(),
                 include_online_model: bool = True, allow_different_devices: bool = False, use_foreach: bool = False,
                 update_model_with_ema_every: int | None = None, update_model_with_ema_beta: float = 0.0,
                 forward_method_names: tuple = (), move_ema_to_online_device: bool = False,
                 coerce_dtype: bool = False, lazy_init_ema: bool = False):
        super().__init__()
        self._init_warmup(beta, update_after_step, update_every, inv_gamma, power, min_value)
        self.include_online_model = include_online_model
        self.online_model: typing.Any            # ema-pytorch's: the module itself, or hidden in a list
        if include_online_model:
            self.online_model = model
        else:
            self.online_model = [model]
        self._setup(model, ema_model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names,
                    allow_different_devices, move_ema_to_online_device, coerce_dtype)
        self.ema_model = None
        self.forward_method_names = forward_method_names
        if lazy_init_ema:
            if ema_model is not None:
                raise AssertionValueError("lazy_init_ema=True makes the EMA copy at the first update; pass no "
                                          "ema_model=")
        else:
            self.init_ema(ema_model)
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        self.use_foreach = use_foreach

    @property
    def model(self):
        return self.online_model if self.include_online_model else self.online_model[0]

    def init_ema(self, ema_model=None):
        self._make_ema_model(ema_model)
        for name in self.forward_method_names:
            setattr(self, name, getattr(self.ema_model, name))

    def add_to_optimizer_post_step_hook(self, optimizer):
        if not hasattr(optimizer, "register_step_post_hook"):
            raise AssertionTypeError(f"add_to_optimizer_post_step_hook takes a torch.optim.Optimizer (it needs "
                                     f"register_step_post_hook), got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def forward_eval(self, *args, **kwargs):
        ema_model = self._made()
        training = ema_model.training
        out = ema_model(*args, **kwargs)
        ema_model.train(training)
        return out

    def update(self):
        if self.ema_model is not None:
            self._paired(self.model, self.ema_model)        # refused before the step counts
        step, phase = self._phase()
        decay = self._due_decay(step) if phase == "average" and not self.is_frozen else None   # (refused: no step)
        self._advance()
        if phase == "init" or self.ema_model is None:          # (a lazy EMA that loaded initted=True too)
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self._mark_initted()
            return
        if phase == "copy":
            self.copy_params_from_model_to_ema()
            return
        if phase == "average":
            self.update_moving_average(self.ema_model, self.model, decay)
        if self.update_model_with_ema_every is not None and step % self.update_model_with_ema_every == 0:
            self.update_model_with_ema()

    def update_model_with_ema(self, decay: float | None = None):
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        self.update_moving_average(self.model, self._made(), decay)

    def update_moving_average(self, ma_model, current_model, current_decay: float | None = None):
        if self.is_frozen:
            return
        self._move_towards(ma_model, current_model,
                           self.get_current_decay() if current_decay is None else current_decay)


class KarrasEMA(_EmaPytorchBase):
    """ema-pytorch's ``KarrasEMA``: a power-function EMA (EDM2) of width ``sigma_rel`` (or exponent
    ``gamma``), updated on every ``update_every``-th call (default 100, as ema-pytorch).

    **Deviation from ema-pytorch, on purpose:** ema-pytorch uses ``beta = (1 - 1/(step+1)) **
    (gamma+1)`` at every update whatever ``update_every``, which realises another profile when
    ``update_every > 1`` (sigma_rel 0.05 at ``update_every=10`` realises ~0.25). Here the update
    at step ``s`` uses the Delta-t form ``beta = ((t - k) / t) ** (gamma+1)``, ``t = s + 2``,
    ``k = update_every``, so the realised profile is the requested one for any ``update_every``;
    with ``update_every=1`` both are the same numbers. Same arguments, buffers and methods.
    """

    def __init__(self, model: nn.Module, sigma_rel: float | None = None, gamma: float | None = None,
                 ema_model=None, update_every: int = 100, frozen: bool = False,
                 param_or_buffer_names_no_ema=set(), ignore_names=set(), ignore_startswith_names=set(),
                 allow_different_devices: bool = False, move_ema_to_online_device: bool = False):
        super().__init__()
        if (sigma_rel is None) == (gamma is None):
            raise AssertionValueError("give exactly one of sigma_rel= and gamma= (gamma is derived from sigma_rel "
                                      "as in EDM2, then beta from gamma)")
        gamma = S.sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else typing.cast(float, gamma)
        S.gamma_to_sigma_rel(gamma)
        S.check_count("update_every", update_every, 1)
        self.gamma = gamma
        self.frozen = frozen
        self.online_model = [model]
        self._setup(model, ema_model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names,
                    allow_different_devices, move_ema_to_online_device)
        self._make_ema_model(ema_model)
        self.update_every = update_every

    @property
    def model(self):
        return self.online_model[0]

    @property
    def beta(self) -> float:
        """The decay of an update made at the current step (see the class docstring)."""
        t = self._counters()[0] + 1.0
        return S.PowerFunction(self.gamma).between(None, t - self.update_every, t)

    def update(self):
        if self.ema_model is not None:
            self._paired(self.model, self.ema_model)        # refused before the step counts
        step = self._advance()
        if step % self.update_every != 0:
            return
        if not self._counters()[1]:
            self.copy_params_from_model_to_ema()
            self._mark_initted()
        self.update_moving_average(self.ema_model, self.model)

    def update_moving_average(self, ma_model, current_model):
        if self.frozen:
            return
        self._move_towards(ma_model, current_model, self.beta)

