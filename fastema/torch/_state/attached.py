"""The per-parameter form of an attached average: how a sharded average (FSDP2, tensor parallel,
HSDP: DTensor parameters) rides the optimizer's state dict, and how any attached average rides
DCP's ``get_optimizer_state_dict`` (``../shared/design/optimizer.md`` §4.5, §9 item 1;
``docs/guides/attach.md``).

DCP's ``get_state_dict`` / ``set_state_dict`` keep only ``state`` and ``param_groups`` of an
optimizer's state dict, and at load only the state of ``requires_grad`` parameters, so the
average goes into ``state`` by one rule (``docs/guides/attach.md``):

- the *carriers* (:func:`_carriers`) are the trainable averaged parameters the optimizer steps;
  each carrier's entry holds, under :data:`~fastema.torch._face.attach.KEY`, its part of the
  average's :meth:`state_dict` (``{"averaged": DTensor, "ring": DTensor}``: float32 host copies
  laid out as the parameter is, shape and stride given, so DCP reshards them to any world size or
  mesh; plain tensors for an unsharded average; :class:`~fastema.torch.SplitEntry` values, each
  rank's pieces, for an average split over replicas);
- the first carrier's entry also holds ``"meta"``: the average's counters, settings and flags as
  UTF-8 JSON in a fixed-size uint8 tensor (:data:`META_BYTES`: DCP loads into tensors of the
  saved size, and ``flatten_optimizer_state_dict=True`` takes tensors, ints, floats and dicts
  only), the copied and integer buffers (``"copied"`` / ``"int_buffers"``), and under
  ``"others"`` the rows of every averaged tensor that is no carrier (frozen parameters, averaged
  buffers), each keyed by its index in the list of names the record holds (``"names"``, UTF-8
  JSON in a uint8 tensor of its own size): no key is a name, so any name torch accepts (``/``,
  digits, unicode, ...) comes back as it was, whatever DCP's flattening does to keys (it splits
  them at dots).

``flatten_optimizer_state_dict=True`` rebuilds the loaded per-parameter state from the keys of
the live ``optimizer.state[p]``: :func:`mark` keeps an empty ``{}`` under the key there for every
carrier that has state, or a gradient and no state (a stateless optimizer; DCP's dummy step gives
every trainable parameter one), never one with neither (Adam fills an empty state at its first
step); made after the first step, DCP's dummy step and every load. A loaded entry is taken out
before torch's cast to the parameters' dtype (§4.1); a parameter left with nothing else is
dropped from the state, so Adam never sees an entry without ``step``.
"""
from __future__ import annotations

import json
from itertools import chain
from typing import Any, Callable, Collection, Mapping, Protocol

import torch
from torch import nn

from .._sharding.params import Spec
from .._tensors.hooks import unwrap
from .agree import Agreement
from .nonfinite import RECORD

__all__ = ["META_BYTES", "Attachable", "Face", "mark", "per_param_state", "probed", "refusal",
           "split_entries", "tracked", "unmark", "unmarked"]


class Face(Protocol):
    """What an attachment reads of a torch model average's public surface
    (:class:`~fastema.torch._face.average.TorchAverage` is one)."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def sharded(self) -> bool: ...
    @property
    def split(self) -> bool: ...
    @property
    def swapped(self) -> bool: ...
    @property
    def source(self) -> str: ...
    def state_dict(self) -> dict: ...
    def gathered_state_dict(self) -> dict: ...


class Attachable(Face, Protocol):
    """The average an attachment joins, as the attachment (:mod:`fastema.torch._face.attach`),
    this module and :mod:`.attach_checks` read it: its public surface (:class:`Face`) and what its
    ``attach()`` hands over of its parts (:class:`~fastema.torch._face.attach.Joined`), never a
    private name of a face."""

    @property
    def kind(self) -> str: ...                       # the face's class name, in every message
    @property
    def names(self) -> Collection[str]: ...          # the names of the tensors it averages
    @property
    def specs(self) -> Mapping[str, Spec]: ...       # a sharded one's: name -> its layout
    @property
    def stale(self) -> bool: ...                     # the model's registrations changed since
    @property
    def agreement(self) -> Agreement: ...            # its ranks' agreement (calls(), groups())
    def checked_load(self, state: dict) -> Callable[[], None]: ...

META_BYTES = 1 << 16                 # the counters and settings' JSON, zero-padded (a fixed size)
_PER_NAME = ("averaged", "ring")     # a face's state_dict() entries keyed by tracked tensor name
_BUFFERS = ("copied", "int_buffers")


def refusal(face: Attachable) -> str | None:
    """Why a sharded face cannot take the per-parameter form (None: it can)."""
    for spec in face.specs.values():
        split = spec.slices or spec.replica_dim is not None     # shard_replicas: SplitEntry pieces
        if spec.valid is not None or (spec.pieces is not None and not split):
            return "of DeepSpeed ZeRO partitions or masters (no DTensor layout DCP can reshard)"
    return None


def tracked(face: Attachable) -> dict:
    """name -> the model's parameter (a DTensor) of every parameter the face averages."""
    names = set(face.names)
    return {n: p for n, p in unwrap(face.model).named_parameters() if n in names}


def _names(face: Attachable, optimizer: torch.optim.Optimizer) -> dict:
    """id(parameter) -> the name the face tracks it under, for the optimizer's averaged
    parameters."""
    by_id = {id(p): n for n, p in tracked(face).items()}
    return {id(p): by_id[id(p)] for g in optimizer.param_groups for p in g["params"]
            if id(p) in by_id}


def _carriers(face: Attachable, optimizer: torch.optim.Optimizer) -> dict:
    """id(parameter) -> name of the averaged parameters whose entries carry their own rows: the
    trainable ones the optimizer steps (DCP keeps state for ``requires_grad`` parameters only)."""
    names = _names(face, optimizer)
    return {id(p): names[id(p)] for g in optimizer.param_groups for p in g["params"]
            if id(p) in names and p.requires_grad}


def mark(key: str, face: Attachable, optimizer: torch.optim.Optimizer,
         bare: list | None = None) -> int:
    """An empty entry under ``key`` in the live state of every carrier (:func:`_carriers`) that
    has state, or that has a gradient and no state (the optimizer keeps none for it: plain SGD,
    or after DCP's dummy step, which gives every trainable parameter a gradient): what DCP's
    ``flatten_optimizer_state_dict=True`` rebuilds a loaded entry from. Never on a parameter with
    neither (Adam fills an empty state at its first step). The parameters whose state holds
    nothing but the marker are appended to ``bare``: before the optimizer's next step they are
    taken out again (:func:`unbare`), since Adam and its kin fill a state only where it is empty.
    Returns the number of states after."""
    carriers = _carriers(face, optimizer)
    state = optimizer.state
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in carriers:
                continue
            st = state.get(p)               # .get: no entry made by the defaultdict
            if st:
                if key not in st:
                    st[key] = {}
            elif p.grad is not None:
                state[p] = {key: {}} if st is None else st
                state[p].setdefault(key, {})
                if bare is not None:
                    bare.append(p)
    return len(state)


def unbare(key: str, optimizer: torch.optim.Optimizer, bare: list) -> int:
    """Before a step: the states of ``bare`` (:func:`mark`) that still hold only the marker are
    taken out, so the optimizer finds them empty and fills them (Adam's ``len(state) == 0``);
    the step's post-hook marks them again. Returns how many were taken out."""
    state, out = optimizer.state, 0
    for p in bare:
        st = state.get(p)
        if st is not None and len(st) == 1 and isinstance(st.get(key), dict) and not st[key]:
            del state[p]
            out += 1
    bare.clear()
    return out


def unmark(key: str, optimizer: torch.optim.Optimizer) -> None:
    """:func:`mark` undone (``detach()``): only the empty entries it made."""
    for p, st in list(optimizer.state.items()):
        if isinstance(st.get(key), dict) and not st[key]:
            del st[key]
            if not st:
                del optimizer.state[p]


def unmarked(key: str, state_dict: dict) -> dict:
    """A new state dict without :func:`mark`'s empty entries (the optimizer's own per-parameter
    dicts, which ``state_dict()`` shares, are not written); a parameter left with nothing is
    left out, as the optimizer's own state dict would."""
    state = state_dict.get("state")
    def marked(v: Any) -> bool:
        return isinstance(v, dict) and isinstance(v.get(key), dict) and not v[key]

    if not isinstance(state, dict) or not any(map(marked, state.values())):
        return dict(state_dict)
    out = {k: ({kk: vv for kk, vv in v.items() if kk != key} if marked(v) else v)
           for k, v in state.items()}
    return {**state_dict, "state": {k: v for k, v in out.items() if v}}


def _indexed(d: dict, names: list) -> dict:
    """``d`` keyed by each name's index in ``names`` (appended), as a string: a key of nothing
    but digits, the same after DCP's flattening."""
    out = {}
    for n, v in d.items():
        out[str(len(names))] = v
        names.append(n)
    return out


def _named(what: str, d: Any, names: Any) -> dict:
    """:func:`_indexed` undone: ``d``'s keys back to the names they index; refuses damage."""
    if not isinstance(d, dict):
        raise ValueError(f"the attached average's {what} entry is a {type(d).__name__}, not a dict "
                         f"(damaged); nothing was loaded")
    if not isinstance(names, list) or len(names) != len(d) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < len(names) for k in d):
        raise ValueError(f"the attached average's {what} entry does not match the names its record "
                         f"holds ({len(d)} entries, keys {sorted(d)[:4]}, "
                         f"{len(names) if isinstance(names, list) else 'no'} names): damaged, or "
                         f"saved by another fastema; nothing was loaded")
    return {names[int(k)]: v for k, v in d.items()}


def per_param_state(key: str, face: Attachable, optimizer: torch.optim.Optimizer,
                    state_dict: dict, flags: dict | None = None) -> dict:
    """The optimizer's state dict with the average in its per-parameter entries (a new dict:
    the optimizer's own per-parameter dicts, which ``state_dict()`` shares, are not written).

    The rule (``docs/guides/attach.md``): each trainable averaged parameter the optimizer steps
    (a *carrier*) holds its own rows; the first carrier (in the optimizer's order) also holds the
    record (``"meta"``: counters, settings, ``flags``), the copied and integer buffers, and under
    ``"others"`` the rows of every other averaged tensor (frozen parameters, inside the optimizer
    or not; averaged buffers), which DCP would drop or never see."""
    full = face.state_dict()
    carriers = _carriers(face, optimizer)
    order = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    saved = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    pairs = [(index, carriers[id(p)]) for index, p in zip(saved, order) if id(p) in carriers]
    if not pairs:
        raise ValueError("the attached average's parameters that this optimizer steps are all "
                         "frozen (requires_grad=False): its per-parameter entries need one "
                         "trainable parameter to ride (DCP keeps state for those only). Save the "
                         "average beside the optimizer (dcp.save({'ema': ema, ...}))")
    own = {n for _, n in pairs}
    per_name = {k: full[k] for k in _PER_NAME if isinstance(full.get(k), dict)}
    state = dict(state_dict["state"])
    for i, (index, name) in enumerate(pairs):
        entry: dict = {k: v[name] for k, v in per_name.items() if name in v}
        if i == 0:
            entry["meta"] = _encode(_fitted({**{k: v for k, v in full.items()
                                                if k not in _PER_NAME and k not in _BUFFERS},
                                             **(flags or {})}))
            names: dict = {k: [] for k in (*_BUFFERS, *per_name)}
            for k in _BUFFERS:
                entry[k] = _indexed(full.get(k, {}), names[k])
            entry["others"] = {k: _indexed({n: t for n, t in v.items() if n not in own}, names[k])
                               for k, v in per_name.items()}
            entry["names"] = _text(names)
        state[index] = {**state.get(index, {}), key: entry}
    for index, p in zip(saved, order):    # DCP's strict load wants state for every trainable one
        if p.requires_grad and index not in state:
            state[index] = {}             # (a stateless optimizer's, beside the carriers' entries)
    return {**state_dict, "state": state}


def probed(key: str, face: Attachable, optimizer: torch.optim.Optimizer, state_dict: dict,
           stand_in: Any, placed: list) -> dict:
    """The state dict with ``stand_in`` where :func:`per_param_state` puts the average (under
    ``key`` in each carrier's entry; new dicts, nothing of the average read): what ``attach()``
    checks an optimizer's ``state_dict()`` keeps. Appends each carrier's index to ``placed``."""
    carriers = _carriers(face, optimizer)
    order = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    state = dict(state_dict["state"])
    for index, p in zip(saved, order):
        if id(p) in carriers:
            state[index] = {**state.get(index, {}), key: stand_in}
            placed.append(index)
    return {**state_dict, "state": state}


def split_entries(key: str, face: Attachable, optimizer: torch.optim.Optimizer,
                  state_dict: dict) -> tuple[dict | None, dict]:
    """``(the face's state_dict() rebuilt from the per-parameter entries or None where there are
    none, the state dict without them)``. Refuses a partial set of entries by name."""
    live = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    saved_groups = state_dict.get("param_groups")
    saved = list(chain.from_iterable(g.get("params", ()) for g in saved_groups or ()))
    by_key = {k: p for k, p in zip(saved, live)}
    names = _names(face, optimizer)
    state, found = {}, {}
    for k, v in state_dict.get("state", {}).items():
        if isinstance(v, dict) and key in v:
            rest = {kk: vv for kk, vv in v.items() if kk != key}
            p, entry = by_key.get(k), v[key]
            if not isinstance(entry, dict):        # damaged, or another program's key
                raise ValueError(f"the optimizer state dict's {key!r} entry of parameter {k!r} "
                                 f"is a {type(entry).__name__}, not this average's entries "
                                 f"(damaged, or another program's); nothing was loaded")
            if p is not None and id(p) in names and entry:
                found[names[id(p)]] = entry
            if rest:
                state[k] = rest
        else:
            state[k] = v
    rest_dict = {**state_dict, "state": state}
    if not found:
        return None, rest_dict
    metas = [e for e in found.values() if "meta" in e]
    if len(metas) != 1:
        raise ValueError(f"the optimizer state dict's {key!r} entries hold {len(metas)} counter "
                         f"records (one expected: a state dict of another model or optimizer?); "
                         f"nothing was loaded")
    holder = metas[0]
    full = _decode(holder["meta"], "counter record")
    names = _decode(holder["names"], "name list") if "names" in holder else {}
    others = holder.get("others", {})
    if not isinstance(others, dict):
        raise ValueError(f"the attached average's 'others' entry is a {type(others).__name__}, "
                         f"not a dict (damaged); nothing was loaded")
    for k in _PER_NAME:
        parts = {n: e[k] for n, e in found.items() if k in e}
        parts.update(_named(f"'others' {k!r}", others.get(k, {}), names.get(k, [])))
        if parts:
            full[k] = parts
    for k in _BUFFERS:
        full[k] = _named(repr(k), holder.get(k, {}), names.get(k, []))
    return full, rest_dict


def _fitted(meta: dict) -> dict:
    """``meta`` whose list of tensors holding inf or NaN (information, never loaded) is cut to its
    first names where the whole list would not fit :data:`META_BYTES`: a save keeps the rest."""
    names = meta.get(RECORD)
    if isinstance(names, list) and len(json.dumps(meta).encode()) > META_BYTES:
        return {**meta, RECORD: names[:8] + [f"... and {len(names) - 8} more"]}
    return meta


def _encode(meta: dict) -> torch.Tensor:
    try:
        data = json.dumps(meta, allow_nan=True).encode()
    except TypeError as err:                 # a tensor or another object among the counters
        raise TypeError(f"the attached average's counters and settings cannot be written as "
                        f"JSON ({err}): save it beside the optimizer (dcp.save({{'ema': ema}}))"
                        ) from None
    if json.loads(data) != meta and repr(json.loads(data)) != repr(meta):   # NaN != NaN
        raise TypeError("the attached average's counters and settings do not survive JSON "
                        "(tuples or non-string keys): report it; save the average beside the "
                        "optimizer meanwhile (dcp.save({'ema': ema}))")
    if len(data) > META_BYTES:
        raise ValueError(f"the attached average's counters and settings take {len(data)} bytes as "
                         f"JSON, over the {META_BYTES} its optimizer entry holds: fewer rows or a "
                         f"shorter schedule, or save it beside the optimizer (dcp.save({{'ema': "
                         f"ema}}))")
    out = torch.zeros(META_BYTES, dtype=torch.uint8)
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _text(names: dict) -> torch.Tensor:
    """The names' JSON (ASCII: non-ASCII escaped) in a uint8 tensor of its own size: the same
    size for the same names, so a fresh run's template for ``dcp.load`` holds it."""
    data = json.dumps(names).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _decode(t: Any, what: str = "counter record") -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise TypeError(f"the attached average's {what} must be a 1-D uint8 tensor, got "
                        f"{type(t).__name__}; nothing was loaded")
    raw = bytes(t.cpu().numpy().tobytes()).rstrip(b"\0")
    try:
        meta = json.loads(raw.decode())
    except Exception as err:                 # any failure is damage: RecursionError of deep JSON too
        why = f"{type(err).__name__}: {str(err)[:200]}"
        raise ValueError(f"the attached average's {what} is damaged ({why}); nothing was "
                         f"loaded") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the attached average's {what} is not a dict; nothing was loaded")
    return meta
