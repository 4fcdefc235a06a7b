"""Drop-in replacements for the EMA classes users already have, on fastema's kernels.

- :class:`ExponentialMovingAverage`: the torch_ema API (``shadow_params``, ``store``/``restore``, ...).
- :class:`ModelEmaV3`: the timm API (``module``, ``update(model, step)``, ``get_decay``, ``set``).
- :func:`get_ema_multi_avg_fn`: for ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=...)``
  (and so for Lightning's weight-averaging callbacks).
- :class:`EMA`, :class:`KarrasEMA`, :class:`PostHocEMA`, :class:`EMAModuleWrapper`, :class:`EMAPytree`
  (also :data:`EMATensor`, and what ``EMA(tree)`` makes): lucidrains ema-pytorch's classes (0.8.3).
- :class:`EMAModel`: diffusers' ``diffusers.training_utils.EMAModel``.

Same arguments and state as the originals; the per-parameter loops become one launch
per (device, dtype) group. One module per upstream library (``torch_ema``, ``timm``,
``swa_utils``, ``ema_pytorch``, ``diffusers``), each naming its deviations; this package
only re-exports them.
"""
from .diffusers import EMAModel
from .ema_pytorch import EMA, EMAModuleWrapper, EMAPytree, EMATensor, KarrasEMA, PostHocEMA
from .swa_utils import get_ema_multi_avg_fn
from .timm import ModelEmaV3
from .torch_ema import ExponentialMovingAverage

__all__ = ["EMA", "EMAModel", "EMAModuleWrapper", "EMAPytree", "EMATensor", "ExponentialMovingAverage", "KarrasEMA",
           "ModelEmaV3", "PostHocEMA", "get_ema_multi_avg_fn"]
