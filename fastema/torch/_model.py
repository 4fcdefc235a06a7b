"""The model side of a torch model average: :class:`TorchModel`, which of the model's tensors are
averaged or copied, where they are, and following the model as it changes under the average.

A :class:`TorchModel` owns its selection (averaged and copied names, integer buffers, DTensor
layouts, DeepSpeed's float32 masters; PEFT models: :func:`resolve_trainable_only`), the two
shadows of what it reads (``avg``, made by the face; ``copy``, the copied floating buffers), the
owner slots and the per-step address check, following re-registered or moved tensors
(:meth:`TorchModel.follow`), settling FSDP2 / ZeRO-3 gathered copies before the model's tensors
are written, and the tensors the ``torch.compile`` operators declare. It is the engine's
``ModelAdapter`` (:meth:`~TorchModel.begin`, :meth:`~TorchModel.scan`, :meth:`~TorchModel.carry`)
and what the registration hooks (:mod:`fastema.torch._hooks`) watch. The averages
(:mod:`fastema.torch._average`) have one.
"""
from __future__ import annotations

import operator
import sys
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._backends.torch import refuse_foreign as _refuse_foreign_torch
from ..flat import FlatShadow
from . import _deepspeed, _sharded
from ._hooks import _HOOKS, _matches, _patterns, _unwrap, _watch, tables_changed, tables_of
from ._slots import (
    _DATA_PTR,
    _disjoint_groups,
    _local_key,
    _storage_key,
    _tensors_of,
    copy_unless_flagged_,
)

__all__ = ["TorchModel", "is_peft_model", "resolve_trainable_only"]


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (bare or DDP- / torch.compile-wrapped) and for any model with
    adapters in a ``peft_config`` dict (transformers models after ``add_adapter`` / ``load_adapter``).
    Does not import peft."""
    inner = _unwrap(model)
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(inner, getattr(peft, "PeftModel", ())):
        return True
    config = getattr(inner, "peft_config", None)
    return isinstance(config, dict) and bool(config)


def resolve_trainable_only(model: nn.Module, trainable_only: bool | None) -> tuple[bool, bool]:
    """``(trainable_only, defaulted)``: ``None`` means True for a PEFT model (``defaulted`` is
    then True: the average says so once it is made), False for any other model."""
    if trainable_only is None:
        peft = is_peft_model(model)
        return peft, peft
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only must be True, False or None (True for PEFT models), got {trainable_only!r}")
    return trainable_only, False


def _frozen(model: nn.Module, kind: str, name: str, t: torch.Tensor) -> bool:
    """What ``trainable_only=True`` leaves out: a parameter with ``requires_grad=False``, a buffer
    of a module with no trainable parameter of its own (a frozen base model's statistics)."""
    if kind == "parameter":
        return not t.requires_grad
    prefix = name.rpartition(".")[0]
    owner = model.get_submodule(prefix) if prefix else model
    return not any(p is not None and p.requires_grad for p in owner._parameters.values())


class TorchModel:
    """The model side of one torch model average: which tensors it tracks and where they are now.

    Args:
        model: the model (bare, DDP-, torch.compile- or DeepSpeed-wrapped).
        make_shadow: ``averaged (name -> tensor) -> the shadow`` of the averaged tensors (``avg``).
        buffers, exclude, copy, trainable_only: the face's arguments (see :class:`fastema.torch.EMA`).
        kind: the face's class name, for messages (``"EMA"``).
        check: the face's refusals before every update call (a swapped model, a CUDA graph
            capture its plan cannot replay); :meth:`begin` calls it first.
        fresh: whether nothing but the construction went into the face's averages yet.
        restart: start the face's averages over from the model (after a DDP wrap; see
            :func:`fastema.torch._hooks._wrapped_in_ddp`, which calls ``_fresh`` and ``_restart``).
    """

    def __init__(self, model: nn.Module, make_shadow: Callable[[dict], Any], *, buffers: str,
                 exclude: Sequence[str], copy: Sequence[str], trainable_only: bool | None, kind: str,
                 check: Callable[[], None], fresh: Callable[[], bool],
                 restart: Callable[[nn.Module | None], None]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.kind, self.check, self._fresh, self._restart = kind, check, fresh, restart
        self.buffers = buffers
        self.exclude, self.copy_patterns = _patterns("exclude", exclude), _patterns("copy", copy)
        self.trainable_only, self.defaulted = resolve_trainable_only(model, trainable_only)   # None: True for PEFT
        self.model = model
        inner = _unwrap(model)
        self.int_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (model's, copy)
        self.fsdp = _sharded.fsdp_modules(inner)              # FSDP2 modules, resharded before any read
        self.engine = model if type(model).__name__ == "DeepSpeedEngine" else None
        self.steps = _deepspeed.steps(self.engine)            # DeepSpeed: one fold per optimizer step (M2)
        self.specs: dict[str, _sharded.Spec] = {}            # name -> layout of a DTensor's local shard
        _sharded.reshard(self.fsdp)
        averaged, copied = self._select(inner)
        self.masters = _deepspeed.find(self.engine, averaged, f"{kind}(engine)", stacklevel=5)
        if self.masters is not None:                    # ZeRO-3: the optimizer's float32 masters read instead
            averaged.update(self.masters.views)
            self.specs.update(self.masters.specs)       # ZeRO-1/2: pieces of the parameters, gathered in exports
        self.known = set(_tensors_of(inner))             # every name at construction: others are new (M4)
        self.modules_now: tuple | None = None            # without the hooks: the modules' tables (follow)
        if not averaged:
            raise ValueError("the model has no floating-point parameters to average (check exclude= and copy="
                             + (", and trainable_only" + (" (True by default for a PEFT model)" if self.defaulted
                                                          else "") + ": no parameter has requires_grad=True)"
                                if self.trainable_only else ")"))
        self.names = (list(averaged), list(copied))
        self.address: Callable[[Any], int] = _sharded.local_address if self.specs else _DATA_PTR
        self.zero3 = [p for p in inner.parameters() if _sharded.is_zero3(p)]
        self.avg = make_shadow(averaged)
        self.copy = FlatShadow(copied, dtype="same") if copied else None
        if self.copy is not None:                       # no memory in both groups (a buffer viewing a weight)
            _disjoint_groups(self.avg, self.copy)
        self._stale = False                             # set by torch's registration hooks (see follow)
        self._resync = False                            # the model was wrapped in DDP after construction
        self.slots = self._owner_slots()
        self.addresses = self._addresses_now()
        self.plan_tensors: list = []                    # the face's device-plan arrays (written by an update)
        self.ops = self.op_lists()
        _watch(inner, self)

    # ------------------------------------------------------------ the engine's ModelAdapter

    def begin(self, due: bool) -> None:
        """Before an update call: the face's refusals, then, when the call folds, follow the model
        (every group, or a refusal before anything is written)."""
        self.check()
        if due:
            self.follow()

    def carry(self, flags: dict | None) -> None:
        """After an update (:meth:`begin` followed the model in this call): the copied buffers, the
        integer ones (copied with torch), each kept where ``flags`` is set on its device."""
        copy = self.copy
        if copy is not None:                        # addresses checked by follow() in this update
            copy.copy_from_sources_checked(flags)
        if self.int_buffers:
            srcs, dsts = zip(*self.int_buffers.values())
            copy_unless_flagged_(dsts, srcs, flags)

    def copy_buffers(self) -> None:
        """The copied and integer buffers from the model, as they are now (a restart, a snapshot of
        a window: the shadows check the addresses themselves)."""
        if self.copy is not None:
            self.copy.copy_from_sources()
        if self.int_buffers:
            srcs, dsts = zip(*self.int_buffers.values())
            copy_unless_flagged_(dsts, srcs, None)

    def scan(self, flags: dict | None) -> dict:
        """Non-finite flags over every averaged and copied floating tensor (device values, no sync),
        added to ``flags`` when given."""
        flags = self.avg.scan_nonfinite(flags)
        if self.copy is not None:
            flags = self.copy.scan_nonfinite(flags)
        return flags

    # ------------------------------------------------------------ the model's tensors

    def _select(self, model: nn.Module) -> tuple[dict, dict]:
        """``(averaged, copied)``: ``name -> tensor`` of what this average reads (local shards of
        sharded tensors); integer and complex-copied tensors go to ``int_buffers``."""
        averaged, copied = {}, {}
        wrapped = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module." in n]
        if wrapped:
            raise TypeError(f"the model is wrapped by FSDP1 (FullyShardedDataParallel; {wrapped[0]!r}): its "
                            f"parameters are rank-dependent pieces of flat parameters. Use FSDP2 "
                            f"(torch.distributed.fsdp.fully_shard), or make the EMA of an unwrapped copy of "
                            f"the model. Nothing was written.")
        seen: dict = {}                         # storage key -> first name: a tie or alias is averaged once
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if _matches(name, self.exclude) or (self.trainable_only and _frozen(model, kind, name, t)):
                    continue
                if _sharded.is_sharded(t):     # FSDP2 / tensor parallel / ZeRO-3: this rank's local shard
                    t, self.specs[name] = _sharded.local(t, f"{kind} {name!r}")
                _refuse_foreign_torch(t, f"{kind} {name!r}")   # lazy, ZeRO-3...: by name, first
                key = _storage_key(t)
                if key is not None and key in seen:
                    continue                    # the same memory under another name: exported under both
                if key is not None:
                    seen[key] = name
                if t.is_complex():
                    if not _matches(name, self.copy_patterns):
                        raise TypeError(f"{kind} {name!r} is complex ({t.dtype}): fastema averages real "
                                        f"floating tensors; list it in copy= to carry its latest value, or "
                                        f"exclude= it")
                    self.int_buffers[name] = (t, t.detach().clone())
                elif not t.is_floating_point():   # integer tensors travel as copies
                    self.int_buffers[name] = (t, t.detach().clone())
                elif kind == "buffer" and self.buffers == "ignore":
                    continue
                elif _matches(name, self.copy_patterns) or (kind == "buffer" and self.buffers == "copy"):
                    copied[name] = t
                else:
                    averaged[name] = t
        return averaged, copied

    def _owner_slots(self) -> tuple:
        """(the owning module's _parameters or _buffers dict, key, tensor) of every tracked tensor, for
        the per-step check that the model still holds the tensors the shadow reads (H3); (parent's
        _modules, key, weak reference) of every module on the way to one, checked at every step
        without the registration hooks; and those _parameters and _buffers dicts once each, whose
        lengths are checked at every step (a tensor written into one directly calls no hook, M4).
        The references are weak: a module deleted from the model (``del model.layer`` calls no
        hook) marks the average stale when it is freed."""
        inner = _unwrap(self.model)
        params = {n for n, _ in inner.named_parameters()}
        named: dict[str, torch.Tensor] = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        slots: list = []
        paths: dict = {}
        owners: dict = {}
        me = weakref.ref(self)

        def mark_stale(_):                      # a module on the way was deleted (del model.layer: no hook)
            side = me()
            if side is not None:
                side._stale = True

        for name in self.names[0] + self.names[1] + list(self.int_buffers):
            prefix, _, key = name.rpartition(".")
            owner = inner.get_submodule(prefix) if prefix else inner
            table = owner._parameters if name in params else owner._buffers
            slots.append((table, key, named[name]))
            owners[id(table)] = table
            parent = inner
            for part in prefix.split(".") if prefix else ():   # the modules on the way (hooks off)
                child = parent._modules[part]
                assert child is not None, name    # named_parameters() walked it: a None submodule holds none
                if (id(parent), part) not in paths:
                    paths[(id(parent), part)] = (parent._modules, part, weakref.ref(child, mark_stale))
                parent = child
        columns = lambda rows: tuple(zip(*rows)) if rows else ((), (), ())  # noqa: E731
        return columns(slots), columns(list(paths.values())), list(owners.values())

    def _addresses_now(self) -> list | None:
        """The address of the tensor each tracked slot of the model holds now (one dict lookup and one
        data_ptr() per tensor), then the lengths of the _parameters and _buffers dicts holding them (a
        len() per dict), or None when a slot is empty. Tensors written into _parameters without
        torch's registration hooks (model.to("meta"), overwrite-on-conversion, direct writes; a new
        name changes a length), and storage moved under a tensor show here. With the hooks removed
        (registration_hooks(False)) the modules on the way are checked too."""
        tables, keys, _ = self.slots[0]
        if not _HOOKS:
            mods, names, held = self.slots[1]
            if not all(map(operator.is_, map(dict.get, mods, names), map(weakref.ref.__call__, held))):
                return None
        try:
            now = list(map(self.address, map(dict.get, tables, keys)))
        except TypeError:                         # a slot is empty: the tensor was removed
            return None
        now.extend(map(len, self.slots[2]))
        if self.masters is not None:             # DeepSpeed may move its flat master buffers (offload_states)
            now.extend(self.masters.addresses())
        return now

    def _modules_changed(self) -> bool:
        """Without the registration hooks: whether a module of the model holds more or fewer
        parameters, buffers or submodules, or another submodule, than at the last check."""
        return tables_changed(self.modules_now)

    def _refuse_added(self) -> None:
        """Refuse, naming them, parameters and buffers added to the model after construction that this
        average does not track: an update would skip them and every export (``averaged_state_dict``,
        ``save``, ``module``, a swap, snapshots) would carry their raw values as averages (M4). Fine:
        other names of tracked (or excluded) tensors, names matching ``exclude=``, buffers with
        ``buffers="ignore"``, and non-persistent buffers (no export carries them) unless buffers are
        averaged. A walk of the model's modules: run when the registration hooks marked the average
        stale, or, without the hooks, when a module's tables changed (:meth:`_modules_changed`)."""
        inner = _unwrap(self.model)
        now = _tensors_of(inner)
        new = [n for n in now if n not in self.known]
        if not new:
            return
        known_memory = {_local_key(now[n][1]) for n in now if n in self.known}
        added = []
        for n in new:
            kind, t, persistent = now[n]
            if _matches(n, self.exclude) or (kind == "buffer" and (self.buffers == "ignore" or (
                    not persistent and self.buffers == "copy"))):
                continue
            if self.trainable_only and _frozen(inner, kind, n, t):
                continue                          # frozen: not tracked (a new PEFT adapter is added frozen)
            key = _local_key(t)
            if key is not None and key in known_memory:
                continue                          # another name of a tensor the average knows (a new tie)
            added.append(n)
        if added:
            kind = self.kind
            raise ValueError(f"the model has {len(added)} parameter(s) or buffer(s) added after {kind}(model) that "
                             f"this average does not track: {added[:5]}; an update would leave them out and an "
                             f"export would carry their raw values as averages. Make a new {kind} of the changed "
                             f"model, or exclude= them (exclude={added[:3]!r}). Nothing was written.")

    def _model_changed(self) -> bool:
        return self._stale or self._addresses_now() != self.addresses

    def follow(self) -> bool:
        """Before reading or writing the model: follow re-registered or moved tensors (or refuse before
        anything is written), and start over from the model after a DDP wrap (see _on_registration).
        True when the shadows' addresses are known to be current (nothing moved, or just followed)."""
        changed = self._stale or self._addresses_now() != self.addresses     # self._model_changed()
        if changed and self.fsdp:                # a forward with no backward left unsharded copies
            _sharded.reshard(self.fsdp)
            changed = self._model_changed()
        if _HOOKS:                                # something was registered, or an owner's table changed: new names?
            if self.modules_now is not None:
                self.modules_now = None          # (no module held: a deleted one must be freed, see _owner_slots)
            if changed:                           # (stale: changed)
                self._refuse_added()
        elif self._stale or self._modules_changed():
            self._refuse_added()
            self.modules_now = tables_of(_unwrap(self.model))    # what passed, for the next check
        if changed:
            self._rebind()
            self.avg.refresh()                  # storage moved under a tensor the shadow already holds
            if self.copy is not None:
                self.copy.refresh()
            self.addresses = self._addresses_now()
        if self._resync:
            self._resync = False
            self._restart(None)
        return True

    def _rebind(self) -> None:
        # A parameter or buffer was re-registered (load_state_dict(assign=True), ...):
        # follow the new tensors if they fit the shadow, else refuse before writing anything.
        inner = _unwrap(self.model)
        named: dict[str, torch.Tensor] = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        wanted = self.names[0] + self.names[1] + list(self.int_buffers)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"the model no longer has {missing[:5]} (it changed after EMA(model)); "
                             f"make a new EMA for the new model. Nothing was updated.")
        specs = {}
        for n in wanted:                          # sharded parameters: their local shards
            if _sharded.is_sharded(named[n]):
                named[n], specs[n] = _sharded.local(named[n], repr(n))
        masters = self.masters and _deepspeed.find(self.engine, {n: named[n] for n in self.names[0]})
        if masters is not None:                   # DeepSpeed's masters: views made again (a flat buffer moved)
            named.update(masters.views)
            specs.update(masters.specs)
        moved = [n for n in set(specs) | set(self.specs) if n not in specs or n not in self.specs or
                 specs[n].shape != self.specs[n].shape or specs[n].placements != self.specs[n].placements]
        if moved:
            raise ValueError(f"{moved[0]!r} was re-sharded or un-sharded after the average was made (it is laid out "
                             f"over the ranks differently now); make a new average of the model as it is, or "
                             f"load this one's checkpoint into it. Nothing was updated.")
        for n, (_, copy_) in self.int_buffers.items():
            if named[n].shape != copy_.shape or named[n].dtype != copy_.dtype:
                raise ValueError(f"{n!r} changed from {copy_.dtype} {tuple(copy_.shape)} to {named[n].dtype} "
                                 f"{tuple(named[n].shape)}; make a new EMA. Nothing was updated.")
        old = self.avg.sources
        self.avg.rebind({n: named[n] for n in self.names[0]})
        if self.copy is not None:
            try:
                self.copy.rebind({n: named[n] for n in self.names[1]})
                _disjoint_groups(self.avg, self.copy)
            except Exception:
                self.avg.rebind(old)
                raise
        for n, (_, copy_) in list(self.int_buffers.items()):
            self.int_buffers[n] = (named[n], copy_)
        self.specs, self.masters = specs, masters
        self.ops = self.op_lists()
        self.slots = self._owner_slots()          # follow() records the addresses once all groups pass
        self._stale = False
        _watch(inner, self)                      # new submodules are watched too

    def settle(self) -> None:
        """Before the model's tensors are written (swap, copy-out): no gathered copy may outlive the
        write. FSDP2: a forward with no backward (evaluation) leaves unsharded copies on the modules,
        which the next forward would use as they are (the EMA weights after a swap back): reshard.
        ZeRO-3: persistent parameters stay gathered: release them (or refuse)."""
        _sharded.reshard(self.fsdp)
        if self.fsdp and torch.cuda.is_available() and any(t.device.type == "cpu" for t in self.avg.sources):
            torch.cuda.current_stream().synchronize()   # CPUOffloadPolicy: FSDP2 copies shards in non_blocking
        if self.zero3:
            _sharded.release_zero3(self.zero3, self.engine)

    # ------------------------------------------------------------ torch.compile

    def op_lists(self) -> dict:
        """``op -> (tensors it writes, tensors it reads)`` for the compiled operators (``_compile``):
        every tensor an eager call touches, so functionalization sees each write. Made when the
        tensors change (construction, rebind), never while tracing."""
        avg, copy = self.avg, self.copy
        groups = [g for shadow in (avg, copy) if shadow is not None for g in shadow.layout.groups]
        shadows = [g.buffer for g in groups] + [ring for _, ring, _ in getattr(avg, "_rings", ())]
        sources = list(avg.sources) + (list(copy.sources) if copy is not None else [])
        ints = list(self.int_buffers.values())
        owned = shadows + [d for _, d in ints] + self.plan_tensors
        for t in owned:                 # fastema's own, never moved: static for cudagraph trees, which skip a
            if t.is_cuda:               # graph that writes a tensor that is not (issue 37, B5); what
                t._dynamo_static_input_type = "unguarded"   # torch._dynamo.mark_static_address(t) sets
        return {"update": (owned, sources + [s for s, _ in ints]),
                "swap": (shadows + sources, []),
                "copy_to": (sources, shadows)}

    def read_from(self, read: list) -> Callable[[], None]:
        """Read the sources from ``read`` (in :meth:`op_lists` order) until the returned function
        is called: a compiled operator handed other tensors than the model's own."""
        avg, copy = self.avg, self.copy
        n_avg = len(avg.sources)
        n_copy = len(copy.sources) if copy is not None else 0
        old = (list(avg.sources), list(copy.sources) if copy is not None else [], dict(self.int_buffers))
        avg.retarget(read[:n_avg])
        if copy is not None:
            copy.retarget(read[n_avg:n_avg + n_copy])
        for (name, (_, dst)), src in zip(list(self.int_buffers.items()), read[n_avg + n_copy:]):
            self.int_buffers[name] = (src, dst)

        def restore() -> None:
            avg.retarget(old[0])
            if copy is not None:
                copy.retarget(old[1])
            self.int_buffers.update(old[2])

        return restore
