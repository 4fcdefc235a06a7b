"""PyTorch model EMA over fastema's flat kernels.

``fastema.torch.EMA(model, decay)`` keeps averaged copies of a model's weights in
flat buffers (one per device and dtype) and updates all of them with one kernel
launch per buffer, with no host sync. Drop-in classes for torch_ema, timm and
``torch.optim.swa_utils`` live in :mod:`fastema.torch.compat`.

One concern per module: ``_hooks`` (registration hooks, names and patterns), ``_slots`` (``Slots``:
where tracked tensors sit and the per-step check; storage keys, the writes besides the kernels),
``_model`` (``TorchModel``: selection, following the model, the engine's adapter), ``_pairs``
(``TorchPairs``: a target network's), ``_checkpoint`` (``TorchCheckpoint``: state dicts,
checkpoints, ``save``), ``_average`` (``TorchAverage``, which holds a ``TorchModel`` and a
``TorchCheckpoint``: swap, ``copy_to``), ``ema`` / ``window`` / ``posthoc`` / ``target`` (the
public classes), ``_compile``, ``_offload`` and ``_sharded``.
"""
from ._checkpoint import FORMAT, VERSION  # noqa: F401
from ._hooks import HOOKS as _HOOKS  # noqa: F401
from ._hooks import normalize_name, registration_hooks, unwrap
from .ema import EMA
from .posthoc import PostHocEMA
from .target import TargetNetwork
from .window import WindowAverage

__all__ = ["EMA", "PostHocEMA", "TargetNetwork", "WindowAverage", "normalize_name", "registration_hooks",
           "unwrap"]

# Kept importable from fastema.torch (not public): FORMAT and VERSION, the EMA checkpoint's schema;
# _HOOKS, the installed registration hooks (tests).
