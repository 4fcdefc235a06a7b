"""What a torch model average holds in memory, by device: ``ema.memory()`` and ``ema.nbytes``.

Every allocation the average made and keeps is counted once (by its address): the shadow rows
(this rank's slice of them under ``shard_replicas``), the copied buffers' shadow and the integer
buffers' copies, a swap's backup of the raw weights (the raw window under ``shard_replicas``), the
offloaded shadow's staging and pinned slots, the launch tables, and the device plan's arrays.
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


def _shadow_arrays(shadow) -> list:
    """The arrays a FlatShadow (or a shadow with its layout) owns: buffers and launch tables."""
    out: list[Any] = []
    if shadow is None:
        return out
    for g in shadow.layout.groups:
        out.append(getattr(g, "buffer", None))                    # a pair group's averages are the caller's
        if getattr(g, "scan", g) is not g:                        # a split group's whole-source scan tables
            t = g.scan.tables
            out.extend(getattr(t, f) for f in ("seg_addr", "seg_offset", "chunk_seg", "chunk_begin"))
        t = g.tables
        out.extend(getattr(t, f) for f in ("shadow_addr", "seg_addr", "seg_offset", "chunk_seg", "chunk_begin"))
        staging = getattr(t, "staging", None)
        if staging is not None:
            out.extend(v for v in vars(staging).values() if hasattr(v, "__cuda_array_interface__")
                       or isinstance(v, (np.ndarray, torch.Tensor)))
    return out


def memory(side, core=None, backup=None) -> dict[str, int]:
    """``device -> bytes`` the average holds (see the module): ``side`` its model side, ``core`` its
    engine (the device plan), ``backup`` a lossy swap's backup of the raw weights."""
    arrays: list[Any] = []
    avg = side.avg
    arrays += _shadow_arrays(avg)
    arrays += _shadow_arrays(getattr(avg, "_raw", None))          # shard_replicas: the raw window of a swap
    pack = getattr(avg, "pack", None)                             # offloaded: the staging and the host slots
    if pack is not None:
        arrays += _shadow_arrays(pack)
        arrays += [s for slots in getattr(avg, "_slots", ()) for s in slots]
    arrays += _shadow_arrays(side.copy)
    arrays += [copy for _, copy in side.int_buffers.values()]
    if backup is not None and hasattr(backup, "layout"):
        arrays += _shadow_arrays(backup)
    return _total(arrays, core)


def pairs_memory(pairs, core) -> dict[str, int]:
    """``device -> bytes`` a target network holds besides the target itself (the caller's tensors,
    which are the average): the copied buffers' tables, the flags, the launch tables, the device plan."""
    arrays: list[Any] = _shadow_arrays(pairs.avg) + _shadow_arrays(pairs.copied) + list(pairs.flags.values())
    return _total(arrays, core)


def _total(arrays: list, core) -> dict[str, int]:
    plan = getattr(core, "device_plan", None)
    if plan is not None:
        arrays = arrays + list(plan.tensors())
    seen: set = set()
    out: dict[str, int] = {}
    for a in arrays:
        found = _device_of(a)
        if found is None or found[2] == 0:
            continue
        where, address, size = found
        if (where, address) in seen:
            continue
        seen.add((where, address))
        out[where] = out.get(where, 0) + size
    return out
