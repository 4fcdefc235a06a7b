"""The average split over data-parallel replicas (``EMA(model, shard_replicas=...)``).

Replicas (DDP ranks, or the ranks of any group that holds the same parameters) each keep one slice
of the shadow: a :class:`ReplicaShadow` is a :class:`~fastema.flat.FlatShadow` made with
``split=(rank, ranks)``, so every (device, dtype) group's row is cut into contiguous, 16-byte
aligned, balanced windows, and an update folds this rank's window alone from this rank's copy of
the weights: no collective, no host sync, 1/N of the memory and of the kernel's traffic. The
replicas hold the same weights after every optimizer step, so the windows together are the
average an unsplit EMA would hold, bit for bit (stochastic rounding is keyed by each element's
place in the whole group).

Reading the average is the collective: :meth:`ReplicaShadow.swap` and
:meth:`ReplicaShadow.copy_to_sources` write the gathered average into the model bucket by bucket
(``all_gather_into_tensor`` of one bucket of every rank's window, in the model's dtype), the raw
weights kept as this rank's window only (and gathered back on the way out, bit for bit). Exports
and checkpoints go through the checkpoint side with the ``pieces`` layout of
:mod:`fastema.torch._sharding.tensors` (each rank's piece of each tensor; the full tensor gathered one at a
time). The construction checks once, with one collective, that the ranks hold the same parameters.
"""
from __future__ import annotations

import os
import zlib
from typing import Any

import torch
import torch.distributed as dist

from ..._interrupts import ctrl_c_held
from ...flat import FlatShadow
from ...window import WindowShadow
from .._sharding import tensors as _sharded
from . import gather
from .offload import DEFAULT_CHUNK, OffloadedShadow

__all__ = ["OffloadedReplicaShadow", "ReplicaShadow", "ReplicaWindow", "check_replicas", "replica_group",
           "split_shadow"]

DEFAULT_BUCKET = 64 << 20          # bytes of one gather bucket, all ranks' parts together (the wire's dtype)
_DIGEST_CHUNK = 1 << 20            # elements the construction check widens to float64 at a time (8 MiB)


def replica_group(model, shard_replicas, kind: str, *, offload: Any, specs: dict, masters: Any):
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


def split_shadow(model, side, shard_replicas, kind: str, settings: str, bucket, make, *, offload: Any = None):
    """The shadow of ``side`` (a :class:`~fastema.torch._tensors.model.TorchModel`) split over ``model``'s
    replicas, or None when ``shard_replicas`` is off: the group found (:func:`replica_group`), the
    bucket and layouts checked, the one collective that checks the replicas agree (``settings``: what
    must be the same on every rank), ``make(group)`` the shadow, and the side told of its pieces."""
    split = replica_group(model, shard_replicas, kind, offload=offload, specs=side.specs, masters=side.masters)
    if split is None:
        return None
    group, dim = split
    check_bucket(bucket)
    check_layouts(side.averaged, kind)
    run = check_replicas(side.averaged, group, kind, f"{settings};{bucket}")
    shadow = make(group)
    shadow.split_id = run
    side.split(shadow.specs(_sharded.mesh_of(group, gather.mesh_device(group)), side.specs, dim))
    return shadow


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


class _ReplicaReads:
    """What a shadow split over a replica group adds (a :class:`ReplicaShadow`'s or a
    :class:`ReplicaWindow`'s, each a split shadow of its kind): its per-source views are this rank's
    pieces, 1-D (``view``: ``(count,)``, ``state_view``: ``(rows, count)``; empty where it holds none
    of a source); :meth:`specs` describes them to the checkpoint side; ``swap`` and
    ``copy_to_sources`` are collectives over ``group`` that write the gathered average row.
    ``_settle()`` runs before each read (an offloaded shadow waits for its folds there)."""

    exact_swap = True           # the swap keeps the raw weights' window and gathers it back: exact for every dtype
    split_id: int | None
    layout: Any
    names: list
    sources: list
    source_table: Any
    check_row: Any
    _reserved: tuple[FlatShadow | None, gather.Buckets] | None

    def _join(self, group, bucket: int) -> tuple[int, int]:
        """Take ``group`` and ``bucket``; ``(rank, ranks)``, the split to make."""
        check_bucket(bucket)
        self.group, self.bucket = group, bucket
        self.rank, self.ranks = dist.get_rank(group), dist.get_world_size(group)
        self._raw: FlatShadow | None = None      # the raw weights' window while the average is swapped in (only)
        self._swapped_row: int | None = None
        self.release()                           # nothing reserved for a read (reserve)
        self.split_id = 0                        # the split's run id, set once the ranks agreed (split_shadow)
        return self.rank, self.ranks

    def __repr__(self) -> str:
        return f"Replica{super().__repr__()[:-1]}, rank={self.rank} of {self.ranks})"

    def parts(self, what: str = "shadow") -> list:
        """The split shadow's parts, and during a swap the raw weights' window (``"swap backup"``)."""
        raw = self._raw.parts("swap backup") if self._raw is not None else []
        return super().parts(what) + raw    # type: ignore[misc]

    def _settle(self) -> None:
        pass

    def specs(self, group_mesh, sharded: dict | None = None, dim: int | None = None) -> dict[str, _sharded.Spec]:
        """``name -> Spec`` of every source: its shape and every rank's ``(first, count)`` piece
        (``_sharded``'s ``pieces`` layout: exports gather the full tensor, a load cuts this rank's).
        HSDP (``sharded``: the parameters' DTensor specs, split over mesh dimension ``dim``): the
        pieces are of the local shard, and the spec keeps the DTensor's layout around them."""
        from torch.distributed.tensor import Replicate

        out = {}
        for i, (name, t) in enumerate(zip(self.names, self.sources)):
            g, slot = self.layout.where[i]
            counts = int(g.counts[slot])
            where = []
            for r in range(self.ranks):
                lo, hi = gather.window(g, r, self.ranks)
                first = min(max(lo - int(g.starts[slot]), 0), counts)
                last = min(max(hi - int(g.starts[slot]), 0), counts)
                where.append((first, max(last - first, 0)))
            pieces = (tuple(t.shape), tuple(where))
            if sharded is not None and name in sharded:
                out[name] = sharded[name]._replace(pieces=pieces, slices=t.is_contiguous() and t.numel() > 0,
                                                   replica_dim=dim)
            else:
                out[name] = _sharded.Spec(group_mesh, (Replicate(),), t.shape, tuple(t.stride()), pieces=pieces,
                                          slices=t.is_contiguous() and t.numel() > 0)
        return out

    # ------------------------------------------------------------ reading the average: collectives

    def swap_modes(self, lossy: bool = False) -> list:
        return []                                # no swap kernel: a gather, exact for every dtype

    def reserve(self, row: int, swap: bool) -> None:
        """Allocate what the next :meth:`swap` (``swap``) or :meth:`copy_to_sources` of ``row``
        needs, after the checks it makes: its gather buckets, and for a swap in the raw weights'
        window (this rank's window of the sources, copied now). Called inside the ranks' agreement,
        so a failure here (out of memory on one rank) is a refusal every rank raises, never a rank
        leaving the read after the others entered its gathers."""
        self.release()
        self._settle()
        self.source_table.refresh()
        if swap and self._swapped_row is not None:
            if row != self._swapped_row:
                raise RuntimeError(f"row {self._swapped_row} is swapped in; swap it back before "
                                   f"swapping row {row}")
            assert self._raw is not None
            self._reserved = (None, gather.reserve(self._raw.layout, self))
            return
        self.check_row(row)
        mine = dict(zip(self.names, self.sources))
        raw = FlatShadow(mine, dtype="same", split=(self.rank, self.ranks)) if swap else None
        self._reserved = (raw, gather.reserve(self.layout, self))

    def release(self) -> None:
        """Free what :meth:`reserve` allocated for a read that was then refused."""
        self._reserved = None

    def _take(self, row: int, swap: bool) -> tuple[FlatShadow | None, gather.Buckets]:
        if self._reserved is None:                   # not reserved by a face: now (a direct call)
            self.reserve(row, swap)
        reserved, self._reserved = self._reserved, None
        assert reserved is not None
        return reserved

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Put average ``row`` into the sources (gathered), keeping this rank's window of the raw
        weights; called again, gather the raw windows back. Every rank of the group must call it."""
        raw, buckets = self._take(row, True)
        self.source_table.refresh()
        if self._swapped_row is None:
            self._raw, self._swapped_row = raw, row  # from here the raw window is the way back
            written: list = []
            try:
                with ctrl_c_held():
                    gather.gather_into_sources(self.layout, row, self, buckets, written)
            except BaseException:
                if not written:                      # nothing of the average went in: not swapped (H7)
                    self._swapped_row, self._raw = None, None
                raise
        else:
            assert self._raw is not None
            with ctrl_c_held():
                gather.gather_into_sources(self._raw.layout, 0, self, buckets)
            self._swapped_row, self._raw = None, None        # its memory back until the next swap

    @property
    def swapped(self) -> bool:
        return self._swapped_row is not None

    def copy_to_sources(self, row: int = 0) -> None:
        """Write average ``row`` into the sources (gathered): a collective over the group."""
        _, buckets = self._take(row, False)
        self.source_table.refresh()
        with ctrl_c_held():                          # the whole model written, or none of it (L3)
            gather.gather_into_sources(self.layout, row, self, buckets)


class ReplicaShadow(_ReplicaReads, FlatShadow):
    """A :class:`~fastema.flat.FlatShadow` holding this rank's window of every group (see the module
    and :class:`_ReplicaReads`)."""

    def __init__(self, sources: dict, *, rows: int, dtype: str, group, bucket: int = DEFAULT_BUCKET):
        FlatShadow.__init__(self, sources, rows=rows, dtype=dtype, split=self._join(group, bucket))

    def view(self, source: int | str, row: int | None = 0):
        """This rank's piece of the average of ``source`` (``row=None``: every row, ``(rows, count)``)."""
        if row is not None:
            self.check_row(row)
        g, _, count, col = self.layout.piece(self.source_table.position(source))
        return g.buffer[:, col:col + count] if row is None else g.buffer[row, col:col + count]


class ReplicaWindow(_ReplicaReads, WindowShadow):
    """A :class:`~fastema.window.WindowShadow` holding this rank's window of every group: of the mean,
    the compensated sums and the ring (``WindowAverage(model, W, shard_replicas=...)``)."""

    def __init__(self, sources: dict, window: int, *, ring_dtype: str, group, bucket: int = DEFAULT_BUCKET):
        WindowShadow.__init__(self, sources, window, ring_dtype=ring_dtype, split=self._join(group, bucket))


class OffloadedReplicaShadow(_ReplicaReads, OffloadedShadow):
    """An offloaded shadow (:class:`~fastema.torch._placement.offload.OffloadedShadow`) of this rank's window of every
    group: each rank stages and folds its slice only, and reads gather it as :class:`ReplicaShadow`'s do
    (after the pending folds)."""

    def __init__(self, sources: dict, *, rows: int, dtype: str, group, bucket: int = DEFAULT_BUCKET,
                 chunk: int = DEFAULT_CHUNK):
        OffloadedShadow.__init__(self, sources, rows=rows, dtype=dtype, chunk=chunk, split=self._join(group, bucket))

    def _settle(self) -> None:
        self.join()

    def view(self, source: int | str, row: int | None = 0):
        """This rank's piece of the average of ``source`` (``row=None``: every row, ``(rows, count)``), in
        host memory, after the pending folds."""
        if row is not None:
            self.check_row(row)
        self.join()
        g, _, count, col = self.src.layout.piece(self.source_table.position(source))
        buffer = self._hosts[self.src.layout.groups.index(g)].buffer
        return buffer[:, col:col + count] if row is None else buffer[row, col:col + count]
