"""The profiles of ema-pytorch's ``PostHocEMA`` on one shadow. Where its ``KarrasEMA`` agree: one
:class:`fastema.FlatShadow` of K rows (one per profile) over the model's averaged tensors,
updated in one pass (one launch per (device, dtype) group), each ``ema_models[k]``'s averaged
tensors re-pointed at row ``k`` (:class:`Shared`). Where they do not: a :class:`Watch` of what
the refusal rests on, so that :func:`decide` runs again only once something of it changed."""
from __future__ import annotations

import operator
import typing

import torch
from torch import nn

from ...._backends import device_of
from ....flat import FlatShadow
from ....schedules import PowerFunction
from ..._tensors.hooks import watch
from ..._tensors.slots import DATA_PTR, Slots
from ._model import KarrasEMA

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)
_COUNTERS = KarrasEMA._counters
_EVERY = operator.attrgetter("update_every")


class Owner(typing.Protocol):
    """What a decision reads of the ``PostHocEMA`` it is made for (its module imports this one)."""

    ema_models: nn.ModuleList
    _modules: dict

    @property
    def model(self) -> nn.Module: ...


def _settings(e) -> tuple:
    """What a profile's update does, read from the profile now: its class, online model, cadence
    and flags, the names it tracks, skips and copies (the collections themselves, compared by
    identity first, and their sizes: a name added in place is a change), last its exponent."""
    if type(e) is not KarrasEMA:
        return (type(e),)
    names = (e.parameter_names, e.buffer_names, e.ignore_names, e.ignore_startswith_names,
             e.param_or_buffer_names_no_ema)
    try:
        sizes: tuple | None = tuple(map(len, names))
    except TypeError:                            # an iterable without a size: compared as it is
        sizes = None
    return (KarrasEMA, e.online_model[0], e.update_every, e.frozen, e.move_ema_to_online_device,
            e.allow_different_devices, *names, sizes, e.gamma)


def _tracked(e, model: nn.Module) -> list:
    """``(name, kind, tensor)`` of what ``e`` reads of ``model``, in ``e._tensors``' order."""
    return [(n, "parameter", t) for n, t in e.get_params_iter(model)] + \
           [(n, "buffer", t) for n, t in e.get_buffers_iter(model)]


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor with a storage of its own (no copy; it keeps the shadow
    alive): an ``ema_model`` saved alone (``torch.save``, safetensors, ``save_pretrained``)
    holds its own tensors' bytes, as ema-pytorch's does, not every profile's rows."""
    return torch.from_dlpack(view)


def _rowable(c: torch.Tensor, m: torch.Tensor) -> bool:
    """Whether the average ``m`` of ``c`` can be a row of a same-dtype shadow of ``c``: plain
    strided tensors of one kernel dtype, device (CPU or CUDA, as the adapter says), shape and
    strides."""
    return (type(c) in _PLAIN and type(m) in _PLAIN and c.dtype == m.dtype
            and c.dtype in _KERNEL_DTYPES and c.device == m.device
            and device_of(c).partition(":")[0] in ("cpu", "cuda") and c.shape == m.shape
            and c.stride() == m.stride() and c.layout == m.layout == torch.strided)


class Watch:
    """What a decision on ``owner``'s (a ``PostHocEMA``'s) profiles ``ems`` rests on: the
    profiles, their settings, whether their counters agree, and where the tracked tensors sit
    (:class:`~fastema.torch._tensors.slots.Slots`: ``slots`` of the model's, ``mine`` of the
    profiles', from ``entries`` and ``their_entries``). ``stale``: set by torch's registration
    hooks on the model or the owner's modules. Its :meth:`update` runs each profile on its own."""

    def __init__(self, owner: Owner, ems: list, entries: typing.Sequence = (),
                 their_entries: typing.Sequence = ()):
        self.owner_list = owner.ema_models
        self.ems = ems
        self.settings = list(map(_settings, ems))
        self.everys = list(map(_EVERY, ems))
        self.agreed = self._agree()
        self.stale = False
        self.slots = Slots((owner.model,), entries, self)
        self.mine = Slots(ems, their_entries, self)
        self.slots.record()
        self.mine.record()
        self.tracked = self.slots.held()         # the model's tracked tensors (objects) now
        watch((owner.model, owner), self)

    def _agree(self) -> bool:
        """Whether the profiles' counters (``[step, initted]``, the host mirrors, kept in
        ``counters``) agree."""
        counters = self.counters = list(map(_COUNTERS, self.ems))
        return not counters or counters.count(counters[0]) == len(counters)

    def holds(self, owner: Owner) -> bool:
        """The per-step check: the same profiles in the owner, of the same ``update_every``, with
        counters that agree as they did, and where this call reads the tensors (:meth:`reads`) of
        the same settings, every tracked tensor where it was (addresses)."""
        ems, mine = self.ems, self.owner_list
        if owner._modules.get("ema_models") is not mine or len(mine._modules) != len(ems) or \
                not all(map(operator.is_, mine._modules.values(), ems)):
            return False
        if list(map(_EVERY, ems)) != self.everys or self._agree() != self.agreed:
            return False
        if not self.reads():                     # a call that only counts: its cadence is enough
            return not self.stale
        if self.stale or list(map(_settings, ems)) != self.settings or \
                not self.mine.unchanged(False):
            return False
        return self.slots.unchanged(False) or self.follow()

    def reads(self) -> bool:
        """Whether this call reads or writes the tracked tensors (each profile on its own: yes)."""
        return True

    def follow(self) -> bool:
        """After the model's tracked tensors moved: whether the decision still holds (no: it is
        made again)."""
        return False

    def update(self, owner: Owner) -> None:
        """Each profile on its own (ema-pytorch's way)."""
        for e in owner.ema_models:
            typing.cast(KarrasEMA, e).update()


class Shared(Watch):
    """K agreeing ``KarrasEMA`` (``ems``) of one model on one ``FlatShadow`` of K rows
    (``shadow``, each source's own dtype). ``lerped``: ``(name, source, [average per profile])``,
    each average re-pointed here at its row (its values kept), with a storage of its own;
    ``copied``: the same of ``param_or_buffer_names_no_ema`` (copied at each due update). The
    step buffers are re-pointed at one tensor of K steps (one ``add_`` a call)."""

    def __init__(self, owner: Owner, ems: list, entries: list, their_entries: list,
                 lerped: list, copied: list, shadow: FlatShadow):
        with torch.no_grad():
            for name, _, ms in lerped:
                for k, m in enumerate(ms):
                    row = shadow.view(name, k)
                    row.copy_(m)
                    m.data = _own_storage(row)
            self.steps = torch.stack([e._buffer("step") for e in ems])
            for k, e in enumerate(ems):
                e._buffer("step").data = _own_storage(self.steps[k])
        self.step_buffers = [e._buffer("step") for e in ems]
        self.step_at = list(map(DATA_PTR, self.step_buffers))
        super().__init__(owner, ems, entries, their_entries)
        self.shadow = shadow
        self.every = ems[0].update_every
        self.profiles = [PowerFunction(e.gamma) for e in ems]
        self.devices = sorted({g.device for g in shadow.layout.groups})
        self.copy_to = [m for _, _, ms in copied for m in ms]
        self.copy_from = [c for _, c, ms in copied for _ in ms]

    def reads(self) -> bool:
        """The step buffers still where one ``add_`` advances them (else ``stale``), and whether
        this call is a due update (the only one that reads the tensors)."""
        held = [e._buffers.get("step") for e in self.ems]
        if not all(map(operator.is_, held, self.step_buffers)) or \
                list(map(DATA_PTR, held)) != self.step_at:
            self.stale = True
        return self.counters[0][0] % self.every == 0

    def follow(self) -> bool:
        """The model's tensors moved: the shadow follows those whose storage moved with their
        dtype, shape, layout and device kept (``param.data = new``: no new shadow), and the
        decision is made again for anything else (another tensor in a slot, another dtype...)."""
        if not all(map(operator.is_, self.slots.held(), self.tracked)):
            return False
        try:
            self.shadow.check_sources()
        except (TypeError, ValueError):          # a source changed: the decision is made again
            return False
        self.slots.record()
        return True

    def update(self, owner: Owner) -> None:
        """Every profile's ``KarrasEMA.update()``, bit for bit, from the host mirrors
        :meth:`holds` read: the steps advanced (one ``add_``; the buffers' version counters stay
        as the mirrors saw them), a due update's first copy, the copied names, then one lerp
        launch per group, each row with its profile's ``KarrasEMA.beta``."""
        counters = self.counters
        step = counters[0][0]
        for host in counters:
            host[0] = step + 1
        self.steps.add_(1)
        if step % self.every != 0:
            return
        if not counters[0][1]:
            for e in self.ems:
                e.copy_params_from_model_to_ema()
                e._mark_initted()
        if self.copy_to:
            with torch.no_grad():
                torch._foreach_copy_(self.copy_to, self.copy_from)
        t = step + 2.0                           # KarrasEMA.beta's t, after this call's advance
        last = t - self.every
        w = tuple(1.0 - p.between(None, last, t) for p in self.profiles)
        self.shadow.update_checked({d: w for d in self.devices}, "nearest", 0, 0, None)


def decide(owner: Owner) -> Watch:
    """``owner``'s (a ``PostHocEMA``'s) profiles on one shadow (:class:`Shared`) where they agree:
    every profile a ``KarrasEMA`` of the owner's model, none frozen, of one ``update_every``,
    names, flags and counters, each with an ``ema_model`` of its own holding the same names and
    step buffers of int64 on one device; every averaged tensor and its averages plain, strided,
    of one kernel dtype (float32, bfloat16, float16, float64), device, shape and strides; the
    copied ones on the model's device; the shadow made (its sources dense, sharing no memory).
    Otherwise a :class:`Watch` (each profile on its own)."""
    ems = typing.cast("list[KarrasEMA]", list(owner.ema_models))   # (each checked below)
    model = owner.model
    if not ems or any(type(e) is not KarrasEMA or e.model is not model or e.frozen for e in ems):
        return Watch(owner, ems)
    settings = [s[:-1] for s in map(_settings, ems)]
    mods = [e._made() for e in ems]
    if settings.count(settings[0]) != len(ems) or \
            len({id(m) for m in [model, *mods, *ems]}) != 2 * len(ems) + 1:
        return Watch(owner, ems)             # (one ema_model= module for all: each on its own)
    e0 = ems[0]
    sources = _tracked(e0, model)
    theirs = [_tracked(e, m) for e, m in zip(ems, mods)]
    entries = [(0, n, kind) for n, kind, _ in sources]
    their_entries = [(k, f"ema_model.{n}", kind) for k, t in enumerate(theirs) for n, kind, _ in t]
    watched = Watch(owner, ems, entries, their_entries)
    distinct = {id(x) for t in [sources, *theirs] for _, _, x in t}
    if not watched.agreed or any(len(t) != len(sources) for t in theirs) or \
            len(distinct) != len(sources) * (len(ems) + 1):
        return watched
    lerped, copied = [], []
    for i, (name, kind, c) in enumerate(sources):
        ms = [t[i][2] for t in theirs]
        if any(t[i][:2] != (name, kind) for t in theirs):
            return watched
        if e0._skipped(name):
            continue
        if name in e0.param_or_buffer_names_no_ema:
            if any(m.device != c.device for m in ms):
                return watched
            copied.append((name, c, ms))
        elif all(_rowable(c, m) for m in ms):
            lerped.append((name, c, ms))
        else:
            return watched
    steps = [e._buffer("step") for e in ems]
    if any(type(b) is not torch.Tensor or b.dtype != torch.int64 or b.dim()
           or b.device != steps[0].device for b in steps):
        return watched
    if not lerped or (e0.move_ema_to_online_device and any(
            next(m.parameters()).device != next(model.parameters()).device for m in mods)):
        return watched
    try:
        shadow = FlatShadow({name: c for name, c, _ in lerped}, rows=len(ems), dtype="same",
                            init="zeros")
    except (TypeError, ValueError):          # sources sharing memory, or not dense: each on its own
        return watched
    return Shared(owner, ems, entries, their_entries, lerped, copied, shadow)
