"""``fastema.torch.EMA``: the exponential moving average of a model's weights (schedules,
several decays in one pass, BEMA, the plan on the device for CUDA graphs, CPU offload)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from .._interrupts import ctrl_c_held
from ..average import Average, EMAOptions, Face, document
from . import _compile
from ._average import TorchAverage
from ._placement.pick import PLACEMENT_DOCS, Offload, Placement, make_shadow
from ._state.checkpoint import FORMAT, CheckpointCore
from ._tensors.model import SELECTION_DOCS, Selection, TorchModel

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

    def __init__(self, model: nn.Module, decay: Any = None, *, update_every: int = 1, compensate: bool = False,
                 debias: bool = False, shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0,
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = (),
                 skip_nonfinite: bool = False, device_step: bool | None = None, offload: str | Offload | None = None,
                 trainable_only: bool | None = None, shard_replicas: Any = False):
        placement = Placement.of(offload, shard_replicas)
        opts = EMAOptions(decay, update_every=update_every, compensate=compensate, debias=debias,
                          shadow_dtype=shadow_dtype, rounding=rounding, seed=seed, skip_nonfinite=skip_nonfinite,
                          device_step=device_step, offload="cpu" if placement.offload else None)
        # Built in one direction: the model side, its shadow, the engine over both, then the rest.
        swap = self._new_swap()
        side = TorchModel(model, Selection(buffers, exclude, copy, trainable_only), kind=type(self).__name__,
                          check=functools.partial(swap.refuse, "update()"), on_restart=self._restart_if_fresh)
        rows = opts.shadow_rows                                      # BEMA: output, EMA, theta_0
        shadow = make_shadow(side, rows, shadow_dtype, placement, kind=type(self).__name__,
                             settings=f"{opts!r};{shadow_dtype};{rows}")
        side.attach(shadow)
        self._core = core = Average(opts, FORMAT, shadow, adapter=side)   # the plan, the update driver, BEMA
        self.shadow_dtype = shadow_dtype
        self._bema = core.plan.schedules[0] if opts.is_bema else None
        super().__init__(side, swap, self._checkpoint_core(core), FORMAT, core.plan.cadence)
        self._on_gpu = any(t.device.type != "cpu" for t in shadow.sources)
        if device_step is None:
            device_step = self._on_gpu and not shadow.host_plan_only and self._bema is None
        if device_step:
            core.plan_on_device()                    # and every kernel compiled and loaded now
        self._plan_on_device = plan = core.device_plan
        if plan is not None:                         # its arrays are written by every update too
            side.also_written([t for t in plan.tensors() if isinstance(t, torch.Tensor)])

    def _checkpoint_core(self, core: Average) -> CheckpointCore:
        """What the checkpoint keeps besides the tensors: the engine's plan and counters (the device
        plan's counts with the plan on the device; its checks too, M4)."""
        return core

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
        if torch.compiler.is_compiling():                 # one operator in the graph (see _compile)
            _compile.compiled_update(self, step)
            return
        self._eager_update(step)

    def _eager_update(self, step: int | None) -> None:
        if self._on_gpu and self._plan_on_device is None:
            _refuse_capture(self._avg)                    # a capture the plan on the host cannot replay
        steps = self._steps
        if steps is not None and not steps.new():         # DeepSpeed: a micro-step inside accumulation
            return
        if self._avg.holds_interrupts:                    # every window staged, then counted, or none: a
            with ctrl_c_held():                           # Ctrl-C is raised after the update is queued whole
                self._core.update(step)                   # (and recorded as DeepSpeed's step folded)
                if steps is not None:
                    steps.done()
            return
        self._core.update(step)                           # the engine's driver: plan, checks, kernels, carry
        if steps is not None:
            steps.done()

    def _restart(self) -> None:
        self._avg.copy_from_sources()
        self._model.copy_buffers()

    def __repr__(self) -> str:
        source = "" if self.source == "parameters" else f", source={self.source!r}"
        return (f"EMA(decay={self.decay}, updates={self.updates}, averaged={len(self._avg)} tensors, "
                f"copied={len(self._copy) if self._copy else 0}{source}, shadow={self._avg!r})")


def _refuse_capture(shadow) -> None:
    """Refuse a CUDA graph capture of ``update()`` that the plan on the host cannot replay."""
    if torch.cuda.is_current_stream_capturing():
        if shadow.host_plan_only:
            raise RuntimeError(f"EMA.update() is being captured in a CUDA graph, but this EMA is offloaded "
                               f"({shadow.placement}): its update runs on a host thread, which a replay would "
                               f"not run. Call update() outside the graph, or make the EMA without it.")
        raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA keeps its schedule "
                           "on the host (device_step=False): every replay would repeat this call's weights "
                           "and rounding key. Make the EMA with device_step=True (the default on a GPU).")


EMA.__doc__ = document(EMA.__doc__, SELECTION_DOCS, PLACEMENT_DOCS)
