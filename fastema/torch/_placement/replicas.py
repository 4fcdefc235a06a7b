"""The average split over data-parallel replicas (``EMA(model, shard_replicas=...)``): which
replicas, and the one collective of construction that checks they agree.

Replicas (DDP ranks, or the ranks of any group that holds the same parameters) each keep one
slice of the shadow: the storage is made with ``split=(rank, ranks)`` (a
:class:`~fastema.flat.FlatShadow`, a window's, an offloaded one), so every (device, dtype) group's
row is cut into contiguous, 16-byte aligned, balanced windows, and an update folds this rank's
window alone from this rank's copy of the weights: no collective, no host sync, 1/N of the memory
and of the kernel's traffic. The replicas hold the same weights after every optimizer step, so the
windows together are the average an unsplit EMA would hold, bit for bit (stochastic rounding is
keyed by each element's place in the whole group).

Reading the average is the collective, the wrapper's
(:class:`~fastema.torch._placement.split.Split`): its swap and copy-out write the gathered average
into the model bucket by bucket (``all_gather_into_tensor`` of one bucket of every rank's window,
in the model's dtype), the raw weights kept as this rank's window only (and gathered back on the
way out, bit for bit). Exports and checkpoints go through the checkpoint side with the ``pieces``
layout of :mod:`fastema.torch._sharding.params` (each rank's piece of each tensor; the full
tensor gathered one at a time). The construction checks once, with one collective, that the ranks
hold the same parameters (:func:`found_replicas`).
"""
from __future__ import annotations

import os
import zlib
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import gather

__all__ = ["Found", "check_replicas", "found_replicas", "replica_group"]

DEFAULT_BUCKET = 64 << 20          # bytes of one gather bucket, all ranks' parts together (the wire's dtype)
_DIGEST_CHUNK = 1 << 20            # elements the construction check widens to float64 at a time (8 MiB)


def replica_group(model, shard_replicas, kind: str, *, specs: dict, masters: Any):
    """``(group, mesh dim)``: the process group whose ranks hold replicas of ``model``'s parameters,
    from ``shard_replicas`` (True: an HSDP mesh's replicate dimension, DDP's group, else the default
    group; a ``ProcessGroup``; a 1-D ``DeviceMesh``), and for HSDP that dimension of the parameters'
    mesh (else None); None when it is False/None. Refuses, naming the fix, what cannot be split."""
    if shard_replicas is None or shard_replicas is False:
        return None
    what = f"{kind}(shard_replicas=...)"
    if masters is not None:
        raise ValueError(f"{what}: this average reads DeepSpeed's float32 masters, which the optimizer already "
                         f"partitions over the data-parallel ranks (ZeRO-1/2/3): each rank keeps the average of its "
                         f"partition only. Drop shard_replicas=")
    if specs:
        return _hsdp_replicas(specs, shard_replicas, what)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{what} splits the average over the ranks of a process group, and none is initialised: "
                         f"call torch.distributed.init_process_group() first (or drop shard_replicas=)")
    outside = f"{what}: this rank (global rank {dist.get_rank()}) is not in the group given; pass the group of the " \
              f"ranks that hold this rank's replicas"
    if shard_replicas is dist.GroupMember.NON_GROUP_MEMBER:      # what new_group() gives a rank outside it
        raise ValueError(outside)
    if shard_replicas is True:
        ddp = model
        while type(ddp).__name__ != "DistributedDataParallel" and isinstance(getattr(ddp, "_orig_mod", None),
                                                                              torch.nn.Module):
            ddp = ddp._orig_mod                                    # torch.compile(DDP(model))
        group = getattr(ddp, "process_group", None) if type(ddp).__name__ == "DistributedDataParallel" else None
        group = group if group is not None else dist.group.WORLD
    elif isinstance(shard_replicas, dist.ProcessGroup):
        group = shard_replicas
    elif type(shard_replicas).__name__ == "DeviceMesh":
        if shard_replicas.ndim != 1:
            raise ValueError(f"{what} takes a 1-D DeviceMesh (the replicas' dimension: mesh['replicate']), got a "
                             f"{shard_replicas.ndim}-D mesh")
        group = shard_replicas.get_group()
    else:
        raise TypeError(f"shard_replicas must be True, False, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(shard_replicas).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(outside)
    return group, None


class Found(NamedTuple):
    """The replicas a split average is split over: their ``group``, for HSDP the mesh dimension
    (``dim``, else None) of the parameters' mesh, the split's run id (``run``, agreed) and the
    bytes of one gather of its reads (``bucket``)."""
    group: Any
    dim: int | None
    run: int
    bucket: int


def found_replicas(side, shard_replicas, kind: str, settings: str, bucket: int) -> Found | None:
    """The replicas of ``side``'s model (a :class:`~fastema.torch._tensors.model.TorchModel`) that
    its average is split over, or None when ``shard_replicas`` is off: the group found
    (:func:`replica_group`), the bucket and layouts checked, and the one collective that checks the
    replicas agree (``settings``: what must be the same on every rank). The picker then makes the
    storage of this rank's slice and wraps it (:class:`~fastema.torch._placement.split.Split`)."""
    split = replica_group(side.model, shard_replicas, kind, specs=side.specs, masters=side.masters)
    if split is None:
        return None
    group, dim = split
    check_bucket(bucket)
    check_layouts(side.averaged, kind)
    run = check_replicas(side.averaged, group, kind, f"{settings};{bucket}")   # one collective
    return Found(group, dim, run, bucket)


def _hsdp_replicas(specs: dict, shard_replicas, what: str):
    """``(group, dim)`` of the mesh dimension over which every sharded parameter is replicated (HSDP's
    replicate dimension), or the refusal: a model sharded over every rank (FSDP2, tensor parallel) has
    no replicas, its average is already split like it."""
    from torch.distributed.tensor import Replicate, Shard

    meshes = {s.mesh: s.mesh for s in specs.values()}      # by equality: DTensors may hold equal copies of a mesh
    if shard_replicas is not True or len(meshes) != 1 or any(s.pieces is not None or s.valid is not None
                                                              for s in specs.values()):
        raise ValueError(f"{what}: the model's parameters are sharded (DTensors of several meshes, ZeRO-3 "
                         f"partitions, or a group given for an HSDP model); pass shard_replicas=True for an HSDP "
                         f"model (its replicate dimension is found), or drop it: the average of a sharded model "
                         f"is already split like the model")
    mesh = next(iter(meshes.values()))
    dims = [d for d in range(mesh.ndim) if all(isinstance(s.placements[d], Replicate) for s in specs.values())]
    if not dims or any(not isinstance(p, (Shard, Replicate)) for s in specs.values() for p in s.placements):
        raise ValueError(f"{what}: no mesh dimension holds replicas of every parameter (FSDP2 or tensor parallel "
                         f"without an HSDP replicate dimension): the average is already split like the model, "
                         f"1/N a rank. Drop shard_replicas=")
    return mesh.get_group(dims[0]), dims[0]


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_replicas(sources: dict, group, kind: str, settings: str = "") -> int:
    """One collective at construction: every rank of ``group`` holds the same averaged tensors and
    makes the same split (a CRC of the names, shapes, strides, dtypes and the split's ``settings``:
    rows, dtypes, schedule, seed, bucket), with the same values (two int64 sums of their bits, one
    weighted by its position in the whole layout: exact, order-sensitive, NaN-safe). Every rank sees
    every rank's digest, so every rank refuses alike (never a hang). Returns the split's run id (group
    rank 0's random number, the same on every rank): what a slice's reads and checkpoints say it is
    of (:mod:`fastema.torch._state.agree`)."""
    layout = settings + ";" + ";".join(f"{n}:{tuple(t.shape)}:{tuple(t.stride())}:{t.dtype}"
                                       for n, t in sources.items())
    plain = bumped = 0
    base = 0                                   # positions run on across tensors: exchanged tensors differ (L2)
    with torch.no_grad():
        for t in sources.values():
            bits_of = gather.flat(t.detach()).view(_BITS[t.element_size()])
            for at in range(0, bits_of.numel(), _DIGEST_CHUNK):     # a chunk at a time: bounded
                bits = bits_of[at:at + _DIGEST_CHUNK].to(torch.int64)
                where = torch.arange(base + at, base + at + bits.numel(), device=bits.device) % 65521 + 1
                plain += int(bits.sum())
                bumped += int((bits * where).sum())
            base += bits_of.numel()
    wrap = lambda v: (v + 2**63) % 2**64 - 2**63               # noqa: E731  (int64, as the sums wrap)
    nonce = int.from_bytes(os.urandom(8), "little") >> 1       # this rank's candidate for the split's run id
    mine = torch.tensor([zlib.crc32(layout.encode()), len(sources), wrap(plain), wrap(bumped), nonce],
                        dtype=torch.int64, device=gather.wire_device(group, list(sources.values())))
    every = torch.empty(dist.get_world_size(group) * 5, dtype=torch.int64, device=mine.device)
    gather.all_gather(every, mine, group)
    rows = [r[:4] for r in every.cpu().view(-1, 5).tolist()]
    run = int(every[4])                                        # rank 0's: the run id every rank keeps
    if any(r[:2] != rows[0][:2] for r in rows):
        differ = [i for i, r in enumerate(rows) if r[:2] != rows[0][:2]][:5]
        raise ValueError(f"{kind}(shard_replicas=...): the ranks hold different models or split them differently "
                         f"(names, shapes, layouts, dtypes, decays, seed or the gather bucket differ between ranks "
                         f"{differ} and rank 0 of the group); the split average needs replicas of one model, made "
                         f"alike. Nothing was made.")
    if any(r[2:] != rows[0][2:] for r in rows):
        raise ValueError(f"{kind}(shard_replicas=...): the ranks' weights differ (group ranks "
                         f"{[i for i, r in enumerate(rows) if r[2:] != rows[0][2:]][:5]} against rank 0): each "
                         f"slice would average another model. Make the average after DistributedDataParallel(model) "
                         f"has broadcast rank 0's weights, or after every rank loaded the same checkpoint. Nothing "
                         f"was made.")
    return run


def check_bucket(bucket) -> None:
    """``ShardReplicas(bucket=)`` is a number of bytes >= 16, or the error saying so."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 16:
        raise ValueError(f"ShardReplicas(bucket=...) must be a number of bytes >= 16 (the memory a swap gathers "
                         f"through), got {bucket!r}")


def check_layouts(sources: dict, kind: str) -> None:
    """The split keeps each tensor's elements in storage order and exports them in C order: a tensor
    laid out otherwise (channels_last) is refused by name, before any collective."""
    odd = [n for n, t in sources.items() if not t.is_contiguous()]
    if odd:
        raise ValueError(f"{kind}(shard_replicas=...): {odd[:3]} are not C-contiguous (channels_last or another "
                         f"layout), which the split average does not export yet; make the model contiguous "
                         f"(model.to(memory_format=torch.contiguous_format)) or drop shard_replicas=")
