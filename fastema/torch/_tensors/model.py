"""The model side of a torch model average: :class:`TorchModel`, which of the model's tensors are
averaged or copied, where they are, and following the model as it changes under the average.

A :class:`TorchModel` owns its selection (made by :mod:`.selection`: averaged and copied names,
integer buffers, DTensor layouts; DeepSpeed's float32 masters),
the two shadows of what it reads (``avg``, made by the face from :attr:`~TorchModel.averaged` and
handed over by :meth:`~TorchModel.attach`; ``copy``, the copied floating buffers), where the
tensors sit (a :class:`~fastema.torch._tensors.slots.Slots`, which makes the per-step check),
following re-registered or moved tensors (:meth:`TorchModel.follow`), the restart after a DDP wrap
(:attr:`~TorchModel.resync`), settling FSDP2 / ZeRO-3 gathered copies before the model's tensors are
written, and the tensors the ``torch.compile`` operators declare. It is the engine's
``ModelAdapter`` (:meth:`~TorchModel.begin`, :meth:`~TorchModel.scan`, :meth:`~TorchModel.carry`)
and what the registration hooks (:mod:`fastema.torch._tensors.hooks`) watch. The averages
(:mod:`fastema.torch._face.average`) have one.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..._shadow import AveragingShadow, WindowingShadow
from ...flat import FlatShadow
from .._sharding import masters as _deepspeed
from .._sharding import params as _sharded
from .follow import Followed
from .hooks import any_matches, names_of, patterns, unsynced, unwrap, watch
from .selection import Selection, frozen, resolve_trainable_only, select
from .slots import Slots, copy_unless_flagged_, disjoint_groups, local_key, tensors_of, ties_of

__all__ = ["TorchModel", "static"]


class TorchModel(Followed):
    """The model side of one torch model average: which tensors it tracks and where they are now.

    Built in two steps, by the face's builder (:mod:`fastema.torch._face.contract`), before the face exists:
    ``TorchModel(model, selection, kind=...)`` selects the tensors (:attr:`averaged` is what the
    shadow is made of); then, once the shadow and what reads it are made (the engine, the swap),
    :meth:`attach` takes the shadow (``avg``), the refusal before every update and the restart
    after a DDP wrap, and records where the tensors sit. What is made between the two steps keeps
    the side and reads it only when called.

    Args:
        model: the model (bare, DDP-, torch.compile- or DeepSpeed-wrapped).
        selection: what is read of it (see :class:`fastema.torch.EMA`).
        kind: the face's class name, for messages (``"EMA"``).

    ``resync`` is set by the registration hooks when the model is wrapped in
    DistributedDataParallel after construction (which broadcast rank 0's weights into it):
    :meth:`restart` then runs the restart :meth:`attach` took at the model's first forward, or at
    the next read (:meth:`follow`) if that comes first, and warns when the averages could not
    start over.
    """

    def __init__(self, model: nn.Module, selection: Selection, *, kind: str):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        buffers = selection.buffers
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.kind = kind
        self.check: Callable[[], None] = _unattached          # attach(): the face's refusal
        self.on_restart: Callable[[], bool] = _unattached_restart
        # wrapped in DDP after construction: restart() pending
        self.resync = False
        self.buffers = buffers
        self.exclude = patterns("exclude", selection.exclude)
        self.copy_patterns = patterns("copy", selection.copy)
        self.trainable_only, self.defaulted = resolve_trainable_only(model,
                                                                     selection.trainable_only)
        self.model = model
        inner = unwrap(model)
        # name -> (model's, copy)
        self.int_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # FSDP2 modules, resharded before any read
        self.fsdp = _sharded.fsdp_modules(inner)
        self.engine = model if type(model).__name__ == "DeepSpeedEngine" else None
        # DeepSpeed: one fold per optimizer step (M2)
        self.steps = _deepspeed.steps(self.engine)
        # name -> layout of a DTensor's local shard
        self.specs: dict[str, _sharded.Spec] = {}
        self.replica_specs: dict[str, _sharded.Spec] = {}    # name -> pieces over replicas (split)
        _sharded.reshard(self.fsdp)
        averaged, copied = select(inner, self.exclude, self.copy_patterns, buffers,
                                  self.trainable_only, self.specs, self.int_buffers)
        self.masters = _deepspeed.find(self.engine, averaged, f"{kind}(engine)", stacklevel=4)
        # ZeRO-3: the optimizer's float32 masters read instead
        if self.masters is not None:
            averaged.update(self.masters.views)
            # ZeRO-1/2: pieces of the parameters, gathered in exports
            self.specs.update(self.masters.specs)
        # DTensors / ZeRO-3 / masters: local shards are tracked
        self.local_shards = bool(self.specs)
        # every name at construction: others are new (M4)
        every = tensors_of(inner)
        self.known = set(every)
        if not averaged:
            peft = " (True by default for a PEFT model)" if self.defaulted else ""
            frozen_too = (f", and trainable_only{peft}: no parameter has requires_grad=True)"
                          if self.trainable_only else ")")
            raise ValueError("the model has no floating-point parameters to average (check "
                             "exclude= and copy=" + frozen_too)
        self.names = (list(averaged), list(copied))
        # another name of a tracked tensor (a tie, an alias) -> the tracked name: it must stay tied
        self.ties = ties_of(every, self.names[0] + self.names[1] + list(self.int_buffers))
        # name -> tensor: what the face's shadow is made of
        self.averaged = averaged
        self.zero3 = [p for p in inner.parameters() if _sharded.is_zero3(p)]
        self.copy = FlatShadow(copied, dtype="same", valid=self.padded(copied)) if copied else None
        self.avg: Any = None                            # the face's shadow of averaged (attach)
        # set by torch's registration hooks (see Followed)
        self.stale = False
        self.slots = self._slots(inner)
        self.ops: dict = {}                             # the compiled operators' lists (attach)
        # told when the lists are made: the face's update written in a graph (_face/lowered)
        self.lowering: Callable[[], None] | None = None
        watch((inner,), self)

    def attach(self, shadow: AveragingShadow | WindowingShadow, *, check: Callable[[], None],
               restart: Callable[[], bool]) -> None:
        """The second step of the build: take the shadow of :attr:`averaged` (``avg``), checked
        against the copied group (no memory in both); ``check``, the face's refusal before every
        update call (a swapped model), which :meth:`begin` calls first; ``restart``, what starts the
        averages over from the model unless something but the construction went into them (then
        False; see :attr:`resync`). Then the slots are recorded and the compiled operators' lists
        made."""
        self.avg = shadow
        # no memory in both groups (a buffer viewing a weight)
        if self.copy is not None:
            disjoint_groups(shadow, self.copy)
        self.check, self.on_restart = check, restart
        self.slots.record()
        self.ops = self.op_lists()

    def padded(self, names=None) -> dict[str, int]:
        """``name -> values`` of each ZeRO-3 partition among ``names`` (None: every one): the
        elements before its padding, which DeepSpeed never writes (``FlatShadow(valid=)``,
        the scans)."""
        return {n: s.valid for n, s in self.specs.items()
                if s.valid is not None and (names is None or n in names)}

    def split(self, specs: dict) -> None:
        """The averaged tensors are split over replicas: ``specs`` (``name -> Spec`` with every
        rank's piece, :meth:`fastema.torch._placement.replicas.ReplicaShadow.specs`) tell the
        checkpoint side so."""
        self.replica_specs = dict(specs)
        self.specs.update(specs)

    # ------------------------------------------------------------ the engine's ModelAdapter

    def begin(self, due: bool) -> None:
        """Before an update call: the face's refusals, then, when the call folds, follow the model
        (every group, or a refusal before anything is written)."""
        self.check()
        # follow()'s usual step, inlined
        if due and (self.resync or not self.slots.unchanged(self.stale)):
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
        added to ``flags`` when given. The addresses are current: :meth:`begin` checked them in this
        call (no second address read per tensor)."""
        flags = self.avg.scan_groups(flags)
        if self.copy is not None:
            flags = self.copy.scan_groups(flags)
        return flags

    # ------------------------------------------------------------ the model's tensors

    def _slots(self, inner: nn.Module) -> Slots:
        """Where every tracked tensor sits in the model (see
        :class:`~fastema.torch._tensors.slots.Slots`), not recorded yet: the per-step check that the
        model still holds the tensors the shadows read (H3), and what ``DeepSpeed`` may move (its
        flat master buffers: ``offload_states``)."""
        params = {n for n, _ in inner.named_parameters()}
        entries = [(0, n, "parameter" if n in params else "buffer")
                   for n in self.names[0] + self.names[1] + list(self.int_buffers)]
        masters = self.masters
        return Slots((inner,), entries, self, sharded=self.local_shards, fsdp=self.fsdp,
                     also=masters.addresses if masters is not None else None)

    def _refuse_added(self) -> None:
        """Refuse, naming them, parameters and buffers added to the model after construction that
        this average does not track: an update would skip them and every export
        (``averaged_state_dict``, ``save``, ``module``, a swap, snapshots) would carry their raw
        values as averages (M4). Fine: other names of tracked (or excluded) tensors, names matching
        ``exclude=``, buffers with ``buffers="ignore"``, and non-persistent buffers (no export
        carries them) unless buffers are averaged. A walk of the model's modules: run when the
        registration hooks marked the average stale or a slot moved, or, without the hooks, when a
        module's tables changed."""
        inner = unwrap(self.model)
        now = tensors_of(inner)
        self._refuse_untied(now)
        new = [n for n in now if n not in self.known]
        if not new:
            return
        known_memory = {local_key(now[n][1]) for n in now if n in self.known}
        added, names = [], names_of(inner)            # (a tie: excluded by any of its names)
        for n in new:
            kind, t, persistent = now[n]
            if any_matches(names.get(id(t), [n]), self.exclude) or (kind == "buffer" and (self.buffers == "ignore" or (
                    not persistent and self.buffers == "copy"))):
                continue
            if self.trainable_only and frozen(inner, kind, n, t):
                # frozen: not tracked (a new PEFT adapter is added frozen)
                continue
            key = local_key(t)
            if key is not None and key in known_memory:
                # another name of a tensor the average knows (a new tie)
                continue
            added.append(n)
        if added:
            kind = self.kind
            raise ValueError(f"the model has {len(added)} parameter(s) or buffer(s) added after "
                             f"{kind}(model) that this average does not track: {added[:5]}; an "
                             "update would leave them out and an export would carry their raw "
                             f"values as averages. Make a new {kind} of the changed model, or "
                             f"exclude= them (exclude={added[:3]!r}). Nothing was written.")

    def _refuse_untied(self, now: dict) -> None:
        """Refuse, naming it, another name of a tracked tensor at construction (a tie, a buffer
        aliasing a parameter) that holds memory of its own now (``m.b.weight =
        nn.Parameter(...)``): an update would leave it out and every export would carry its raw
        value. Fine where the export carries the model's value anyway (a name ``exclude=`` or
        ``copy=`` match, an ignored buffer, a non-persistent one copied, a frozen parameter with
        ``trainable_only``) and where it now shares another tracked tensor's memory. ``now``:
        :func:`~fastema.torch._tensors.slots.tensors_of` the model."""
        untied = [(n, first) for n, first in self.ties.items() if n in now and first in now and
                  local_key(now[n][1]) != local_key(now[first][1])]
        if not untied:
            return
        names = self.names[0] + self.names[1] + list(self.int_buffers)
        tracked = {local_key(now[n][1]) for n in names if n in now}
        inner = unwrap(self.model)
        for n, first in untied:
            kind, t, persistent = now[n]
            if any_matches([n], self.exclude + self.copy_patterns) or kind == "buffer" and (
                    self.buffers == "ignore" or (not persistent and self.buffers == "copy")):
                continue
            if (self.trainable_only and frozen(inner, kind, n, t)) or local_key(t) in tracked:
                continue
            kind = self.kind
            raise ValueError(f"{n!r} no longer shares its memory with {first!r} (untied after "
                             f"{kind}(model)): an update would leave it out and an export would "
                             f"carry its raw value as the average. Make a new {kind} of the "
                             f"model (exclude={n!r} to leave it out). Nothing was written.")

    def follow(self) -> bool:
        """Before reading or writing the model: follow re-registered or moved tensors (or refuse
        before anything is written; :class:`~fastema.torch._tensors.follow.Followed`), and start
        over from the model after a DDP wrap (:meth:`restart`). True: the shadows' addresses are
        current."""
        Followed.follow(self)
        if self.resync:
            self.restart()
        return True

    def _relook(self, moved: bool, renamed: bool) -> None:
        # something was registered, or a table changed: new names?
        if moved or renamed:
            self._refuse_added()
        if moved or self.stale:
            self._rebind()
            # storage moved under a tensor the shadow already holds
            self.avg.refresh()
            if self.copy is not None:
                self.copy.refresh()
        self.slots.record()                           # once every group passed

    def restart(self, model: nn.Module | None = None) -> None:
        """After a DDP wrap (:attr:`resync`): start the averages over from the model's weights (rank
        0's, broadcast by the wrap), or warn that the ranks' averages may differ when updates went
        into them already. Called at the model's first forward (``model``) or the next read."""
        if self.resync:
            self.resync = False
            if not self.on_restart():
                unsynced(self.kind)

    def _rebind(self) -> None:
        # A parameter or buffer was re-registered (load_state_dict(assign=True), ...):
        # follow the new tensors if they fit the shadow, else refuse before writing anything.
        inner = unwrap(self.model)
        named: dict[str, torch.Tensor] = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        wanted = self.names[0] + self.names[1] + list(self.int_buffers)
        missing = [n for n in wanted if n not in named]
        if missing:
            every, first = tensors_of(inner), {id(t): n for n, t in named.items()}
            # still there, under a name listed first (tied to it)
            tied = [(n, first[id(every[n][1])]) for n in missing
                    if n in every and id(every[n][1]) in first]
            kind = self.kind
            if tied:
                raise ValueError(f"{tied[0][0]!r} now shares its memory with {tied[0][1]!r} (tied "
                                 f"after {kind}(model)), which this average tracks apart; make a "
                                 f"new {kind} of the tied model. Nothing was updated.")
            raise ValueError(f"the model no longer has {missing[:5]} (it changed after {kind}"
                             f"(model)); make a new {kind} for the new model. Nothing was updated.")
        specs = {}
        for n in wanted:                          # sharded parameters: their local shards
            if _sharded.is_sharded(named[n]):
                named[n], specs[n] = _sharded.local(named[n], repr(n))
        averaged = {n: named[n] for n in self.names[0]}
        masters = self.masters and _deepspeed.find(self.engine, averaged)
        # DeepSpeed's masters: views made again (a flat buffer moved)
        if masters is not None:
            named.update(masters.views)
            specs.update(masters.specs)
        moved = [n for n in set(specs) | set(self.specs) if n not in self.replica_specs and (
                 n not in specs or n not in self.specs or specs[n].shape != self.specs[n].shape or
                 specs[n].placements != self.specs[n].placements)]
        # split over replicas: each DTensor's layout as it was made
        split = self.replica_specs
        moved += [n for n in split if (n in specs) != (split[n].replica_dim is not None) or (
                  n in specs and (specs[n].shape != split[n].shape
                                  or specs[n].placements != split[n].placements))]
        if moved:
            raise ValueError(f"{moved[0]!r} was re-sharded or un-sharded after the average was "
                             "made (it is laid out over the ranks differently now); make a new "
                             "average of the model as it is, or load this one's checkpoint into "
                             "it. Nothing was updated.")
        for n, (_, copy_) in self.int_buffers.items():
            if named[n].shape != copy_.shape or named[n].dtype != copy_.dtype:
                raise ValueError(f"{n!r} changed from {copy_.dtype} {tuple(copy_.shape)} to "
                                 f"{named[n].dtype} {tuple(named[n].shape)}; make a new EMA. "
                                 "Nothing was updated.")
        old = self.avg.sources
        self.avg.rebind({n: named[n] for n in self.names[0]})
        if self.copy is not None:
            try:
                self.copy.rebind({n: named[n] for n in self.names[1]})
                disjoint_groups(self.avg, self.copy)
            except Exception:
                self.avg.rebind(old)
                raise
        for n, (_, copy_) in list(self.int_buffers.items()):
            self.int_buffers[n] = (named[n], copy_)
        self.local_shards = bool(specs)
        specs.update(self.replica_specs)          # the split over replicas stays as made
        self.specs, self.masters = specs, masters
        self.ops = self.op_lists()
        self.slots = self._slots(inner)           # follow() records them once all groups pass
        self.stale = False
        watch((inner,), self)                    # new submodules are watched too

    def settle(self) -> None:
        """Before the model's tensors are written (swap, copy-out): no gathered copy may outlive the
        write. FSDP2: a forward with no backward (evaluation) leaves unsharded copies on the
        modules, which the next forward would use as they are (the EMA weights after a swap back):
        reshard. ZeRO-3: persistent parameters stay gathered: release them (or refuse)."""
        _sharded.reshard(self.fsdp)
        on_host = any(t.device.type == "cpu" for t in self.avg.sources) if self.fsdp else False
        if on_host and torch.cuda.is_available():
            # CPUOffloadPolicy: FSDP2 copies shards in non_blocking
            torch.cuda.current_stream().synchronize()
        if self.zero3:
            _sharded.release_zero3(self.zero3, self.engine)

    # ------------------------------------------------------------ torch.compile

    def op_lists(self) -> dict:
        """``op -> (tensors it writes, tensors it reads)`` for the compiled operators
        (``_compile``): every tensor an eager call touches, so functionalization sees each write.
        Made when the tensors change (construction, rebind), never while tracing; :attr:`lowering`
        is told then."""
        avg, copy = self.avg, self.copy
        shadows = avg.written() + (copy.written() if copy is not None else [])
        sources = list(avg.sources) + (list(copy.sources) if copy is not None else [])
        ints = list(self.int_buffers.values())
        owned = static(shadows + [d for _, d in ints])
        lists = {"update": (owned, sources + [s for s, _ in ints]),
                 "swap": (shadows + sources, []),
                 "copy_to": (sources, shadows)}
        if self.lowering is not None:
            self.lowering()
        return lists

    def read_from(self, read: list) -> Callable[[], None]:
        """Read the sources from ``read`` (in :meth:`op_lists` order) until the returned function
        is called: a compiled operator handed other tensors than the model's own."""
        avg, copy = self.avg, self.copy
        n_avg = len(avg.sources)
        n_copy = len(copy.sources) if copy is not None else 0
        old = (list(avg.sources), list(copy.sources) if copy is not None else [],
               dict(self.int_buffers))
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


def _unattached() -> None:
    raise RuntimeError("the model side is not attached to its average yet (TorchModel.attach)")


def _unattached_restart() -> bool:
    _unattached()
    return False


def static(owned: list, guard: bool = False) -> list:
    """``owned``, fastema's own tensors, never moved, marked static for cudagraph trees, which skip
    a graph that writes a tensor that is not (issue 37, B5): what
    ``torch._dynamo.mark_static_address(t, guard)`` sets. ``guard``: every one of them, guarded by
    identity and held by the graph as a constant (the plain update's own tensors,
    :mod:`fastema.torch._face.lowered`); else the CUDA ones, inputs of the graph."""
    for t in owned:
        if guard or t.is_cuda:
            t._dynamo_static_input_type = "guarded" if guard else "unguarded"
    return owned
