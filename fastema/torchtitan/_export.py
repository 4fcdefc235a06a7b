"""One copy of a :class:`fastema.torchtitan.EMA` exported to a Hugging Face folder (as torchtitan
main's ``scripts/checkpoint_conversion/convert_ema_to_hf.py`` exports one from a checkpoint)."""
from __future__ import annotations

import os
from typing import Any

import torch

from .._io.files import atomic_write
from .._io.safetensors import stream_safetensors
from . import _nonfinite
from ._ema import EMA
from ._state import Tracked, as_global

__all__ = ["export_hf"]


def _writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _memory(t: torch.Tensor) -> tuple | None:
    """Where ``t``'s elements are on this rank (a DTensor's: its local tensor's), in which layout:
    equal keys are one tensor under two names (a tied embedding and head). None for a tensor with
    no memory of its own to compare (empty, meta)."""
    local = getattr(t, "_local_tensor", t)
    if not local.numel() or local.device.type == "meta":
        return None
    return (local.device, local.dtype, local.untyped_storage().data_ptr(), local.storage_offset(),
            tuple(local.shape), tuple(local.stride()), tuple(t.shape))


def export_hf(ema: EMA, directory: str | os.PathLike, key: str | None = None, *,
              sd_adapter: Any = None, export_dtype: torch.dtype = torch.float32,
              allow_nonfinite: bool | None = None) -> str:
    """Write copy ``key`` (default: the only one) of ``ema`` as a Hugging Face folder: the model's
    state dict with every tracked tensor replaced by its average under every name it has (a tied
    embedding and head: both names, the same average; an entry is the tracked tensor when it is
    that object, or the same memory in the same layout, or has its name), the others (frozen
    parameters and buffers not averaged) as the model holds them, through ``sd_adapter.to_hf`` when
    given (torchtitan's state-dict adapter), in ``export_dtype``, into
    ``directory/model.safetensors`` (written whole or not at all). On a sharded model every rank
    must call it (each tensor gathered in turn); rank 0 writes. Returns the file's path. A copy
    holding inf or NaN (on any rank) is refused by name on every rank, nothing written, unless
    ``allow_nonfinite`` (None: ``ema.allow_nonfinite``): see :meth:`EMA.repair_nonfinite`."""
    from torch.distributed.tensor import DTensor

    row = ema.row_of(key)
    _nonfinite.refuse(ema, "export_hf()", row, allow_nonfinite)
    state: dict[str, torch.Tensor] = {}
    for model in ema.model_parts:
        state.update(model.state_dict(keep_vars=True))      # the tensors themselves: ties seen
    by_id = {id(t.tensor): t for t in ema.tracked}
    by_memory = {_memory(t.tensor): t for t in ema.tracked}
    by_memory.pop(None, None)
    by_name = {t.fqn: t for t in ema.tracked}
    averages: dict[str, Tracked] = {}
    for name, value in state.items():
        t = by_id.get(id(value)) or by_memory.get(_memory(value)) or by_name.get(name)
        if t is not None:
            averages[name] = t
    # a non-persistent buffer is in no state dict, so in no file: nothing of it to write
    unsaved = {n for model in ema.model_parts for n, _ in model.named_buffers()} - set(state)
    unmatched = sorted({t.fqn for t in ema.tracked} - {t.fqn for t in averages.values()} - unsaved)
    if unmatched:
        raise ValueError(f"{len(unmatched)} averaged tensor(s) have no key in the model's state "
                         f"dict, e.g. {unmatched[:3]}: exporting would write the trained weights "
                         f"instead of the average")
    full = {}
    with torch.no_grad():
        for name, value in state.items():
            t = averages.get(name)
            if t is not None:
                value = as_global(t, ema.shadow.view(t.fqn, row))
            value = value.full_tensor() if isinstance(value, DTensor) else value
            full[name] = value.detach()
    if sd_adapter is not None:
        full = sd_adapter.to_hf(full)
    path = os.path.join(os.fspath(directory), "model.safetensors")
    if _writer():
        os.makedirs(os.fspath(directory), exist_ok=True)
        tensors = {n: (v, export_dtype if v.is_floating_point() else v.dtype)
                   for n, v in full.items()}
        atomic_write(path, lambda f: stream_safetensors(
            f, tensors, {"format": "pt", "ema_key": ema.keys[row]}))
    return path
