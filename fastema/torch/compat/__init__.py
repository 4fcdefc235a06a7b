"""Drop-in replacements for the EMA classes users already have, on fastema's kernels.

- :class:`ExponentialMovingAverage`: the torch_ema API (``shadow_params``, ``store``/``restore``, ...).
- :class:`ModelEmaV3`: the timm API (``module``, ``update(model, step)``, ``get_decay``, ``set``).
- :func:`get_ema_multi_avg_fn`: for ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=...)``
  (and so for Lightning's weight-averaging callbacks).
- :class:`EMA`, :class:`KarrasEMA`, :class:`PostHocEMA`, :class:`EMAModuleWrapper`, :class:`EMAPytree`
  (also :data:`EMATensor`, and what ``EMA(tree)`` makes): lucidrains ema-pytorch's classes (0.8.3).
- :class:`EMAModel`: diffusers' ``diffusers.training_utils.EMAModel``.
- :func:`polyak_update`: Stable-Baselines3's ``polyak_update`` (target networks).
- :class:`SoftUpdate`, :class:`HardUpdate`: TorchRL's target-network updaters (subclasses of
  TorchRL's: TorchRL is imported when one of them is first used).

Same arguments and state as the originals; the per-parameter loops become one launch
per (device, dtype) group. One module per upstream library (``torch_ema``, ``timm``,
``swa_utils``, ``ema_pytorch``, ``diffusers``, ``sb3``, ``torchrl``), each naming its deviations; this package
only re-exports them.
"""
from importlib.util import find_spec
from typing import Any

from .diffusers import EMAModel
from .ema_pytorch import EMA, EMAModuleWrapper, EMAPytree, EMATensor, KarrasEMA, PostHocEMA
from .sb3 import polyak_update
from .swa_utils import get_ema_multi_avg_fn
from .timm import ModelEmaV3
from .torch_ema import ExponentialMovingAverage

__all__ = ["EMA", "EMAModel", "EMAModuleWrapper", "EMAPytree", "EMATensor", "ExponentialMovingAverage", "KarrasEMA",
           "ModelEmaV3", "PostHocEMA", "get_ema_multi_avg_fn", "polyak_update"]
if find_spec("torchrl") is not None:        # found, not imported: `import *` works with or without TorchRL
    __all__ += ["HardUpdate", "SoftUpdate"]


def __getattr__(name: str) -> Any:
    # TorchRL's updaters subclass TorchRL's classes: import torchrl on first use, not with this package.
    if name in ("SoftUpdate", "HardUpdate"):
        from . import torchrl as _torchrl
        return getattr(_torchrl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))      # the lazy names too (autodoc lists dir())
