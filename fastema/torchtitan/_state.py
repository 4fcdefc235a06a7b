"""The EMA in torchtitan's checkpoints: main's layout, ``state.<fqn>.ema_params.<key>`` (DTensors of
the parameters' layouts, the padding of padded parameters hidden), written from and read into the
shadow."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .._nonfinite import load_advice
from ..torch import mesh_findings, refuse_together
from ._keys import canonical_fqn, flat_key

if TYPE_CHECKING:
    from ..flat import FlatShadow

__all__ = ["Tracked", "agreed_load", "as_global", "flat_state_dict", "load_flat_state_dict",
           "mesh_groups", "padded_params"]


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
                         padded: Mapping[str, Any], state: Mapping[str, Any],
                         verdict: Callable[[str | None], None], allow: bool = False) -> list[str]:
    """See :meth:`fastema.torchtitan.EMA.load_state_dict`: every entry checked on this rank (no
    collective: a DTensor entry's local piece, in the copy's dtype), ``verdict(problem)`` (raises on
    every rank of the mesh when one refused: :func:`agreed_load`), then every entry written (an
    entry that is the shadow's view, as ``dcp.load`` fills them, is checked too, not copied again:
    it was written before this call). ``allow``: entries holding inf or NaN in the copy's dtype
    load too; returns their keys."""
    from torch.distributed.tensor import DTensor

    problems: list[str] = []
    in_place: list[str] = []                    # entries dcp.load wrote into the shadow's own views
    bad_in_place: list[str] = []
    poisoned: list[str] = []                    # loaded all the same (allow)
    refused = 0                                 # problems that are inf or NaN (allow loads them)
    ready = []
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
            shape = list(value.shape)       # with the hidden padding back (zeros: never trained)
            if padding is not None:
                shape[padding.dim] = padding.num_padded
            if isinstance(value, DTensor):
                if t.layout is None:
                    problems.append(f"{name} is a DTensor but {t.fqn!r} is a whole tensor here")
                    continue
                expected, local = tuple(t.layout[2]), value.to_local()
            elif t.layout is not None:
                problems.append(f"{name} is a plain tensor but {t.fqn!r} is sharded here: pass the "
                                f"DTensors state_dict() gives (dcp.load does)")
                continue
            else:
                expected, local = tuple(dst.shape), value
            if tuple(shape) != expected:
                problems.append(f"{name} has shape {tuple(shape)}, expected {expected}")
                continue
            if local.is_meta:                            # (its check would read no values: torch's error)
                problems.append(f"{name} is a meta tensor, which holds no values: load a checkpoint that holds them")
                continue
            if written:
                in_place.append(name)
            # finite in the copy's dtype: a float64 1e300 lands in a float32 copy as inf
            if bool(torch.isfinite(local.to(dst.dtype)).all()) or allow:
                ready.append((t.layout, dst, value, padding))
                if allow and not bool(torch.isfinite(local.to(dst.dtype)).all()):
                    poisoned.append(name)
            elif written:
                bad_in_place.append(name)
            elif bool(torch.isfinite(local).all()):
                problems.append(f"{name} holds values beyond {dst.dtype}'s range (its copy's "
                                f"dtype), which would land as inf")
                refused += 1
            else:
                problems.append(f"{name} holds inf or NaN")
                refused += 1
    verdict(_refusal(problems, in_place, bad_in_place, refused))
    with torch.no_grad():                       # every rank's entries passed: the same on each
        for layout, dst, value, padding in ready:
            if padding is not None:
                value = padding.restore(value)
            if isinstance(value, DTensor) and layout is not None:     # (checked: it has one)
                if tuple(value.placements) != layout[1]:
                    value = value.redistribute(layout[0], layout[1])
                value = value.to_local()
            if not _same_memory(value, dst):    # dcp.load's views: checked, not copied again
                dst.copy_(value)
    return poisoned


def _refusal(problems: list[str], in_place: list[str], bad_in_place: list[str],
             nonfinite: int = 0) -> str | None:
    """What this rank refuses the load for (None: nothing); where inf or NaN is all it refuses
    (``nonfinite``: of ``problems``), how to load it all the same and repair it."""
    if bad_in_place:
        why = (f"the EMA state was not loaded: {_listed(bad_in_place)} hold inf or NaN, and they "
               f"are this EMA's copies, which dcp.load had already written in place (it fills the "
               f"views state_dict() gives, then calls load_state_dict): the copies now hold the "
               f"checkpoint's values where dcp.load wrote them, inf and NaN included, and their "
               f"previous values elsewhere (nothing else was written)"
               + (f" ({_listed(problems)})" if problems else "")
               + ": load a checkpoint whose EMA is finite, or call load_state_dict({}) to start "
                 "every copy afresh from the weights")
    elif problems:
        why = ("the EMA state was not loaded (nothing was written"
               + (f"; {len(in_place)} entries are this EMA's copies, which hold what was written "
                  f"into them before this call, as dcp.load does" if in_place else "")
               + f"): {_listed(problems)}")
    else:
        return None
    if nonfinite < len(problems):
        return why
    return why + ". " + load_advice("or set ema.allow_nonfinite = True before a load another "
                                    "library makes: dcp.load, torchtitan's CheckpointManager")


def mesh_groups(tracked: Sequence[Tracked]) -> list:
    """``(process group, device type)`` of every dimension of the meshes the tracked tensors are
    laid out over (DTensors', ``layouts=``'), each once; empty without a process group."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return []
    groups: list = []
    for t in tracked:
        if t.layout is None:
            continue
        mesh = t.layout[0]
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            if all(group is not g for g, _ in groups):
                groups.append((group, mesh.device_type))
    return groups


def agreed_load(tracked: Sequence[Tracked], problem: str | None, present: bool) -> None:
    """The verdict of a load, agreed over the tracked tensors' mesh (one
    :func:`fastema.torch.mesh_findings` of every rank's ``(present, problem)``, under the process
    group's timeout): a rank that refuses (``problem``) makes every rank raise the same
    ``Disagreement`` (a ``ValueError``) naming it, as do ranks of which some load the EMA's entries
    and others none (``present``); never a rank left in its next collective. Without a mesh:
    ``ValueError(problem)``."""
    groups = mesh_groups(tracked)
    if not groups:
        if problem is not None:
            raise ValueError(problem)
        return
    what = "fastema.torchtitan.EMA.load_state_dict()"
    found = mesh_findings((present, problem), groups, waiting=(
        f"{what}: every rank of the EMA's mesh must load it (dcp.load calls it on every rank); "
        f"nothing was loaded here"))
    refuse_together(what, {rank: f[1] for rank, f in found.items()})
    loading = [rank for rank, f in found.items() if f[0]]
    if loading and len(loading) < len(found):
        empty = [rank for rank in found if rank not in loading]
        refuse_together(what, {empty[0]: (
            f"its state dict holds no EMA entry (a cold start) while ranks {loading} load the "
            f"EMA's entries (global ranks): the ranks load different checkpoints. Load one on "
            f"every rank; nothing was loaded, on every rank")})
