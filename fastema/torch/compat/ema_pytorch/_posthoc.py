"""ema-pytorch's ``PostHocEMA``: several ``KarrasEMA``, their checkpoint files, and the synthesis
of another profile from them (EDM2's least squares). The checkpoints are read through the one
regular-file reader (``fastema._io.safe_files``): a FIFO, device or folder named like one is
refused by name, never opened."""
from __future__ import annotations

import numbers
import pathlib
import re
import typing

import numpy as np
import torch
from torch import nn

from .... import schedules as S
from ...._io.safe_files import FileRefused, open_regular, regular
from .._common import AllOrNothingLoad
from ._base import AssertionValueError
from ._model import KarrasEMA
from ._shared import Watch, decide

_NAME = re.compile(r"([0-9]+)\.([0-9]+)")          # {index}.{step}, as checkpoint() names a file


def _checkpoint_name(path: pathlib.Path, profiles: int) -> tuple[int, int]:
    """(profile index, step) of a checkpoint file of a :class:`PostHocEMA` with ``profiles``
    profiles, from its name; :class:`FileRefused` naming it when it is not one."""
    found = _NAME.fullmatch(path.stem)
    if found is None or int(found.group(1)) >= profiles:
        why = "its name is not {index}.{step}.pt" if found is None else \
            f"its index {int(found.group(1))} is not one of this PostHocEMA's {profiles} profiles"
        raise FileRefused(f"{str(path)!r} is not a checkpoint of this PostHocEMA ({why}): its folder must "
                          f"hold only the files checkpoint() writes, {{index}}.{{step}}.pt with index 0 to "
                          f"{profiles - 1}; move it out of the folder")
    return int(found.group(1)), int(found.group(2))


def _check_checkpoint_args(every, dtype) -> None:
    """``checkpoint_every_num_steps`` an int >= 1 or ``"manual"``, ``checkpoint_dtype`` a floating
    ``torch.dtype``: checked before anything is made (ema-pytorch takes any, and fails at each
    ``update()`` after averaging, or synthesises from checkpoints cast to integers)."""
    if every != "manual" and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
        raise ValueError(f"checkpoint_every_num_steps must be an int >= 1 (checkpoint every that many "
                         f"updates) or 'manual' (call checkpoint() yourself), got {every!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        hint = f": pass torch.{dtype}" if isinstance(dtype, str) and \
            isinstance(getattr(torch, dtype, None), torch.dtype) and getattr(torch, dtype).is_floating_point else ""
        raise ValueError(f"checkpoint_dtype must be a floating torch.dtype (torch.float16, torch.bfloat16, "
                         f"torch.float32, ...), got {dtype!r}{hint}")


class PostHocEMA(AllOrNothingLoad):
    """ema-pytorch's ``PostHocEMA``: several :class:`KarrasEMA`, checkpointed every
    ``checkpoint_every_num_steps`` as ``{index}.{step}.pt`` in ``checkpoint_folder`` (ema-pytorch's
    files: a folder written by either can be synthesised by either), and
    ``synthesize_ema_model(sigma_rel=...)`` by EDM2's least squares, as ema-pytorch computes it
    (coefficients not normalised; every checkpoint in the folder).

    Differences: updates use the exact Delta-t profile (see :class:`KarrasEMA`; ema-pytorch's
    profiles are off when ``update_every > 1``, its default being 100); checkpoints are written
    atomically. ``checkpoint_every_num_steps`` must be an int >= 1 or ``"manual"`` and
    ``checkpoint_dtype`` a floating ``torch.dtype``, checked at construction (ema-pytorch takes
    any: 0, ``None`` or ``"Manual"`` fail at each ``update()`` after its average, an integer dtype
    synthesises zeros, a string fails at the first checkpoint). ``synthesize_ema_model`` reads
    every ``*.pt`` of the folder, as ema-pytorch does, and refuses by name, before reading any, one
    that is not a checkpoint this ``PostHocEMA`` wrote: a name other than ``{index}.{step}.pt``
    (``notes.pt``; ema-pytorch raises a bare ``int()`` error) or an index past its profiles
    (ema-pytorch: an ``IndexError``), and a FIFO, device or folder (ema-pytorch's ``torch.load``
    blocks on a FIFO for ever). Refused, not skipped: ema-pytorch reads every ``*.pt`` too, so
    skipping would synthesise the same folder from other files than ema-pytorch does, without a
    word. :class:`fastema.torch.PostHocEMA` is the native version (safetensors snapshots, a
    residual check, one shadow always).

    **One shadow where the profiles agree.** Where every profile is a :class:`KarrasEMA` of the
    model, none frozen, of one ``update_every``, name sets and flags, with its counters (``step``,
    ``initted``) at one value and an ``ema_model`` of its own, and every averaged tensor and its
    averages are of one float dtype (float32, bfloat16, float16, float64), device, shape and
    strides, the K profiles are the K rows of one :class:`fastema.FlatShadow` updated in one pass
    (one launch per (device, dtype) group), bit for bit the K ``KarrasEMA`` updates. Each
    ``ema_models[k]`` stays an ``nn.Module`` whose averaged tensors are views of row ``k``, each
    with a storage of its own (an ``ema_model`` saved alone holds its own tensors, as
    ema-pytorch's), and the ``step`` buffers views of one tensor that one ``add_`` advances;
    checkpoints, ``state_dict()``, loads and synthesis read and write those views. Every update
    checks that nothing of this changed: the profiles, their settings and counters, and at a due
    update the address of every tracked tensor of the model and of each ``ema_model`` (K + 1
    times the native face's per-tensor check). Where something did (an ``ema_model`` moved with
    ``.to()`` or one of its tensors replaced too), the next update decides again, the values
    kept: on a new shadow where the profiles agree, and each profile on its own, as ema-pytorch's
    do, where they do not: a profile's ``update_every``, ``frozen`` or name sets changed, one
    profile's own ``update()`` or ``step`` write, an ``ema_model`` in another dtype or on another
    device than the model, ``ema_model=`` one module (every profile then averages it, as in
    ema-pytorch), complex tensors. A pickled or deep-copied ``PostHocEMA`` makes its shadow again
    at its first update.
    """

    def __init__(self, model: nn.Module, ema_model=None, sigma_rels: tuple | None = None, gammas: tuple | None = None,
                 checkpoint_every_num_steps: int | str = 1000, checkpoint_folder: str = "./post-hoc-ema-checkpoints",
                 checkpoint_dtype: torch.dtype = torch.float16, **kwargs):
        super().__init__()
        _check_checkpoint_args(checkpoint_every_num_steps, checkpoint_dtype)
        if (sigma_rels is None) == (gammas is None):
            raise AssertionValueError("give exactly one of sigma_rels= and gammas=")
        gammas = tuple(S.sigma_rel_to_gamma(s) for s in sigma_rels) if sigma_rels is not None else \
            tuple(typing.cast(tuple, gammas))
        if len(gammas) < 2:
            raise AssertionValueError("at least 2 profiles with different gammas are needed to synthesise "
                                      "others")
        if len(set(gammas)) != len(gammas):
            raise AssertionValueError(f"the gammas must differ from each other, got {gammas}")
        self.maybe_ema_model = ema_model
        self.gammas = tuple(gammas)
        self.num_ema_models = len(gammas)
        self._model = [model]
        self.ema_models = nn.ModuleList([KarrasEMA(model, ema_model=ema_model, gamma=g, **kwargs) for g in gammas])
        self.checkpoint_folder = pathlib.Path(checkpoint_folder)
        self.checkpoint_folder.mkdir(exist_ok=True, parents=True)
        self.checkpoint_every_num_steps = checkpoint_every_num_steps
        self.checkpoint_dtype = checkpoint_dtype
        self.ema_kwargs = kwargs
        self._shared: Watch | None = None        # the profiles on one shadow, or why not (decide)

    def __getstate__(self):
        state = super().__getstate__()
        state["_shared"] = None          # this process's shadow and launch tables: made again
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_shared", None)  # a PostHocEMA pickled before it had one

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
        shared = self._shared
        if shared is None or not shared.holds(self):
            shared = self._shared = decide(self)
        shared.update(self)
        if self.checkpoint_every_num_steps == "manual":
            return
        if self.ema_models[0]._counters()[0] % self.checkpoint_every_num_steps == 0:
            self.checkpoint()

    def checkpoint(self):
        from ...._io.files import atomic_write as _atomic_write

        step = self.ema_models[0]._counters()[0]
        for i, e in enumerate(self.ema_models):
            pkg = {k: v.to(device="cpu", dtype=self.checkpoint_dtype, copy=True) for k, v in e.state_dict().items()}
            _atomic_write(str(self.checkpoint_folder / f"{i}.{step}.pt"), lambda f, pkg=pkg: torch.save(pkg, f))

    def synthesize_ema_model(self, gamma: float | None = None, sigma_rel: float | None = None,
                             step: int | None = None) -> KarrasEMA:
        if (gamma is None) == (sigma_rel is None):
            raise AssertionValueError("give exactly one of gamma= and sigma_rel=")
        if sigma_rel is not None:
            gamma = S.sigma_rel_to_gamma(sigma_rel)
        files = sorted(self.checkpoint_folder.glob("*.pt"))
        if not files:
            raise FileNotFoundError(f"no checkpoints in {self.checkpoint_folder}: call update() or checkpoint() first")
        idx, steps = zip(*(_checkpoint_name(f, self.num_ema_models) for f in files))
        for f in files:                   # a FIFO, device or folder named like one: refused, nothing read
            regular(str(f))
        last = max(steps)
        step = last if step is None else step
        if step > last:
            raise AssertionValueError(f"you can only synthesize for a timestep that is less than the max "
                                      f"timestep {last}")
        from ....posthoc import profile_dot

        t_i = np.asarray(steps, np.float64)
        g_i = np.asarray([self.gammas[i] for i in idx], np.float64)
        A = profile_dot(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
        b = profile_dot(t_i, g_i, float(step), gamma)
        weights = torch.linalg.solve(torch.from_numpy(A), torch.from_numpy(b)[:, None])[:, 0].tolist()
        synthesized = KarrasEMA(self.model, ema_model=self.maybe_ema_model, gamma=gamma, **self.ema_kwargs)
        scratch = KarrasEMA(self.model, ema_model=self.maybe_ema_model, gamma=gamma, **self.ema_kwargs)
        for n, (f, w) in enumerate(zip(files, weights)):
            with open_regular(str(f)) as opened:
                scratch.load_state_dict(torch.load(opened, weights_only=True))
            with torch.no_grad():
                pairs = zip(scratch.iter_all_ema_params_and_buffers(), synthesized.iter_all_ema_params_and_buffers())
                for c, s in pairs:
                    if n == 0:
                        s.zero_()
                    s.add_(c * w)
        return synthesized

    def __call__(self, *args, **kwargs):
        return tuple(e(*args, **kwargs) for e in self.ema_models)


