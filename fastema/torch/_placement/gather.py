"""The gathers that read an average split over replicas into the model (its swap in and back,
``copy_to``), and where and in which dtype a gather carries values (:func:`transport`).

Every rank's window of a row is gathered bucket by bucket (one ``all_gather_into_tensor`` per bucket
and group, every rank of the replica group joining) and written into the model's tensors in their
own dtype. What a read allocates is allocated before its first collective, by :func:`reserve`,
inside the ranks' agreement (:mod:`fastema.torch._state.agree`): a rank that cannot allocate its
buckets then refuses the read on every rank, instead of leaving the read after the others entered
its first gather (where that rank's next exchange would pair with their bucket).
:func:`gather_into_sources` allocates nothing. :func:`allocate` is where every such buffer comes
from (the split swap's and the streams' buckets).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Buckets", "all_gather", "allocate", "flat", "gather_into_sources", "mesh_device",
           "reserve", "transport", "wire_device", "window"]


def _nccl(group) -> bool:
    """Whether ``group`` moves CUDA tensors with NCCL (``"nccl"``, or a ``"cpu:gloo,cuda:nccl"``
    pair, which a plain ``init_process_group()`` makes and ``get_backend`` calls
    ``"undefined"``)."""
    try:
        return "nccl" in str(dist.get_backend_config(group))
    except (AttributeError, RuntimeError, ValueError):
        return dist.get_backend(group) == "nccl"


def wire_device(group, sources: list) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the sources' GPU with NCCL, else host."""
    cuda = [t.device for t in sources if t.device.type == "cuda"]
    if _nccl(group) and (cuda or torch.cuda.is_available()):
        return cuda[0] if cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mesh_device(group) -> str:
    """The device type of a mesh over ``group`` (``"cuda"`` with NCCL, else ``"cpu"``)."""
    return "cuda" if _nccl(group) and torch.cuda.is_available() else "cpu"


def _wire_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """16-bit values travel as float32 through the host (gloo; exact both ways), as on a GPU."""
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu":
        return torch.float32
    return dtype


def transport(group, dtype: torch.dtype, sources: list) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` a gather over ``group`` carries ``dtype`` values in (see wire_device)."""
    device = wire_device(group, sources)
    return device, _wire_dtype(dtype, device)


def allocate(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor of ``numel`` elements: where every buffer a collective read allocates comes
    from (its buckets, inside the ranks' agreement; a stream's entries). The fault tests make it
    fail on one rank."""
    return torch.empty(numel, dtype=dtype, device=device)


def all_gather(out: torch.Tensor, mine: torch.Tensor, group) -> None:
    """Every rank's ``mine`` into ``out`` (rank order): ``all_gather_single`` where torch has it
    (its new name), else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements in storage order, as a 1-D view (any dense layout)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def window(g, rank: int, ranks: int) -> tuple[int, int]:
    """The columns ``[lo, hi)`` of group ``g``'s whole row that ``rank`` of ``ranks`` keeps."""
    from ..._layout import window as _window

    return _window(g.whole, 16 // g.buffer.element_size(), (rank, ranks))


class _Plan(NamedTuple):
    dtype: torch.dtype            # the model's (the sources') dtype
    wire: torch.dtype             # what travels
    windows: list                 # every rank's (lo, hi)
    longest: int                  # the longest window
    per: int                      # elements of one rank's part of a bucket


class Buckets(NamedTuple):
    """A read's buffers (bytes, viewed in each group's dtypes): one rank's part of a bucket, every
    rank's parts, and the model-dtype rounding of an average kept in another dtype (None where none
    rounds)."""
    send: torch.Tensor
    got: torch.Tensor
    rounding: torch.Tensor | None


def _plans(layout, owner) -> list[_Plan]:
    ranks, out = owner.ranks, []
    for g in layout.groups:
        dtype = owner.sources[g.members[0]].dtype
        _, wire = transport(owner.group, dtype, owner.sources)
        windows = [window(g, r, ranks) for r in range(ranks)]
        longest = max(hi - lo for lo, hi in windows)
        per = max(1, min(longest, owner.gather_bucket // (wire.itemsize * ranks)))   # all ranks
        out.append(_Plan(dtype, wire, windows, longest, per))
    return out


def reserve(layout, owner) -> Buckets:
    """The buffers :func:`gather_into_sources` of ``layout`` (the owner's, or its raw weights'
    window) takes, allocated now: the largest group's bucket, every rank's parts of it, and a
    rounding buffer where the shadow's dtype is neither the model's nor the wire's."""
    device, _ = transport(owner.group, torch.float32, owner.sources)
    plans = _plans(layout, owner)
    size = max((p.per * p.wire.itemsize for p in plans), default=0)
    rounds = [p.per * p.dtype.itemsize for g, p in zip(layout.groups, plans)
              if p.wire != p.dtype and g.buffer.dtype != p.dtype]
    return Buckets(allocate(size, torch.uint8, device),
                   allocate(size * owner.ranks, torch.uint8, device),
                   allocate(max(rounds), torch.uint8, device) if rounds else None)


def gather_into_sources(layout, row: int, owner, buckets: Buckets,
                        written: list | None = None) -> None:
    """Every rank's window of row ``row`` of ``layout``, gathered bucket by bucket and written into
    the owner's sources in their own dtype (rounded to nearest from the shadow's): one
    ``all_gather_into_tensor`` per bucket and group, every rank of ``owner.group`` joining. A bucket
    is ``owner.gather_bucket`` bytes, all ranks' parts together (the memory a read adds), in
    ``buckets`` (from :func:`reserve`). ``written`` gets an entry once the first value is
    written."""
    group, ranks = owner.group, owner.ranks
    flats = [flat(t.detach()) for t in owner.sources]
    with torch.no_grad():
        for g, p in zip(layout.groups, _plans(layout, owner)):
            per = p.per
            send = buckets.send[:per * p.wire.itemsize].view(p.wire)
            got = buckets.got[:ranks * per * p.wire.itemsize].view(p.wire)
            starts, counts = np.asarray(g.starts, np.int64), np.asarray(g.counts, np.int64)
            mine = g.buffer[row]
            for b0 in range(0, p.longest, per):
                part = mine[b0:b0 + per]
                n = part.numel()
                if p.wire == p.dtype or part.dtype == p.dtype:
                    send[:n].copy_(part)                   # rounded to the model's dtype once
                else:
                    assert buckets.rounding is not None            # reserved for this group
                    rounded = buckets.rounding[:n * p.dtype.itemsize].view(p.dtype)
                    rounded.copy_(part)                    # to the model's dtype, then the wire's
                    send[:n].copy_(rounded)
                send[n:].zero_()
                all_gather(got, send, group)
                if written is not None and not written:
                    written.append(True)                   # from here the sources hold part of it
                _scatter(got, p, b0, starts, counts, [flats[m] for m in g.members])


def _scatter(got: torch.Tensor, p: _Plan, b0: int, starts, counts, flats: list) -> None:
    """One gathered bucket (every rank's part of columns ``b0 + [0, per)`` of its window) into the
    sources."""
    per = p.per
    for r, (lo, hi) in enumerate(p.windows):
        a, b = lo + b0, min(hi, lo + b0 + per)         # the whole row's columns this piece holds
        if a >= b:
            continue
        first = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
        for slot in range(first, len(starts)):
            s0 = int(starts[slot])
            if s0 >= b:
                break
            x0, x1 = max(a, s0), min(b, s0 + int(counts[slot]))
            if x0 < x1:
                at = r * per - lo - b0
                flats[slot][x0 - s0:x1 - s0].copy_(got[at + x0:at + x1])
