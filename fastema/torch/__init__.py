"""PyTorch model EMA over fastema's flat kernels.

``fastema.torch.EMA(model, decay)`` keeps averaged copies of a model's weights in
flat buffers (one per device and dtype) and updates all of them with one kernel
launch per buffer, with no host sync. Drop-in classes for torch_ema, timm and
``torch.optim.swa_utils`` live in :mod:`fastema.torch.compat`.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import tempfile
import weakref
from typing import Iterator, Sequence

import torch
from torch import nn

from .._bridge import init_plan
from ..flat import FlatShadow, WindowShadow

__all__ = ["EMA", "WindowAverage", "normalize_name"]

FORMAT = "fastema.torch.EMA"
VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")        # DistributedDataParallel, torch.compile


def normalize_name(name: str) -> str:
    """Strip the wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile)."""
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                      if type(model).__name__ in ("DistributedDataParallel",
                                                                                  "DataParallel") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# Models are watched for parameters, buffers or submodules registered after the EMA
# was made (load_state_dict(assign=True), module.weight = nn.Parameter(...),
# model[0] = nn.Linear(...)): torch calls these global hooks, which mark the EMA
# stale; update() then re-reads the model. The per-step cost is one flag check.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_HOOKS_INSTALLED = False


def _on_registration(module, name, value):
    emas = _WATCHED.get(module)
    if emas:
        for ema in emas:
            ema._stale = True
    return None


def _watch(model: nn.Module, ema) -> None:
    global _HOOKS_INSTALLED
    if not _HOOKS_INSTALLED:
        from torch.nn.modules import module as M

        M.register_module_parameter_registration_hook(_on_registration)
        M.register_module_buffer_registration_hook(_on_registration)
        M.register_module_module_registration_hook(_on_registration)
        _HOOKS_INSTALLED = True
    for m in model.modules():
        _WATCHED.setdefault(m, weakref.WeakSet()).add(ema)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _ModelAverage:
    """What every model-level average shares: which tensors are averaged or copied, the flat
    shadow, following a changed model, swap / copy-out / export, and checkpoints. Subclasses
    make the shadow and define ``update()`` and their extra checkpoint state."""

    _format = ""

    def __init__(self, model: nn.Module, make_shadow, *, buffers: str, exclude: Sequence[str],
                 copy: Sequence[str]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.buffers, self.exclude, self.copy_patterns = buffers, tuple(exclude), tuple(copy)
        self.model = model
        self._int_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (model's, copy)
        averaged, copied = self._select(model)
        if not averaged:
            raise ValueError("the model has no floating-point parameters to average "
                             "(check exclude= and copy=)")
        self._names = (list(averaged), list(copied))
        self._avg = make_shadow(averaged)
        self._copy = FlatShadow(copied, dtype="same") if copied else None
        self.calls = 0                          # update() calls
        self._stale = False
        self._backup = None                     # raw weights during a lossy swap (float16 models)
        self._swapped_row: int | None = None
        _watch(_unwrap(model), self)

    def _copy_buffers(self) -> None:
        if self._copy is not None:
            self._copy.copy_from_sources()
        for src, dst in self._int_buffers.values():
            dst.copy_(src)

    def _due(self, every: int) -> bool:
        """Count a call of update(); True when this one updates (the first, then every k-th)."""
        self._not_swapped("update()")
        due = self.calls % every == 0
        if due and self._stale:
            self._rebind()                      # may refuse: then nothing is counted or written
        self.calls += 1
        return due

    def _select(self, model):
        averaged, copied = {}, {}
        wrapped = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module." in n]
        if wrapped:
            raise TypeError(f"the model is wrapped by FSDP1 (FullyShardedDataParallel; {wrapped[0]!r}): its "
                            f"parameters are rank-dependent pieces of flat parameters. Use FSDP2 "
                            f"(torch.distributed.fsdp.fully_shard), or make the EMA of an unwrapped copy of "
                            f"the model. Nothing was written.")
        for name, p in model.named_parameters():
            name = normalize_name(name)
            if _matches(name, self.exclude):
                continue
            if not p.is_floating_point():           # integer parameters travel with the integer buffers
                self._int_buffers[name] = (p, p.detach().clone())
            else:
                (copied if _matches(name, self.copy_patterns) else averaged)[name] = p
        for name, b in model.named_buffers():
            name = normalize_name(name)
            if _matches(name, self.exclude) or (b.is_floating_point() and self.buffers == "ignore"):
                continue
            if b.is_floating_point() and self.buffers == "average" and not _matches(name, self.copy_patterns):
                averaged[name] = b
            elif b.is_floating_point():
                copied[name] = b
            else:
                self._int_buffers[name] = (b, b.detach().clone())
        return averaged, copied

    @property
    def swapped(self) -> bool:
        return self._swapped_row is not None

    def _rebind(self) -> None:
        # A parameter or buffer was re-registered (load_state_dict(assign=True), ...):
        # follow the new tensors if they fit the shadow, else refuse before writing anything.
        named = {normalize_name(n): t for n, t in
                 list(self.model.named_parameters()) + list(self.model.named_buffers())}
        wanted = self._names[0] + self._names[1] + list(self._int_buffers)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"the model no longer has {missing[:5]} (it changed after EMA(model)); "
                             f"make a new EMA for the new model. Nothing was updated.")
        self._avg.rebind({n: named[n] for n in self._names[0]})
        if self._copy is not None:
            self._copy.rebind({n: named[n] for n in self._names[1]})
        for n, (_, copy_) in list(self._int_buffers.items()):
            if named[n].shape != copy_.shape:
                raise ValueError(f"buffer {n!r} changed shape from {tuple(copy_.shape)} to "
                                 f"{tuple(named[n].shape)}; make a new EMA. Nothing was updated.")
            self._int_buffers[n] = (named[n], copy_)
        _watch(_unwrap(self.model), self)               # new submodules are watched too

    def swap(self, row: int = 0) -> None:
        """Put average ``row`` into the model in place; call again to put the raw weights back.

        In place with no model-sized temporary when the shadow keeps an exact swap
        (equal dtypes, or float32 shadow and bfloat16 weights). float16 weights with a
        float32 shadow are backed up once instead (a float16-sized buffer), so the
        float32 average is never rounded.
        """
        if self._swapped_row is not None and row != self._swapped_row:
            raise RuntimeError(f"average {self._swapped_row} is swapped in; swap it back first")
        swapping_in = self._swapped_row is None
        if self._lossy_swap():
            if swapping_in:
                if self._backup is None:
                    self._backup = FlatShadow(dict(zip(self._avg.names, self._avg._sources)), dtype="same")
                else:
                    self._backup.copy_from_sources()
                self._avg.copy_to_sources(row)
            else:
                self._backup.copy_to_sources()
        else:
            self._avg.swap(row)
        if self._copy is not None:
            self._copy.swap()
        self._swapped_row = row if swapping_in else None

    def _not_swapped(self, what: str) -> None:
        if self._swapped_row is not None:
            raise RuntimeError(f"{what} while the EMA weights are swapped into the model (the shadow holds the "
                               f"raw weights then); call it outside average_parameters() or after swap()")

    def _lossy_swap(self) -> bool:
        return any(g["shadow_dtype"] != g["src_dtype"] and not (g["shadow_dtype"] == "float32" and
                                                                 g["src_dtype"] == "bfloat16")
                   for g in self._avg.groups)

    @contextlib.contextmanager
    def average_parameters(self, row: int = 0) -> Iterator[nn.Module]:
        """``with ema.average_parameters(): evaluate(model)``: EMA weights in, raw weights back on exit
        (also when the block raises)."""
        self.swap(row)
        try:
            yield self.model
        finally:
            self.swap(row)

    def copy_to(self, model: nn.Module | None = None, row: int = 0) -> None:
        """Write average ``row`` into ``model`` (default: the tracked model), e.g. at the end of training."""
        if model is None or model is self.model:
            self._avg.copy_to_sources(row)
            if self._copy is not None:
                self._copy.copy_to_sources()
            return
        model.load_state_dict(self.averaged_state_dict(row), strict=False)

    def averaged_state_dict(self, row: int = 0) -> dict[str, torch.Tensor]:
        """A model-style state dict of the averaged weights (the model's dtypes and names,
        prefixes stripped): what ``model.load_state_dict`` takes."""
        self._not_swapped("averaged_state_dict()")
        out = {}
        for name, t in self._raw_named():
            if name in self._avg._index:
                out[name] = self._avg.view(name, row).to(t.dtype, copy=True)
            elif self._copy is not None and name in self._copy._index:
                out[name] = self._copy.view(name).clone()
            elif name in self._int_buffers:
                out[name] = self._int_buffers[name][1].clone()
            else:
                out[name] = t.detach().clone()                     # excluded: the model's own value
        return out

    def _raw_named(self):
        m = _unwrap(self.model)
        return list(m.state_dict(keep_vars=True).items())

    def module(self, row: int = 0) -> nn.Module:
        """A standalone copy of the model holding the averaged weights (for export or another process)."""
        clone = copy.deepcopy(_unwrap(self.model))
        clone.load_state_dict(self.averaged_state_dict(row))
        return clone

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: averages keyed by name, counters, settings."""
        self._not_swapped("state_dict()")
        return {
            "format": self._format, "version": VERSION, "calls": self.calls, **self._extra_state(),
            # views of the flat buffers, as nn.Module.state_dict() returns views: no model-sized copy
            "averaged": {n: self._avg.view(n, None) for n in self._avg.names},
            "copied": {n: self._copy.view(n) for n in self._copy.names} if self._copy is not None else {},
            "int_buffers": {n: v[1] for n, v in self._int_buffers.items()},
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`: checks everything first, changes nothing if anything is off."""
        kind = type(self).__name__
        if not isinstance(state, dict) or state.get("format") != self._format:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {self._format} state dict (format={found!r}); a model checkpoint goes to "
                             f"model.load_state_dict, a {kind} checkpoint ({kind}.state_dict()) here")
        if state.get("version") != VERSION:
            raise ValueError(f"{kind} checkpoint version {state.get('version')!r} is not supported "
                             f"(expected {VERSION})")
        self._not_swapped("load_state_dict()")
        rows = self._avg.rows
        problems = []
        copied_names = self._copy.names if self._copy else []
        for key, names, shape_of in (("averaged", self._avg.names, lambda n: (rows, *self._avg.view(n).shape)),
                                     ("copied", copied_names, lambda n: tuple(self._copy.view(n).shape))):
            saved = {normalize_name(k): v for k, v in state.get(key, {}).items()}
            missing = [n for n in names if n not in saved]
            extra = [n for n in saved if n not in names]
            if missing:
                problems.append(f"{key} missing {missing[:5]}")
            if extra and strict:
                problems.append(f"{key} unexpected {extra[:5]}")
            for n in names:
                if n in saved and tuple(saved[n].shape) != tuple(shape_of(n)):
                    problems.append(f"{key} {n!r} has shape {tuple(saved[n].shape)}, expected {tuple(shape_of(n))}")
        self._check_extra(state, problems)
        if problems:
            raise ValueError(f"{kind} checkpoint does not match this model: " + "; ".join(problems) +
                             ". Nothing was loaded.")
        averaged = {normalize_name(k): v for k, v in state["averaged"].items()}
        for n in self._avg.names:
            for r in range(rows):
                self._avg.view(n, r).copy_(averaged[n][r])
        copied = {normalize_name(k): v for k, v in state.get("copied", {}).items()}
        for n in (self._copy.names if self._copy else []):
            self._copy.view(n).copy_(copied[n])
        for n, v in state.get("int_buffers", {}).items():
            if n in self._int_buffers:
                self._int_buffers[n][1].copy_(v)
        self.calls = int(state["calls"])
        self._load_extra(state)

    def _extra_state(self) -> dict:
        return {}

    def _check_extra(self, state: dict, problems: list) -> None:
        pass

    def _load_extra(self, state: dict) -> None:
        pass

    def save(self, path: str | os.PathLike, row: int = 0) -> None:
        """Write the averaged weights as a model checkpoint, atomically (temporary file, then rename).

        ``model.load_state_dict(torch.load(path))`` loads it; a ``.safetensors`` path is
        written with safetensors (which must be installed).
        """
        path = os.fspath(path)
        weights = {k: v.detach().contiguous() for k, v in self.averaged_state_dict(row).items()}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".fastema-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                if path.endswith(".safetensors"):
                    try:
                        from safetensors.torch import save
                    except ImportError:
                        raise ImportError("saving .safetensors needs the safetensors package "
                                          "(pip install safetensors)") from None
                    f.write(save({k: v.cpu() for k, v in weights.items()}))
                else:
                    torch.save(weights, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class EMA(_ModelAverage):
    """Exponential moving average of a PyTorch model's weights.

    ``shadow <- decay * shadow + (1 - decay) * weight`` after every ``update()``, for
    every floating parameter (and buffer, if asked), in one kernel launch per
    (device, dtype) group, on torch's current stream, with no host sync.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped; names are normalised).
        decay: a float, or up to 8 floats for several averages kept in one pass.
        warmup: ``None`` (constant decay), ``"num_updates"`` (``min(decay, (1+n)/(10+n))``,
            torch_ema/TF) or ``"power"`` (timm/diffusers/ema-pytorch:
            ``clamp(1 - (1 + s/inv_gamma)^-power, min_decay, decay)``, ``s = n - update_after_step - 1``).
        min_decay, inv_gamma, power, update_after_step: parameters of ``warmup="power"``.
        update_every: update on every k-th call of ``update()`` (the first call updates).
        compensate: with ``update_every=k``, use ``decay**k`` so the average spans the same time.
        debias: start the average from zero and divide out the bias (optax ``debias=True``,
            pandas ``ewm(adjust=True)``); the first update then copies the weights.
        shadow_dtype: ``"float32"`` (default: bfloat16/float16 weights keep moving),
            ``"same"`` or ``"bfloat16"``.
        rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).
        seed: stochastic-rounding seed; with the step it gives the same bits on every rank.
        buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default), ``"average"``
            or ``"ignore"``. Integer buffers are always copied.
        exclude: name patterns (fnmatch, normalised names) left out entirely.
        copy: name patterns copied instead of averaged.
        skip_nonfinite: skip an update (on the device, no sync) when a weight is inf/NaN.
    """

    _format = FORMAT

    def __init__(self, model: nn.Module, decay: float | Sequence[float] = 0.9999, *, warmup: str | None = None,
                 min_decay: float = 0.0, inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0,
                 update_every: int = 1, compensate: bool = False, debias: bool = False,
                 shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0, buffers: str = "copy",
                 exclude: Sequence[str] = (), copy: Sequence[str] = (), skip_nonfinite: bool = False):
        init_plan(self, decay, shadow_dtype=shadow_dtype, rounding=rounding, seed=seed,
                  skip_nonfinite=skip_nonfinite, warmup=warmup, min_decay=min_decay, inv_gamma=inv_gamma,
                  power=power, update_after_step=update_after_step, update_every=update_every,
                  compensate=compensate, debias=debias)
        super().__init__(model, lambda avg: FlatShadow(avg, rows=self.plan.rows, dtype=shadow_dtype),
                         buffers=buffers, exclude=exclude, copy=copy)

    # The counters and settings live in the plan (shared with fastema.jax and fastema.tensorflow).
    calls = property(lambda self: self.plan.calls, lambda self, v: setattr(self.plan, "calls", v))
    updates = property(lambda self: self.plan.updates, lambda self, v: setattr(self.plan, "updates", v))
    norms = property(lambda self: self.plan.norms)
    schedules = property(lambda self: self.plan.schedules)
    update_every = property(lambda self: self.plan.update_every)
    compensate = property(lambda self: self.plan.compensate)
    debias = property(lambda self: self.plan.debias)

    @property
    def decay(self) -> float | list[float]:
        """The decay(s) the next ``update()`` will use: Python floats, no device read."""
        return self.plan.decay

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Update the averages from the model's current weights (call after ``optimizer.step()``).

        Args:
            step: the training step for the schedule; defaults to the number of updates made.
        """
        if not self._due(self.update_every):
            return
        n, weights, pending = self.plan.weights(step)
        self._avg.update(weight=weights, rounding=self.rounding, seed=self.seed, step=n,
                         skip_nonfinite=self.skip_nonfinite)
        self._copy_buffers()
        self.plan.commit(pending)

    def ema_state_dict(self, row: int = 0) -> dict[str, torch.Tensor]:
        """Alias of :meth:`averaged_state_dict`."""
        return self.averaged_state_dict(row)

    def _extra_state(self) -> dict:
        return {**self.plan.state(), "shadow_dtype": self.shadow_dtype, "rounding": self.rounding, "seed": self.seed}

    def _check_extra(self, state: dict, problems: list) -> None:
        self.plan.check_state(state, problems)

    def _load_extra(self, state: dict) -> None:
        self.plan.load_state(state)
        self.rounding, self.seed = state["rounding"], state["seed"]

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, updates={self.updates}, averaged={len(self._avg)} tensors, "
                f"copied={len(self._copy) if self._copy else 0}, shadow={self._avg!r})")


class WindowAverage(_ModelAverage):
    """The mean of the last ``window`` snapshots of a model's weights, or of all of them (SWA).

    ``window=W``: a ring of W flat snapshots per (device, dtype) group and a compensated
    float32 running sum; each snapshot is one kernel launch, and the mean stays within
    2 ulp of an exact recomputation over the ring however many snapshots pass.
    ``window=None``: the cumulative mean of every snapshot (stochastic weight averaging,
    ``avg <- avg + (w - avg) / (n + 1)``), no ring. The weights at construction are the
    first snapshot. Swap, ``average_parameters()``, ``copy_to``, checkpoints and ``save``
    behave as in :class:`EMA`.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped).
        window: snapshots in the window, or None for the cumulative mean.
        every: take a snapshot on every k-th call of ``update()`` (the first call snapshots).
        ring_dtype: ``"float32"`` or ``"bfloat16"`` snapshots (half the memory; each snapshot
            is rounded to bfloat16, the mean and the sum stay float32).
        buffers, exclude, copy: as in :class:`EMA`.
    """

    _format = "fastema.torch.WindowAverage"

    def __init__(self, model: nn.Module, window: int | None, *, every: int = 1, ring_dtype: str = "float32",
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = ()):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None (cumulative mean), got {window!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        self.window, self.every, self.ring_dtype = window, every, ring_dtype
        make = (lambda avg: FlatShadow(avg, dtype="float32")) if window is None else \
            (lambda avg: WindowShadow(avg, window, ring_dtype=ring_dtype))
        super().__init__(model, make, buffers=buffers, exclude=exclude, copy=copy)
        self.snapshots = 1                      # snapshots taken (the construction is the first)

    @property
    def count(self) -> int:
        """Snapshots in the average now."""
        return self.snapshots if self.window is None else min(self.snapshots, self.window)

    @torch.no_grad()
    def update(self) -> None:
        """Take a snapshot of the model's weights (on every ``every``-th call)."""
        if not self._due(self.every):
            return
        if self.window is None:
            self._avg.update(weight=1.0 / (self.snapshots + 1))
        else:
            self._avg.push()
        self._copy_buffers()
        self.snapshots += 1

    def _extra_state(self) -> dict:
        state = {"snapshots": self.snapshots, "window": self.window, "every": self.every,
                 "ring_dtype": self.ring_dtype}
        if self.window is not None:
            state["ring"] = {n: self._avg.ring_view(n) for n in self._avg.names}
            state["pushes"] = self._avg.pushes
        return state

    def _check_extra(self, state: dict, problems: list) -> None:
        if (state.get("window"), state.get("ring_dtype")) != (self.window, self.ring_dtype):
            problems.append(f"checkpoint window/ring_dtype {state.get('window')!r}/{state.get('ring_dtype')!r}, "
                            f"this average {self.window!r}/{self.ring_dtype!r}")
        elif self.window is not None:
            ring = {normalize_name(k): v for k, v in state.get("ring", {}).items()}
            for n in self._avg.names:
                if n not in ring or tuple(ring[n].shape) != tuple(self._avg.ring_view(n).shape):
                    problems.append(f"ring {n!r} missing or of another shape")

    def _load_extra(self, state: dict) -> None:
        self.snapshots, self.every = int(state["snapshots"]), int(state["every"])
        if self.window is not None:
            ring = {normalize_name(k): v for k, v in state["ring"].items()}
            for n in self._avg.names:
                self._avg.ring_view(n).copy_(ring[n])
            self._avg.pushes = int(state["pushes"])

    def __repr__(self) -> str:
        kind = "cumulative" if self.window is None else f"window={self.window}"
        return f"WindowAverage({kind}, snapshots={self.snapshots}, averaged={len(self._avg)} tensors)"
