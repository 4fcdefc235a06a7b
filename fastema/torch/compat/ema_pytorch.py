"""lucidrains ema-pytorch's ``EMA``, ``KarrasEMA`` and ``PostHocEMA`` (ema-pytorch 0.8) on fastema's kernels.

Deviations (documented on each class): an ``nn.Module`` only (a pytree is refused); a model that
cannot be deep-copied raises (ema-pytorch exits); ``KarrasEMA`` uses the Delta-t decay, so the
realised profile is the requested one for any ``update_every`` (the same numbers at
``update_every=1``); ``PostHocEMA`` writes its checkpoints atomically.
"""
from __future__ import annotations

import copy as _copy

import numpy as np
import torch
from torch import nn

from ... import schedules as S
from ._common import _lerp_pairs

__all__ = ["EMA", "KarrasEMA", "PostHocEMA"]


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
        self._seen = None                        # the buffers (and version counters) _host was read from

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

    def _buffers_now(self) -> tuple:
        """Which ``step`` / ``initted`` tensors the module holds and their version counters: host
        integers that every in-place write bumps (``ema.step.zero_()``, ``initted.fill_(False)``,
        a load), so a change is seen without reading the device."""
        step, initted = self._buffers["step"], self._buffers["initted"]
        try:
            return step, initted, step._version, initted._version
        except RuntimeError:                     # inference tensors keep no version: read every time
            return None

    def _counters(self) -> list:
        """``[step, initted]`` as Python values, read from the buffers once and again only after
        something else wrote them or replaced them (no ``.item()`` per update)."""
        seen = self._buffers_now()
        if self._host is None or seen is None or self._seen is None or seen[2:] != self._seen[2:] or \
                seen[0] is not self._seen[0] or seen[1] is not self._seen[1]:
            self._host = [int(self.step), bool(self.initted)]
            self._seen = seen
        return self._host

    def _wrote(self) -> None:
        """After this module's own write to a buffer: its new version is already in ``_host``."""
        if self._seen is not None:
            self._seen = self._buffers_now()

    def _advance(self) -> int:
        """``step += 1`` (device buffer and host mirror); returns the step before."""
        host = self._counters()
        before = host[0]
        host[0] += 1
        self.step.add_(1)
        self._wrote()
        return before

    def _mark_initted(self) -> None:
        self._counters()[1] = True
        self.initted.fill_(True)
        self._wrote()

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
    host, so no ``.item()`` sync per update. Writes to the ``step`` / ``initted`` buffers
    (``ema.step.zero_()``, ``ema.initted.fill_(False)``, a new tensor, a load) are followed: the
    buffers are read again when their version counters (host integers) show a change.

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
        from ..._files import atomic_write as _atomic_write

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
        from ...posthoc import profile_dot

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
                pairs = zip(scratch.iter_all_ema_params_and_buffers(), synthesized.iter_all_ema_params_and_buffers())
                for c, s in pairs:
                    if n == 0:
                        s.zero_()
                    s.add_(c * w)
        return synthesized

    def __call__(self, *args, **kwargs):
        return tuple(e(*args, **kwargs) for e in self.ema_models)
