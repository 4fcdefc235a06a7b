"""The model side of a torch model average: which of the model's tensors are averaged or copied,
and following the model as it changes under the average.

:class:`_ModelSide`, mixed into ``_ModelAverage`` (:mod:`fastema.torch._base`): selection, owner
slots and the per-step address check, following re-registered or moved tensors (``_follow`` /
``_rebind``), buffer copies, the non-finite scan, and settling FSDP2 / ZeRO-3 gathered copies
before the model's tensors are written. The registration hooks, names and patterns are in
:mod:`fastema.torch._hooks`, storage keys and the writes besides the kernels in
:mod:`fastema.torch._slots`.
"""
from __future__ import annotations

import operator
import weakref

import torch
from torch import nn

from .._backends.torch import refuse_foreign as _refuse_foreign_torch
from . import _deepspeed, _sharded
from ._hooks import _HOOKS, _matches, _unwrap, _watch, tables_changed, tables_of
from ._slots import _disjoint_groups, _local_key, _storage_key, _tensors_of, copy_unless_flagged_


def _frozen(model: nn.Module, kind: str, name: str, t: torch.Tensor) -> bool:
    """What ``trainable_only=True`` leaves out: a parameter with ``requires_grad=False``, a buffer
    of a module with no trainable parameter of its own (a frozen base model's statistics)."""
    if kind == "parameter":
        return not t.requires_grad
    prefix = name.rpartition(".")[0]
    owner = model.get_submodule(prefix) if prefix else model
    return not any(p is not None and p.requires_grad for p in owner._parameters.values())


class _ModelSide:
    """The model side of ``_ModelAverage``: which tensors it tracks and where they are now. Reads
    and sets the average's ``model``, ``buffers``, ``exclude``, ``copy_patterns``, ``trainable_only``, ``_names``,
    ``_specs``, ``_int_buffers``, ``_avg``, ``_copy``, ``_slots``, ``_addresses``, ``_stale``,
    ``_resync``, ``_fsdp``, ``_zero3``, ``_engine``, ``_known`` and ``_modules_now`` (made in
    ``_ModelAverage.__init__``)."""

    def _select(self, model):
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
                    t, self._specs[name] = _sharded.local(t, f"{kind} {name!r}")
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
                    self._int_buffers[name] = (t, t.detach().clone())
                elif not t.is_floating_point():   # integer tensors travel as copies
                    self._int_buffers[name] = (t, t.detach().clone())
                elif kind == "buffer" and self.buffers == "ignore":
                    continue
                elif _matches(name, self.copy_patterns) or (kind == "buffer" and self.buffers == "copy"):
                    copied[name] = t
                else:
                    averaged[name] = t
        return averaged, copied

    def _owner_slots(self):
        """(the owning module's _parameters or _buffers dict, key, tensor) of every tracked tensor, for
        the per-step check that the model still holds the tensors the shadow reads (H3); (parent's
        _modules, key, weak reference) of every module on the way to one, checked at every step
        without the registration hooks; and those _parameters and _buffers dicts once each, whose
        lengths are checked at every step (a tensor written into one directly calls no hook, M4).
        The references are weak: a module deleted from the model (``del model.layer`` calls no
        hook) marks the average stale when it is freed."""
        inner = _unwrap(self.model)
        params = {n for n, _ in inner.named_parameters()}
        named = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        slots, paths, owners = [], {}, {}
        me = weakref.ref(self)

        def mark_stale(_):                      # a module on the way was deleted (del model.layer: no hook)
            ema = me()
            if ema is not None:
                ema._stale = True

        for name in self._names[0] + self._names[1] + list(self._int_buffers):
            prefix, _, key = name.rpartition(".")
            owner = inner.get_submodule(prefix) if prefix else inner
            table = owner._parameters if name in params else owner._buffers
            slots.append((table, key, named[name]))
            owners[id(table)] = table
            parent = inner
            for part in prefix.split(".") if prefix else ():   # the modules on the way (hooks off)
                child = parent._modules[part]
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
        tables, keys, _ = self._slots[0]
        if not _HOOKS:
            mods, names, held = self._slots[1]
            if not all(map(operator.is_, map(dict.get, mods, names), map(weakref.ref.__call__, held))):
                return None
        try:
            now = list(map(self._address, map(dict.get, tables, keys)))
        except TypeError:                         # a slot is empty: the tensor was removed
            return None
        now.extend(map(len, self._slots[2]))
        if self._masters is not None:             # DeepSpeed may move its flat master buffers (offload_states)
            now.extend(self._masters.addresses())
        return now

    def _modules_changed(self) -> bool:
        """Without the registration hooks: whether a module of the model holds more or fewer
        parameters, buffers or submodules, or another submodule, than at the last check."""
        return tables_changed(self._modules_now)

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
        new = [n for n in now if n not in self._known]
        if not new:
            return
        known_memory = {_local_key(now[n][1]) for n in now if n in self._known}
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
            kind = type(self).__name__
            raise ValueError(f"the model has {len(added)} parameter(s) or buffer(s) added after {kind}(model) that "
                             f"this average does not track: {added[:5]}; an update would leave them out and an "
                             f"export would carry their raw values as averages. Make a new {kind} of the changed "
                             f"model, or exclude= them (exclude={added[:3]!r}). Nothing was written.")

    def _model_changed(self) -> bool:
        return self._stale or self._addresses_now() != self._addresses

    def _follow(self) -> bool:
        """Before reading or writing the model: follow re-registered or moved tensors (or refuse before
        anything is written), and start over from the model after a DDP wrap (see _on_registration).
        True when the shadows' addresses are known to be current (nothing moved, or just followed)."""
        changed = self._stale or self._addresses_now() != self._addresses     # self._model_changed()
        if changed and self._fsdp:                # a forward with no backward left unsharded copies
            _sharded.reshard(self._fsdp)
            changed = self._model_changed()
        if _HOOKS:                                # something was registered, or an owner's table changed: new names?
            if self._modules_now is not None:
                self._modules_now = None          # (no module held: a deleted one must be freed, see _owner_slots)
            if changed:                           # (stale: changed)
                self._refuse_added()
        elif self._stale or self._modules_changed():
            self._refuse_added()
            self._modules_now = tables_of(_unwrap(self.model))    # what passed, for the next check
        if changed:
            self._rebind()
            self._avg.refresh()                  # storage moved under a tensor the shadow already holds
            if self._copy is not None:
                self._copy.refresh()
            self._addresses = self._addresses_now()
        if self._resync:
            self._resync = False
            self._restart()
        return True

    def _copy_buffers(self, flags: dict | None = None, current: bool = False) -> None:
        if self._copy is not None:
            if current:                             # addresses checked by _follow() in this update
                self._copy.copy_from_sources_checked(flags)
            else:
                self._copy.copy_from_sources(skip_if=flags)
        if self._int_buffers:
            srcs, dsts = zip(*self._int_buffers.values())
            copy_unless_flagged_(dsts, srcs, flags)

    def _scan(self, flags: dict | None = None) -> dict:
        """Non-finite flags over every averaged and copied floating tensor (device values, no sync),
        added to ``flags`` when given."""
        flags = self._avg.scan_nonfinite(flags)
        if self._copy is not None:
            flags = self._copy.scan_nonfinite(flags)
        return flags

    def _rebind(self) -> None:
        # A parameter or buffer was re-registered (load_state_dict(assign=True), ...):
        # follow the new tensors if they fit the shadow, else refuse before writing anything.
        inner = _unwrap(self.model)
        named = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        wanted = self._names[0] + self._names[1] + list(self._int_buffers)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"the model no longer has {missing[:5]} (it changed after EMA(model)); "
                             f"make a new EMA for the new model. Nothing was updated.")
        specs = {}
        for n in wanted:                          # sharded parameters: their local shards
            if _sharded.is_sharded(named[n]):
                named[n], specs[n] = _sharded.local(named[n], repr(n))
        masters = self._masters and _deepspeed.find(self._engine, {n: named[n] for n in self._names[0]})
        if masters is not None:                   # DeepSpeed's masters: views made again (a flat buffer moved)
            named.update(masters.views)
            specs.update(masters.specs)
        moved = [n for n in set(specs) | set(self._specs) if n not in specs or n not in self._specs or
                 specs[n].shape != self._specs[n].shape or specs[n].placements != self._specs[n].placements]
        if moved:
            raise ValueError(f"{moved[0]!r} was re-sharded or un-sharded after the average was made (it is laid out "
                             f"over the ranks differently now); make a new average of the model as it is, or "
                             f"load this one's checkpoint into it. Nothing was updated.")
        for n, (_, copy_) in self._int_buffers.items():
            if named[n].shape != copy_.shape or named[n].dtype != copy_.dtype:
                raise ValueError(f"{n!r} changed from {copy_.dtype} {tuple(copy_.shape)} to {named[n].dtype} "
                                 f"{tuple(named[n].shape)}; make a new EMA. Nothing was updated.")
        old = self._avg.sources
        self._avg.rebind({n: named[n] for n in self._names[0]})
        if self._copy is not None:
            try:
                self._copy.rebind({n: named[n] for n in self._names[1]})
                _disjoint_groups(self._avg, self._copy)
            except Exception:
                self._avg.rebind(old)
                raise
        for n, (_, copy_) in list(self._int_buffers.items()):
            self._int_buffers[n] = (named[n], copy_)
        self._specs, self._masters = specs, masters
        self._ops = self._op_lists()
        self._slots = self._owner_slots()          # _follow() records the addresses once all groups pass
        self._stale = False
        _watch(inner, self)                      # new submodules are watched too

    def _settle(self) -> None:
        """Before the model's tensors are written (swap, copy-out): no gathered copy may outlive the
        write. FSDP2: a forward with no backward (evaluation) leaves unsharded copies on the modules,
        which the next forward would use as they are (the EMA weights after a swap back): reshard.
        ZeRO-3: persistent parameters stay gathered: release them (or refuse)."""
        _sharded.reshard(self._fsdp)
        if self._fsdp and torch.cuda.is_available() and any(t.device.type == "cpu" for t in self._avg.sources):
            torch.cuda.current_stream().synchronize()   # CPUOffloadPolicy: FSDP2 copies shards in non_blocking
        if self._zero3:
            _sharded.release_zero3(self._zero3, self._engine)
