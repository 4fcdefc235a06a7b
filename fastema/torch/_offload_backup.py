"""The raw weights of an offloaded average while its average is swapped into the model
(:class:`~fastema.torch._offload.OffloadedShadow`): kept in host memory, window by window through
the ring's slot 0, never on the weights' device."""
from __future__ import annotations

from typing import Any

import torch

from .._interrupts import ctrl_c_held

__all__ = ["HostBackup"]


class HostBackup:
    """The raw weights while the average is swapped in: every window's bytes in one host buffer
    per ring (``shadow._spare``), released at the next update (updates are refused while swapped)."""

    def __init__(self, shadow: Any):    # an OffloadedShadow (which imports this module)
        self.shadow = shadow
        self.copy_from_sources()

    def rebind(self, sources) -> None:
        pass                                                      # the shadow follows its sources itself

    def _buffers(self) -> list:
        s = self.shadow
        if s._spare is None:
            total = sum(s.src.nbytes_of(i) for i in range(len(s.src.windows)))
            s._spare = [torch.empty(total, dtype=torch.uint8)]
        return s._spare

    def _spans(self):
        s, at = self.shadow, 0
        for i in range(len(s.src.windows)):
            n = s.src.nbytes_of(i)
            yield i, s._ring_of[s.src.device_of(i)], at, n
            at += n

    def copy_from_sources(self) -> None:
        s = self.shadow
        s.join()
        s.refresh()
        buf = self._buffers()[0]
        for i, ring, at, n in self._spans():
            s._to_slot(i, ring)
            buf[at:at + n].copy_(ring.slots[0][:n])

    def copy_to_sources(self) -> None:
        s = self.shadow
        if s._spare is None:
            raise RuntimeError("the offloaded EMA's backup of the raw weights is gone (an update ran while the "
                               "average was swapped in); the model keeps the average")
        s.check_sources()
        buf = s._spare[0]
        with ctrl_c_held():                       # every window back, or none (the swap holds it too)
            for i, ring, at, n in self._spans():
                ring.slots[0][:n].copy_(buf[at:at + n])
                s._from_slot(i, ring)

