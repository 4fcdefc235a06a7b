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

import numpy as np
import torch


def _device_of(x) -> tuple[str, int, int] | None:
    """``(device, address, bytes)`` of one allocation (torch tensor, NumPy array, CUDA device array)."""
    if isinstance(x, torch.Tensor):
        storage = x.untyped_storage()
        where = "cpu" if x.device.type == "cpu" else str(x.device)
        return where, storage.data_ptr(), storage.nbytes()
    if isinstance(x, np.ndarray):
        base = x if x.base is None else x.base
        if isinstance(base, np.ndarray):
            return "cpu", base.__array_interface__["data"][0], base.nbytes
        return "cpu", x.__array_interface__["data"][0], x.nbytes
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        device = getattr(getattr(x, "gpu_data", None), "device", None)
        index = getattr(getattr(x, "_numba_type_", None), "device", None)
        name = f"cuda:{getattr(device, 'id', index) or 0}"
        return name, cai["data"][0], int(getattr(x, "nbytes", 0) or getattr(x, "alloc_size", 0))
    return None


TABLE_FIELDS = ("shadow_addr", "seg_addr", "seg_offset", "chunk_seg", "chunk_begin")


def _table_arrays(t) -> list:
    """The arrays of one launch table (``_launch.Tables``: host NumPy arrays or device arrays, and on
    CUDA their pinned staging)."""
    out = [getattr(t, f) for f in TABLE_FIELDS]
    staging = getattr(t, "staging", None)
    if staging is not None:
        out.extend(v for v in vars(staging).values() if hasattr(v, "__cuda_array_interface__")
                   or isinstance(v, (np.ndarray, torch.Tensor)))
    return out


def _shadow_parts(shadow, what: str) -> list[tuple[str, Any]]:
    """``(part, array)`` of what a FlatShadow (or a shadow with its layout) owns: its buffers (``what``)
    and its launch tables; a shadow that lists its own parts (offloaded) gives those."""
    if shadow is None:
        return []
    own = getattr(shadow, "parts", None)
    if callable(own):
        return [(part, a) for part, a in own()]
    out: list[tuple[str, Any]] = []
    for g in shadow.layout.groups:
        out.append((what, getattr(g, "buffer", None)))            # a pair group's averages are the caller's
        if getattr(g, "scan", g) is not g:                        # a split group's whole-source scan tables
            out.append(("tables", g.scan.tables))
        out.append(("tables", g.tables))
    return out


def memory(side, core=None, backup=None, parts: bool = False) -> dict:
    """``device -> bytes`` the average holds (see the module): ``side`` its model side, ``core`` its
    engine (the device plan), ``backup`` a lossy swap's backup of the raw weights. ``parts``: ``device
    -> {part: bytes}`` instead, the parts being ``"shadow"``, ``"ring"`` (a window's snapshots),
    ``"copied buffers"``, ``"tables"``,
    ``"swap backup"``, ``"device plan"``, and for an offloaded average ``"staging chunks"`` and
    ``"pinned slots"`` (``"host slots"`` where the tests run a GPU's pipeline on the CPU)."""
    items: list[tuple[str, Any]] = []
    avg = side.avg
    items += _shadow_parts(avg, "shadow")
    items += _shadow_parts(getattr(avg, "_raw", None), "swap backup")   # shard_replicas: the raw window of a swap
    items += _shadow_parts(side.copy, "copied buffers")
    items += [("copied buffers", copy) for _, copy in side.int_buffers.values()]
    if backup is not None and hasattr(backup, "layout"):
        items += _shadow_parts(backup, "swap backup")
    return _total(items, core, parts)


def pairs_memory(pairs, core) -> dict[str, int]:
    """``device -> bytes`` a target network holds besides the target itself (the caller's tensors,
    which are the average): the copied buffers' tables, the flags, the launch tables, the device plan."""
    items = _shadow_parts(pairs.avg, "shadow") + _shadow_parts(pairs.copied, "copied buffers")
    items += [("flags", f) for f in pairs.flags.values()]
    return _total(items, core, False)


def _total(items: list, core, parts: bool) -> dict:
    plan = getattr(core, "device_plan", None)
    if plan is not None:
        items = items + [("device plan", a) for a in plan.tensors()]
    seen: set = set()
    out: dict = {}
    for part, a in items:
        for x in (_table_arrays(a) if hasattr(a, "chunk_begin") else [a]):
            found = _device_of(x)
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
