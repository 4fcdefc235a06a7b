"""A stream's split pieces (an average split over replicas, ``shard_replicas``) read bucket by
bucket.

The entries' pieces in the stream's order, cut into buckets of one rank's consecutive pieces of at
most ``bucket_bytes``, one broadcast from that rank per bucket, each full tensor made from the
buckets as they come (HSDP: each local shard so made, then one ``full_tensor()`` per parameter over
the shard dimension). Every rank plans the same broadcasts (:class:`BucketReads`); the buffer they
arrive in is allocated once, before the first one (:meth:`BucketReads.reserve`, inside the ranks'
agreement: a rank that cannot allocate it refuses the stream on every rank), and reused: held
besides what the consumer holds are the latest bucket and the entry being made, never more.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .._placement import gather
from .._sharding import params as _sharded

__all__ = ["BucketReads", "bucketed"]


def bucketed(item) -> bool:
    """Whether a stream's ``item`` is read in buckets: a piece of an average split over replicas."""
    return item.spec is not None and item.spec.pieces is not None and item.spec.slices


class _Seg(NamedTuple):
    item: int                   # the entry's index in the stream
    at: int                     # where its elements go in the entry (flat; HSDP: the local shard)
    src: int                    # where they are in the owner's piece of the entry
    n: int                      # how many
    where: int                  # where they are in the bucket


class _Bucket:
    """One broadcast: consecutive pieces (in the stream's order) that one rank of a replica group
    holds, at most ``bucket_bytes`` in the dtype they are carried in."""

    def __init__(self, owner: int, group, device: torch.device, carry: torch.dtype):
        self.owner, self.group, self.device, self.carry = owner, group, device, carry
        self.segs: list[_Seg] = []
        self.size = 0                           # elements


def _plan(items: list, bucket_bytes: int) -> list[_Bucket]:
    """The broadcasts that read ``items``' split pieces, every rank alike: each entry's pieces in
    rank order (its elements in order), cut into buckets of one owner's consecutive pieces, each
    filled to ``bucket_bytes`` (a piece longer than that spans several)."""
    buckets: list[_Bucket] = []
    cur: _Bucket | None = None
    for k, item in enumerate(items):
        if not bucketed(item):
            continue
        spec = item.spec
        group = spec.mesh.get_group(spec.replica_dim or 0)
        device, carry = gather.transport(group, item.wire, [_sharded.local_tensor(item.t)])
        cap = max(1, bucket_bytes // carry.itemsize)
        for r, (first, count) in enumerate(spec.pieces[1]):
            done = 0
            while done < count:
                if cur is None or cur.size == cap or cur.group is not group or \
                        (cur.owner, cur.device, cur.carry) != (r, device, carry):
                    cur = _Bucket(r, group, device, carry)
                    buckets.append(cur)
                n = min(count - done, cap - cur.size)
                cur.segs.append(_Seg(k, first + done, done, n, cur.size))
                cur.size += n
                done += n
    return buckets


class BucketReads:
    """The broadcasts of a stream's split entries (``items``: the stream's, with ``name``, ``t``,
    ``value``, ``wire``, ``spec``, ``home``), the bucket received last, and each split entry made
    from them."""

    def __init__(self, items: list, bucket_bytes: int):
        self.items = items
        self.buckets = _plan(items, bucket_bytes)
        self.segs: dict[int, list] = {}          # entry -> (bucket, segment) of each of its pieces
        for b, bucket in enumerate(self.buckets):
            for seg in bucket.segs:
                self.segs.setdefault(seg.item, []).append((b, seg))
        self.done = 0                            # buckets received
        self.buf: torch.Tensor | None = None     # the latest bucket received (buckets[done - 1])
        self._space: dict[torch.device, torch.Tensor] = {}

    def reserve(self) -> None:
        """Allocate the buffer every bucket arrives in (per device, the largest bucket's bytes)."""
        sizes: dict[torch.device, int] = {}
        for b in self.buckets:
            sizes[b.device] = max(sizes.get(b.device, 0), b.size * b.carry.itemsize)
        self._space = {d: gather.allocate(n, torch.uint8, d) for d, n in sizes.items()}

    def entry(self, k: int, keep: bool, unchanged) -> torch.Tensor | None:
        """Entry ``k`` made whole (fresh) from its pieces, receiving the buckets it needs
        (``unchanged()`` before each); None where this rank keeps nothing. Its pieces in buckets
        already passed (a stream resumed after a failure, its rest read) are skipped: only what is
        kept needs them."""
        item = self.items[k]
        hsdp = item.spec.replica_dim is not None
        part = None
        if (keep or hsdp) and k in self.segs:    # before its buckets: a failure leaves them unread
            first = self.buckets[self.segs[k][0][0]]
            part = gather.allocate(sum(n for _, n in item.spec.pieces[1]),
                                   first.carry if hsdp else item.wire, first.device)
        for b, seg in self.segs.get(k, []):
            if b >= self.done:                   # not received: the latest bucket's pieces first
                unchanged()                      # before each read, on every rank alike
                self.buf = self._receive(self.buckets[b])
                self.done = b + 1
            if b == self.done - 1 and part is not None:
                assert self.buf is not None
                part[seg.at:seg.at + seg.n] = self.buf[seg.where:seg.where + seg.n]
        return _finish(item, part, keep)

    def _receive(self, bucket: _Bucket) -> torch.Tensor:
        """One bucket: its owner packs its pieces (the model's dtype, then the wire's), then one
        broadcast over the replica group, into the reserved buffer."""
        dist = torch.distributed
        if bucket.device not in self._space:     # not reserved (made without the agreement)
            self.reserve()
        buf = self._space[bucket.device][:bucket.size * bucket.carry.itemsize].view(bucket.carry)
        with torch.no_grad():
            if dist.get_rank(bucket.group) == bucket.owner:
                for seg in bucket.segs:
                    item = self.items[seg.item]
                    piece = item.value()[seg.src:seg.src + seg.n]
                    # rounded as the model's, then the wire's
                    buf[seg.where:seg.where + seg.n] = piece.to(item.t.dtype).to(item.wire)
            owner = dist.get_global_rank(bucket.group, bucket.owner)
            dist.broadcast(buf, src=owner, group=bucket.group)
        return buf


def _finish(item, part: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
    """A split entry made whole (fresh): the tensor, or with HSDP its local shard, then one
    ``full_tensor()`` over the shard dimension (every rank of it joins)."""
    spec = item.spec
    if part is None:
        return None                             # not kept here
    out: Any = part.view(spec.pieces[0])
    if spec.replica_dim is not None:
        from torch.distributed.tensor import DTensor

        home = _sharded.local_tensor(item.t).device     # the mesh's device, for the gather
        out = DTensor.from_local(out.to(home), spec.mesh, spec.placements, run_check=False,
                                 shape=spec.shape, stride=spec.stride).full_tensor()
        if not keep:
            return None
    return out.to(device=item.home or out.device, dtype=item.wire)
