"""``torch.optim.swa_utils.get_ema_multi_avg_fn`` on fastema's kernels, for
``AveragedModel(model, multi_avg_fn=...)`` (and so Lightning's weight-averaging callbacks).

Deviations: none in the arithmetic of the float32 / bfloat16 / float16 groups; float64, complex
and integer groups keep torch's own arithmetic, and so do the pairs the kernels do not take (a
weight laid out unlike its copy, meta tensors: ``_common.lerp_pairs``).
"""
from __future__ import annotations

import torch

from ._common import kernel_weight, lerp_pairs

__all__ = ["get_ema_multi_avg_fn"]


def get_ema_multi_avg_fn(decay: float = 0.999):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: the EMA of
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` in one fastema launch per group."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged):
        # AveragedModel groups by (device, dtype); fastema takes the float32/bfloat16/float16
        # groups, anything else (float64, integer buffers) gets torch's own arithmetic.
        if ema_param_list[0].dtype in (torch.float32, torch.bfloat16, torch.float16):
            # torch's own lerp for the pairs the kernels do not take (a weight laid out unlike its
            # copy, channels_last after the copy was made; meta tensors), as the other drop-ins
            lerp_pairs(ema_param_list, current_param_list, kernel_weight(1 - decay),
                       names=("ema_param_list", "current_param_list"))
        elif torch.is_floating_point(ema_param_list[0]) or torch.is_complex(ema_param_list[0]):
            torch._foreach_lerp_(ema_param_list, current_param_list, 1 - decay)
        else:
            for p_ema, p_model in zip(ema_param_list, current_param_list):
                p_ema.copy_(p_ema * decay + p_model * (1 - decay))

    return ema_update
