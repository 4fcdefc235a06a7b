"""Where a model's tensors are, and what fastema writes into them besides the kernels.

- :class:`Slots`: where N named tensors sit in one or two modules, and the per-step check that
  they still sit there (:meth:`Slots.unchanged`), with what a follow needs when they do not
  (:meth:`Slots.changes`, :meth:`Slots.current`, FSDP2 modules resharded first). The model side
  of a model average (:class:`~fastema.torch._tensors.model.TorchModel`) and a target network's pairs
  (:class:`~fastema.torch._tensors.pairs.TorchPairs`) each keep one, and only their selection.
- Storage keys (:func:`storage_key`, :func:`local_key`): equal keys mean the same memory in the
  same layout (a tied or aliased tensor); :data:`DATA_PTR`, a tensor's address;
  :func:`tensors_of`, every parameter and buffer of a model under every name it has.
- Writes: :data:`bump_versions` (autograd's version counters of tensors the kernels wrote),
  :func:`copy_unless_flagged_` (integer buffers, behind the non-finite flags), and the check
  that the averaged and copied groups share no memory (:func:`disjoint_groups`).
"""
from __future__ import annotations

import operator
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ... import _backends
from ..._backends import versions as _versions
from ..._shadow import Shadow
from .._sharding import params as _sharded
from .hooks import HOOKS, tables_changed, tables_of

__all__ = ["DATA_PTR", "Slots", "bump_versions", "copy_unless_flagged_", "device_name", "disjoint_groups",
           "local_key", "storage_key", "tensors_of", "ties_of"]

DATA_PTR = torch.Tensor.data_ptr                 # a tensor's address (unsharded tensors)

_CALL = weakref.ref.__call__
# (a subclass with a __torch_dispatch__ of its own is a wrapper: no memory of its own)
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


class Slots:
    """Where N named tensors sit in one or two modules, and whether they still sit there (once
    :meth:`record` took where they are).

    Per tensor: the owning module's ``_parameters`` or ``_buffers`` dict and the key in it (its
    slot). Per module on the way to one: its parent's ``_modules`` dict, key and a weak reference
    (a module freed marks ``owner`` stale: ``del model.layer`` calls no hook). The lengths of those
    dicts, a ``len()`` each (a tensor or module added or deleted without a registration hook shows
    as a length). The address function: :data:`DATA_PTR`, or the local shard's
    (:func:`fastema.torch._sharding.params.local_address`) when ``sharded``.

    Args:
        modules: the one or two (unwrapped) modules.
        entries: ``(module index, name, kind)`` per tensor, ``kind`` ``"parameter"`` or ``"buffer"``.
        owner: what the registration hooks watch (``owner.stale``), held weakly here.
        sharded: the tensors may be sharded (DTensors, ZeRO-3): their local shards are compared.
        layouts: compare the tensors' layouts at every step too (the same address in another shape
            or order), not only their addresses.
        also: more addresses the per-step check compares (DeepSpeed's flat master buffers), or None.
        fsdp: FSDP2 modules, resharded before the tensors are looked at again (:meth:`changes`).
    """

    def __init__(self, modules: Sequence[nn.Module], entries: Sequence[tuple[int, str, str]], owner, *,
                 sharded: bool = False, layouts: bool = False, also: Callable[[], list] | None = None,
                 fsdp: Sequence = ()):
        me = weakref.ref(owner)

        def mark_stale(_):                       # a module on the way was freed (del model.layer: no hook)
            side = me()
            if side is not None:
                side.stale = True

        tables: list[dict] = []
        keys: list[str] = []
        tensors: list[torch.Tensor] = []
        paths: dict = {}
        for index, name, kind in entries:
            prefix, _, key = name.rpartition(".")
            parent = modules[index]
            for part in prefix.split(".") if prefix else ():
                child = parent._modules[part]
                assert child is not None, name   # named_parameters() walked it: a None submodule holds none
                if (id(parent), part) not in paths:
                    paths[(id(parent), part)] = (parent._modules, part, weakref.ref(child, mark_stale))
                parent = child
            table = parent._parameters if kind == "parameter" else parent._buffers
            tensor = table[key]
            assert tensor is not None, name      # named_parameters() / named_buffers() listed it
            tables.append(table)
            keys.append(key)
            tensors.append(tensor)
        self.modules = tuple(modules)
        self.tables, self.keys, self.tensors = tables, keys, tensors
        self.path_tables = [p for p, _, _ in paths.values()]
        self.path_keys = [k for _, k, _ in paths.values()]
        self.path_refs = [r for _, _, r in paths.values()]
        owners: dict[int, dict] = {id(t): t for t in tables}
        owners.update((id(p), p) for p in self.path_tables)
        self.counted = list(owners.values())     # every _parameters, _buffers and _modules dict on the way
        self.lengths = list(map(len, self.counted))
        self.sharded = sharded
        self.address: Callable[[Any], int] = _sharded.local_address if sharded else DATA_PTR
        self.layouts, self.also, self.fsdp = layouts, also, list(fsdp)
        self.recorded: list | None = None        # the key of the last record()
        self.guard: Callable[[list], bool] | None = None
        self.tables_now: tuple | None = None     # without the hooks: the modules' tables (see changes)

    def held(self) -> list:
        """What the slots hold now (None for an emptied one): one dict lookup per tensor."""
        return list(map(dict.get, self.tables, self.keys))

    def pieces(self, tensors: list) -> list:
        """Where ``tensors``' elements are on this rank: their local shards when sharded."""
        return list(map(_sharded.local_tensor, tensors)) if self.sharded else tensors

    def key(self, tensors: list) -> list | None:
        """``tensors``' addresses, then the lengths of the dicts on the way (and :attr:`also`'s
        addresses), or None when one is no tensor with storage (an emptied slot)."""
        try:
            key = list(map(self.address, tensors))
        except (TypeError, RuntimeError):        # an empty slot; a tensor with no storage of its own
            return None
        key.extend(map(len, self.counted))
        if self.also is not None:
            key.extend(self.also())
        return key

    def record(self, tensors: list | None = None) -> None:
        """Take ``tensors`` (default: what the slots hold) as where the tensors are: the key the
        per-step check compares, their layouts, and, without the hooks, every module's tables."""
        tensors = self.held() if tensors is None else tensors
        self.recorded = self.key(tensors)
        if self.layouts:
            guard = _backends.layout_guard(self.pieces(tensors))
            self.guard = guard if not self.sharded else (lambda ts: guard(self.pieces(ts)))
        self.tables_now = None if HOOKS else tables_of(*self.modules)

    def unchanged(self, stale: bool) -> bool:
        """The per-step check before the tensors are read or written: True when nothing moved.

        With torch's registration hooks installed (the default: they set ``stale``), one dict
        lookup and one address per tensor and a ``len()`` per dict (and a layout check per tensor
        with ``layouts``). Without them, also the modules on the way and the tensors' identities,
        and every module's tables (a ``len()`` each, an identity per submodule)."""
        if stale:
            return False
        if not HOOKS and (self.current() is None or tables_changed(self.tables_now)):
            return False
        guard = self.guard                       # (self.key(self.held()), inlined: the per-step path)
        held: Any = map(dict.get, self.tables, self.keys)
        if guard is not None:                    # the guard reads them too
            held = list(held)
        try:
            key = list(map(self.address, held))
        except (TypeError, RuntimeError):        # an empty slot; a tensor with no storage of its own
            return False
        key.extend(map(len, self.counted))
        if self.also is not None:
            key.extend(self.also())
        return key == self.recorded and (guard is None or guard(held))

    def changes(self, stale: bool) -> tuple[bool, bool]:
        """``(moved, renamed)`` once :meth:`unchanged` said no. ``moved``: a slot holds another
        tensor, or a tensor's memory moved (address, layout) or a dict on the way changed length,
        after FSDP2 modules are resharded (a forward with no backward left unsharded copies in
        the slots). ``renamed``: a registration marked ``stale``, or, without the hooks, a module's
        tables changed: new names may be there."""
        moved = not self.in_place()
        if (moved or stale) and self.fsdp:
            _sharded.reshard(self.fsdp)
            moved = not self.in_place()
        return moved, stale or (not HOOKS and tables_changed(self.tables_now))

    def in_place(self) -> bool:
        """Whether the slots hold tensors where :meth:`record` found them (addresses, lengths,
        layouts; without the hooks, the same tensors in the same modules)."""
        if not HOOKS and self.current() is None:
            return False
        held = self.held()
        return self.key(held) == self.recorded and (self.guard is None or self.guard(held))

    def paths_held(self) -> bool:
        """Whether every module on the way is still where it was (identities)."""
        return all(map(operator.is_, map(dict.get, self.path_tables, self.path_keys), map(_CALL, self.path_refs)))

    def current(self) -> list | None:
        """The tensors the slots hold now if they are this tracker's own objects in the same modules,
        the dicts on the way of the same lengths (lookups and identities, no name walk), else None."""
        if not self.paths_held() or list(map(len, self.counted)) != self.lengths:
            return None
        now = self.held()
        return now if all(map(operator.is_, now, self.tensors)) else None


def storage_key(t: torch.Tensor):
    """Where a tensor's elements are: equal keys mean the same memory in the same layout (a tied
    or aliased tensor under another name). None for a tensor with no memory to compare: empty, on
    the meta device, or a wrapper subclass (its own ``__torch_dispatch__``: DTensor, quantized
    weights); a plain Python subclass (``class MyParam(nn.Parameter)``) holds its memory as a
    tensor does."""
    if (not t.numel() or t.device.type == "meta"
            or type(t).__torch_dispatch__ is not _PLAIN_DISPATCH):
        return None
    return t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()


def local_key(t: torch.Tensor):
    """:func:`storage_key` of the memory a (possibly sharded) tensor's rank holds."""
    return storage_key(_sharded.local_tensor(t) if _sharded.is_sharded(t) else t)


def tensors_of(model: nn.Module) -> dict:
    """``name -> (kind, tensor, persistent)`` of every parameter and buffer of ``model``, under every
    name a shared tensor or module has (``named_parameters(remove_duplicate=False)``'s names)."""
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for k, p in m._parameters.items():
            if p is not None:
                out[pre + k] = ("parameter", p, True)
        for k, b in m._buffers.items():
            if b is not None:
                out[pre + k] = ("buffer", b, k not in m._non_persistent_buffers_set)
    return out


def ties_of(every: dict, tracked: list) -> dict:
    """``name -> tracked name`` of every other name in ``every`` (:func:`tensors_of` a model) of a
    ``tracked`` tensor's memory (a tie, a buffer aliasing a parameter): the names a relook checks
    are still tied."""
    first: dict = {}
    for n in tracked:
        key = local_key(every[n][1]) if n in every else None
        if key is not None:
            first.setdefault(key, n)
    names = set(tracked)
    return {n: first[key] for n, (_, t, _) in every.items()
            if n not in names and (key := local_key(t)) is not None and key in first}


bump_versions = _versions.bump_versions()
"""``bump_versions(tensors)``: the torch backend's (:func:`fastema._backends.versions.bump_versions`):
autograd is told that fastema's kernels wrote ``tensors`` in place, as torch's own in-place operations
do (also under ``no_grad``): a backward through a graph that saved their old values raises "modified by
an inplace operation" instead of using the new ones. No sync, no allocation (~0.03 us a tensor)."""


def copy_unless_flagged_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], flags: dict | None) -> None:
    """``dst <- src`` for every pair (integer buffers: BatchNorm counters), except on a device whose skip
    flag (``flags``: device name -> int32[1] tensor) is set, which keeps its old values: on the device,
    no host sync. One ``_foreach_copy_`` per device; behind a flag, one ``where`` per tensor against
    the flag read once per device (before: four operations per tensor)."""
    with torch.no_grad():
        if not flags:
            torch._foreach_copy_(list(dsts), list(srcs))
            return
        keep: dict = {}                          # device name -> 0-dim bool: the flag is set
        pairs: dict = {}                         # device name -> (dsts, what they receive)
        for d, s in zip(dsts, srcs):
            name = device_name(d)
            flag = flags.get(name)
            ds, vs = pairs.setdefault(name, ([], []))
            ds.append(d)
            if flag is None:
                vs.append(s)
                continue
            k = keep.get(name)
            if k is None:
                k = keep[name] = flag[0] != 0
            vs.append(torch.where(k, d, s))
        for ds, vs in pairs.values():
            torch._foreach_copy_(ds, vs)


def device_name(t: torch.Tensor) -> str:
    """``"cpu"`` or ``"cuda:N"``: the device names the skip flags are keyed by (the adapter's: the
    groups' devices are its too)."""
    return _backends.device_of(t)


def disjoint_groups(a: Shadow, b: Shadow) -> None:
    """Refuse, naming them, an averaged and a copied tensor that share memory (a buffer viewing a weight)."""
    from ..._backends import describe, disjoint

    bufs = [describe(t, n) for n, t in zip(a.names, a.sources)] + \
           [describe(t, n) for n, t in zip(b.names, b.sources)]
    disjoint(bufs, [repr(n) for n in a.names] + [repr(n) for n in b.names])
