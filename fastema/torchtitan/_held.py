"""Where the tensors a :class:`fastema.torchtitan.EMA` tracks sit in its model parts, and the check,
at every firing, that the model still holds them there.

The shadow's sources are the model's own tensors: each parameter or buffer object itself, whose
``.data = ...`` the shadow follows (its address check), or, for a DTensor, the DTensor's own local
tensor (``_local_tensor``: ``to_local()`` would make a view of it, an alias of fastema's that would
never move again). What the shadow cannot see is checked here, per tracked tensor, with one dict
lookup and identities: the model's slot (the module's ``_parameters`` or ``_buffers`` entry) still
holds the tracked object, in its dtype, the modules on the way are the same, and a DTensor's local
tensor is the one the shadow reads. When a check fails (and once FSDP2 modules left unsharded are
resharded), the names are looked up again (:meth:`Held.changes`): a DTensor's new local tensor is
followed (FSDP2 re-pads it, ``reset_sharded_param``); a name that holds another object, another
dtype, or nothing is refused by name.
"""
from __future__ import annotations

import itertools
import operator
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ._keys import canonical_fqn
from ._state import Tracked

__all__ = ["Held", "Slot", "model_tensors"]

_IS = operator.is_
_DTYPE = operator.attrgetter("dtype")
_LOCAL = operator.attrgetter("_local_tensor")


class Slot(NamedTuple):
    """Where the model holds one tensor: ``table[key]`` (a module's ``_parameters`` or
    ``_buffers``), reached through ``path``, ``(parent's _modules dict, key, child)`` per module on
    the way."""
    tensor: torch.Tensor
    table: dict
    key: str
    path: list


def model_tensors(parts: Sequence[nn.Module]) -> dict[str, Slot]:
    """``canonical fqn -> Slot`` of every parameter and buffer of ``parts`` (each tensor under its
    first name, as ``named_parameters()`` gives it)."""
    out: dict[str, Slot] = {}
    for part in parts:
        named = itertools.chain(((n, t, "_parameters") for n, t in part.named_parameters()),
                                ((n, t, "_buffers") for n, t in part.named_buffers()))
        for name, t, table in named:
            prefix, _, key = name.rpartition(".")
            module, path = part, []
            for piece in prefix.split(".") if prefix else ():
                child = module._modules[piece]
                assert child is not None, name      # named_parameters() walked it
                path.append((module._modules, piece, child))
                module = child
            out.setdefault(canonical_fqn(name), Slot(t, getattr(module, table), key, path))
    return out


class Held:
    """The slots of the tracked tensors, as the model held them at construction (or at the last
    follow), and :meth:`unchanged`, the check at every firing."""

    def __init__(self, parts: Sequence[nn.Module], tracked: Sequence[Tracked]):
        now = model_tensors(parts)
        slots = [now[t.fqn] for t in tracked]
        self.tables = [s.table for s in slots]
        self.keys = [s.key for s in slots]
        edges = {(id(d), k): (d, k, c) for s in slots for d, k, c in s.path}
        self.path_tables = [d for d, _, _ in edges.values()]
        self.path_keys = [k for _, k, _ in edges.values()]
        self.path_modules = [c for _, _, c in edges.values()]
        self.tensors = [t.tensor for t in tracked]
        self.dtypes = list(map(_DTYPE, self.tensors))
        sharded = [t for t in tracked if t.tensor is not t.local]   # DTensors: their local tensors
        self.dtensors = [t.tensor for t in sharded]
        self.locals = [t.local for t in sharded]
        self.fsdp = _fsdp_modules(parts) if sharded else []

    def unchanged(self) -> bool:
        """Whether every slot holds its tracked tensor in its dtype, through the same modules, and
        every DTensor the local tensor the shadow reads: one lookup and a few identities per tensor,
        no host sync."""
        held = list(map(dict.get, self.tables, self.keys))
        path = map(dict.get, self.path_tables, self.path_keys)
        return (all(map(_IS, held, self.tensors)) and list(map(_DTYPE, held)) == self.dtypes
                and all(map(_IS, path, self.path_modules))
                and all(map(_IS, map(_LOCAL, self.dtensors), self.locals)))

    def changes(self, parts: Sequence[nn.Module],
                tracked: Sequence[Tracked]) -> tuple[list[str], list[Tracked]]:
        """``(problems, tracked now)``: each tracked name looked up in the model again by its
        canonical name; a problem, naming it, for a name that is gone, holds another object or
        another dtype than at construction (or a DTensor whose local tensor has another shape or
        device); else the tracked entries with the DTensors' current local tensors."""
        now = model_tensors(parts)
        problems: list[str] = []
        out: list[Tracked] = []
        for t, dtype in zip(tracked, self.dtypes):
            slot = now.get(t.fqn)
            held = None if slot is None else slot.tensor
            kind = "parameter" if isinstance(t.tensor, nn.Parameter) else "buffer"
            if held is None:
                problems.append(f"the {kind} {t.fqn!r} is gone from the model")
                continue
            if held is not t.tensor:
                how = ("a new nn.Parameter, load_state_dict(assign=True)" if kind == "parameter"
                       else "module.<name> = tensor")
                problems.append(f"{t.fqn!r} holds another {kind} object than the one this EMA "
                                f"was built on ({how}): the EMA would go on averaging the old one")
                continue
            if held.dtype != dtype:
                problems.append(f"{t.fqn!r} is {held.dtype} now, {dtype} when this EMA was built "
                                f"(model.to(), a dtype cast)")
                continue
            local = _LOCAL(held) if held is not t.local else held
            if (local.shape, local.device) != (t.local.shape, t.local.device):
                problems.append(f"{t.fqn!r}'s local shard is {tuple(local.shape)} on "
                                f"{local.device} now, {tuple(t.local.shape)} on {t.local.device} "
                                f"when this EMA was built (re-sharded or moved)")
            out.append(t._replace(local=local))
        return problems, out

    def reshard(self) -> None:
        """FSDP2 modules left unsharded (a forward with no backward) hold full plain copies in the
        slots: put the sharded parameters back."""
        for m in self.fsdp:
            m.reshard()


def _fsdp_modules(parts: Sequence[nn.Module]) -> list:
    """The FSDP2 (``fully_shard``) modules of ``parts``."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for part in parts for m in part.modules() if isinstance(m, FSDPModule)]
