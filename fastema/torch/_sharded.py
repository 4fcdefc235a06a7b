"""What fastema knows of sharded parameters (FSDP2 ``fully_shard``, tensor parallel, HSDP: DTensors).

A DTensor's ``data_ptr()`` is not where its elements are; each rank holds a plain local tensor
(``p._local_tensor``, what ``p.to_local()`` returns) with the rank's piece of the parameter. A
sharded average averages those local pieces, with no collective: the shadow of a parameter is
``rows x local_numel`` elements of the rank's flat buffer. This module maps DTensor parameters to
their local tensors, describes the shadow's views as DTensors (for checkpoints: DCP reads and
loads the shadow in place), cuts a rank's piece out of a full tensor, and reshards FSDP2 modules
(an FSDP2 module left unsharded after a forward with no backward holds plain full copies that the
next forward would use as they are).
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch


class Spec(NamedTuple):
    """How a DTensor parameter is laid out over the ranks: what the shadow's views are wrapped in."""
    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t, what: str):
    """``(local tensor, Spec)`` of a DTensor parameter, refused by name where the local tensor is not
    the rank's piece of the parameter (a Partial placement: pending sums) or is itself a wrapper."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    placements = tuple(t.placements)
    for p in placements:
        if not isinstance(p, (Shard, Replicate, _StridedShard)):
            raise TypeError(f"{what} is a DTensor with placement {p} (pending reductions, not values): fastema "
                            f"averages Shard and Replicate parameters; redistribute it first. Nothing was written.")
    piece = getattr(t, "_local_tensor", None)
    if not isinstance(piece, torch.Tensor):
        piece = t.to_local()
    if is_traceable_wrapper_subclass(piece):
        raise TypeError(f"{what} is a DTensor whose local shard is a {type(piece).__name__} (a quantised or "
                        f"float8 tensor subclass): fastema averages plain local shards of a supported dtype. "
                        f"Nothing was written.")
    return piece, Spec(t.device_mesh, placements, t.shape, tuple(t.stride()))


def local_address(t) -> int:
    """Where a tracked parameter's elements are now: the local shard's for a DTensor."""
    return getattr(t, "_local_tensor", t).data_ptr()


def fsdp_modules(model) -> list:
    """The FSDP2 modules in ``model`` (every ``fully_shard``-ed one), in module order."""
    mod = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(mod, "FSDPModule", None) if mod is not None else None
    return [m for m in model.modules() if isinstance(m, cls)] if cls is not None else []


def reshard(modules) -> None:
    """Reshard every FSDP2 module (``FSDPModule.reshard()`` is not recursive): drop the unsharded
    copies a forward with no backward leaves, and put the sharded DTensors back on the modules."""
    for m in modules:
        m.reshard()


def _row_placement(p):
    """The placement of a parameter's shard on the shadow's (rows, *shape) view: dims move up by one."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(p, _StridedShard):
        return _StridedShard(p.dim + 1, split_factor=p.split_factor)
    if isinstance(p, Shard):
        return Shard(p.dim + 1)
    return p


def rows_spec(spec: Spec, rows: int) -> Spec:
    """The Spec of the (rows, *shape) stack of a parameter's averages."""
    numel = 1
    for d in spec.shape:
        numel *= d
    return Spec(spec.mesh, tuple(_row_placement(p) for p in spec.placements),
                torch.Size((rows, *spec.shape)), (numel, *_contiguous_stride(spec.shape)))


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def wrap(piece: torch.Tensor, spec: Spec):
    """``piece`` (this rank's part) as a DTensor laid out as ``spec``: no copy, no collective."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(piece, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def piece_of(value: torch.Tensor, spec: Spec) -> torch.Tensor:
    """This rank's part, laid out as ``spec``, of ``value``: a full plain tensor (sliced locally, no
    collective), a DTensor laid out as ``spec`` (its local tensor) or a DTensor laid out otherwise
    (gathered first: a collective every rank must join)."""
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        if value.device_mesh == spec.mesh and tuple(value.placements) == tuple(spec.placements):
            return value.to_local()
        value = value.full_tensor()
    return distribute_tensor(value, spec.mesh, spec.placements, src_data_rank=None).to_local()


def full(value):
    """A full plain tensor from a DTensor (collective), or the tensor itself."""
    return value.full_tensor() if is_dtensor(value) else value
