"""The global layout of a parameter held as a plain local shard (``build(layouts=...)``: torchtitan's
``spmd_types`` backend), checked against that shard when the EMA is built: the checkpoint holds the
average as DTensors of this layout, so a layout the local tensor does not fit would save a checkpoint
that DCP reads back wrong (a (2, 2) global shape over a (4, 4) shard resumes the corner, the rest zeros).
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch

__all__ = ["given_layout", "shard_shape"]


def shard_shape(shape: Sequence[int], mesh_sizes: Sequence[int], shard_dims: Sequence[int | None],
                coordinate: Sequence[int]) -> tuple[int, ...]:
    """The shape of the shard of a tensor of ``shape`` at ``coordinate`` of a mesh of ``mesh_sizes``, its
    mesh dim ``i`` sharding tensor dim ``shard_dims[i]`` (None: replicated there), in mesh-dim order,
    each split as ``torch.chunk`` splits (DTensor's ``Shard``: chunks of ``ceil(size / n)``, the last ones
    shorter or empty)."""
    sizes = list(shape)
    for n, dim, at in zip(mesh_sizes, shard_dims, coordinate):
        if dim is not None:
            chunk = -(-sizes[dim] // n)
            sizes[dim] = max(0, min(chunk, sizes[dim] - at * chunk))
    return tuple(sizes)


def given_layout(fqn: str, local: torch.Tensor, given: Any) -> tuple:
    """``(mesh, placements, shape, stride)`` of ``layouts[fqn]`` (``(mesh, placements)``: even shards,
    the global shape from the local one; or ``(mesh, placements, global_shape)``), its ``Shard`` dims
    made non-negative; refused by name when it is malformed, a ``Shard`` dim is out of range, or
    ``local`` is not the shard the placements and the global shape give this rank."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard

    where = f"layouts[{fqn!r}]"
    if not isinstance(given, tuple) or len(given) not in (2, 3):
        raise ValueError(f"{where} must be (mesh, placements) or (mesh, placements, global_shape), "
                         f"got {given!r}")
    mesh = given[0]
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"{where}: the mesh must be a DeviceMesh (the one {fqn!r} is sharded over), "
                         f"got {type(mesh).__name__}")
    if isinstance(given[1], (str, bytes)) or not isinstance(given[1], Sequence):
        raise ValueError(f"{where}: the placements must be a list, one per mesh dim, got {given[1]!r}")
    placements = tuple(given[1])
    if len(placements) != mesh.ndim:
        raise ValueError(f"{where} gives {len(placements)} placements for a {mesh.ndim}-D mesh: give one per "
                         f"mesh dim")
    shape = _global_shape(where, given[2]) if len(given) == 3 else None
    ndim = local.ndim if shape is None else len(shape)
    dims: list[int | None] = []
    for axis, p in enumerate(placements):
        if type(p) is Replicate:
            dims.append(None)
        elif type(p) is Shard:
            if not -ndim <= p.dim < ndim:
                raise ValueError(f"{where}: {p!r} (mesh dim {axis}) shards dim {p.dim} of a {ndim}-D tensor: "
                                 f"give a dim in [{-ndim}, {ndim})")
            dims.append(p.dim % ndim)
        else:
            raise ValueError(f"{where}: the placement {p!r} (mesh dim {axis}) is neither Shard(dim) nor "
                             f"Replicate(), the placements of a plain local shard")
    placements = tuple(Replicate() if d is None else Shard(d) for d in dims)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{where}: this rank is not in the mesh, so it holds no shard of {fqn!r}: give the "
                         f"mesh the parameter is sharded over")
    if shape is None:                           # even shards: the global shape from the local one
        sizes = list(local.shape)
        for axis, d in enumerate(dims):
            if d is not None:
                sizes[d] *= mesh.size(axis)
        shape = tuple(sizes)
    mesh_sizes = [mesh.size(axis) for axis in range(mesh.ndim)]
    expected = shard_shape(shape, mesh_sizes, dims, coordinate)
    if expected != tuple(local.shape):
        raise ValueError(f"{where}: {list(placements)} of global shape {shape} give this rank (mesh "
                         f"coordinate {list(coordinate)}) a shard of shape {expected}, but its local tensor "
                         f"has shape {tuple(local.shape)}: give the global shape of the whole parameter and "
                         f"the placements it is sharded with")
    stride = tuple(torch.empty(shape, device="meta").stride())
    return mesh, placements, shape, stride


def _global_shape(where: str, shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of sizes, refused unless every entry is an int >= 0."""
    try:
        sizes = tuple(operator.index(s) for s in shape)
    except TypeError:
        sizes = None
    if sizes is None or isinstance(shape, (str, bytes)) or any(s < 0 or isinstance(s, bool) for s in shape):
        raise ValueError(f"{where}: the global shape must be a sequence of ints >= 0 (the whole "
                         f"parameter's shape), got {shape!r}")
    return sizes
