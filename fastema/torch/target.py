"""``fastema.torch.TargetNetwork``: a target network (RL) or a momentum teacher (self-supervised
learning) kept as the moving average of an online network, in the target module's own tensors."""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import nn

from .. import _backends, _launch
from .._backends.torch import refuse_foreign, span
from .._checks import resolve_weights, sr_key, stochastic_rounding
from ..average.device_plan import DevicePlan
from ..average.device_plan import check_state as check_device_state
from ..average.plan import Plan
from ..pairs import pair_groups
from ..schedules import MOMENTUM_SCHEDULES, Constant, NumUpdates, PowerWarmup, from_state
from . import _compile, _model, _sharded
from ._model import _matches, _patterns, _unwrap, normalize_name

__all__ = ["TargetNetwork"]

FORMAT = "fastema.torch.TargetNetwork"
VERSION = 1

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MOMENTUMS = (Constant, NumUpdates, PowerWarmup, *MOMENTUM_SCHEDULES)   # what momentum= and warmup= make
_DATA_PTR = torch.Tensor.data_ptr


def _named(module: nn.Module, exclude: tuple, buffers: str) -> dict:
    """``normalised name -> (kind, tensor)`` of what a target network tracks in ``module``."""
    out = {}
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            name = normalize_name(name)
            if _matches(name, exclude) or (kind == "buffer" and buffers == "ignore"):
                continue
            out[name] = (kind, t)
    return out


def _slot(module: nn.Module, name: str, kind: str) -> tuple[dict, str, list]:
    """``(the owner's _parameters or _buffers dict, key, [(parent._modules, part, child), ...])``."""
    prefix, _, key = name.rpartition(".")
    path, parent = [], module
    for part in prefix.split(".") if prefix else ():
        child = parent._modules[part]
        assert child is not None, name          # _named() walked it: a None submodule holds no tensor
        path.append((parent._modules, part, child))
        parent = child
    return (parent._parameters if kind == "parameter" else parent._buffers), key, path


class _Selection:
    """What a target network reads and writes, found by name in both modules, every check made.

    ``tensors`` lists the targets' tensors then the online ones, in the order: averaged, copied
    (floating buffers with ``buffers="copy"``), integer (copied with torch). Nothing is kept
    that is not the modules' own: slots, the modules on the way to them, and launch groups of
    addresses."""

    def __init__(self, online: nn.Module, target: nn.Module, exclude: tuple, buffers: str):
        mine, theirs = _named(target, exclude, buffers), _named(online, exclude, buffers)
        missing, extra = [n for n in theirs if n not in mine], [n for n in mine if n not in theirs]
        if missing or extra:
            what = " and ".join(f"{k} {v[:5]}{e}" for k, v, e in (("lacks", missing, ""),
                                                                   ("has", extra, ", which the online network lacks"))
                                if v)
            raise ValueError(f"the target's names do not match the online network's: the target {what}; make the "
                             f"target a copy of the online network (copy.deepcopy(online)), or exclude= the names "
                             f"that differ. Nothing was written.")
        pieces: dict = {}                               # id(a DTensor) -> its local shard (FSDP2, TP, HSDP)
        for side, named in (("online network", theirs), ("target", mine)):
            for name, (kind, t) in named.items():       # sharded, lazy, ZeRO-3...: by name, before any address
                what = f"the {side}'s {kind} {name!r}"
                if _sharded.is_dtensor(t):
                    pieces[id(t)] = _sharded.local(t, what)[0]
                    t = pieces[id(t)]
                refuse_foreign(t, what)

        def local(t) -> torch.Tensor:
            return pieces.get(id(t), t)

        averaged: list = []
        copied: list = []
        ints: list = []
        for name, (kind, src) in theirs.items():
            dst = mine[name][1]
            if (id(dst) in pieces) != (id(src) in pieces):
                side, other = ("target", "online network") if id(dst) in pieces else ("online network", "target")
                raise ValueError(f"{name!r} is sharded (a DTensor) in the {side} but not in the {other}; shard both "
                                 f"networks the same way (fully_shard(target) with the online network's mesh and "
                                 f"policy). Nothing was written.")
            if id(dst) in pieces and (dst.device_mesh != src.device_mesh or
                                      tuple(dst.placements) != tuple(src.placements) or
                                      tuple(local(dst).shape) != tuple(local(src).shape)):
                raise ValueError(f"{name!r} is sharded differently in the target ({tuple(dst.placements)} on "
                                 f"{dst.device_mesh}, local shape {tuple(local(dst).shape)}) and the online network "
                                 f"({tuple(src.placements)} on {src.device_mesh}, local shape "
                                 f"{tuple(local(src).shape)}); each rank averages its own shards, so shard both the "
                                 f"same way. Nothing was written.")
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"{name!r} has shape {tuple(dst.shape)} in the target but {tuple(src.shape)} in the "
                                 f"online network; they must match. Nothing was written.")
            if dst.device != src.device:
                raise ValueError(f"{name!r} is on {dst.device} in the target but on {src.device} in the online "
                                 f"network; put both networks on one device. Nothing was written.")
            if src.is_complex() or dst.is_complex():
                raise TypeError(f"{name!r} is complex ({src.dtype} -> {dst.dtype}): fastema averages real floating "
                                f"tensors; exclude= it. Nothing was written.")
            if src.is_floating_point() != dst.is_floating_point() or not (
                    src.is_floating_point() or src.dtype == dst.dtype):
                raise TypeError(f"{name!r} is {src.dtype} in the online network but {dst.dtype} in the target; an "
                                f"integer tensor needs the same dtype on both sides. Nothing was written.")
            if not src.is_floating_point():
                ints.append(name)
                continue
            if src.dtype not in _KERNEL_DTYPES or dst.dtype not in _KERNEL_DTYPES:
                raise TypeError(f"{name!r} is {src.dtype} -> {dst.dtype}: fastema's kernels take float32, bfloat16, "
                                f"float16 and float64; exclude= it. Nothing was written.")
            (copied if kind == "buffer" and buffers == "copy" else averaged).append(name)
        if not averaged:
            raise ValueError("the online network has no floating-point parameters to average (check exclude=). "
                             "Nothing was written.")
        self.names = (averaged, copied, ints)
        order = averaged + copied + ints
        self.labels = ([f"the target's {n!r}" for n in order], [f"the online network's {n!r}" for n in order])
        slots = [_slot(target, n, mine[n][0]) for n in order] + [_slot(online, n, theirs[n][0]) for n in order]
        self.tables, self.keys = [s[0] for s in slots], [s[1] for s in slots]
        owners = {id(s[0]): s[0] for s in slots}
        self.owner_tables = list(owners.values())
        paths = {(id(p), k): (p, k, c) for s in slots for p, k, c in s[2]}
        self.path_tables = [p for p, _, _ in paths.values()]
        self.path_keys = [k for _, k, _ in paths.values()]
        self.path_children = [c for _, _, c in paths.values()]
        self.module_tables = list({id(p): p for p in self.path_tables}.values())
        self.counted = self.owner_tables + self.module_tables
        self.lengths = list(map(len, self.counted))
        self.tensors = [mine[n][1] for n in order] + [theirs[n][1] for n in order]
        self.written = self.tensors[:len(averaged) + len(copied)]     # by the kernels: versions bumped by hand
        self.sharded = bool(pieces)                     # then every average reads and writes local shards
        self.address = _sharded.local_address if self.sharded else _DATA_PTR
        self.specs = [(t.dtype, tuple(t.shape), _sharded.is_dtensor(t)) for t in self.tensors]
        self.groups = self.group(self.tensors)

    def layout_guard(self, tensors: list):
        """A check that tensors at ``tensors``' addresses still have their layouts (see
        :func:`fastema._backends.layout_guard`), of the local shards when sharded."""
        guard = _backends.layout_guard(self.pieces(tensors))
        return guard if not self.sharded else (lambda ts: guard(self.pieces(ts)))

    def pieces(self, tensors: list) -> list:
        """Where ``tensors``' elements are on this rank: the local shards of DTensors (each rank
        averages its own, no collective), the tensors themselves when nothing is sharded."""
        return list(map(_sharded.local_tensor, tensors)) if self.sharded else tensors

    def current(self) -> list | None:
        """The tensors the slots hold now if they are the selection's own objects in the same modules
        (dict lookups and identities, no name walk), else None."""
        if not all(map(operator.is_, map(dict.get, self.path_tables, self.path_keys), self.path_children)):
            return None
        if list(map(len, self.counted)) != self.lengths:
            return None                                  # a tensor or module added or deleted: names again
        now = list(map(dict.get, self.tables, self.keys))
        return now if all(map(operator.is_, now, self.tensors)) else None

    def key(self, tensors: list) -> list | None:
        """``tensors``' addresses, then the lengths of the ``_parameters``/``_buffers`` dicts holding
        them and of the ``_modules`` dicts on the way (a tensor or module added or deleted without a
        registration hook shows as a length), or None when one is no tensor with storage."""
        try:
            key = list(map(self.address, tensors))
        except (TypeError, RuntimeError):                # an empty slot; a tensor with no storage of its own
            return None
        key.extend(map(len, self.counted))
        return key

    def group(self, tensors: list) -> tuple:
        """``(averaged groups, copied groups, integer pairs)`` of ``tensors``, checked: no target
        tensor shares a byte with an online one; layouts, devices and no shared memory among the
        targets (:func:`fastema.ops.pair_groups`), every refusal naming the tensor."""
        n = len(tensors) // 2
        for name, t, spec in zip((self.names[0] + self.names[1] + self.names[2]) * 2, tensors, self.specs):
            if (t.dtype, tuple(t.shape), _sharded.is_dtensor(t)) != spec:
                raise ValueError(f"{name!r} changed from {spec[0]} {spec[1]}{' sharded' if spec[2] else ''} to "
                                 f"{t.dtype} {tuple(t.shape)}{' sharded' if _sharded.is_dtensor(t) else ''} after "
                                 f"TargetNetwork(online, target); make a new TargetNetwork. Nothing was written.")
        pieces = self.pieces(tensors)
        dst, src = pieces[:n], pieces[n:]
        shared = _backends.first_shared(list(map(span, dst)), list(map(span, src)))
        if shared is not None:
            mine, theirs = self.labels[0][shared[0]], self.labels[1][shared[1]]
            raise ValueError(f"{mine} shares memory with {theirs} (the same tensor or a view into it): an update "
                             f"would write the online network. The target must be a copy of its own "
                             f"(copy.deepcopy(online)). Nothing was written.")
        a, c = len(self.names[0]), len(self.names[0]) + len(self.names[1])
        dsts, srcs = self.labels
        try:
            return (pair_groups(dst[:a], src[:a], (dsts[:a], srcs[:a])),
                    pair_groups(dst[a:c], src[a:c], (dsts[a:c], srcs[a:c])) if c > a else [], (dst[c:], src[c:]))
        except (ValueError, TypeError) as err:
            if "Nothing was written" in str(err):
                raise
            raise type(err)(f"{err}. Nothing was written.") from None


class TargetNetwork:
    """A target network kept as the moving average of an online network, in its own tensors.

    ``target <- tau * online + (1 - tau) * target`` at every ``update()``, for every floating
    parameter (and floating buffer, with ``buffers="average"``) of the target: the target
    module's own tensors are the average, so it is used in forward passes as it is and this
    object holds no copy of the weights. In the glossary's words ``momentum = decay = 1 - tau``;
    SB3 and TorchRL say ``tau``, DINO, BYOL and MoCo say ``momentum``: give either. One kernel
    launch per (device, dtype) group of (target, online) pairs, on torch's current stream, with
    no host sync; computed as ``target.lerp_(online, tau)`` in float32 (float64 for float64
    tensors), so a float32 target equals ``torch._foreach_lerp_`` bit for bit on the CPU.

    Why a class of its own and not ``EMA(online, into=target)``: an :class:`EMA` owns its
    shadow (flat buffers that it swaps into the model, exports, offloads, keeps several decays
    or BEMA's rows in); here the average is a module that the user owns, runs and checkpoints,
    so none of that applies, and what remains (pairs of the user's tensors, found by name in
    two modules and followed in both) is the pair launcher of :func:`fastema.ops.ema_update_many_`
    with EMA's schedule (:class:`fastema.average.plan.Plan`) and its device plan.

    The pairs are matched by normalised name (``module.`` and ``_orig_mod.`` prefixes stripped):
    a target made by ``copy.deepcopy(online)`` matches. Shapes and devices must match; dtypes may
    differ among float32, bfloat16, float16 and float64 (a float32 target of a bfloat16 online
    network). The target's ``requires_grad`` is left as it is; the kernels write its memory
    directly (no autograd, as under ``torch.no_grad()``) and bump its version counters, as torch's
    in-place operations do (a backward that saved the old target raises).

    Every ``update()`` checks that both modules still hold the tensors it paired (a dict lookup,
    one ``data_ptr()`` and a layout check a tensor, with torch's registration hooks watching the
    modules; see :meth:`_groups`): a tensor whose storage moved (``p.data = new``) is followed; a
    tensor or module replaced, added or removed is looked up again by name and followed if it
    still fits, or refused by name, before anything is written.

    Sharded networks (FSDP2, tensor parallel, HSDP: DTensor parameters), sharded alike: each rank
    averages its own local shards in place, with no collective; a forward that left unsharded
    copies on the modules is resharded first.

    Args:
        online: the network being trained (bare, DDP- or torch.compile-wrapped).
        target: its copy, updated in place (typically ``copy.deepcopy(online)`` with
            ``requires_grad_(False)``).
        tau: the weight of the online network, in ``[0, 1]`` (default 0.005, SB3's, when
            ``momentum`` is not given).
        momentum: instead of ``tau``: the weight kept from the target (``1 - tau``), a float or a
            schedule :class:`fastema.EMA` takes as ``decay=`` (DINO's cosine from 0.996 to 1).
        warmup, min_decay, inv_gamma, power, update_after_step: a warm-up of the momentum, as
            :class:`fastema.torch.EMA`'s.
        update_every: update on every k-th call of ``update()`` (the first call updates);
            ``compensate=True`` uses ``momentum ** k``.
        buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default: the online
            network's, as SB3 does with ``tau=1`` for them), ``"average"`` or ``"ignore"`` (the
            target's buffers, integer ones included, are left alone). Integer buffers are copied.
        exclude: name patterns (fnmatch, normalised names) left alone in the target.
        rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 targets).
        seed: stochastic-rounding seed.
        skip_nonfinite: skip an update (decided on the device, no sync) when an online tensor
            holds inf/NaN: the target keeps its values.
        device_step: keep the update count, the momentum schedule, ``update_every``'s skips and
            the rounding key in device memory, advanced by a one-thread kernel at every call, so
            ``update()`` captured in a CUDA graph replays the schedule exactly. ``None`` (default):
            on when the networks are on a GPU.

    Inside a ``torch.compile``-d function ``update()`` is one custom operator (see :meth:`update`).
    """

    def __init__(self, online: nn.Module, target: nn.Module, tau: float | None = None, *,
                 momentum: Any = None, warmup: str | None = None, min_decay: float = 0.0, inv_gamma: float = 1.0,
                 power: float = 2 / 3, update_after_step: int = 0, update_every: int = 1, compensate: bool = False,
                 buffers: str = "copy", exclude: Sequence[str] = (), rounding: str = "nearest", seed: int = 0,
                 skip_nonfinite: bool = False, device_step: bool | None = None):
        for what, m in (("online", online), ("target", target)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
        if _unwrap(online) is _unwrap(target):
            raise ValueError("target is the online network itself; pass a copy: TargetNetwork(online, "
                             "copy.deepcopy(online))")
        if tau is not None and momentum is not None:
            raise ValueError(f"give tau or momentum (= 1 - tau), not both; got tau={tau!r}, momentum={momentum!r}")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
            raise ValueError(f"tau must be a float in [0, 1], got {tau!r} (a schedule goes to momentum=)")
        if momentum is None:
            momentum = 1.0 - (0.005 if tau is None else float(tau))
        self.plan = Plan(momentum, warmup=warmup, min_decay=min_decay, inv_gamma=inv_gamma, power=power,
                         update_after_step=update_after_step, update_every=update_every, compensate=compensate)
        if self.plan.rows != 1:
            raise ValueError(f"a target network keeps one average; give one momentum, got {momentum!r}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        if device_step is not None and not isinstance(device_step, bool):
            raise TypeError(f"device_step must be True, False or None, got {device_step!r}")
        sr_key(seed, 0)                                     # validates the seed
        self.online, self.target = online, target
        self.buffers, self.exclude = buffers, _patterns("exclude", exclude)
        self.rounding, self.seed, self.skip_nonfinite = rounding, seed, skip_nonfinite
        self._sel = _Selection(_unwrap(online), _unwrap(target), self.exclude, buffers)
        averaged = self._sel.groups[0]
        for g in averaged:
            stochastic_rounding(rounding, g.shadow_kind)   # a stochastic rounding of float32 targets: refused
        self._devices = sorted({g.device for gs in self._sel.groups[:2] for g in gs})
        self._key = self._sel.key(self._sel.tensors)
        self._guard = self._sel.layout_guard(self._sel.tensors)
        self._fsdp = (_sharded.fsdp_modules(_unwrap(online)) + _sharded.fsdp_modules(_unwrap(target))
                      if self._sel.sharded else [])
        self._stale = False                             # set by torch's registration hooks (see _groups)
        _model.watch((_unwrap(online), _unwrap(target)), self)
        self._tables = None if _model._HOOKS else _model.tables_of(_unwrap(online), _unwrap(target))
        self._flags = {d: torch.zeros(1, dtype=torch.int32, device=d) for d in self._devices}
        self._flag_views = {d: _backends.kernel_view(f).reshape(-1) for d, f in self._flags.items()}
        self._on_gpu = any(d != "cpu" for d in self._devices)
        if device_step is None:
            device_step = self._on_gpu
        self._device_plan = DevicePlan(self.plan, averaged, seed, also=self._behind_flags()) if device_step else None
        self._weights: tuple = (None, None)             # (the plan's weights, the kernels' tuple) of the last update
        self._lerps: tuple = (None, None, None, [])     # (the groups, flags, carried, their bound launches)
        self._copies: tuple = (None, None, [])          # (the copied groups, the flags, their bound copy launches)
        self._handle = _compile.register(self)          # what torch.compile's operator finds this object by
        if self._device_plan is not None:
            self._warm()
        self._ops = self._op_lists()

    def _behind_flags(self) -> list[tuple[str, str]]:
        """``(framework, device)`` of the copied buffers (floating and integer): the device plan's
        flags must cover their devices too, where no averaged tensor may be."""
        copied, (ints, _) = self._sel.groups[1], self._sel.groups[2]
        return [(g.framework, g.device) for g in copied] + [("torch", _model._device_name(t)) for t in ints]

    def _warm(self) -> None:
        """Compile and load every kernel ``update()`` launches now, not inside a first graph capture
        (as :class:`fastema.torch.EMA` does): one update against a scratch device plan whose call is
        skipped, so every kernel runs and none writes. The launches bound to the scratch plan are
        dropped; the first update binds its own."""
        scratch = DevicePlan(self.plan, self._sel.groups[0], self.seed, also=self._behind_flags())
        scratch.skip_next()
        self._launch_update(None, None, scratch)
        self._lerps, self._copies = (None, None, None, []), (None, None, [])

    # ------------------------------------------------------------ what it is

    @property
    def momentum(self) -> float:
        """The momentum (``1 - tau``) the next update uses."""
        return float(self.plan.decay)          # type: ignore[arg-type]  # one row

    @property
    def tau(self) -> float:
        """The weight of the online network in the next update (``1 - momentum``)."""
        return 1.0 - self.momentum

    @property
    def updates(self) -> int:
        """Updates made (calls that ``update_every`` skipped are not counted)."""
        return self.plan.updates

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        return self.plan.calls

    @property
    def device_step(self) -> bool:
        """True when the plan lives on the device (see the ``device_step`` argument)."""
        return self._device_plan is not None

    @property
    def names(self) -> dict[str, list[str]]:
        """The target's tensors by what ``update()`` does to them: ``averaged``, ``copied``
        (floating buffers) and ``integer`` (copied)."""
        return dict(zip(("averaged", "copied", "integer"), (list(n) for n in self._sel.names)))

    @property
    def skipped(self) -> dict[str, torch.Tensor]:
        """``device -> int32[1]`` flags of the last update with ``skip_nonfinite=True`` (nonzero: that
        call wrote nothing: an inf/NaN in the online network, or, with the plan on the device, a
        call ``update_every`` skips). Read them when you need them: a read waits for the device."""
        if not self.skip_nonfinite:
            return {}
        return dict(self._flags if self._device_plan is None else self._device_plan.flags)

    @property
    def nbytes(self) -> int:
        """Bytes of memory this object owns: launch tables of addresses, skip flags, the device plan.
        The average is the target's own tensors: no copy of the weights is kept."""
        total = sum(f.numel() * f.element_size() for f in self._flags.values())
        for gs in self._sel.groups[:2]:
            for g in gs:
                total += sum(int(getattr(a, "nbytes", 0)) for a in g.tables.args()[1:])
        if self._device_plan is not None:
            total += sum(a.numel() * a.element_size() for d in self._device_plan.devices.values()
                         for a in d.arrays.values() if isinstance(a, torch.Tensor))
        return total

    def __repr__(self) -> str:
        a, c, i = self._sel.names
        return (f"TargetNetwork(tau={self.tau:.6g}, {len(a)} averaged, {len(c)} copied, {len(i)} integer, "
                f"updates={self.updates}, device_step={self.device_step})")

    def __copy__(self):
        raise TypeError("a TargetNetwork cannot be copied: its launch tables hold the addresses of both networks' "
                        "tensors. Make a new one of the (copied) networks and load this one's state: "
                        "new.load_state_dict(old.state_dict())")

    def __deepcopy__(self, memo):
        self.__copy__()

    # ------------------------------------------------------------ the per-step path

    def _groups(self) -> tuple:
        """The launch groups of the tensors the modules hold now: the last ones when nothing moved;
        else looked up again by name and checked (or refused, writing nothing).

        The usual step costs one dict lookup, one ``data_ptr()`` and a layout check per tensor,
        and a ``len()`` per module table on the way: torch's registration hooks (installed with
        :func:`fastema.torch.registration_hooks`, the default) mark this object stale when a
        parameter, buffer or submodule is set on a watched module, so no module identity is
        checked unless one fired (then the names are looked up again: a tensor registered anywhere in
        the networks is followed or refused by name); writes the hooks do not see (``p.data = new``, a
        direct ``_parameters[k] = t``, ``del model[0]``) show as an address or a length. Two writes
        show only without the hooks, as for :class:`fastema.torch.EMA`: a module put into a
        ``_modules`` dict directly, over another (the old module's tensors, still alive, would be
        averaged), and a tensor put directly into the dict of a module holding no tracked tensor.
        Without the hooks, the modules on the way and the tensors' identities are checked at every
        step, and every module's tables (a ``len()`` each, an identity per submodule)."""
        sel = self._sel
        if not self._stale and _model._HOOKS:
            held = list(map(dict.get, sel.tables, sel.keys))
            if sel.key(held) == self._key and self._guard(held):
                return sel.groups                        # the usual step: nothing moved
        if self._fsdp:                                   # a forward with no backward left unsharded copies
            _sharded.reshard(self._fsdp)
        renamed = self._stale if _model._HOOKS else _model.tables_changed(self._tables)
        now = None if renamed else sel.current()         # (a registration, a module's table: new names?)
        if now is not None and sel.key(now) == self._key and self._guard(now):
            self._stale = False
            return sel.groups
        if now is None:                                  # a tensor or module replaced, added or removed
            try:
                sel = _Selection(_unwrap(self.online), _unwrap(self.target), self.exclude, self.buffers)
            except (ValueError, TypeError) as err:
                raise type(err)(f"the networks changed after TargetNetwork(online, target): {err}") from None
            if sel.names != self._sel.names:
                old, new = set(sum(self._sel.names, [])), set(sum(sel.names, []))
                what = "; ".join(f"{k} {sorted(v)[:5]}" for k, v in (("without", old - new), ("with new", new - old))
                                 if v) or "a tensor changed kind (averaged, copied or an integer buffer)"
                raise ValueError(f"the networks changed after TargetNetwork(online, target): {what}; make a new "
                                 f"TargetNetwork. Nothing was written.")
            sel.specs = self._sel.specs
            groups = sel.group(sel.tensors)              # checked against the construction's dtypes, shapes
            sel.groups = groups
            self._sel, self._key = sel, sel.key(sel.tensors)
            self._guard = sel.layout_guard(sel.tensors)
            self._ops = self._op_lists()
            _model.watch((_unwrap(self.online), _unwrap(self.target)), self)    # new modules, if any
        else:
            groups = sel.group(now)                      # storage moved under a tensor (p.data = new)
            sel.groups = groups
            self._key, self._guard = sel.key(now), sel.layout_guard(now)
        self._stale = False
        self._tables = None if _model._HOOKS else _model.tables_of(_unwrap(self.online), _unwrap(self.target))
        return groups

    def update(self, step: int | None = None) -> None:
        """Move the target towards the online network (call after ``optimizer.step()``).

        Inside a function compiled with ``torch.compile`` the call is one custom operator
        (``fastema::update_``, as :meth:`fastema.torch.EMA.update`), which runs this eager update
        at every call of the compiled code: the schedule advances without recompiling.

        Args:
            step: the training step for the momentum schedule; defaults to the number of
                updates made.
        """
        if torch.compiler.is_compiling():
            _compile.compiled_update(self, step)
            return
        self._eager_update(step)

    def _eager_update(self, step: int | None) -> None:
        pending = self.plan.next(step)                   # checks step before anything else
        plan = self._device_plan
        if plan is None:
            if self._on_gpu and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("TargetNetwork.update() is being captured in a CUDA graph, but this one keeps "
                                   "its schedule on the host (device_step=False): every replay would repeat this "
                                   "call's tau. Make it with device_step=True (the default on a GPU).")
            if not pending.due:
                self.plan.done(pending)
                return
        self._launch_update(step, pending, plan)
        _model.bump_versions(self._sel.written)         # as torch's lerp_ does: a backward that saved the old
        self.plan.done(pending)                          # target raises ("modified by an inplace operation")

    def _launch_update(self, step: int | None, pending, plan: DevicePlan | None) -> None:
        """The launches of one update: with ``plan`` (a device plan), its step and the launches
        behind its flags; else ``pending``'s host weights."""
        averaged, copied, ints = self._groups()
        flags = None
        carried = plan is not None and not self.skip_nonfinite    # the plan step rides in the first lerp launch
        if plan is not None:
            plan.advance(step, carried=carried)                    # (a non-finite scan must run between them)
            flags = plan.flag_views
        elif self.skip_nonfinite:
            for f in self._flags.values():
                f.zero_()                                # on the device, stream-ordered: no sync
            flags = self._flag_views
        if self.skip_nonfinite:                          # the online tensors' inf/NaN: added to the flags
            for g in averaged + copied:
                _launch.launch("nonfinite", g, flag=flags[g.device])   # type: ignore[index]
        stochastic = self.rounding == "stochastic"
        lerps = self._lerps
        if lerps[0] is not averaged or lerps[1] is not flags or lerps[2] is not carried:   # bound once per groups,
            lerps = self._lerps = (averaged, flags, carried, [self._bind(gi, g, flags, stochastic, carried, plan)
                                                              for gi, g in enumerate(averaged)])  # flags, carrying
        if plan is not None:
            given = -1 if step is None else step
            carriers = plan.carriers if carried else {}
            for gi, (g, run) in enumerate(zip(averaged, lerps[3])):
                if carriers.get(g.device) == gi:
                    run(given)
                else:
                    run(plan.weights(g), plan.key(gi, g))
        else:
            if pending.weights != self._weights[0]:      # host floats, the same on every device
                self._weights = (pending.weights, resolve_weights(None, pending.weights, 1, "cpu"))
            w = self._weights[1]
            if stochastic:
                for gi, run in enumerate(lerps[3]):
                    run(w, sr_key(self.seed + (gi << 32), pending.n))
            else:
                for run in lerps[3]:
                    run(w)
        if copied or ints[0]:
            self._carry(copied, ints, flags, plan.flags if plan is not None else self._flags)

    def _bind(self, gi: int, g, flags: dict | None, stochastic: bool, carried: bool, plan: DevicePlan | None):
        """Group ``gi``'s launch, bound once: with ``carried``, the device plan's step and this lerp in one
        launch where the plan lists the group as its device's carrier; else the lerp behind the flags."""
        if carried and plan is not None and plan.carriers.get(g.device) == gi:
            return _launch.plan_lerp_launcher(g, plan.views(g.device), gi, stochastic=stochastic)
        return _launch.lerp_launcher(g, flag=None if flags is None else flags[g.device], stochastic=stochastic)

    def _carry(self, copied: list, ints: tuple, flags: dict | None, tensors: dict) -> None:
        """The copied buffers: floating ones by the copy kernel (bound once per groups and flags),
        integer ones by torch (behind the flags, on the device, when given)."""
        bound = self._copies
        if bound[0] is not copied or bound[1] is not flags:
            bound = self._copies = (copied, flags, [_launch.copy_launcher(
                g, to_shadow=True, row_lo=0, row_hi=1, flag=None if flags is None else flags.get(g.device))
                for g in copied])
        for run in bound[2]:
            run()
        dst, src = ints
        if dst:
            _model.copy_unless_flagged_(dst, src, None if flags is None else tensors)

    # ------------------------------------------------------------ torch.compile (_compile.UpdateOwner)

    def _op_lists(self) -> dict:
        """``{"update": (tensors it writes, tensors it reads)}`` for the compiled operator: the target's
        tensors, the skip flags and the device plan's arrays; the online network's tensors. Made when
        the tensors change (construction, a changed network followed), never while tracing."""
        n = len(self._sel.tensors) // 2
        plan = [] if self._device_plan is None else [
            t for d in self._device_plan.devices.values() for t in d.arrays.values() if isinstance(t, torch.Tensor)]
        flags = list(self._flags.values()) if self.skip_nonfinite else []
        return {"update": (self._sel.tensors[:n] + flags + plan, self._sel.tensors[n:])}

    def _read_from(self, read: list):
        """Read the online network's tensors from ``read`` until the returned function is called (the
        operator handed other tensors than the network's own: a slow path, see ``_compile``): their
        values are copied in, and the online network's own values are put back after."""
        own = self._sel.tensors[len(self._sel.tensors) // 2:]
        with torch.no_grad():
            backup = [o.detach().clone() for o in own]
            for o, r in zip(own, read):
                if o is not r:
                    o.copy_(r)

        def restore():
            with torch.no_grad():
                for o, b in zip(own, backup):
                    o.copy_(b)

        return restore

    def hard_update(self) -> None:
        """``target <- online`` exactly (every averaged and copied tensor; DQN's periodic copy,
        TorchRL's ``HardUpdate``). Not counted as an update; the schedule is not advanced."""
        averaged, copied, ints = self._groups()
        for g in averaged + copied:                      # rare: not bound (the per-step copies stay bound)
            _launch.launch("copy", g, to_shadow=True, row_lo=0, row_hi=1)
        if ints[0]:
            _model.copy_unless_flagged_(ints[0], ints[1], None)
        _model.bump_versions(self._sel.written)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The counters and the schedule (plain Python values). The averaged weights are the
        target's own: save ``target.state_dict()`` beside this."""
        if self._device_plan is not None:
            self._device_plan.read_into(self.plan)       # replayed graphs advanced the device only
        a, c, i = self._sel.names
        return {"format": FORMAT, "version": VERSION, "plan": self.plan.state(),
                "names": {"averaged": list(a), "copied": list(c), "integer": list(i)}}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s counters and schedule; everything is checked before anything
        changes (load the target's weights with ``target.load_state_dict``)."""
        problems: list[str] = []
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TargetNetwork.state_dict(), got {type(state).__name__}")
        if state.get("format") != FORMAT:
            problems.append(f"format is {state.get('format')!r}, not {FORMAT!r} (is it another object's state?)")
        elif state.get("version") != VERSION:
            problems.append(f"version {state.get('version')!r} is not {VERSION} (saved by another fastema?)")
        else:
            names = state.get("names")
            if names != self.names:
                problems.append("the checkpoint's tensor names differ from these networks' (saved for other "
                                "networks, or with other exclude= / buffers=)")
            plan = state.get("plan")
            if not isinstance(plan, dict):
                problems.append("the checkpoint has no plan state")
            else:
                self.plan.check_state(plan, problems)
                if not problems:                         # what TargetNetwork(...) itself refuses
                    other = [s["kind"] for s in plan["schedules"] if not isinstance(from_state(s), _MOMENTUMS)]
                    if other:
                        problems.append(f"its schedule is {other[0]!r}, which momentum= does not take (a float, a "
                                        f"warm-up or a momentum schedule: Cosine, Linear, PiecewiseConstant)")
                    if plan["debias"]:
                        problems.append("its plan is debiased (debias=True), which a target network is not")
                if not problems and self._device_plan is not None:
                    check_device_state(self.plan, plan, self.seed, problems)
        if problems:
            raise ValueError("cannot load this TargetNetwork state: " + "; ".join(problems) + ". Nothing was loaded.")
        self.plan.load_state(state["plan"])
        if self._device_plan is not None:
            self._device_plan.load(self.plan, self.seed)
