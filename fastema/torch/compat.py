"""Drop-in replacements for the EMA classes users already have, on fastema's kernels.

- :class:`ExponentialMovingAverage`: the torch_ema API (``shadow_params``, ``store``/``restore``, ...).
- :class:`ModelEmaV3`: the timm API (``module``, ``update(model, step)``, ``get_decay``, ``set``).
- :func:`get_ema_multi_avg_fn`: for ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=...)``
  (and so for Lightning's weight-averaging callbacks).
- :class:`EMA`, :class:`KarrasEMA`, :class:`PostHocEMA`: lucidrains ema-pytorch's classes.
- :class:`EMAModel`: diffusers' ``diffusers.training_utils.EMAModel``.

Same arguments and state as the originals; the per-parameter loops become one launch
per (device, dtype) group.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import weakref
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .. import schedules as S
from ..flat import FlatShadow
from ..ops import ema_update_many_, launch_pairs, pair_groups
from . import _unwrap, _watch

__all__ = ["EMA", "EMAModel", "ExponentialMovingAverage", "KarrasEMA", "ModelEmaV3", "PostHocEMA", "get_ema_multi_avg_fn"]


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


# --------------------------------------------------------------------------- ema-pytorch and diffusers

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@torch.no_grad()
def _lerp_pairs(targets: list, sources: list, weight: float) -> None:
    """``targets[i].lerp_(sources[i], weight)`` for every pair: one fastema launch per (device,
    dtype) group for the dtypes the kernels take, torch's own lerp for the rest (complex) and
    for pairs on two devices (``allow_different_devices``)."""
    fast_t, fast_s, slow = [], [], []
    for t, s in zip(targets, sources):
        if t.dtype in _KERNEL_DTYPES and s.dtype in _KERNEL_DTYPES and t.device == s.device:
            fast_t.append(t)
            fast_s.append(s)
        else:
            slow.append((t, s))
    if fast_t:
        ema_update_many_(fast_t, fast_s, weight=weight)
    for t, s in slow:
        t.lerp_(s.to(t.device, t.dtype), weight)


class _EmaPytorchBase(nn.Module):
    """What ema-pytorch's ``EMA`` and ``KarrasEMA`` share: the averaged copy ``ema_model``, the
    name filters, the ``initted`` / ``step`` buffers, copies both ways, and the update of one
    module towards another (one fastema launch per group instead of a per-tensor loop)."""

    def _setup(self, model, ema_model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names,
               allow_different_devices, move_ema_to_online_device, coerce_dtype=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastema.torch.compat.{type(self).__name__} takes an nn.Module, got "
                            f"{type(model).__name__}; for a pytree of tensors use ema_pytorch itself")
        if not isinstance(param_or_buffer_names_no_ema, (set, list)):
            raise TypeError("param_or_buffer_names_no_ema must be a set or a list of names")
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.allow_different_devices = allow_different_devices
        self.move_ema_to_online_device = move_ema_to_online_device
        self.coerce_dtype = coerce_dtype
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self._host = None                        # (step, initted) as Python values: no .item() per update

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

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None                        # step / initted changed: read them again once

    def _counters(self) -> list:
        if self._host is None:
            self._host = [int(self.step), bool(self.initted)]        # one read after construction or a load
        return self._host

    def _advance(self) -> int:
        """``step += 1`` (device buffer and host mirror); returns the step before."""
        host = self._counters()
        before = host[0]
        host[0] += 1
        self.step.add_(1)
        return before

    def _mark_initted(self) -> None:
        self._counters()[1] = True
        self.initted.fill_(True)

    def eval(self):
        return self.ema_model.eval()

    def restore_ema_model_device(self):
        self.ema_model.to(self.initted.device)

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

    def _skipped(self, name: str) -> bool:
        return name in self.ignore_names or any(name.startswith(p) for p in self.ignore_startswith_names)

    @torch.no_grad()
    def _copy_all(self, dst_model, src_model) -> None:
        for (_, d), (_, s) in zip(self._tensors(dst_model), self._tensors(src_model)):
            d.data.copy_(s.data if d.device == s.device else s.data.to(d.device))

    def copy_params_from_model_to_ema(self):
        self._copy_all(self.ema_model, self.model)

    def copy_params_from_ema_to_model(self):
        self._copy_all(self.model, self.ema_model)

    def iter_all_ema_params_and_buffers(self):
        for name, t in self._tensors(self.ema_model):
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
        for (name, c), (_, m) in zip(self._tensors(current_model), self._tensors(ma_model)):
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
        _lerp_pairs(lerp_t, lerp_s, 1.0 - decay)

    def __call__(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)


class EMA(_EmaPytorchBase):
    """lucidrains ema-pytorch's ``EMA`` (0.8): ``ema_model`` is an averaged copy of the model, with
    the same arguments, schedule (``beta``, ``update_after_step=100``, ``update_every=10``,
    ``inv_gamma``, ``power``, ``min_value``), methods and ``state_dict()`` keys. Each due update
    is one fastema launch per (device, dtype) group over the tracked tensors, bit for bit
    ``torch.lerp_`` (what ema-pytorch runs per tensor); the step counter is mirrored on the
    host, so no ``.item()`` sync per update.

    ``use_foreach`` and ``coerce_dtype`` are accepted (the launch is already one per group, and
    the kernels read any float dtype); a pytree (not an ``nn.Module``) is refused.
    """

    def __init__(self, model: nn.Module, ema_model=None, beta: float = 0.9999, update_after_step: int = 100,
                 update_every: int = 10, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
                 param_or_buffer_names_no_ema=set(), ignore_names=set(), ignore_startswith_names=set(),
                 include_online_model: bool = True, allow_different_devices: bool = False, use_foreach: bool = False,
                 update_model_with_ema_every: int | None = None, update_model_with_ema_beta: float = 0.0,
                 forward_method_names: tuple = (), move_ema_to_online_device: bool = False,
                 coerce_dtype: bool = False, lazy_init_ema: bool = False):
        super().__init__()
        S._check_decay("beta", beta)
        S._check_count("update_every", update_every, 1)
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
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
                raise ValueError("lazy_init_ema=True makes the EMA copy at the first update; pass no ema_model=")
        else:
            self.init_ema(ema_model)
        self.update_every, self.update_after_step = update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
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
        return optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def forward_eval(self, *args, **kwargs):
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def get_current_decay(self) -> float:
        """ema-pytorch's warm-up at the current step: 0 until ``update_after_step``, then
        ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
        epoch = max(self._counters()[0] - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        # in float32 on host scalars, as ema-pytorch computes it on its step buffer: the same decay
        value = 1 - (1 + torch.tensor(float(epoch)) / self.inv_gamma) ** -self.power
        return float(value.clamp(min=self.min_value, max=self.beta).numpy())     # a CPU scalar of ours

    def update(self):
        step = self._advance()
        if not self._counters()[1]:
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self._mark_initted()
            return
        due = step % self.update_every == 0
        if due and step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        if due:
            self.update_moving_average(self.ema_model, self.model)
        if self.update_model_with_ema_every is not None and step % self.update_model_with_ema_every == 0:
            self.update_model_with_ema()

    def update_model_with_ema(self, decay: float | None = None):
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        self.update_moving_average(self.model, self.ema_model, decay)

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
            raise ValueError("give exactly one of sigma_rel= and gamma= (gamma is derived from sigma_rel as in "
                             "EDM2, then beta from gamma)")
        if sigma_rel is not None:
            gamma = S.sigma_rel_to_gamma(sigma_rel)
        S.gamma_to_sigma_rel(gamma)
        S._check_count("update_every", update_every, 1)
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


class PostHocEMA(nn.Module):
    """ema-pytorch's ``PostHocEMA``: several :class:`KarrasEMA`, checkpointed every
    ``checkpoint_every_num_steps`` as ``{index}.{step}.pt`` in ``checkpoint_folder`` (ema-pytorch's
    files: a folder written by either can be synthesised by either), and
    ``synthesize_ema_model(sigma_rel=...)`` by EDM2's least squares, as ema-pytorch computes it
    (coefficients not normalised; every checkpoint in the folder).

    Differences: updates use the exact Delta-t profile (see :class:`KarrasEMA`; ema-pytorch's
    profiles are off when ``update_every > 1``, its default being 100); checkpoints are written
    atomically. :class:`fastema.torch.PostHocEMA` is the fast native version (every profile in
    one pass, safetensors snapshots, a residual check).
    """

    def __init__(self, model: nn.Module, ema_model=None, sigma_rels: tuple | None = None, gammas: tuple | None = None,
                 checkpoint_every_num_steps: int | str = 1000, checkpoint_folder: str = "./post-hoc-ema-checkpoints",
                 checkpoint_dtype: torch.dtype = torch.float16, **kwargs):
        super().__init__()
        if (sigma_rels is None) == (gammas is None):
            raise ValueError("give exactly one of sigma_rels= and gammas=")
        if sigma_rels is not None:
            gammas = tuple(S.sigma_rel_to_gamma(s) for s in sigma_rels)
        if len(gammas) < 2:
            raise ValueError("at least 2 profiles with different gammas are needed to synthesise others")
        if len(set(gammas)) != len(gammas):
            raise ValueError(f"the gammas must differ from each other, got {gammas}")
        self.maybe_ema_model = ema_model
        self.gammas = tuple(gammas)
        self.num_ema_models = len(gammas)
        self._model = [model]
        self.ema_models = nn.ModuleList([KarrasEMA(model, ema_model=ema_model, gamma=g, **kwargs) for g in gammas])
        import pathlib

        self.checkpoint_folder = pathlib.Path(checkpoint_folder)
        self.checkpoint_folder.mkdir(exist_ok=True, parents=True)
        self.checkpoint_every_num_steps = checkpoint_every_num_steps
        self.checkpoint_dtype = checkpoint_dtype
        self.ema_kwargs = kwargs

    @property
    def model(self):
        return self._model[0]

    @property
    def step(self):
        return self.ema_models[0].step

    @property
    def device(self):
        return self.step.device

    def copy_params_from_model_to_ema(self):
        for e in self.ema_models:
            e.copy_params_from_model_to_ema()

    def copy_params_from_ema_to_model(self):
        for e in self.ema_models:
            e.copy_params_from_ema_to_model()

    def update(self):
        for e in self.ema_models:
            e.update()
        if self.checkpoint_every_num_steps == "manual":
            return
        if self.ema_models[0]._counters()[0] % self.checkpoint_every_num_steps == 0:
            self.checkpoint()

    def checkpoint(self):
        from .._files import atomic_write as _atomic_write

        step = self.ema_models[0]._counters()[0]
        for i, e in enumerate(self.ema_models):
            pkg = {k: v.to(device="cpu", dtype=self.checkpoint_dtype, copy=True) for k, v in e.state_dict().items()}
            _atomic_write(str(self.checkpoint_folder / f"{i}.{step}.pt"), lambda f, pkg=pkg: torch.save(pkg, f))

    def synthesize_ema_model(self, gamma: float | None = None, sigma_rel: float | None = None,
                             step: int | None = None) -> KarrasEMA:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError("give exactly one of gamma= and sigma_rel=")
        if sigma_rel is not None:
            gamma = S.sigma_rel_to_gamma(sigma_rel)
        files = sorted(self.checkpoint_folder.glob("*.pt"))
        if not files:
            raise FileNotFoundError(f"no checkpoints in {self.checkpoint_folder}: call update() or checkpoint() first")
        idx, steps = zip(*(map(int, f.stem.split(".")) for f in files))
        last = max(steps)
        step = last if step is None else step
        if step > last:
            raise ValueError(f"you can only synthesize for a timestep that is less than the max timestep {last}")
        from ..posthoc import profile_dot

        t_i = np.asarray(steps, np.float64)
        g_i = np.asarray([self.gammas[i] for i in idx], np.float64)
        A = profile_dot(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
        b = profile_dot(t_i, g_i, float(step), gamma)
        weights = torch.linalg.solve(torch.from_numpy(A), torch.from_numpy(b)[:, None])[:, 0].tolist()
        synthesized = KarrasEMA(self.model, ema_model=self.maybe_ema_model, gamma=gamma, **self.ema_kwargs)
        scratch = KarrasEMA(self.model, ema_model=self.maybe_ema_model, gamma=gamma, **self.ema_kwargs)
        for n, (f, w) in enumerate(zip(files, weights)):
            scratch.load_state_dict(torch.load(str(f), weights_only=True))
            with torch.no_grad():
                for c, s in zip(scratch.iter_all_ema_params_and_buffers(), synthesized.iter_all_ema_params_and_buffers()):
                    if n == 0:
                        s.zero_()
                    s.add_(c * w)
        return synthesized

    def __call__(self, *args, **kwargs):
        return tuple(e(*args, **kwargs) for e in self.ema_models)


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
    refused at ``step`` with the fix (diffusers fails inside torch).
    """

    def __init__(self, parameters, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3, foreach: bool = False,
                 model_cls=None, model_config=None, **kwargs):
        if isinstance(parameters, nn.Module):      # deprecated in diffusers, kept as diffusers keeps it
            parameters = parameters.parameters()
            use_ema_warmup = True
        if kwargs.get("max_value") is not None:
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            min_decay = kwargs["min_value"]
        S.check_power_args(decay, min_decay, inv_gamma, power, update_after_step)
        parameters = list(parameters)
        self.shadow_params = [p.clone().detach() for p in parameters]
        if kwargs.get("device") is not None:
            self.to(device=kwargs["device"])
        self.temp_stored_params = None
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0
        self.cur_decay_value = None
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
        grads = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        if grads:
            _lerp_pairs([s for s, _ in grads], [p for _, p in grads], 1.0 - decay)
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
        checks = {"min_decay": float, "optimization_step": int, "update_after_step": int, "use_ema_warmup": bool,
                  "inv_gamma": (float, int), "power": (float, int)}
        for key, kind in checks.items():
            if not isinstance(new[key], kind):
                raise ValueError(f"Invalid {key}")
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
        for k, v in new.items():
            setattr(self, k, v)
        if shadow is not None:
            self.shadow_params = shadow
