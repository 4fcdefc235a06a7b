"""lucidrains ema-pytorch's ``EMA``, ``KarrasEMA``, ``PostHocEMA`` (0.8) and 0.8.3's ``EMAPytree``
(``EMATensor``: ``EMA(tree)``) and ``EMAModuleWrapper``, on fastema's kernels.

Deviations (documented on each class): a model that cannot be deep-copied raises (ema-pytorch
exits); ``KarrasEMA`` uses the Delta-t decay, so the realised profile is the requested one for
any ``update_every`` (the same numbers at ``update_every=1``); ``PostHocEMA`` writes its
checkpoints atomically; ``EMAPytree``'s ``state_dict()`` holds the averaged tensors
(``ema_pytree.<path>``; ema-pytorch's only the counters), a tree whose structure or shapes
changed is refused before anything changes, integer leaves are copied, not averaged;
``EMAModuleWrapper`` checks every route before hooking any, and refuses ``ema=`` with EMA
arguments.
"""
from __future__ import annotations

import copy as _copy
import functools
import inspect
import typing

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree

from ... import schedules as S
from ...ops import cached_pair_groups, launch_pairs
from ._common import lerp_pairs

__all__ = ["EMA", "EMAModuleWrapper", "EMAPytree", "EMATensor", "KarrasEMA", "PostHocEMA"]


def _inplace_copy(tgt: torch.Tensor, src: torch.Tensor, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_copy`` attribute): ``tgt.copy_(src)``, ``src``
    moved to ``tgt``'s device and cast to its dtype first when asked. The classes here do not
    use it: their copies and averages are batched."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    tgt.copy_(src)


def _inplace_lerp(tgt: torch.Tensor, src: torch.Tensor, weight, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_lerp`` attribute): ``tgt.lerp_(src, weight)``,
    ``src`` moved / cast first when asked. The classes here average with fastema's kernels."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    tgt.lerp_(src, weight)


def _helpers(ema, allow_different_devices: bool, coerce_dtype: bool) -> None:
    ema.inplace_copy = functools.partial(_inplace_copy, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)
    ema.inplace_lerp = functools.partial(_inplace_lerp, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)


class _Counters(nn.Module):
    """ema-pytorch's ``initted`` / ``step`` buffers with a host mirror: the counters are read from
    the device once, and again only after something else wrote or replaced the buffers (no
    ``.item()`` per update, where ema-pytorch reads both at every call)."""

    def _init_counters(self) -> None:
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self._host: list | None = None           # [step, initted] as Python values: no .item() per update
        self._seen: tuple | None = None          # the buffers (and version counters) _host was read from

    def _buffer(self, name: str) -> torch.Tensor:
        return typing.cast(torch.Tensor, self._buffers[name])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None                        # step / initted changed: read them again once

    def _buffers_now(self) -> tuple | None:
        """Which ``step`` / ``initted`` tensors the module holds and their version counters: host
        integers that every in-place write bumps (``ema.step.zero_()``, ``initted.fill_(False)``,
        a load), so a change is seen without reading the device."""
        step, initted = self._buffer("step"), self._buffer("initted")
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
            self._host = [int(self._buffer("step")), bool(self._buffer("initted"))]
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
        self._buffer("step").add_(1)
        self._wrote()
        return before

    def _mark_initted(self) -> None:
        self._counters()[1] = True
        self._buffer("initted").fill_(True)
        self._wrote()


def _warmup_decay(ema) -> float:
    """ema-pytorch's warm-up at ``ema``'s current step: 0 until ``update_after_step``, then
    ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
    epoch = max(ema._counters()[0] - ema.update_after_step - 1, 0)
    if epoch <= 0:
        return 0.0
    # in float32 on host scalars, as ema-pytorch computes it on its step buffer: the same decay
    value = 1 - (1 + torch.tensor(float(epoch)) / ema.inv_gamma) ** -ema.power
    return float(value.clamp(min=ema.min_value, max=ema.beta).numpy())     # a CPU scalar of ours


class _EmaPytorchBase(_Counters):
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
            raise TypeError("param_or_buffer_names_no_ema must be a set or a list of names")
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.allow_different_devices = allow_different_devices
        self.move_ema_to_online_device = move_ema_to_online_device
        self.coerce_dtype = coerce_dtype
        _helpers(self, allow_different_devices, coerce_dtype)
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

    def _skipped(self, name: str) -> bool:
        return name in self.ignore_names or any(name.startswith(p) for p in self.ignore_startswith_names)

    @torch.no_grad()
    def _copy_all(self, dst_model, src_model) -> None:
        for (_, d), (_, s) in zip(self._tensors(dst_model), self._tensors(src_model)):
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
        lerp_pairs(lerp_t, lerp_s, 1.0 - decay)

    def __call__(self, *args, **kwargs):
        return self._made()(*args, **kwargs)


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
    the kernels read any float dtype). As in ema-pytorch 0.8.3, ``EMA(tree, ...)`` with a tensor or
    a tree of tensors (not an ``nn.Module``) makes an :class:`EMAPytree`.
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
        S._check_decay("beta", beta)
        S._check_count("update_every", update_every, 1)
        self.beta = beta
        self.is_frozen = beta == 1.0
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
        ema_model = self._made()
        training = ema_model.training
        out = ema_model(*args, **kwargs)
        ema_model.train(training)
        return out

    def get_current_decay(self) -> float:
        """ema-pytorch's warm-up at the current step: 0 until ``update_after_step``, then
        ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
        return _warmup_decay(self)

    def update(self):
        step = self._advance()
        if not self._counters()[1] or self.ema_model is None:   # (a lazy EMA that loaded initted=True too)
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
            raise ValueError("give exactly one of sigma_rel= and gamma= (gamma is derived from sigma_rel as in "
                             "EDM2, then beta from gamma)")
        gamma = S.sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else typing.cast(float, gamma)
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
        gammas = tuple(S.sigma_rel_to_gamma(s) for s in sigma_rels) if sigma_rels is not None else \
            tuple(typing.cast(tuple, gammas))
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


# ------------------------------------------------------------------ tensor trees (ema-pytorch 0.8.3 EMAPytree)

def _leaf_name(path: tuple) -> str:
    """``ema_pytree`` and the dotted path of a leaf (``ema_pytree.w``, ``ema_pytree.layers.0``): its
    ``state_dict()`` key."""
    parts = ["ema_pytree"]
    for k in path:
        for attr in ("key", "idx", "name"):          # MappingKey, SequenceKey, GetAttrKey (namedtuples)
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


class EMAPytree(_Counters):
    """ema-pytorch 0.8.3's ``EMAPytree`` (also ``EMATensor``, and what ``EMA(tree)`` returns): the
    EMA of a tensor, or of a tree of tensors (nested dicts / lists / tuples / namedtuples, as
    ``torch.utils._pytree`` flattens them), with :class:`EMA`'s schedule (``beta``,
    ``update_after_step=100``, ``update_every=10``, ``inv_gamma``, ``power``, ``min_value``) and
    its buffers ``initted`` / ``step``::

        ema_tree <- lerp(ema_tree, tree, 1 - decay)     # each floating tensor leaf, at each due update

    ``ema_pytree`` (also ``ema_model``) is a deep copy of ``pytree`` (or the tree given as
    ``ema_pytree=``, or made by it when it is a function); ``ema()`` returns it (or calls it, when
    it is callable, as ema-pytorch does). The online tree is read again at every ``update()``, so
    a training loop that replaces its tensors (``params = {k: p - lr * g[k] ...}``) and writes
    the new ones into the same tree is followed. Each due update is one fastema launch per
    (device, dtype) group, bit for bit ``torch.lerp_`` (ema-pytorch's per-tensor loop), and reads
    no tensor value on the host.

    Deviations from ema-pytorch, on purpose:

    - ``state_dict()`` also holds the averaged tensors, under ``ema_pytree.<path>`` (``ema_pytree``
      alone for a bare tensor): ema-pytorch's holds only ``initted`` and ``step``, so its round
      trip loses the average. Its state dict loads into this class with ``strict=False`` (the
      counters; the average is kept as it is); a strict load of one says so and loads nothing.
      This one loads into ema-pytorch's with ``strict=False``.
    - A tree whose structure, tensor shapes or devices no longer match the EMA copy's is refused
      with the leaf's path, before anything changes (``step`` included); ema-pytorch pairs the
      leaves in order and fails midway, or averages the wrong pairs.
    - Integer and bool tensor leaves are copied at each due update, never averaged
      (ema-pytorch's ``lerp_`` fails on them). Non-tensor leaves are left alone, as ema-pytorch does.
    - A tensor that sits at two places of the tree (a tied weight; the deep copy keeps it one
      tensor) is averaged once per update; ema-pytorch's loop averages it twice.
    - ``ema_pytree=`` given as a function (with no tensors of its own) is called, as its type hint
      says (ema-pytorch's check never calls it). A tree with no tensor, or an ``nn.Module`` (use
      :class:`EMA`), is refused; ``beta`` and ``update_every`` are checked.
    - ``allow_different_devices`` and ``coerce_dtype`` are accepted (pairs on two devices are
      averaged by torch, the kernels read any float dtype).
    """

    def __init__(self, pytree, ema_pytree=None, beta: float = 0.9999, update_after_step: int = 100,
                 update_every: int = 10, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
                 allow_different_devices: bool = False, coerce_dtype: bool = False):
        super().__init__()
        S._check_decay("beta", beta)
        S._check_count("update_every", update_every, 1)
        if isinstance(pytree, nn.Module):
            raise TypeError("EMAPytree takes a tensor or a tree of tensors, got an nn.Module; use "
                            "fastema.torch.compat.EMA(model) for a module")
        with_paths, spec = _pytree.tree_flatten_with_path(pytree)
        self._spec = spec                                # the structure both trees keep
        self._tensor_at = [i for i, (_, leaf) in enumerate(with_paths) if torch.is_tensor(leaf)]
        if not self._tensor_at:
            raise ValueError(f"the tree has no tensor to average (its leaves: "
                             f"{[type(leaf).__name__ for _, leaf in with_paths][:8]}); pass a tensor or a "
                             f"dict / list / tuple of tensors")
        self._names = [_leaf_name(path) for path, _ in with_paths]
        names = [self._names[i] for i in self._tensor_at]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two leaves of the tree have the same state_dict key {twice[0]!r} (keys such as "
                             f"'a.b' and 'a' -> 'b', or 1 and '1'); rename one")
        if ema_pytree is not None and callable(ema_pytree) and not any(
                torch.is_tensor(leaf) for leaf in _pytree.tree_leaves(ema_pytree)):
            ema_pytree = ema_pytree()                    # a function making the EMA copy
        if ema_pytree is None:
            try:
                ema_pytree = _copy.deepcopy(pytree)
            except Exception as err:
                raise TypeError(f"could not deepcopy the tree ({err}); pass ema_pytree= (a tree of the same "
                                f"structure, or a function returning one)") from err
        ema_leaves = _pytree.tree_leaves(ema_pytree)
        if len(ema_leaves) != len(with_paths):
            raise ValueError(f"ema_pytree= does not match pytree: {len(ema_leaves)} leaves, not {len(with_paths)}")
        self._float_at = [i for i in self._tensor_at if torch.is_tensor(ema_leaves[i]) and
                          (torch.is_floating_point(ema_leaves[i]) or torch.is_complex(ema_leaves[i]))]
        self._float_set = frozenset(self._float_at)
        self._other_at = [i for i in self._tensor_at if i not in self._float_set]
        try:
            self._pairs(ema_pytree, pytree)              # the EMA copy matches the tree
        except ValueError as err:
            raise ValueError(f"ema_pytree= does not match pytree: {err}") from None
        self.online_pytree = [pytree]                    # a list: never registered as a submodule
        self.__dict__["ema_pytree"] = ema_pytree         # a plain attribute (ema-pytorch's) even for a Parameter
        for leaf in _pytree.tree_leaves(ema_pytree):
            if torch.is_tensor(leaf):
                leaf.detach_()
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.allow_different_devices = allow_different_devices
        self.coerce_dtype = coerce_dtype
        _helpers(self, allow_different_devices, coerce_dtype)
        self.update_every, self.update_after_step = update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self._init_counters()

    @property
    def pytree(self):
        """The online tree (the one training changes)."""
        return self.online_pytree[0]

    @property
    def ema_model(self):
        """The averaged tree, ``ema_pytree`` (ema-pytorch's name for it on every class)."""
        return self.ema_pytree

    def _pairs(self, ma_tree, current_tree, what: str = "pytree") -> tuple[tuple, tuple]:
        """``(average, copy)``: ``(targets, sources, groups)`` of the floating tensor leaves of two
        trees of the recorded structure (``groups``: the launch groups of an earlier update over
        the same memory in the same layout, else None) and ``(targets, sources)`` of the other
        tensor leaves; or a ``ValueError`` naming the first leaf that does not match (shapes are
        host metadata: no device read)."""
        ma, ma_spec = _pytree.tree_flatten(ma_tree)
        cur, cur_spec = _pytree.tree_flatten(current_tree)
        for name, spec, tree in ((what, cur_spec, current_tree), ("ema_pytree", ma_spec, ma_tree)):
            if spec != self._spec:
                raise self._structure_error(name, tree)
        avg_t, avg_s = [ma[i] for i in self._float_at], [cur[i] for i in self._float_at]
        copy_t, copy_s = [ma[i] for i in self._other_at], [cur[i] for i in self._other_at]
        # a hit: these tensors, in this layout, passed every check below at an earlier update
        groups = cached_pair_groups(avg_t, avg_s) if avg_t else None
        for i in (self._other_at if groups is not None else self._tensor_at):
            m, c = ma[i], cur[i]
            if not (torch.is_tensor(m) and torch.is_tensor(c)):
                raise ValueError(f"{self._names[i]} is a {type(c if torch.is_tensor(m) else m).__name__}, not a "
                                 f"tensor as when the EMA was made; keep the tree's tensors tensors")
            if m.shape != c.shape:
                raise ValueError(f"{self._names[i]} has shape {tuple(c.shape)} but its EMA copy {tuple(m.shape)}; "
                                 f"was the tree changed after the EMA was made? Make a new EMA")
            if m.device != c.device and not self.allow_different_devices:
                raise ValueError(f"{self._names[i]}: the EMA copy is on {m.device} and the tree on {c.device}; "
                                 f"pass allow_different_devices=True (as in ema-pytorch) or move them together")
            if (torch.is_floating_point(m) or torch.is_complex(m)) != (i in self._float_set):
                raise ValueError(f"{self._names[i]}'s EMA copy changed from a floating to an integer dtype or back "
                                 f"(now {m.dtype}); keep its dtype, or make a new EMA")
        return (avg_t, avg_s, groups), (copy_t, copy_s)

    def _structure_error(self, name: str, tree) -> ValueError:
        """What changed in ``tree``'s structure, in leaf paths (a few of each), as an error."""
        now = [_leaf_name(path) for path, _ in _pytree.tree_flatten_with_path(tree)[0]]
        gone = [n for n in self._names if n not in set(now)][:3]
        new = [n for n in now if n not in set(self._names)][:3]
        what = (f"gone: {gone}; new: {new}" if gone or new else
                "the same paths in other containers (a list that became a tuple, reordered keys, ...)")
        return ValueError(f"the structure of {name} changed since the EMA was made ({what}); keep the tree's "
                          f"keys and nesting, or make a new EMA")

    @staticmethod
    @torch.no_grad()
    def _copy(targets: list, sources: list) -> None:
        same = [(t, s) for t, s in zip(targets, sources) if t.device == s.device]
        if same:
            torch._foreach_copy_([t for t, _ in same], [s for _, s in same])
        for t, s in zip(targets, sources):
            if t.device != s.device:
                t.copy_(s)

    def copy_params_from_pytree_to_ema(self) -> None:
        """Copy every tensor of the tree into the EMA copy (the first update and the warm-up do)."""
        average, copy = self._pairs(self.ema_pytree, self.pytree)
        self._copy(average[0] + copy[0], average[1] + copy[1])

    def get_current_decay(self) -> float:
        """ema-pytorch's warm-up at the current step: 0 until ``update_after_step``, then
        ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
        return _warmup_decay(self)

    def update(self) -> None:
        """ema-pytorch's ``update()``: the first call copies the tree; then every ``update_every``-th
        call copies it until ``update_after_step``, and averages it after. A tree that no longer
        matches is refused before the step counter moves."""
        average, copy = self._pairs(self.ema_pytree, self.pytree)
        step = self._advance()
        if not self._counters()[1]:
            self._copy(average[0] + copy[0], average[1] + copy[1])
            self._mark_initted()
            return
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self._copy(average[0] + copy[0], average[1] + copy[1])
            return
        self._move(average, copy, None)

    def update_moving_average(self, ma_pytree, current_pytree, current_decay: float | None = None) -> None:
        """``ma_pytree <- lerp(ma_pytree, current_pytree, 1 - decay)`` for two trees of the EMA's
        structure (``decay``: ``current_decay``, else :meth:`get_current_decay`)."""
        if self.is_frozen:
            return
        self._move(*self._pairs(ma_pytree, current_pytree), current_decay)

    def _move(self, average: tuple, copy: tuple, decay: float | None) -> None:
        if self.is_frozen:
            return
        decay = self.get_current_decay() if decay is None else decay
        targets, sources, groups = average
        if groups is not None:
            launch_pairs(groups, None, 1.0 - decay, "nearest", 0, 0)
        else:
            lerp_pairs(targets, sources, 1.0 - decay)
        if copy[0]:
            self._copy(*copy)

    def __call__(self, *args, **kwargs):
        if callable(self.ema_pytree):
            return self.ema_pytree(*args, **kwargs)
        return self.ema_pytree

    # state_dict: initted, step (ema-pytorch's keys), then ema_pytree.<path> for each tensor leaf

    def _leaves(self) -> list:
        """``[(key, tensor)]`` of the EMA copy's tensor leaves."""
        leaves, spec = _pytree.tree_flatten(self.ema_pytree)
        if spec != self._spec:
            raise self._structure_error("ema_pytree", self.ema_pytree)
        return [(self._names[i], leaves[i]) for i in self._tensor_at]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self._leaves():
            destination[prefix + name] = t if keep_vars else t.detach()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: every key is checked (presence under
        ``strict``, tensors, shapes) before ``initted``, ``step`` or an averaged tensor is written.
        ``strict=False`` takes ema-pytorch's state dict (``initted`` and ``step`` only)."""
        self._strict_load: bool | None = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._strict_load = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch passes strict=True here whatever the caller asked; load_state_dict above says it
        strict = getattr(self, "_strict_load", None)
        mine = [("initted", self.initted), ("step", self.step)] + self._leaves()
        expected = {prefix + name for name, _ in mine}
        errors, missing = [], []
        for name, t in mine:
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            value = state_dict[key]
            if not torch.is_tensor(value):
                errors.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif value.shape != t.shape:
                errors.append(f"size mismatch for {key}: copying a tensor with shape {tuple(value.shape)} from "
                              f"the checkpoint, the shape in the EMA is {tuple(t.shape)}")
        unexpected = [k for k in state_dict if k.startswith(prefix) and k not in expected]
        missing_keys.extend(missing)                      # torch raises on them when the load is strict
        unexpected_keys.extend(unexpected)
        if strict and len([k for k in missing if k not in (prefix + "initted", prefix + "step")]) == len(mine) - 2:
            errors.append("the state dict holds no averaged tensor (ema-pytorch's EMAPytree saves only initted "
                          "and step): nothing was loaded; pass strict=False to load the counters and keep the "
                          "average as it is, or load a state dict of fastema's EMAPytree")
        error_msgs.extend(errors)
        if errors or (strict and (missing or unexpected)):
            return                                        # nothing of this module was changed
        with torch.no_grad():
            for name, t in mine:
                if prefix + name in state_dict:
                    t.copy_(state_dict[prefix + name])
        self._host = None                                 # step / initted changed: read them again once


EMATensor = EMAPytree


# ------------------------------------------------------------------ EMAModuleWrapper (ema-pytorch 0.8.3)

class _KwargSpec(typing.NamedTuple):
    """One routing of ``EMAModuleWrapper``: the EMA copy's submodule ``ema_path``'s output (through
    ``transform``) goes to the online submodule ``receiver_path`` as keyword ``kwarg_name``."""
    receiver_path: str
    ema_path: str
    kwarg_name: str
    transform: typing.Callable | None = None


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    if not path or path == ".":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"ema_module_kwargs: {what} {path!r} is not a submodule of the model ({err}); use a "
                         f"name from model.named_modules()") from None


def _parse_specs(model: nn.Module, ema_module_kwargs, default_kwarg: str) -> list:
    """ema-pytorch's ``parse_ema_module_kwargs``: a list / tuple / set of paths (each receives its
    own EMA copy's output as ``default_kwarg``) or a dict ``receiver -> value``, the value a
    submodule path (its EMA copy's output), a keyword name (the receiver's own EMA copy's
    output under that name), a tuple ``(ema_path, kwarg_name, transform)`` (None: the default)
    or a dict with ``ema_module_path`` / ``ema_path``, ``ema_kwarg`` / ``kwarg_name``, ``transform``."""
    if ema_module_kwargs is None:
        return []
    if isinstance(ema_module_kwargs, (list, tuple, set)):
        return [_KwargSpec(path, path, default_kwarg) for path in ema_module_kwargs]
    if not isinstance(ema_module_kwargs, dict):
        raise TypeError(f"ema_module_kwargs must be a dict, a list, a tuple or a set of module paths, got "
                        f"{type(ema_module_kwargs).__name__}")
    specs = []
    for receiver, value in ema_module_kwargs.items():
        if isinstance(value, str):
            try:
                model.get_submodule(value)
                is_path = True
            except AttributeError:
                is_path = False
            specs.append(_KwargSpec(receiver, value, default_kwarg) if is_path else
                         _KwargSpec(receiver, receiver, value))
        elif isinstance(value, (tuple, list)):
            ema_path, kwarg_name, transform, *_ = (*tuple(value), None, None, None)
            specs.append(_KwargSpec(receiver, receiver if ema_path is None else ema_path,
                                    default_kwarg if kwarg_name is None else kwarg_name, transform))
        elif isinstance(value, dict):
            given: typing.Any = value                  # any mapping of the keys below
            specs.append(_KwargSpec(receiver, given.get("ema_module_path", given.get("ema_path", receiver)),
                                    given.get("ema_kwarg", given.get("kwarg_name", default_kwarg)),
                                    given.get("transform")))
        else:
            raise TypeError(f"ema_module_kwargs[{receiver!r}] is a {type(value).__name__}; give a module path or a "
                            f"keyword name (str), a tuple (ema_path, kwarg_name, transform) or a dict")
    return specs


class EMAModuleWrapper(nn.Module):
    """ema-pytorch 0.8.3's ``EMAModuleWrapper``: an :class:`EMA` of ``model`` (made from
    ``**ema_kwargs``, or ``ema=``) that routes the EMA copy's submodule outputs into the online
    model's forward (self-distillation: BYOL, DINO, JEPA-style targets).

    ``ema_module_kwargs`` names the routes (see ema-pytorch's README): ``{'branch_a.block1':
    'branch_b.block1'}`` runs the EMA copy first (``no_grad``, eval mode) and passes its
    ``branch_b.block1`` output to the online ``branch_a.block1`` as ``ema_output=`` (or the
    keyword ``default_ema_kwarg``, or one named per route). ``wrapper(x)`` does that while the
    online model trains (``forward_online_during_train=True``), and otherwise returns
    ``ema_model(x)``; ``only_online=True`` / ``only_ema=True`` run one model alone, and
    ``ema_args`` / ``ema_kwargs`` give the EMA copy other inputs (a second view). ``update()``,
    ``update_model_with_ema()``, ``eval()`` (the EMA copy's) and ``forward_eval()`` are the
    EMA's; ``state_dict()`` keys are ema-pytorch's (``ema.step``, ``ema.ema_model.*``, ...).

    Deviations from ema-pytorch, on purpose: every route is checked (paths exist, the receiver's
    forward takes the keyword) before any hook is put on the model, and a bad one is a
    ``ValueError`` / ``TypeError`` naming it (ema-pytorch asserts midway, leaving the earlier
    hooks on the model, and drops a route of an unknown form silently); ``ema=`` together with
    EMA keyword arguments is refused (ema-pytorch ignores the arguments), as is an ``ema=`` of
    another model or not a :class:`fastema.torch.compat.EMA`; with ``lazy_init_ema=True`` the
    routes are hooked at the first ``update()`` (ema-pytorch never hooks them).
    """

    def __init__(self, model: nn.Module, ema: EMA | None = None, ema_module_kwargs=None,
                 default_ema_kwarg: str = "ema_output", forward_online_during_train: bool = True, **ema_kwargs):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMAModuleWrapper takes an nn.Module, got {type(model).__name__}; for a tree of "
                            f"tensors use fastema.torch.compat.EMA(tree)")
        if ema is None:
            ema = EMA(model, **ema_kwargs)
        else:
            if ema_kwargs:
                raise ValueError(f"got ema= and EMA arguments {sorted(ema_kwargs)}; give the arguments to the EMA "
                                 f"you pass, or pass no ema=")
            if not isinstance(ema, EMA):
                raise TypeError(f"ema= must be a fastema.torch.compat.EMA, got {type(ema).__module__}."
                                f"{type(ema).__name__}; make it with fastema.torch.compat.EMA(model, ...)")
            if ema.model is not model:
                raise ValueError("ema= averages another model than model=; pass the model the EMA was made with")
        self._hook_handles: list = []
        self._captured_ema_outputs: dict = {}
        self._hooked = False
        self.ema_module_kwargs = ema_module_kwargs
        self.default_ema_kwarg = default_ema_kwarg
        self.forward_online_during_train = forward_online_during_train
        _parse_specs(model, ema_module_kwargs, default_ema_kwarg)     # a bad form refused before anything
        self.ema = ema
        self.register_ema_module_hooks()

    @property
    def model(self) -> nn.Module:
        """The online model (the EMA's)."""
        return self.ema.model

    @property
    def ema_model(self) -> nn.Module | None:
        """The averaged copy (the EMA's)."""
        return self.ema.ema_model

    def update(self):
        """The EMA's :meth:`EMA.update` (and, after a lazy first copy, the routes' hooks)."""
        out = self.ema.update()
        if not self._hooked and self.ema.ema_model is not None:
            self.register_ema_module_hooks()
        return out

    def update_model_with_ema(self, decay: float | None = None):
        """The EMA's :meth:`EMA.update_model_with_ema`."""
        return self.ema.update_model_with_ema(decay=decay)

    def eval(self):
        """The EMA copy's ``eval()`` (as ema-pytorch: the online model keeps its mode)."""
        return self.ema.eval()

    def forward_eval(self, *args, **kwargs):
        """The EMA's :meth:`EMA.forward_eval`: the EMA copy under ``no_grad``."""
        return self.ema.forward_eval(*args, **kwargs)

    def remove_ema_module_hooks(self) -> None:
        """Take the routes' hooks off both models."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._hooked = False

    def register_ema_module_hooks(self) -> None:
        """(Re)hook the routes of ``ema_module_kwargs``: a forward hook on each EMA copy submodule
        keeps its output, a pre-hook on each receiver passes it as the keyword. Every route is
        checked before the first hook is placed."""
        self.remove_ema_module_hooks()
        if self.ema_module_kwargs is None or self.ema_model is None:
            return
        routes = []
        for spec in _parse_specs(self.model, self.ema_module_kwargs, self.default_ema_kwarg):
            ema_sub = _submodule(self.ema_model, spec.ema_path, "the EMA module path")
            receiver = _submodule(self.model, spec.receiver_path, "the receiving module path")
            params = inspect.signature(receiver.forward).parameters
            if spec.kwarg_name not in params and not any(p.kind == inspect.Parameter.VAR_KEYWORD
                                                         for p in params.values()):
                raise ValueError(f"submodule {spec.receiver_path!r} ({type(receiver).__name__}) has no forward "
                                 f"keyword argument {spec.kwarg_name!r} to receive the EMA output of "
                                 f"{spec.ema_path!r}; add it to its forward or name another with ema_kwarg=")
            routes.append((spec, ema_sub, receiver))
        captured = self._captured_ema_outputs
        for spec, ema_sub, receiver in routes:
            def keep(module, args, output, path=spec.ema_path, transform=spec.transform):
                captured[path] = output if transform is None else transform(output)

            def give(module, args, kwargs, path=spec.ema_path, name=spec.kwarg_name):
                if path in captured:
                    kwargs[name] = captured[path]
                return args, kwargs

            self._hook_handles.append(ema_sub.register_forward_hook(keep))
            self._hook_handles.append(receiver.register_forward_pre_hook(give, with_kwargs=True))
        self._hooked = True

    def forward_online(self, *args, only_online: bool = False, only_ema: bool = False, ema_args=None,
                       ema_kwargs: dict | None = None, auto_normalize_ema_args: bool = True, **kwargs):
        """Run the EMA copy (``no_grad``, eval mode; on ``ema_args`` / ``ema_kwargs`` when given,
        else on the same inputs), then the online model, which receives the routed outputs;
        returns the online model's output. ``only_online`` / ``only_ema``: that model alone."""
        if only_online and only_ema:
            raise ValueError("only_online=True and only_ema=True together; pick one")
        if (only_online or only_ema) and (ema_args is not None or ema_kwargs is not None):
            raise ValueError("ema_args / ema_kwargs are for the EMA copy's pass of a routed forward; drop them "
                             "with only_online=True or only_ema=True")
        if only_ema:
            return self.ema._made()(*args, **kwargs)
        if only_online:
            self._captured_ema_outputs.clear()
            return self.model(*args, **kwargs)
        ema_model = self.ema._made()
        self._captured_ema_outputs.clear()
        if auto_normalize_ema_args and ema_args is not None:
            if isinstance(ema_args, dict):                 # ema-pytorch's normalize_ema_args_kwargs
                ema_args, ema_kwargs = (), {**ema_args, **(ema_kwargs or {})}
            elif not isinstance(ema_args, tuple):
                ema_args = (ema_args,)
        with torch.no_grad():
            training = ema_model.training
            ema_model.eval()
            ema_model(*(args if ema_args is None else ema_args), **(kwargs if ema_kwargs is None else ema_kwargs))
            ema_model.train(training)
        out = self.model(*args, **kwargs)
        self._captured_ema_outputs.clear()
        return out

    def forward(self, *args, forward_online: bool | None = None, only_online: bool = False, only_ema: bool = False,
                ema_args=None, ema_kwargs: dict | None = None, auto_normalize_ema_args: bool = True, **kwargs):
        """The routed forward (:meth:`forward_online`) while the online model trains and routes are
        given (or ``forward_online=True``, ``only_online``, ``only_ema``); else ``ema_model(...)``."""
        if forward_online is None:
            forward_online = self.ema_module_kwargs is not None and self.model.training and \
                self.forward_online_during_train
        if only_online or only_ema or forward_online:
            return self.forward_online(*args, only_online=only_online, only_ema=only_ema, ema_args=ema_args,
                                       ema_kwargs=ema_kwargs, auto_normalize_ema_args=auto_normalize_ema_args,
                                       **kwargs)
        return self.ema._made()(*args, **kwargs)
