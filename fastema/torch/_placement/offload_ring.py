"""The staging of an offloaded average (:mod:`fastema.torch._placement.offload`): each device's *ring* of two
chunks on the device and, for a GPU, two pinned host slots and a side stream, and the host
shadow's groups. What the chunks and slots are for, and the order of packs, copies and folds,
is told in :mod:`fastema.torch._placement.offload`.

The tests run the GPU rings' pipeline on the CPU: they replace :func:`_two_slots`, and the
chunks are then host tensors, copied into two host slots in turn, as on a GPU without the
streams.
"""
from __future__ import annotations

from typing import Any

import torch

from .folds import Record

__all__ = ["DEFAULT_CHUNK", "HostGroup", "Ring", "after_side_stream", "check_chunk"]

#: bytes of one staging chunk: on an H100 (2026-11-26, ``bench/scripts/offload.py --gpu``) a step plus an
#: offloaded update of a 1 GiB model came within 1.2x of the device-to-host floor with 256 MiB chunks, 1.8x
#: with 64 MiB and 2x with 16 MiB (docs/guides/large_models.md, "The chunk size")
DEFAULT_CHUNK = 256 << 20


def check_chunk(chunk) -> None:
    """``Offload(chunk=)`` is a number of bytes >= 16, or the error saying so."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16:
        raise ValueError(f"Offload(chunk=...) must be a number of bytes >= 16 (each of the two staging chunks the "
                         f"offloaded average keeps on the weights' device), got {chunk!r}")


def _two_slots(device: str) -> bool:
    """Whether the chunks of ``device``'s ring are copied into two host slots (a GPU's: pinned
    memory, device-to-host copies), or are themselves what the worker folds (the CPU's)."""
    return device != "cpu"


class Ring:
    """One device's staging (see the module). ``uses[c]`` / ``done[c]``: windows staged into / folded
    from slot ``c``; ``last[c]``: the record that last staged into it."""

    def __init__(self, device: str, nbytes: int):
        self.device, self.cuda = device, device != "cpu"
        self.through_host = self.cuda or bool(_two_slots(device))
        dev = torch.device(device)
        self.chunks = [torch.zeros(nbytes, dtype=torch.uint8, device=dev) for _ in range(2)]
        self.slots = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)] \
            if self.through_host else self.chunks
        self.chunk_at = [c.data_ptr() for c in self.chunks]
        self.slot_at = [s.data_ptr() for s in self.slots]
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.packed: Any = None           # the event after the last pack (CUDA)
        self.next = 0
        self.uses, self.done = [0, 0], [0, 0]
        self.last: list[Record | None] = [None, None]

    def resync(self) -> None:
        """After the jobs ended with an error: no slot is waited on any more."""
        self.done, self.last = list(self.uses), [None, None]


def after_side_stream(ring: Ring) -> None:
    """The caller's stream on ``ring``'s GPU waits (on the device, no host sync) for everything its side
    stream was given: a pack or copy still reading the weights or writing a chunk or slot."""
    if ring.stream is not None:
        torch.cuda.current_stream(torch.device(ring.device)).wait_stream(ring.stream)


class HostGroup:
    """A group of the host shadow: the source group's geometry (starts, counts, pieces...) with its
    ``(rows, n)`` buffer in host memory, on device ``"cpu"`` (the weights the engine hands over)."""

    device = "cpu"

    def __init__(self, source_group, buffer: torch.Tensor):
        self.source = source_group
        self.buffer = buffer

    def __getattr__(self, name: str):
        return getattr(self.source, name)


class HostLayout:
    """The host shadow's layout: its :class:`HostGroup` per source group, where each source sits
    (``where``: position -> (host group, slot)), the split it holds (``split``), and this rank's
    piece of a source (:meth:`piece`, as :meth:`fastema._layout.FlatLayout.piece`)."""

    def __init__(self, source_layout, hosts: list[HostGroup]):
        self.source, self.groups, self.split = source_layout, hosts, source_layout.split
        self.where = {i: (hosts[source_layout.groups.index(g)], slot)
                      for i, (g, slot) in source_layout.where.items()}
        self.nbytes = sum(h.buffer.nbytes for h in hosts)

    def piece(self, i: int) -> tuple:
        """``(host group, first element, elements, column)`` of source ``i``'s piece held here."""
        g, first, count, col = self.source.piece(i)
        return self.groups[self.source.groups.index(g)], first, count, col
