"""A checkpoint entry that holds this rank's pieces of a tensor only: :class:`SplitEntry`.

An average split over replicas (``shard_replicas``) keeps, on each rank, a flat range of every
tensor's elements. ``torch.distributed.checkpoint`` writes and reads rectangular chunks of a
tensor, so a rank's range is cut into at most ``2 * ndim - 1`` rectangles (:func:`rects`, each
contiguous in memory), and :class:`SplitEntry` shows them to DCP as a tensor of the whole checkpoint
entry's shape: DCP's ``_Checkpointable`` protocol (the three methods DTensor implements), so
``dcp.save`` writes each element once (each rank its own rectangles), ``dcp.load`` fills them from
a checkpoint of any layout (a split average on another number of ranks, an unsplit one, FSDP's),
``dcp.async_save`` stages them (a tensor with no storage of its own: its pieces are staged), and
``dcp_to_torch_save`` gives plain full tensors. No collective: each rank names its own pieces.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._sharding import params as _sharded

__all__ = ["SplitEntry", "full_entry", "piece_of_slices", "rects", "slices", "tensor_slices"]


def rects(first: int, last: int, shape: tuple) -> list[tuple[list, list]]:
    """The elements ``[first, last)`` of a C-order tensor of ``shape`` as rectangles ``(offsets,
    sizes)``, in order, each one contiguous in memory: at most ``2 * len(shape) - 1`` of them."""
    if first >= last:
        return []
    if not shape:
        return [([], [])]
    inner = 1
    for d in shape[1:]:
        inner *= d
    lo, hi = -(-first // inner), last // inner              # the whole rows of dim 0
    if lo > hi:                                             # within one row
        row = first // inner
        return [([row, *o], [1, *s]) for o, s in rects(first - row * inner, last - row * inner, shape[1:])]
    out = []
    if first < lo * inner:                                  # the head: the end of a row
        row = lo - 1
        out += [([row, *o], [1, *s]) for o, s in rects(first - row * inner, inner, shape[1:])]
    if hi > lo:
        out.append(([lo] + [0] * (len(shape) - 1), [hi - lo, *shape[1:]]))
    if last > hi * inner:                                   # the tail: the start of a row
        out += [([hi, *o], [1, *s]) for o, s in rects(0, last - hi * inner, shape[1:])]
    return out


class SplitEntry(torch.Tensor):
    """A checkpoint entry of an average split over replicas (``shard_replicas``): this rank's
    pieces of one tensor, shown as a tensor of the whole entry's ``size``
    (``fastema.torch.SplitEntry``, what a split average's ``state_dict()`` holds; test for it with
    ``isinstance``). It holds only ``pieces``: ``(offsets, tensor)``, each tensor the rectangle at
    ``offsets`` (plain host tensors). No operator runs on it (it has no storage);
    ``torch.distributed.checkpoint`` reads and writes the pieces through its
    ``__create_write_items__``, ``__create_chunk_list__`` and ``__get_tensor_shard__`` methods, and
    a file of one rank's own (a callback's) through :meth:`flat_range`, :meth:`to_local` and
    :meth:`load_local`."""

    _pieces: list

    @staticmethod
    def __new__(cls, pieces: list, size: tuple, dtype: torch.dtype):
        self = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device=torch.device("cpu"),
                                                   requires_grad=False)
        self._pieces = list(pieces)
        return self

    def __repr__(self) -> str:                              # type: ignore[override]
        at = [tuple(o) for o, _ in self._pieces]
        return f"SplitEntry(size={tuple(self.shape)}, dtype={self.dtype}, pieces={at})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.new_empty.default:         # DCP's async staging: a shell, its pieces staged after
            self = args[0]
            return SplitEntry([], self.shape, kwargs.get("dtype") or self.dtype)
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]
        raise RuntimeError(f"{func} on a split average's checkpoint entry (SplitEntry: this "
                           f"rank's pieces only, for torch.distributed.checkpoint): load the state "
                           f"dict into an EMA, or gather it with ema.full_state_dict()")

    def flat_range(self) -> tuple[int, int] | None:
        """``(first, count)``: this rank's elements as one range of each row of the whole tensor in C
        order (what a per-rank file records, so that another number of ranks can cut its own ranges
        from it), or None where they are not one (HSDP pieces of a shard on an inner dimension)."""
        shape = tuple(self.shape[1:])
        first = at = None
        for offsets, t in self._pieces:
            sizes, starts = tuple(t.shape[1:]), list(offsets[1:])
            lead = next((d for d, n in enumerate(sizes) if n > 1), len(sizes))
            if any(sizes[d] != shape[d] for d in range(lead + 1, len(shape))):
                return None                             # a rectangle not contiguous in the whole tensor
            start = 0
            for d, o in enumerate(starts):
                start = start * shape[d] + o
            if at is not None and start != at:
                return None
            first = start if first is None else first
            at = start + t[0].numel()
        return (0, 0) if first is None or at is None else (first, at - first)

    def to_local(self) -> torch.Tensor:
        """This rank's pieces as one ``(rows, count)`` host tensor (a copy): what a per-rank file keeps."""
        rows = self.shape[0]
        if not self._pieces:
            return torch.empty((rows, 0), dtype=self.dtype)
        return torch.cat([t.reshape(rows, -1) for _, t in self._pieces], dim=1)

    def load_local(self, local: torch.Tensor) -> None:
        """The pieces <- a ``(rows, count)`` tensor that :meth:`to_local` gave (shape checked by the caller)."""
        at = 0
        for _, t in self._pieces:
            n = t[0].numel() if t.shape[0] else 0
            t.view(t.shape[0], n).copy_(local[:, at:at + n])
            at += n

    def __reduce_ex__(self, protocol):
        raise TypeError("a split average's state_dict() holds this rank's pieces only (shard_replicas): save it "
                        "with torch.distributed.checkpoint (dcp.save({'ema': ema}) on every rank), or gather a "
                        "full one with ema.full_state_dict() / ema.save(path)")

    # ------------------------------------------------------------ torch.distributed.checkpoint

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape),
                              properties=TensorProperties.create_from_tensor(t), size=self.shape))
                for offsets, t in self._pieces]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape) for offsets, t in self._pieces]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        for offsets, t in self._pieces:
            if torch.Size(offsets) == index.offset:
                return t
        raise ValueError(f"{index.fqn!r}: no piece of this rank at {tuple(index.offset)}")


# ------------------------------------------------------------ a split average's entries (see _replicas)

def slices(view: torch.Tensor, spec: _sharded.Spec) -> SplitEntry:
    """This rank's piece of a ``(rows, count)`` shadow view as the ``(rows, *shape)`` checkpoint
    entry (:class:`SplitEntry`): a host copy of each rectangle the piece makes, at its place in the
    whole tensor. No collective, and no rank stages more than it holds."""
    rows = view.shape[0]
    pieces, at = [], 0
    for offsets, sizes in _chunks(spec):
        host = torch.empty((rows, *sizes), dtype=view.dtype, device="cpu")
        n = host[0].numel()
        host.view(rows, n).copy_(view[:, at:at + n])
        pieces.append((offsets, host))
        at += n
    return SplitEntry(pieces, tuple(spec.shape), view.dtype)


def tensor_slices(piece: torch.Tensor, spec: _sharded.Spec) -> SplitEntry:
    """This rank's 1-D ``piece`` of one tensor (one row: a snapshot's profile) as an entry of the
    tensor's own shape holding this rank's rectangles only (see :func:`slices`)."""
    entry = slices(piece.reshape(1, -1), _sharded.rows_spec(spec, 1))
    pieces = [(offsets[1:], t[0]) for offsets, t in entry._pieces]
    return SplitEntry(pieces, tuple(spec.shape), piece.dtype)


def _chunks(spec: _sharded.Spec) -> list[tuple[list, list]]:
    """``(offsets, sizes)`` in the ``(rows, *shape)`` entry (``spec``: a rows spec) of the rectangles
    this rank's piece makes: of the tensor, or of the local shard, moved to its place (HSDP)."""
    assert spec.pieces is not None
    shape, where = spec.pieces
    first, count = where[dist.get_rank(spec.mesh.get_group(spec.replica_dim or 0))]
    base = [0] * (len(shape) + 1)
    if spec.replica_dim is not None:                       # the local shard's place in the whole tensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        base = list(compute_local_shape_and_global_offset(spec.shape, spec.mesh, spec.placements)[1])
    return [([b + o for b, o in zip(base, [0, *offsets])], sizes)
            for offsets, sizes in rects(first, first + count, tuple(shape))]


def piece_of_slices(value: SplitEntry, spec: _sharded.Spec) -> torch.Tensor:
    """This rank's ``(rows, count)`` piece from a :class:`SplitEntry` that :func:`slices` made (and
    ``dcp.load`` filled); refuses one laid out otherwise."""
    expected = [o for o, _ in _chunks(spec)]
    got = [list(o) for o, _ in value._pieces]
    if got != expected:
        raise ValueError(f"a checkpoint entry of this rank's pieces at {got[:3]}, where this split average holds "
                         f"{expected[:3]}: load a full tensor, or this average's own state_dict() filled by "
                         f"torch.distributed.checkpoint.load")
    return value.to_local()


def full_entry(specs: dict, name: str, value):
    """The full ``(rows, *shape)`` tensor of a split average's checkpoint entry (a
    :class:`SplitEntry`: this rank's pieces), gathered over its group (a collective); any other
    entry as it is."""
    if not isinstance(value, SplitEntry):
        return value
    spec = _sharded.rows_spec(specs[name], value.shape[0])
    return _sharded.full(_sharded.wrap(value.to_local(), spec))
