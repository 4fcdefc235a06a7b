"""fastema: moving averages of model weights and metrics with compiled kernels.

Numba CPU and CUDA kernels update flat shadow buffers in place: many tensors in
one launch, several decays in one pass, bfloat16 with stochastic rounding, an
exact in-place swap for evaluation, and an on-device non-finite guard.

Array level (NumPy arrays, torch tensors, CuPy arrays, and any DLPack producer as a
source: JAX arrays, TensorFlow tensors)::

    fastema.ema_update_(shadow, src, decay=0.999)

Many tensors::

    shadow = fastema.FlatShadow(list(model.parameters()))
    shadow.update(decay=0.999)      # after optimizer.step(): one launch per (device, dtype)

Framework models: ``fastema.torch.EMA``, ``fastema.jax.EMA``, ``fastema.tensorflow.EMA``,
``fastema.keras.WeightEMA`` (imported on demand; each needs its framework).
Post-hoc EMA: ``fastema.torch.PostHocEMA`` tracks and snapshots profiles,
``fastema.posthoc.synthesize(DIR, sigma_rel)`` synthesises any other after training.
"""
from . import ops, posthoc, schedules
from .flat import FlatShadow
from .flat_window import WindowShadow
from .ops import MAX_DECAYS, copy_, ema_update_, ema_update_many_, ema_update_multi_, flag_nonfinite_, swap_
from .smooth import Smoother
from .track import Tracker

__all__ = ["FlatShadow", "MAX_DECAYS", "Smoother", "WindowShadow", "clear_caches", "copy_", "ema_update_",
           "ema_update_many_", "ema_update_multi_", "flag_nonfinite_", "posthoc", "schedules", "swap_", "Tracker"]


def clear_caches() -> None:
    """Drop fastema's module-level caches: the segment tables of recent array-level calls
    (``ema_update_many_`` layouts, single-pair tables) and, once CUDA was used, the stream
    objects kept per device. They hold numbers and small fastema-owned device arrays, never a
    tensor or a storage of yours; compiled kernels stay compiled. Shadows (``FlatShadow``, the
    model averages) own their buffers and are not affected. On a GPU, what a captured CUDA graph
    reads is kept (the tables of captured array-level calls, the per-device zero flags), and a
    call during a capture is refused (RuntimeError)."""
    import sys

    from . import _launch, ops, pairs

    _launch.refuse_during_capture("fastema.clear_caches()", _launch.CLEARING)
    pairs.clear()
    ops.clear()
    cuda = sys.modules.get(f"{__name__}._launch.cuda.tables")
    if cuda is not None:
        cuda.clear_caches()


__version__ = "0.2.0"


def _torch_operators() -> None:
    """Register fastema.torch's operators, which route the array functions into ``torch.compile``'s
    graphs (:data:`fastema.ops.COMPILED`): called by the first array function that finds torch
    loaded, in eager code or by Dynamo as it traces (``import fastema`` imports no framework)."""
    from . import torch  # noqa: F401  (its operators install ops.COMPILED)


ops.LOADERS["torch"] = _torch_operators
