"""What fastema knows of sharded parameters: DTensors (FSDP2 ``fully_shard``, tensor parallel, HSDP)
and DeepSpeed ZeRO-3 partitions.

A DTensor's ``data_ptr()`` is not where its elements are; each rank holds a plain local tensor
(``p._local_tensor``, what ``p.to_local()`` returns) with the rank's piece of the parameter. A
sharded average averages those local pieces, with no collective: the shadow of a parameter is
``rows x local_numel`` elements of the rank's flat buffer. This module maps DTensor parameters to
their local tensors, describes the shadow's views as DTensors (for checkpoints: DCP reads and
loads the shadow in place), cuts a rank's piece out of a full tensor, and reshards FSDP2 modules
(an FSDP2 module left unsharded after a forward with no backward holds plain full copies that the
next forward would use as they are).

A ZeRO-3 parameter keeps ``p.data`` empty and this rank's partition in ``p.ds_tensor``: the
``ceil(numel / world)`` elements from ``rank * ceil(numel / world)`` of the flattened parameter,
padded at the end. That is ``torch.chunk``'s split, so the partitions are described as a 1-D
``Shard(0)`` DTensor of ``numel`` elements over the parameter's process group (``valid``: the
elements of the partition that are not padding). A target network pairs two ZeRO-3 parameters
partitioned alike, rank-locally (:func:`zero3_piece`: the partition without its padding, and what the
two must share), and drops the target's gathered copies before it writes (:func:`release_gathered`).

The float32 masters of DeepSpeed ZeRO-1/2 and BF16_Optimizer (:mod:`fastema.torch._sharding.masters`)
give each rank a piece of a parameter's flattened elements at an arbitrary offset, which no
DTensor layout describes: their Spec has ``pieces`` (the parameter's shape, and each rank's
``(start, length)``), :func:`wrap` gathers the full tensor (a collective) and :func:`piece_of`
cuts this rank's piece out of a full one.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NamedTuple

import torch

from ... import _backends

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


class Spec(NamedTuple):
    """How a sharded parameter is laid out over the ranks: what the shadow's views are wrapped in."""
    mesh: DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple
    valid: int | None = None          # ZeRO-3: the partition's elements that are not padding
    view_shape: tuple | None = None   # ZeRO-3: the parameter's shape (the checkpoint keeps it flat)
    pieces: tuple | None = None       # ZeRO-1/2 masters: (parameter shape, ((start, length) of each rank, ...))
    slices: bool = False              # shard_replicas: a checkpoint holds this rank's pieces only
    replica_dim: int | None = None    # shard_replicas over a DTensor's replicate mesh dim: pieces of the local shard


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> TypeGuard[DTensor]:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_zero3(t) -> bool:
    return hasattr(t, "ds_id") and isinstance(getattr(t, "ds_tensor", None), torch.Tensor)


def is_sharded(t) -> bool:
    return is_dtensor(t) or is_zero3(t)


def local(t, what: str):
    """``(local tensor, Spec)`` of a DTensor or ZeRO-3 parameter, refused by name where the local
    tensor is not the rank's piece of the parameter (a Partial placement: pending sums) or is
    itself a wrapper."""
    if not is_dtensor(t):
        return _zero3_local(t, what)
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


_MESHES: dict = {}


def _zero3_checked(t, what: str):
    """``(partition, process group, world, rank, numel)`` of a ZeRO-3 parameter, refused by name where
    the partition is not DeepSpeed's ceil(numel / world) split held in memory. No collective."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise TypeError(f"{what} is a DeepSpeed ZeRO-3 partitioned parameter (full shape {tuple(t.ds_shape)}), but "
                        f"torch.distributed is not initialized: make the average inside the DeepSpeed run. "
                        f"Nothing was written.")
    part = t.ds_tensor
    location = getattr(part, "final_location", None)
    if hasattr(part, "ds_quant_scale") or (location is not None and "nvme" in str(location).lower()):
        raise TypeError(f"{what} is a ZeRO-3 parameter whose partition is quantised or swapped to NVMe: fastema "
                        f"averages partitions held in memory. Nothing was written.")
    group = getattr(t, "ds_process_group", None)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    numel, size = int(t.ds_numel), part.numel()
    if size * world < numel or size != -(-numel // world):
        raise TypeError(f"{what}: a ZeRO-3 partition of {size} elements for {numel} over {world} ranks is not "
                        f"DeepSpeed's ceil(numel / world) split. Nothing was written.")
    return part, group, world, rank, numel


def _zero3_local(t, what: str):
    from torch.distributed.tensor import Shard

    part, group, world, rank, numel = _zero3_checked(t, what)
    size = part.numel()
    valid = max(0, min(size, numel - rank * size))
    return part, Spec(mesh_of(group, part.device.type), (Shard(0),), torch.Size((numel,)), (1,), valid,
                      tuple(t.ds_shape))


def zero3_piece(t, what: str):
    """``(valid part, layout)`` of a ZeRO-3 parameter on this rank, for pairing it with another
    rank-locally (a target network): the partition without its padding (a view: the tail of the
    last ranks' partitions is memory DeepSpeed never writes), and what two parameters must share to
    be paired element for element on every rank: ``(the group's global ranks, this rank, partition
    size, numel, full shape)``. No collective (the ranks are read from the group)."""
    import torch.distributed as dist

    part, group, world, rank, numel = _zero3_checked(t, what)
    size = part.numel()
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))  # type: ignore[arg-type]
    return part[:max(0, min(size, numel - rank * size))], (ranks, rank, size, numel, tuple(t.ds_shape))


def zero3_full(t) -> torch.Tensor:
    """A fresh copy of a ZeRO-3 parameter's whole value (one the average does not track: excluded,
    frozen), gathered by DeepSpeed's ``GatheredParameters`` (read only: a collective every rank of
    the parameter's group joins). A partitioned parameter's own ``data`` is a placeholder of shape
    ``(0,)``; a persistent one may be gathered or not, so it is always gathered here."""
    import deepspeed  # deepspeed.zero is its attribute, not a module

    with torch.no_grad(), deepspeed.zero.GatheredParameters([t]):
        return t.detach().clone().view(tuple(t.ds_shape))


def full_shape(t) -> tuple:
    """A parameter's shape: a ZeRO-3 parameter's full ``ds_shape`` (its ``shape`` is ``(0,)`` while
    partitioned, the full shape while gathered)."""
    return tuple(t.ds_shape) if is_zero3(t) else tuple(t.shape)


_DEPTH = "_ds_z3_gathered_param_context_depth"     # GatheredParameters' nesting (newer DeepSpeed; else 0)


def release_gathered(params: list, what: str) -> None:
    """Before partitions are written in place: drop the gathered copies ``params`` hold (persistent
    parameters stay gathered after a forward and a forward reads that copy, not the partition), so
    that the next forward gathers the written partitions. DeepSpeed's own release (``partition()``, as
    ``GatheredParameters`` does on exit): the copies freed, the partitions unchanged, no collective.
    Refused by name, nothing released, while one is in use (inside a forward or a ``GatheredParameters``
    block): a write then would be lost or half seen."""
    if _backends.capturing("torch", _backends.device_of(params[0].ds_tensor)):
        raise RuntimeError(f"the update of {what}, ZeRO-3 partitioned, is being captured in a CUDA graph: its "
                           f"gathered copies are released at every update, which a replay would not do. Update it "
                           f"eagerly. Nothing was written.")
    status = type(params[0].ds_status)                 # DeepSpeed's ZeroParamStatus
    gone, whole = status.NOT_AVAILABLE, status.AVAILABLE
    held = [p for p in params if p.ds_status is not gone]
    if not held:
        return
    busy = [p for p in held if p.ds_status is not whole or p.ds_active_sub_modules or getattr(p, _DEPTH, 0)]
    if busy:
        raise RuntimeError(f"{len(busy)} ZeRO-3 parameters of {what} are gathered and in use now (inside its "
                           f"forward, or a deepspeed.zero.GatheredParameters block): the partitions cannot be "
                           f"written under them. Update outside the forward and the block. Nothing was written.")
    held[0].partition(param_list=held)


def mesh_of(group, device_type: str):
    """A 1-D DeviceMesh over a process group (None: the world), made once per group and device type."""
    import torch.distributed as dist

    key = (id(group), device_type)
    if key not in _MESHES:
        from torch.distributed.device_mesh import DeviceMesh

        # torch types group.WORLD Optional: it is set once a process group is initialized (a sharded model's)
        _MESHES[key] = (group, DeviceMesh.from_group(group or dist.group.WORLD, device_type))  # type: ignore[arg-type]
    return _MESHES[key][1]


def gather_pieces(piece: torch.Tensor, lengths, group) -> list:
    """Every rank's ``piece`` (``(..., lengths[rank])``; lengths may differ): one all-gather of pieces
    padded to the longest, a collective every rank of ``group`` must join. 16-bit pieces travel as
    float32 on gloo (exact both ways)."""
    import torch.distributed as dist

    longest = max(max(lengths), 1)
    wire = torch.float32 if piece.dtype in (torch.bfloat16, torch.float16) and dist.get_backend(group) == "gloo" \
        else piece.dtype
    padded = piece.new_zeros((*piece.shape[:-1], longest), dtype=wire)
    padded[..., :piece.shape[-1]] = piece
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded, group=group)
    return [o[..., :n].to(piece.dtype) for o, n in zip(out, lengths)]


def _gathered(piece: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The full tensor of a parameter whose float32 masters are cut into pieces over the ranks at
    arbitrary offsets (ZeRO-1/2, BF16_Optimizer): every rank's piece, gathered (a collective) and put
    in the parameter's shape (``spec.shape``: with the rows in front for a stack of averages)."""
    assert spec.pieces is not None                # wrap() gathers pieces only
    local_shape, where = spec.pieces
    parts = gather_pieces(piece, [n for _, n in where], spec.mesh.get_group(spec.replica_dim or 0))
    if spec.replica_dim is None:
        return torch.cat(parts, dim=-1).reshape(spec.shape)
    from torch.distributed.tensor import DTensor  # HSDP split over its replicas: the local shard, whole

    local = torch.cat(parts, dim=-1).reshape(*piece.shape[:-1], *local_shape)
    return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def local_tensor(t):
    """The memory this rank holds of a parameter: the local shard (a DTensor's), the partition
    (ZeRO-3), or the tensor itself."""
    inner = getattr(t, "_local_tensor", None)
    if inner is None:
        inner = getattr(t, "ds_tensor", None)
    return t if inner is None else inner


def local_address(t) -> int:
    """Where a tracked parameter's elements are now (see :func:`local_tensor`)."""
    return local_tensor(t).data_ptr()


def release_zero3(params: list, engine) -> None:
    """Before the partitions are written (a swap, a copy-out): no ZeRO-3 parameter may hold a gathered
    copy (persistent parameters stay gathered after a forward), or the model would go on using it.
    The engine releases them; without one, refuse."""
    held = [p for p in params if getattr(p.ds_status, "name", "") != "NOT_AVAILABLE"]
    if held and engine is not None:
        engine.empty_partition_cache()
        held = [p for p in params if getattr(p.ds_status, "name", "") != "NOT_AVAILABLE"]
    if held:
        raise RuntimeError(f"{len(held)} ZeRO-3 parameters are gathered now (persistent parameters, or inside a "
                           f"forward), and the model would keep using those copies: make the average of the engine, "
                           f"EMA(engine), which releases them, or call engine.empty_partition_cache() first. "
                           f"Nothing was written.")


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
    return spec._replace(placements=tuple(_row_placement(p) for p in spec.placements),
                         shape=torch.Size((rows, *spec.shape)), stride=(numel, *_contiguous_stride(spec.shape)))


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def wrap(piece: torch.Tensor, spec: Spec):
    """``piece`` (this rank's part) as a DTensor laid out as ``spec``: no copy, no collective."""
    from torch.distributed.tensor import DTensor

    if spec.pieces is not None:                                # ZeRO-1/2 masters: the full tensor, gathered
        return _gathered(piece, spec)
    if spec.valid is not None:
        piece = piece[..., :spec.valid]                        # a ZeRO-3 partition without its padding
    return DTensor.from_local(piece, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def piece_of(value: torch.Tensor, spec: Spec) -> torch.Tensor:
    """This rank's part, laid out as ``spec``, of ``value``: a full plain tensor (sliced locally, no
    collective), a DTensor laid out as ``spec`` (its local tensor) or a DTensor laid out otherwise
    (gathered first: a collective every rank must join)."""
    from torch.distributed.tensor import distribute_tensor

    if spec.replica_dim is not None:                           # HSDP split over its replicas: the local shard's piece
        import torch.distributed as dist

        local = piece_of(value, spec._replace(pieces=None, slices=False, replica_dim=None))
        assert spec.pieces is not None
        shape, where = spec.pieces
        first, count = where[dist.get_rank(spec.mesh.get_group(spec.replica_dim))]
        return local.reshape(*local.shape[:local.dim() - len(shape)], -1)[..., first:first + count]
    if spec.pieces is not None:                                # ZeRO-1/2 masters: this rank's piece of the elements
        import torch.distributed as dist

        shape, where = spec.pieces
        start, length = where[dist.get_rank(spec.mesh.get_group(0))]
        value = full(value)
        numel = sum(n for _, n in where)
        return value.reshape(*value.shape[:value.dim() - len(shape)], numel)[..., start:start + length]
    if spec.view_shape is not None and not is_dtensor(value) and len(spec.shape) == 2 \
            and tuple(value.shape[1:]) == spec.view_shape:      # (rows, *shape) into flat ZeRO-3 partitions
        value = value.reshape(value.shape[0], -1)
    if is_dtensor(value):
        if value.device_mesh == spec.mesh and tuple(value.placements) == tuple(spec.placements):
            return value.to_local()
        value = full(value)
    return distribute_tensor(value, spec.mesh, spec.placements, src_data_rank=None).to_local()


def full(value):
    """A full plain tensor from a DTensor (collective), or the tensor itself. A DTensor whose local
    tensor is in host memory on a GPU mesh (what ``state_dict()`` hands out) is gathered on the
    mesh's device: NCCL gathers device tensors only."""
    if not is_dtensor(value):
        return value
    piece = value.to_local()
    if piece.device.type != value.device_mesh.device_type:
        from torch.distributed.tensor import DTensor

        value = DTensor.from_local(piece, value.device_mesh, value.placements, run_check=False,  # moves it there
                                   shape=value.shape, stride=value.stride())
    return value.full_tensor()
