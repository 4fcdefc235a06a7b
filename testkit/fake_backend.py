"""torch's CPU tensors as on a GPU: :class:`FakeGpuBackend`, an adapter of fastema's boundary
(``fastema._backends``) that fastema takes for torch inside ``fastema._backends.using(...)``, as the
launch path takes the :class:`~.fake_driver.FakeDriver` inside ``fastema._launch.cuda.drivers.using``.
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

It owns every torch tensor, by type as fastema's adapter does (one lookup a call: what the gates
measure through it is fastema's host work, not the fake's). A real CUDA tensor inside the block (a
machine with a GPU) is refused where fastema describes it (a source, a shadow, a control array): the
fake stands for a machine whose GPU is ``cuda:0`` with CPU tensors on it.
"""
from __future__ import annotations

import functools
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

    def device_of(self, t) -> str:
        return self.device if t.is_cpu else super().device_of(t)

    def _on_the_fake(self, t, what: str) -> None:
        if t.is_cuda:
            raise ValueError(f"{what} is on {t.device}, a real GPU, inside testkit's fake GPU (CPU tensors on "
                             f"{self.device}); make it on the CPU, or leave the fake_gpu() block")

    def describe(self, t, what: str):
        self._on_the_fake(t, what)
        return super().describe(t, what)

    def control(self, x, what: str, writable: bool):
        self._on_the_fake(x, what)
        return super().control(x, what, writable)

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
        try:
            return (self.key, *map(_data_ptr(), objs))
        except (TypeError, RuntimeError):     # as the torch adapter's: not a tensor; one with no storage
            return None


@functools.cache
def _data_ptr():
    import torch

    return torch.Tensor.data_ptr
