"""What ema-pytorch's classes share here: its per-tensor helpers (``inplace_copy`` /
``inplace_lerp``), the ``initted`` / ``step`` buffers with their host mirror, and the warm-up
of ``EMA`` and ``EMAPytree``."""
from __future__ import annotations

import functools
import typing

import torch
from torch import nn


def _inplace_copy(tgt: torch.Tensor, src: torch.Tensor, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_copy`` attribute): ``tgt.copy_(src)``, ``src``
    moved to ``tgt``'s device and cast to its dtype first when asked. The classes here do not
    use it: their copies and averages are batched."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    tgt.copy_(src)


def _inplace_lerp(tgt: torch.Tensor, src: torch.Tensor, weight, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_lerp`` attribute): ``tgt.lerp_(src, weight)``,
    ``src`` moved / cast first when asked. The classes here average with fastema's kernels."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    tgt.lerp_(src, weight)


def _helpers(ema, allow_different_devices: bool, coerce_dtype: bool) -> None:
    ema.inplace_copy = functools.partial(_inplace_copy, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)
    ema.inplace_lerp = functools.partial(_inplace_lerp, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)


class _Counters(nn.Module):
    """ema-pytorch's ``initted`` / ``step`` buffers with a host mirror: the counters are read from
    the device once, and again only after something else wrote or replaced the buffers (no
    ``.item()`` per update, where ema-pytorch reads both at every call)."""

    def _init_counters(self) -> None:
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self._host: list | None = None           # [step, initted] as Python values: no .item() per update
        self._seen: tuple | None = None          # the buffers (and version counters) _host was read from

    def _buffer(self, name: str) -> torch.Tensor:
        return typing.cast(torch.Tensor, self._buffers[name])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None                        # step / initted changed: read them again once

    def _buffers_now(self) -> tuple | None:
        """Which ``step`` / ``initted`` tensors the module holds and their version counters: host
        integers that every in-place write bumps (``ema.step.zero_()``, ``initted.fill_(False)``,
        a load), so a change is seen without reading the device."""
        step, initted = self._buffer("step"), self._buffer("initted")
        try:
            return step, initted, step._version, initted._version
        except RuntimeError:                     # inference tensors keep no version: read every time
            return None

    def _counters(self) -> list:
        """``[step, initted]`` as Python values, read from the buffers once and again only after
        something else wrote them or replaced them (no ``.item()`` per update)."""
        seen = self._buffers_now()
        if self._host is None or seen is None or self._seen is None or seen[2:] != self._seen[2:] or \
                seen[0] is not self._seen[0] or seen[1] is not self._seen[1]:
            self._host = [int(self._buffer("step")), bool(self._buffer("initted"))]
            self._seen = seen
        return self._host

    def _wrote(self) -> None:
        """After this module's own write to a buffer: its new version is already in ``_host``."""
        if self._seen is not None:
            self._seen = self._buffers_now()

    def _advance(self) -> int:
        """``step += 1`` (device buffer and host mirror); returns the step before."""
        host = self._counters()
        before = host[0]
        host[0] += 1
        self._buffer("step").add_(1)
        self._wrote()
        return before

    def _mark_initted(self) -> None:
        self._counters()[1] = True
        self._buffer("initted").fill_(True)
        self._wrote()


def _warmup_decay(ema) -> float:
    """ema-pytorch's warm-up at ``ema``'s current step: 0 until ``update_after_step``, then
    ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
    epoch = max(ema._counters()[0] - ema.update_after_step - 1, 0)
    if epoch <= 0:
        return 0.0
    # in float32 on host scalars, as ema-pytorch computes it on its step buffer: the same decay
    value = 1 - (1 + torch.tensor(float(epoch)) / ema.inv_gamma) ** -ema.power
    return float(value.clamp(min=ema.min_value, max=ema.beta).numpy())     # a CPU scalar of ours

