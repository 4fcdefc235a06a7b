"""The staging of an offloaded average (:mod:`fastema.torch._placement.offload`): each device's *ring* of two
chunks on the device and, for a GPU, two pinned host slots and a side stream, and the host
shadow's groups. What the chunks and slots are for, and the order of packs, copies and folds,
is told in :mod:`fastema.torch._placement.offload`.

A CPU ring can run a GPU ring's pipeline (``through_host``: what the tests run, through
:func:`fastema.torch._placement.offload.pipeline`): its chunks are then host tensors, copied into
two host slots in turn, as on a GPU without the streams.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .folds import Record

__all__ = ["DEFAULT_CHUNK", "PIPELINE", "HostGroup", "Ring", "after_side_stream", "check_chunk", "pipeline"]

#: bytes of one staging chunk: on an H100 (2026-11-26, ``bench/scripts/offload.py --gpu``) a step plus an
#: offloaded update of a 1 GiB model came within 1.2x of the device-to-host floor with 256 MiB chunks, 1.8x
#: with 64 MiB and 2x with 16 MiB (docs/guides/large_models.md, "The chunk size")
DEFAULT_CHUNK = 256 << 20
PIPELINE = {"host_slots": False, "in_place": True}   # the CPU rings' (:func:`pipeline`): read where one is built


def check_chunk(chunk) -> None:
    """``Offload(chunk=)`` is a number of bytes >= 16, or the error saying so."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16:
        raise ValueError(f"Offload(chunk=...) must be a number of bytes >= 16 (each of the two staging chunks the "
                         f"offloaded average keeps on the weights' device), got {chunk!r}")


@contextlib.contextmanager
def pipeline(*, host_slots: bool = False, in_place: bool = True) -> Iterator[None]:
    """The pipeline of the CPU rings of the offloaded shadows built in the ``with`` block (each keeps
    it after): ``host_slots``, its chunks copied into two host slots in turn before the worker folds
    them, as a GPU ring's are (the GPU's pipeline run on the CPU: the tests); ``in_place`` (the
    default), all but its last two windows of an update folded from the weights where they are
    (update() waits for them); else every window is staged. Put back after, however the block ends;
    not thread-safe (process-wide, as :func:`fastema._launch.config.tuned`)."""
    if not isinstance(host_slots, bool) or not isinstance(in_place, bool):
        raise TypeError(f"pipeline(host_slots=, in_place=) take True or False, got {host_slots!r}, {in_place!r}")
    saved = dict(PIPELINE)
    PIPELINE.update(host_slots=host_slots, in_place=in_place)
    try:
        yield
    finally:
        PIPELINE.update(saved)


class Ring:
    """One device's staging (see the module). ``uses[c]`` / ``done[c]``: windows staged into / folded
    from slot ``c``; ``last[c]``: the record that last staged into it. ``through_host``: a CPU
    ring's chunks copied into two host slots too, as a GPU's are (pinned memory, device-to-host
    copies); else they are themselves what the worker folds. A GPU ring always is."""

    def __init__(self, device: str, nbytes: int, through_host: bool = False):
        self.device, self.cuda = device, device != "cpu"
        self.through_host = self.cuda or through_host
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

    def swap_exact(self) -> bool:
        return False               # in host memory: a swap copies the average out (exact_swap)

    def piece(self, i: int) -> tuple:
        """``(host group, first element, elements, column)`` of source ``i``'s piece held here."""
        g, first, count, col = self.source.piece(i)
        return self.groups[self.source.groups.index(g)], first, count, col
