"""What a torch model average holds in memory, by device: ``ema.memory()`` and ``ema.nbytes``.

Every allocation the average made and keeps is counted once (by its address): the shadow rows
(this rank's slice of them under ``shard_replicas``; an offloaded average's host shadow), the
copied buffers' shadow and the integer buffers' copies, a swap's backup of the raw weights (the
raw window under ``shard_replicas``), an offloaded average's two staging chunks and pinned host
slots, the launch tables, and the device plan's arrays; ``parts=True`` tells them apart.
The model's own tensors are not the average's and are not counted.
"""
from __future__ import annotations

from typing import Any

from ..._backends import allocation


def _shadow_parts(shadow, what: str) -> list[tuple[str, Any]]:
    """``(part, array)`` of what a shadow holds (its own :meth:`~fastema._shadow.Capabilities.parts`)."""
    return [] if shadow is None else shadow.parts(what)


def memory(side, plan=None, backup=None, parts: bool = False) -> dict:
    """``device -> bytes`` the average holds (see the module): ``side`` its model side, ``plan`` its
    engine's device plan (or None), ``backup`` a lossy swap's backup of the raw weights. ``parts``: ``device
    -> {part: bytes}`` instead, the parts being ``"shadow"``, ``"ring"`` (a window's snapshots),
    ``"copied buffers"``, ``"tables"``,
    ``"swap backup"``, ``"device plan"``, and for an offloaded average ``"staging chunks"`` and
    ``"pinned slots"`` (``"host slots"`` where the tests run a GPU's pipeline on the CPU)."""
    items: list[tuple[str, Any]] = []
    avg = side.avg
    items += _shadow_parts(avg, "shadow")                    # shard_replicas: the raw window of a swap too
    items += _shadow_parts(side.copy, "copied buffers")
    items += [("copied buffers", copy) for _, copy in side.int_buffers.values()]
    items += _shadow_parts(backup, "swap backup")
    return _total(items, plan, parts)


def pairs_memory(pairs, plan) -> dict[str, int]:
    """``device -> bytes`` a target network holds besides the target itself (the caller's tensors,
    which are the average): the copied buffers' tables, the flags, the launch tables, the device plan."""
    items = _shadow_parts(pairs.avg, "shadow") + _shadow_parts(pairs.copied, "copied buffers")
    items += [("flags", f) for f in pairs.flags.values()]
    return _total(items, plan, False)


def _total(items: list, plan, parts: bool) -> dict:
    if plan is not None:
        items = items + [("device plan", a) for a in plan.tensors()]
    seen: set = set()
    out: dict = {}
    for part, a in items:
        found = allocation(a)
        if found is None or found[2] == 0:
            continue
        where, address, size = found
        if (where, address) in seen:
            continue
        seen.add((where, address))
        if parts:
            out.setdefault(where, {})
            out[where][part] = out[where].get(part, 0) + size
        else:
            out[where] = out.get(where, 0) + size
    return out
