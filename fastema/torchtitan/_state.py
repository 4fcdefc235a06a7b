"""The EMA in torchtitan's checkpoints (main's layout, ``state.<fqn>.ema_params.<key>``) and one copy
exported to a Hugging Face folder (main's ``scripts/checkpoint_conversion/convert_ema_to_hf.py``)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from .._io.files import atomic_write
from .._io.safetensors import stream_safetensors
from ._keys import canonical_fqn, flat_key

if TYPE_CHECKING:
    from ..flat import FlatShadow
    from ._ema import EMA, Tracked

__all__ = ["as_global", "export_hf", "flat_state_dict", "load_flat_state_dict", "padded_params"]


def padded_params(parts: Sequence[nn.Module]) -> dict[str, Any]:
    """``fqn -> padded dim spec`` of every padded parameter (a module's ``padded_params``: ``dim``,
    ``num_padded``, ``num_real``, ``strip(t)``, ``restore(t)``), as main's ``_padded_params`` finds them."""
    out: dict[str, Any] = {}
    for model in parts:
        for module_fqn, module in model.named_modules():
            for name, spec in getattr(module, "padded_params", {}).items():
                out[canonical_fqn(f"{module_fqn}.{name}" if module_fqn else name)] = spec
    return out


def as_global(t: Tracked, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's part of ``t``'s copy) as the checkpoint holds it: itself for a whole tensor,
    a DTensor of ``t``'s layout for a shard (no collective)."""
    if t.layout is None:
        return local
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = t.layout
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _pads(spec: Any, value: torch.Tensor, size: str) -> bool:
    return spec is not None and value.ndim > spec.dim and value.shape[spec.dim] == getattr(spec, size)


def flat_state_dict(tracked: Sequence[Tracked], shadow: FlatShadow, keys: Sequence[str],
                    padded: Mapping[str, Any]) -> dict[str, Any]:
    """See :meth:`fastema.torchtitan.EMA.state_dict`."""
    out: dict[str, Any] = {}
    for t in tracked:
        spec = padded.get(t.fqn)
        for row, key in enumerate(keys):
            value = as_global(t, shadow.view(t.fqn, row))
            out[flat_key(t.fqn, key)] = spec.strip(value) if _pads(spec, value, "num_padded") else value
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.device == b.device)


def load_flat_state_dict(tracked: Sequence[Tracked], shadow: FlatShadow, keys: Sequence[str],
                         padded: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """See :meth:`fastema.torchtitan.EMA.load_state_dict`: every entry checked, then all written
    (an entry that already is the shadow's view, as ``dcp.load`` fills them, is not copied again)."""
    from torch.distributed.tensor import DTensor

    problems: list[str] = []
    writes = []
    for t in tracked:
        spec = padded.get(t.fqn)
        for row, key in enumerate(keys):
            name = flat_key(t.fqn, key)
            value = state.get(name)
            if value is None:
                problems.append(f"{name} is missing")
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                problems.append(f"{name} is {type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}"
                                f", expected a floating tensor")
                continue
            if _pads(spec, value, "num_real"):
                value = spec.restore(value)                      # hidden padding back (zeros: never trained)
            dst = shadow.view(t.fqn, row)
            if isinstance(value, DTensor):
                if t.layout is None:
                    problems.append(f"{name} is a DTensor but {t.fqn!r} is a whole tensor here")
                    continue
                if tuple(value.placements) != t.layout[1]:
                    value = value.redistribute(t.layout[0], t.layout[1])
                value = value.to_local()
            elif t.layout is not None:
                problems.append(f"{name} is a plain tensor but {t.fqn!r} is sharded here: pass the DTensors "
                                f"state_dict() gives (dcp.load does)")
                continue
            if tuple(value.shape) != tuple(dst.shape):
                problems.append(f"{name} has shape {tuple(value.shape)}, expected {tuple(dst.shape)}")
            elif not _same_memory(value, dst):
                if not bool(torch.isfinite(value).all()):
                    problems.append(f"{name} holds inf or NaN")
                else:
                    writes.append((dst, value))
    if problems:
        raise ValueError(f"the EMA state was not loaded (nothing was written): {'; '.join(problems[:5])}"
                         + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    with torch.no_grad():
        for dst, value in writes:
            dst.copy_(value)


def _writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def export_hf(ema: EMA, directory: str | os.PathLike, key: str | None = None, *, sd_adapter: Any = None,
              export_dtype: torch.dtype = torch.float32) -> str:
    """Write copy ``key`` (default: the only one) of ``ema`` as a Hugging Face folder: the model's state
    dict with every tracked tensor replaced by its average (the others, frozen parameters and buffers not
    averaged, as the model holds them), through ``sd_adapter.to_hf`` when given (torchtitan's state-dict
    adapter), in ``export_dtype``, into ``directory/model.safetensors`` (written whole or not at all).
    On a sharded model every rank must call it (each tensor gathered in turn); rank 0 writes. Returns
    the file's path."""
    from torch.distributed.tensor import DTensor

    row = ema.row_of(key)
    state: dict[str, torch.Tensor] = {}
    for model in ema.model_parts:
        state.update(model.state_dict())
    unmatched = sorted(t.fqn for t in ema.tracked if t.fqn not in state)
    if unmatched:
        raise ValueError(f"{len(unmatched)} averaged tensor(s) have no key in the model's state dict, e.g. "
                         f"{unmatched[:3]}: exporting would write the trained weights instead of the average")
    for t in ema.tracked:
        state[t.fqn] = as_global(t, ema.shadow.view(t.fqn, row))
    full = {}
    for name, value in state.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        full[name] = value.detach()
    if sd_adapter is not None:
        full = sd_adapter.to_hf(full)
    path = os.path.join(os.fspath(directory), "model.safetensors")
    if _writer():
        os.makedirs(os.fspath(directory), exist_ok=True)
        tensors = {n: (v, export_dtype if v.is_floating_point() else v.dtype) for n, v in full.items()}
        atomic_write(path, lambda f: stream_safetensors(f, tensors, {"format": "pt", "ema_key": ema.keys[row]}))
    return path
