"""``fastema.torch.EMA``: the exponential moving average of a model's weights (schedules,
several decays in one pass, BEMA, the plan on the device for CUDA graphs, CPU offload)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from torch import nn
from torch.compiler import is_compiling

from .. import _backends
from .._interrupts import ctrl_c_held
from .._shadow import AveragingShadow
from ..average import Average, EMAOptions, Face, document
from ._face.average import TorchAverage
from ._face.compiled import compiled_update
from ._face.contract import ModelParts, model_parts, with_lowered
from ._placement.pick import PLACEMENT_DOCS, Offload, Placement, make_shadow
from ._state.checkpoint import FORMAT, CheckpointCore
from ._tensors.model import TorchModel
from ._tensors.selection import SELECTION_DOCS, Selection

__all__ = ["EMA"]

PLACEMENT = ("shard_replicas",)   # where the average lives (this face's own; offload= is an EMA option too)


class EMA(Face, TorchAverage):
    """Exponential moving average of a PyTorch model's weights.

    ``shadow <- decay * shadow + (1 - decay) * weight`` after every ``update()``, for
    every floating parameter (and buffer, if asked), in one kernel launch per
    (device, dtype) group, on torch's current stream, with no host sync.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped; names are normalised).
        {decay}
        {update_every}
        {compensate}
        {debias}
        {shadow_dtype}
        {rounding}
        {seed}
        {buffers}
        {exclude}
        {copy}
        {skip_nonfinite}
        {device_step}
        {offload}
        {trainable_only}
        {shard_replicas}
    """

    _core: Average                      # the engine: mypy follows update() into it
    _avg: AveragingShadow

    def __init__(self, model: nn.Module, decay: Any = None, *, update_every: int = 1, compensate: bool = False,
                 debias: bool = False, shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0,
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = (),
                 skip_nonfinite: bool = False, device_step: bool | None = None, offload: str | Offload | None = None,
                 trainable_only: bool | None = None, shard_replicas: Any = False):
        self._from_parts(ema_parts(
            model, decay, kind=type(self).__name__, update_every=update_every,
            compensate=compensate, debias=debias, shadow_dtype=shadow_dtype, rounding=rounding,
            seed=seed, buffers=buffers, exclude=exclude, copy=copy, skip_nonfinite=skip_nonfinite,
            device_step=device_step, offload=offload, trainable_only=trainable_only,
            shard_replicas=shard_replicas, lowered=_updates_as_ema(type(self))))

    def _from_parts(self, parts: ModelParts) -> None:
        """The EMA's own fields, read off its parts, then the face (see :class:`TorchFace`)."""
        core = parts.engine
        assert core is not None                      # an EMA's builder makes one
        self.shadow_dtype = core.shadow_dtype
        self._bema = core.plan.schedules[0] if core.options.is_bema else None
        self._gpu = _gpu_of(parts.shadow.sources)    # the sources' GPU (None: the CPU's), for capture queries
        self._holds = parts.shadow.holds_interrupts   # the shadow's, read once (the per-step path)
        TorchAverage.__init__(self, parts)

    @property
    def device_step(self) -> bool:
        """True when the plan lives on the device (see the ``device_step`` argument)."""
        return self._plan_on_device is not None

    def update(self, step: int | None = None) -> None:
        """Update the averages from the model's current weights (call after ``optimizer.step()``).

        Args:
            step: the training step for the schedule; defaults to the number of updates made
                (timed schedules, ``sigma_rel``/``half_life``/``bema``: the number of calls,
                this one included; pass samples seen to define them in samples). Timed
                schedules refuse a step before the last update's.
        """
        if self._attachment is not None:                  # attach(optimizer): its steps update
            self._attachment.refuse("update()")
        if is_compiling():                 # the plain case in the graph, else one operator (_face.compiled)
            compiled_update(self.compiled, step)         # (module names: each dotted read is a guard)
            return
        self._eager_update(step)

    def _eager_update(self, step: int | None, skip_if: dict | None = None) -> None:
        """The update (the compiled contract's ``eager_update``); ``skip_if``: device-side flags
        (``device -> int32[1]``; non-zero: nothing written there, the call counted), an attached
        step run with GradScaler's ``found_inf`` (:meth:`_skipping_update`). One frame, the
        per-step path."""
        if self._gpu is not None and self._plan_on_device is None:
            _refuse_capture(self._avg, self._gpu)         # a capture the host plan cannot replay
        steps = self._steps
        if steps is not None and not steps.new():         # DeepSpeed: a micro-step inside accumulation
            return
        if self._holds:                          # holds_interrupts: every window staged, then
            with ctrl_c_held():                  # counted, or none (a Ctrl-C waits for the end)
                self._core.update(step)                   # (and recorded as DeepSpeed's step folded)
                if steps is not None:
                    steps.done()
            return
        if skip_if is None:
            self._core.update(step)                       # the engine's driver: plan, checks, kernels, carry
        else:
            self._core.update(step, None, skip_if)
        if steps is not None:
            steps.done()

    def _skipping_update(self, skip_if: dict) -> None:
        """An update behind device-side flags: an attached step run with GradScaler's ``found_inf``."""
        self._eager_update(None, skip_if)

    def __repr__(self) -> str:
        source = "" if self.source == "parameters" else f", source={self.source!r}"
        return (f"EMA(decay={self.decay}, updates={self.updates}, averaged={len(self._avg)} tensors, "
                f"copied={len(self._copy) if self._copy else 0}{source}, shadow={self._avg!r})")


def ema_parts(model: nn.Module, decay: Any = None, *, kind: str,
              run: Callable[[Average], CheckpointCore] | None = None, update_every: int = 1,
              compensate: bool = False, debias: bool = False, shadow_dtype: str = "float32",
              rounding: str = "nearest", seed: int = 0, buffers: str = "copy",
              exclude: Sequence[str] = (), copy: Sequence[str] = (), skip_nonfinite: bool = False,
              device_step: bool | None = None, offload: str | Offload | None = None,
              trainable_only: bool | None = None, shard_replicas: Any = False,
              lowered: bool = False) -> ModelParts:
    """The builder of an :class:`EMA` (and a :class:`~fastema.torch.PostHocEMA`): its arguments
    checked, then its parts in one direction: the model side, its shadow (the picker), the engine
    over both, and the rest (:func:`~fastema.torch._face.contract.model_parts`). ``kind`` names the face;
    ``run(engine)``: what the checkpoint keeps besides the tensors (default: the engine's plan and
    counters; a post-hoc run adds its id); ``lowered``: the plain case's update may be written in a
    compiled graph (:class:`EMA`'s own update, :func:`_updates_as_ema`)."""
    placement = Placement.of(offload, shard_replicas)
    opts = EMAOptions(decay, update_every=update_every, compensate=compensate, debias=debias,
                      shadow_dtype=shadow_dtype, rounding=rounding, seed=seed,
                      skip_nonfinite=skip_nonfinite, device_step=device_step,
                      offload="cpu" if placement.offload else None)
    side = TorchModel(model, Selection(buffers, exclude, copy, trainable_only), kind=kind)
    rows = opts.shadow_rows                                      # BEMA: output, EMA, theta_0
    shadow = make_shadow(side, rows, shadow_dtype, placement, kind=kind,
                         settings=f"{opts!r};{shadow_dtype};{rows}")
    engine = Average(opts, FORMAT, shadow, adapter=side)         # the plan, the update driver, BEMA
    if device_step is None:                              # a GPU's, unless it folds on the host
        on_gpu = _gpu_of(shadow.sources) is not None
        device_step = on_gpu and not shadow.host_plan_only and not opts.is_bema
    core = engine if run is None else run(engine)
    parts = model_parts(side, shadow, engine, core, FORMAT, engine.plan.cadence,
                        functools.partial(_start_over, side), device_step=device_step)
    return with_lowered(parts) if lowered else parts


def _updates_as_ema(cls: type) -> bool:
    """True where ``cls``'s update is :class:`EMA`'s own (not a subclass's that adds to it, as
    PostHocEMA's snapshots): its plain case may be written in a compiled graph
    (``_face/lowered``)."""
    return next(k for k in cls.__mro__ if "_eager_update" in vars(k)) is EMA


def _start_over(side: TorchModel) -> None:
    """Every average from the model's weights as they are (a restart after a DDP wrap)."""
    side.avg.copy_from_sources()
    side.copy_buffers()


def _gpu_of(sources) -> str | None:
    """The first GPU (fastema's name, "cuda:N") among the devices of ``sources``, or None: where a
    face takes a GPU's road (the device plan by default, the capture refusals). The adapter of the
    tensors answers (``_backends.device_of``: the fake GPU of ``testkit`` says "cuda:0" for CPU
    tensors), so the fake takes the road a GPU takes."""
    for t in sources:
        device = _backends.device_of(t)
        if device != "cpu":
            return device
    return None


def _refuse_capture(shadow, device: str) -> None:
    """Refuse a CUDA graph capture of ``update()`` (torch's current stream on ``device`` captured: its
    adapter's query) that the plan on the host cannot replay."""
    if _backends.capturing("torch", device):
        if shadow.host_plan_only:
            raise RuntimeError(f"EMA.update() is being captured in a CUDA graph, but this EMA "
                               f"is offloaded ({shadow.placement}): its update runs on a host "
                               f"thread, which a replay would not run. Call update() outside the "
                               f"graph, or make the EMA without it.")
        raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA keeps its schedule "
                           "on the host (device_step=False): every replay would repeat this call's weights "
                           "and rounding key. Make the EMA with device_step=True (the default on a GPU).")


EMA.__doc__ = document(EMA.__doc__, SELECTION_DOCS, PLACEMENT_DOCS)
