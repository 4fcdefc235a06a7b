"""The pair side of :class:`fastema.torch.TargetNetwork`: two modules paired by name, checked,
and followed at every update, as the engine's :class:`~fastema.average.ModelAdapter` over
the two :class:`~fastema.pairs.PairShadow` of their tensors (the averaged pairs, the copied
floating buffers) and the integer buffers copied with torch. Where the tensors sit, and the
per-step check that they still sit there, is a :class:`~fastema.torch._tensors.slots.Slots` over
both modules; this module keeps the selection (by name, every check made)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ... import _backends
from ..._backends.torch import refuse_foreign, span
from ...pairs import PairShadow, pair_groups
from .._sharding import params as _sharded
from .follow import Followed
from .hooks import any_matches, names_of, normalize_name, unwrap, watch
from .slots import Slots, bump_versions, copy_unless_flagged_, device_name, storage_key

__all__ = ["TorchPairs"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _named(module: nn.Module, exclude: tuple, buffers: str) -> dict:
    """``normalised name -> (kind, tensor)`` of what a target network tracks in ``module``."""
    out, names = {}, names_of(module, normalize_name)      # (a tie by any of its names)
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            name = normalize_name(name)
            if any_matches(names.get(id(t), [name]), exclude) or (kind == "buffer" and buffers == "ignore"):
                continue
            out[name] = (kind, t)
    return out


class _Selection:
    """What a target network reads and writes, found by name in both modules, every check made.

    ``tensors`` lists the targets' tensors then the online ones, in the order: averaged, copied
    (floating buffers with ``buffers="copy"``), integer (copied with torch); ``slots`` is where
    they sit (not recorded yet), the modules on the way held weakly (a freed one marks ``owner``
    stale); ``groups`` the launch groups of their addresses."""

    def __init__(self, online: nn.Module, target: nn.Module, exclude: tuple, buffers: str, owner):
        mine, theirs = _named(target, exclude, buffers), _named(online, exclude, buffers)
        missing, extra = [n for n in theirs if n not in mine], [n for n in mine if n not in theirs]
        if missing or extra:
            what = " and ".join(f"{k} {v[:5]}{e}" for k, v, e in (("lacks", missing, ""),
                                                                   ("has", extra, ", which the "
                                                                                  "online network "
                                                                                  "lacks"))
                                if v)
            raise ValueError("the target's names do not match the online network's: the target "
                             f"{what}; make the target a copy of the online network "
                             "(copy.deepcopy(online)), or exclude= the names that differ. Nothing "
                             "was written.")
        # id(a DTensor) -> its local shard (FSDP2, TP, HSDP)
        pieces: dict = {}
        # id(a ZeRO-3 parameter) -> (valid part, layout)
        zero3: dict = {}
        for side, named in (("online network", theirs), ("target", mine)):
            # sharded, lazy, ZeRO-3...: by name, before any address
            for name, (kind, t) in named.items():
                what = f"the {side}'s {kind} {name!r}"
                if _sharded.is_dtensor(t):
                    pieces[id(t)] = _sharded.local(t, what)[0]
                    t = pieces[id(t)]
                elif _sharded.is_zero3(t):
                    if side == "target" and getattr(t, "ds_secondary_tensor", None) is not None:
                        raise TypeError(f"{what} has a secondary ZeRO-3 partition (ZeRO++ hpZ, "
                                        "zero_hpz_partition_size), which its forward gathers from "
                                        "and an update of the primary one would leave stale: make "
                                        "the target without hpZ. Nothing was written.")
                    zero3[id(t)] = _sharded.zero3_piece(t, what)
                    t = zero3[id(t)][0]
                refuse_foreign(t, what)

        def local(t) -> torch.Tensor:
            return zero3[id(t)][0] if id(t) in zero3 else pieces.get(id(t), t)

        averaged: list = []
        copied: list = []
        ints: list = []
        # the target's memory averaged -> its first name: a buffer aliasing it is averaged once
        seen: dict = {}
        for name, (kind, src) in theirs.items():
            dst = mine[name][1]
            if (id(dst) in pieces) != (id(src) in pieces):
                side, other = ("target", "online network") if id(dst) in pieces else ("online network", "target")
                raise ValueError(f"{name!r} is sharded (a DTensor) in the {side} but not in the "
                                 f"{other}; shard both networks the same way (fully_shard(target) "
                                 "with the online network's mesh and policy). Nothing was written.")
            if id(dst) in pieces and (dst.device_mesh != src.device_mesh or
                                      tuple(dst.placements) != tuple(src.placements) or
                                      tuple(local(dst).shape) != tuple(local(src).shape)):
                raise ValueError(f"{name!r} is sharded differently in the target "
                                 f"({tuple(dst.placements)} on {dst.device_mesh}, local shape "
                                 f"{tuple(local(dst).shape)}) and the online network "
                                 f"({tuple(src.placements)} on {src.device_mesh}, local shape "
                                 f"{tuple(local(src).shape)}); each rank averages its own shards, "
                                 "so shard both the same way. Nothing was written.")
            if _sharded.full_shape(dst) != _sharded.full_shape(src):
                raise ValueError(f"{name!r} has shape {_sharded.full_shape(dst)} in the target but "
                                 f"{_sharded.full_shape(src)} in the online network; they must "
                                 "match. Nothing was written.")
            _zero3_alike(name, zero3.get(id(dst)), zero3.get(id(src)))
            if local(dst).device != local(src).device:
                raise ValueError(f"{name!r} is on {local(dst).device} in the target but on "
                                 f"{local(src).device} in the online network; put both networks on "
                                 "one device. Nothing was written.")
            if src.is_complex() or dst.is_complex():
                raise TypeError(f"{name!r} is complex ({src.dtype} -> {dst.dtype}): fastema "
                                "averages real floating tensors; exclude= it. Nothing was written.")
            if src.is_floating_point() != dst.is_floating_point() or not (
                    src.is_floating_point() or src.dtype == dst.dtype):
                raise TypeError(f"{name!r} is {src.dtype} in the online network but {dst.dtype} in "
                                "the target; an integer tensor needs the same dtype on both sides. "
                                "Nothing was written.")
            if not src.is_floating_point():
                ints.append(name)
                continue
            if src.dtype not in _KERNEL_DTYPES or dst.dtype not in _KERNEL_DTYPES:
                raise TypeError(f"{name!r} is {src.dtype} -> {dst.dtype}: fastema's kernels take "
                                "float32, bfloat16, float16 and float64; exclude= it. Nothing was "
                                "written.")
            key = storage_key(local(dst))
            if kind == "buffer" and buffers == "copy" and key not in seen:
                copied.append(name)
                continue
            if key in seen and storage_key(local(theirs[seen[key]][1])) != storage_key(local(src)):
                first = seen[key]
                raise ValueError(f"the target's {name!r} shares memory with its {first!r} but "
                                 f"the online network's {name!r} is not its {first!r}: one memory "
                                 "cannot hold both; make the target a copy of the online network "
                                 f"(copy.deepcopy(online)), or exclude= {name!r}. Nothing was "
                                 "written.")
            # (the same memory again: averaged once, pair_groups keeps the pair once)
            if key is not None:
                seen.setdefault(key, name)
            averaged.append(name)
        if not averaged:
            raise ValueError("the online network has no floating-point parameters to average "
                             "(check exclude=). Nothing was written.")
        self.names = (averaged, copied, ints)
        order = averaged + copied + ints
        self.labels = ([f"the target's {n!r}" for n in order], ["the online network's "
                                                                f"{n!r}" for n in order])
        # then every average reads and writes local shards
        sharded = bool(pieces) or bool(zero3)
        fsdp = _sharded.fsdp_modules(online) + _sharded.fsdp_modules(target) if pieces else []
        entries = [(0, n, mine[n][0]) for n in order] + [(1, n, theirs[n][0]) for n in order]
        self.slots = Slots((target, online), entries, owner, sharded=sharded, layouts=True, fsdp=fsdp)
        self.tensors = self.slots.tensors
        # by the kernels: versions bumped by hand
        self.written = self.tensors[:len(averaged) + len(copied)]
        self.specs = [_spec(t) for t in self.tensors]
        # ZeRO-3: the elements of each partition that are not padding (None: not partitioned); the
        # target's partitioned parameters, whose gathered copies are released before a write
        self.valid = [zero3[id(t)][0].numel() if id(t) in zero3 else None for t in self.tensors]
        self.zero3 = [t for t in self.tensors[:len(order)] if id(t) in zero3]
        self.groups = self.group(self.tensors)
        self.ints = self.groups[2]

    def group(self, tensors: list) -> tuple:
        """``(averaged groups, copied groups, integer pairs)`` of ``tensors``, checked: no target
        tensor shares a byte with an online one; layouts, devices and no shared memory among the
        targets (:func:`fastema.pairs.pair_groups`), every refusal naming the tensor."""
        n = len(tensors) // 2
        for name, t, spec in zip((self.names[0] + self.names[1] + self.names[2]) * 2, tensors, self.specs):
            if _spec(t) != spec:
                now = _spec(t)
                raise ValueError(f"{name!r} changed from {spec[0]} "
                                 f"{spec[1]}{' sharded' if spec[2] else ''} to {now[0]} "
                                 f"{now[1]}{' sharded' if now[2] else ''} after "
                                 "TargetNetwork(online, target); make a new TargetNetwork. Nothing "
                                 "was written.")
        pieces = [p if v is None else p[:v] for p, v in zip(self.slots.pieces(tensors), self.valid)]
        dst, src = pieces[:n], pieces[n:]
        shared = _backends.first_shared(list(map(span, dst)), list(map(span, src)))
        if shared is not None:
            mine, theirs = self.labels[0][shared[0]], self.labels[1][shared[1]]
            raise ValueError(f"{mine} shares memory with {theirs} (the same tensor or a view into "
                             "it): an update would write the online network. The target must be a "
                             "copy of its own (copy.deepcopy(online)). Nothing was written.")
        a, c = len(self.names[0]), len(self.names[0]) + len(self.names[1])
        dsts, srcs = self.labels
        # a copied buffer must not write what is averaged (a buffer viewing part of a weight)
        shared = _backends.first_shared(list(map(span, dst[:a])), list(map(span, dst[a:c])))
        if shared is not None:
            raise ValueError(f"{dsts[a + shared[1]]} (a buffer copied from the online network) "
                             f"shares memory with {dsts[shared[0]]}, which is averaged: the copy "
                             "would overwrite the average; make the target a copy of the online "
                             "network (copy.deepcopy(online)), or exclude= the buffer. Nothing was "
                             "written.")
        try:
            return (pair_groups(dst[:a], src[:a], (dsts[:a], srcs[:a])),
                    pair_groups(dst[a:c], src[a:c], (dsts[a:c], srcs[a:c])) if c > a else [], (dst[c:], src[c:]))
        except (ValueError, TypeError) as err:
            if "Nothing was written" in str(err):
                raise
            raise type(err)(f"{err}. Nothing was written.") from None


def _spec(t) -> tuple:
    """What a tracked tensor must stay: its dtype, full shape, and whether it is sharded."""
    return t.dtype, _sharded.full_shape(t), _sharded.is_sharded(t)


def _zero3_alike(name: str, dst, src) -> None:
    """Refuse, by name, a pair whose ZeRO-3 partitions (``(valid part, layout)`` of
    :func:`fastema.torch._sharding.params.zero3_piece`, or None) are not the same elements of the
    parameter on this rank: each rank averages its own partitions, with no gather."""
    if dst is None and src is None:
        return
    if dst is None or src is None:
        side, other = ("target", "online network") if dst is not None else ("online network", "target")
        raise ValueError(f"{name!r} is DeepSpeed ZeRO-3 partitioned in the {side} but not in the "
                         f"{other}; each rank averages its own partitions, so make both with the "
                         "same stage-3 config (the reference as TRL's prepare_deepspeed makes it: "
                         "deepspeed.initialize(model=ref, config=the policy's config)). Nothing "
                         "was written.")
    if dst[1] != src[1]:
        (r1, k1, s1, n1, _), (r2, k2, s2, n2, _) = dst[1], src[1]
        raise ValueError(f"{name!r} is ZeRO-3 partitioned differently in the target (rank {k1} of "
                         f"ranks {list(r1)}, partitions of {s1} of {n1} elements) and the online "
                         f"network (rank {k2} of {list(r2)}, {s2} of {n2}); each rank averages its "
                         "own partitions, so partition both over the same ranks (the same stage-3 "
                         "config and data-parallel group). Nothing was written.")


class TorchPairs(Followed):
    """The engine's adapter of a target network (its face's side): a :class:`_Selection` of both
    modules, the averaged pairs (:attr:`avg`, the engine's shadow) and the copied floating buffers
    (:attr:`copied`) as :class:`~fastema.pairs.PairShadow`, the integer buffers (copied with
    torch), the per-step check that both modules still hold what was paired (:meth:`follow`), and
    the compiled operator's lists (:meth:`op_lists`, :meth:`read_from`). Watched by torch's
    registration hooks (``stale``)."""

    def __init__(self, online: nn.Module, target: nn.Module, exclude: tuple, buffers: str):
        self.online, self.target, self.exclude, self.buffers = online, target, exclude, buffers
        # set by torch's registration hooks (see Followed)
        self.stale = False
        self.sel = sel = _Selection(unwrap(online), unwrap(target), exclude, buffers, self)
        self.slots = sel.slots
        averaged, copied, _ = sel.groups
        self.avg = PairShadow((), (), groups=averaged)
        self.copied = PairShadow((), (), groups=copied)
        self.devices = sorted({g.device for gs in sel.groups[:2] for g in gs})
        # the host plan's
        self.flags = {d: _backends.zeros(("torch", d), 1, np.int32) for d in self.devices}
        for f in self.flags.values():
            # fastema's own: launches bind their views once
            _backends.mark_made_here(f)
        watch((unwrap(online), unwrap(target)), self)
        self.slots.record()
        self._ops: tuple = (None, None, {})              # (selection, guard, their lists)

    def behind_flags(self) -> list[tuple[str, str]]:
        """``(framework, device)`` of the copied buffers (floating and integer): a device plan's
        flags must cover their devices too, where no averaged tensor may be."""
        return [(g.framework, g.device) for g in self.sel.groups[1]] + \
            [("torch", device_name(t)) for t in self.sel.ints[0]]

    # ------------------------------------------------------------ ModelAdapter

    def begin(self, due: bool) -> None:
        """Before an update call that folds: both networks followed (:meth:`follow`; its usual step,
        one check, inlined: the per-step path)."""
        if due and not self.slots.unchanged(self.stale):
            self.follow()
        # ZeRO-3: no gathered copy may outlive the write
        if due and self.sel.zero3:
            _sharded.release_gathered(self.sel.zero3, "the target")

    def scan(self, flags: dict | None) -> dict:
        """The online tensors' inf/NaN added to ``flags`` (a device plan's), or to this object's own
        flags, zeroed first (the host plan's): on the device, no sync."""
        if flags is None:
            flags = self.flags
            for f in flags.values():
                _backends.zero_(f)                       # on the device, stream-ordered: no sync
        flags = self.avg.scan_groups(flags)
        return self.copied.scan_groups(flags)

    def carry(self, flags: dict | None) -> None:
        """After the lerps: the copied buffers (behind ``flags``), the integer ones, and the
        autograd versions of what the kernels wrote, as torch's ``lerp_`` bumps them (a backward
        that saved the old target raises "modified by an inplace operation")."""
        sel = self.sel
        if sel.groups[1]:
            self.copied.copy_from_sources_checked(flags)
        dst, src = sel.ints
        if dst:
            copy_unless_flagged_(dst, src, flags)
        bump_versions(sel.written)

    def copy_all(self) -> None:
        """``target <- online`` for every tensor tracked (a hard update), autograd versions
        bumped."""
        self.follow()
        if self.sel.zero3:
            _sharded.release_gathered(self.sel.zero3, "the target")
        self.avg.copy_from_sources_checked(None)
        self.carry(None)

    # ------------------------------------------------------------ torch.compile (_compile)

    def op_lists(self, guarded: bool, plan: list) -> dict:
        """``{"update": (tensors it writes, tensors it reads)}`` for the compiled operator: the
        target's tensors, the skip flags (``guarded``: ``skip_nonfinite``) and the device plan's
        arrays (``plan``); the online network's tensors. Made again when the pairs were looked up
        again (a changed network followed) or the guard switched, never while tracing."""
        sel = self.sel
        of, was, ops = self._ops
        if of is not sel or was is not guarded:
            n = len(sel.tensors) // 2
            flags = list(self.flags.values()) if guarded else []
            ops = {"update": (sel.tensors[:n] + flags + plan, sel.tensors[n:])}
            self._ops = (sel, guarded, ops)
        return ops

    def read_from(self, read: list) -> Callable[[], None]:
        """Read the online network's tensors from ``read`` until the returned function is called
        (the operator handed other tensors than the network's own: a slow path, see ``_compile``):
        their values are copied in, and the online network's own values are put back after."""
        own = self.sel.tensors[len(self.sel.tensors) // 2:]
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

    # ------------------------------------------------------------ following the modules

    def follow(self) -> bool:
        """Make the pairs those of the tensors the modules hold now: nothing to do when nothing
        moved; else looked up again by name and checked (or refused, writing nothing).

        The usual step costs one dict lookup, one ``data_ptr()`` and a layout check per tensor,
        and a ``len()`` per module table on the way
        (:meth:`fastema.torch._tensors.slots.Slots.unchanged`): torch's registration hooks
        (installed with :func:`fastema.torch.registration_hooks`, the default) mark this object
        stale when a parameter, buffer or submodule is set on a watched module, so no module
        identity is checked unless one fired (then the names are looked up again: a tensor
        registered anywhere in the networks is followed or refused by name); writes the hooks do not
        see (``p.data = new``, a direct ``_parameters[k] = t``, ``del model[0]``) show as an address
        or a length. Two writes show only without the hooks, as for :class:`fastema.torch.EMA`: a
        module put into a ``_modules`` dict directly, over another (the old module's tensors, still
        alive, would be averaged), and a tensor put directly into the dict of a module holding no
        tracked tensor. Without the hooks, the modules on the way and the tensors' identities are
        checked at every step, and every module's tables (a ``len()`` each, an identity per
        submodule)."""
        return Followed.follow(self)

    def _relook(self, moved: bool, renamed: bool) -> None:
        sel, slots = self.sel, self.slots
        # (a registration, a module's table: new names?)
        now = None if renamed else slots.current()
        if now is not None and not moved:
            return
        # a tensor or module replaced, added or removed
        if now is None:
            try:
                sel = _Selection(unwrap(self.online), unwrap(self.target), self.exclude, self.buffers, self)
            except (ValueError, TypeError) as err:
                raise type(err)("the networks changed after TargetNetwork(online, target): "
                                f"{err}") from None
            if sel.names != self.sel.names:
                old, new = set(sum(self.sel.names, [])), set(sum(sel.names, []))
                what = "; ".join(f"{k} {sorted(v)[:5]}" for k, v in (("without", old - new), ("with new", new - old))
                                 if v) or "a tensor changed kind (averaged, copied or an integer buffer)"
                raise ValueError("the networks changed after TargetNetwork(online, target): "
                                 f"{what}; make a new TargetNetwork. Nothing was written.")
            sel.specs = self.sel.specs
            # checked against the construction's dtypes, shapes
            sel.groups = sel.group(sel.tensors)
            sel.ints = sel.groups[2]
            self.sel, self.slots = sel, sel.slots
            sel.slots.record()
            watch((unwrap(self.online), unwrap(self.target)), self)    # new modules, if any
        else:
            # storage moved under a tensor (p.data = new)
            sel.groups = sel.group(now)
            sel.ints = sel.groups[2]
            slots.record(now)
        self.avg.regroup(sel.groups[0])
        self.copied.regroup(sel.groups[1])
