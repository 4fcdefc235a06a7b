"""torch's CPU tensors as on a GPU: :class:`FakeGpuBackend`, an adapter of fastema's boundary
(``fastema._backends``) that fastema takes for torch inside ``fastema._backends.using(...)``, as the
launch path takes the :class:`~.fake_driver.FakeDriver` inside ``fastema._launch.drivers.using``.
:func:`.fake_gpu.fake_gpu` gives both.

It is fastema's own torch adapter (``fastema._backends.torch.Torch``: every check and refusal of a
real tensor) with one answer changed: a CPU tensor is on :attr:`~FakeGpuBackend.device`
(``cuda:0``), so fastema takes the road a GPU takes (the device plan of a default ``EMA``, the
CUDA launches, the capture refusals). What follows from that answer:

- a kernel's view of a tensor is a :class:`~.fake_driver.FakeDeviceArray` over the tensor's own
  memory (bfloat16 as its bits), so launches record addresses and run nothing;
- fastema's own arrays for that device (flags, a device plan's arrays) are made on the CPU;
- torch's current stream there is the raw handle :data:`TORCH_STREAM`, and whether it is being
  captured into a CUDA graph is what the driver says (``FakeDriver.capture``): a fake capture;
- its address keys (``fastema._backends.address_key``: what the pair and array-function caches find
  tensors by) carry a number of this adapter's own, so nothing fastema kept for the same CPU
  tensors on another adapter (the CPU, an earlier fake GPU and its driver) is found for them here,
  nor what was kept here after the block.

A real CUDA tensor (on a machine with a GPU) is still the real one's: asked about a device other
than its own, it answers as fastema's torch adapter does.
"""
from __future__ import annotations

import itertools

import numpy as np

from fastema._backends.torch import Torch

from .fake_driver import FakeDeviceArray

TORCH_STREAM = 77
"""The raw handle of torch's current stream on the fake ``cuda:0``."""

_MADE = itertools.count(1)


class FakeGpuBackend(Torch):
    """See the module docstring. ``driver``: the launch driver the tensors' views and the capture
    query are the fake's of (``fake_driver.FakeDriver``, or any driver with ``capturing(raw)``; None:
    never capturing); ``view(address, numel, dtype, owner)``: the kernels' view of a tensor's memory
    (default: a :class:`FakeDeviceArray` of ``driver``'s); ``device``: the GPU CPU tensors are on."""

    def __init__(self, driver=None, view=None, device: str = "cuda:0", stream: int = TORCH_STREAM):
        super().__init__()
        self.driver, self.device, self.raw_stream = driver, device, stream
        self._view = view
        self.key = -next(_MADE)                  # negative, as no address is: no other adapter's key equals one
        self._stream = lambda: stream

    def __repr__(self) -> str:
        return f"<fake GPU backend: torch's CPU tensors on {self.device}, stream {self.raw_stream}>"

    def owns(self, x) -> bool:
        return super().owns(x) and x.is_cpu     # a real CUDA tensor stays the real adapter's

    def device_of(self, t) -> str:
        return self.device if t.is_cpu else super().device_of(t)

    def torch_device(self, device: str) -> str:
        return "cpu" if device == self.device else device

    def raw_view(self, address: int, numel: int, dtype: np.dtype, owner):
        if self._view is not None:
            return self._view(address, numel, dtype, owner)
        return FakeDeviceArray(numel, dtype, ptr=address, driver=self.driver)

    def capturing(self, device: str) -> bool:
        if device != self.device:
            return super().capturing(device)
        return self.driver is not None and bool(self.driver.capturing(self.raw_stream))

    def stream_getter(self, device: str):
        return self._stream if device == self.device else super().stream_getter(device)

    def address_key(self, objs: list) -> tuple | None:
        key = super().address_key(objs)
        return None if key is None else (self.key, *key)
