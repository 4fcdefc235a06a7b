"""The EMA in torchtitan's checkpoints: main's layout, ``state.<fqn>.ema_params.<key>`` (DTensors of
the parameters' layouts, the padding of padded parameters hidden), written from and read into the
shadow."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ._keys import canonical_fqn, flat_key

if TYPE_CHECKING:
    from ..flat import FlatShadow

__all__ = ["Tracked", "as_global", "flat_state_dict", "load_flat_state_dict", "padded_params"]


class Tracked(NamedTuple):
    """One averaged tensor: its canonical name, the model's tensor (a parameter or a buffer; a
    DTensor under FSDP2 / TP), the local tensor the shadow reads (the model's tensor itself, or the
    DTensor's own local tensor, ``_local_tensor``: never an alias made here), and its global layout
    (``(mesh, placements, shape, stride)``: a DTensor's own, or the one given in ``layouts=`` for a
    plain local shard; None for a whole tensor)."""
    fqn: str
    tensor: torch.Tensor
    local: torch.Tensor
    layout: tuple | None


def padded_params(parts: Sequence[nn.Module]) -> dict[str, Any]:
    """``fqn -> padded dim spec`` of every padded parameter (a module's ``padded_params``: ``dim``,
    ``num_padded``, ``num_real``, ``strip(t)``, ``restore(t)``), as main's
    ``_padded_params`` finds them."""
    out: dict[str, Any] = {}
    for model in parts:
        for module_fqn, module in model.named_modules():
            for name, spec in getattr(module, "padded_params", {}).items():
                out[canonical_fqn(f"{module_fqn}.{name}" if module_fqn else name)] = spec
    return out


def as_global(t: Tracked, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's part of ``t``'s copy) as the checkpoint holds it: itself for a whole
    tensor, a DTensor of ``t``'s layout for a shard (no collective)."""
    if t.layout is None:
        return local
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = t.layout
    # an offloaded copy, handed to DCP on the mesh's device
    if local.device.type != mesh.device_type:
        local = local.to(t.local.device)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _pads(spec: Any, value: torch.Tensor, size: str) -> Any:
    """``spec`` when ``value`` has the padded (``"num_padded"``) or real (``"num_real"``) size
    along its dim."""
    if spec is not None and value.ndim > spec.dim and value.shape[spec.dim] == getattr(spec, size):
        return spec
    return None


def flat_state_dict(tracked: Sequence[Tracked], shadow: FlatShadow, keys: Sequence[str],
                    padded: Mapping[str, Any]) -> dict[str, Any]:
    """See :meth:`fastema.torchtitan.EMA.state_dict`."""
    out: dict[str, Any] = {}
    for t in tracked:
        spec = padded.get(t.fqn)
        for row, key in enumerate(keys):
            value = as_global(t, shadow.view(t.fqn, row))
            padding = _pads(spec, value, "num_padded")
            out[flat_key(t.fqn, key)] = value if padding is None else padding.strip(value)
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _written_into(value: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether the entry ``value`` is memory of ``dst``, the shadow's copy: a view :func:`flat_state_dict`
    gave (a padded copy's stripped), which ``dcp.load`` wrote in place before the load was called."""
    from torch.distributed.tensor import DTensor

    local = value.to_local() if isinstance(value, DTensor) else value
    return (local.device == dst.device and local.dtype == dst.dtype and local.numel() > 0
            and local.data_ptr() == dst.data_ptr())


def _listed(items: list[str]) -> str:
    return "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")


def load_flat_state_dict(tracked: Sequence[Tracked], shadow: FlatShadow, keys: Sequence[str],
                         padded: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """See :meth:`fastema.torchtitan.EMA.load_state_dict`: every entry checked, then all written (an
    entry that is the shadow's view, as ``dcp.load`` fills them, is checked too, not copied again: it
    was written before this call)."""
    from torch.distributed.tensor import DTensor

    problems: list[str] = []
    in_place: list[str] = []                    # entries dcp.load wrote into the shadow's own views
    bad_in_place: list[str] = []
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
                what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(f"{name} is {what}, expected a floating tensor")
                continue
            dst = shadow.view(t.fqn, row)
            written = _written_into(value, dst)
            padding = _pads(spec, value, "num_real")
            if padding is not None:
                value = padding.restore(value)  # hidden padding back (zeros: never trained)
            if isinstance(value, DTensor):
                if t.layout is None:
                    problems.append(f"{name} is a DTensor but {t.fqn!r} is a whole tensor here")
                    continue
                if tuple(value.placements) != t.layout[1]:
                    value = value.redistribute(t.layout[0], t.layout[1])
                value = value.to_local()
            elif t.layout is not None:
                problems.append(f"{name} is a plain tensor but {t.fqn!r} is sharded here: pass the "
                                f"DTensors state_dict() gives (dcp.load does)")
                continue
            if tuple(value.shape) != tuple(dst.shape):
                problems.append(f"{name} has shape {tuple(value.shape)}, "
                                f"expected {tuple(dst.shape)}")
                continue
            if written:
                in_place.append(name)
            if bool(torch.isfinite(value).all()):
                if not _same_memory(value, dst):    # dcp.load's views: checked, not copied again
                    writes.append((dst, value))
            elif written:
                bad_in_place.append(name)
            else:
                problems.append(f"{name} holds inf or NaN")
    if bad_in_place:
        raise ValueError(f"the EMA state was not loaded: {_listed(bad_in_place)} hold inf or NaN, and "
                         f"they are this EMA's copies, which dcp.load had already written in place (it "
                         f"fills the views state_dict() gives, then calls load_state_dict): the copies "
                         f"now hold the checkpoint's values where dcp.load wrote them, inf and NaN "
                         f"included, and their previous values elsewhere (nothing else was written)"
                         + (f" ({_listed(problems)})" if problems else "")
                         + ": load a checkpoint whose EMA is finite, or call load_state_dict({}) to "
                           "start every copy afresh from the weights")
    if problems:
        raise ValueError("the EMA state was not loaded (nothing was written"
                         + (f"; {len(in_place)} entries are this EMA's copies, which hold what was "
                            f"written into them before this call, as dcp.load does" if in_place else "")
                         + f"): {_listed(problems)}")
    with torch.no_grad():
        for dst, value in writes:
            dst.copy_(value)
