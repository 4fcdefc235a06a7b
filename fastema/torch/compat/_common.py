"""What several drop-ins share: the pair lerp (one fastema launch per (device, dtype) group,
torch's own lerp for the pairs the kernels do not take), used by ema-pytorch's and diffusers'."""
from __future__ import annotations

import torch

from ...ops import ema_update_many_

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@torch.no_grad()
def _lerp_pairs(targets: list, sources: list, weight: float) -> None:
    """``targets[i].lerp_(sources[i], weight)`` for every pair: one fastema launch per (device,
    dtype) group for the dtypes the kernels take, torch's own lerp for the rest (complex) and
    for pairs on two devices (``allow_different_devices``)."""
    fast_t, fast_s, slow = [], [], []
    for t, s in zip(targets, sources):
        if t.dtype in _KERNEL_DTYPES and s.dtype in _KERNEL_DTYPES and t.device == s.device:
            fast_t.append(t)
            fast_s.append(s)
        else:
            slow.append((t, s))
    if fast_t:
        ema_update_many_(fast_t, fast_s, weight=weight)
    for t, s in slow:
        t.lerp_(s.to(t.device, t.dtype), weight)
