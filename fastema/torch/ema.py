"""``fastema.torch.EMA``: the exponential moving average of a model's weights (schedules,
several decays in one pass, BEMA, the plan on the device for CUDA graphs, CPU offload)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from .. import schedules
from .._interrupts import ctrl_c_held
from ..average import EMAOptions
from ..average.core import Average, Face
from ..flat import FlatShadow
from . import _compile, _offload, _replicas
from ._average import TorchAverage
from ._checkpoint import FORMAT, CheckpointCore
from ._host_masters import HostMastersShadow, hook_of
from ._model import Selection, TorchModel

__all__ = ["EMA"]

PLACEMENT = ("shard_replicas", "gather_bucket", "offload_chunk")   # where the average lives (this face's own)


class EMA(Face, TorchAverage):
    """Exponential moving average of a PyTorch model's weights.

    ``shadow <- decay * shadow + (1 - decay) * weight`` after every ``update()``, for
    every floating parameter (and buffer, if asked), in one kernel launch per
    (device, dtype) group, on torch's current stream, with no host sync.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped; names are normalised).
        decay: a float, or up to 8 floats for several averages kept in one pass (default 0.9999
            when none of ``sigma_rel``, ``half_life``, ``bema`` is given; give only one of them).
        sigma_rel: EDM2 power-function profiles of these relative widths (a float or up to 8),
            exact for any ``update_every`` or irregular ``update(step=)``
            (:class:`fastema.schedules.PowerFunction`); the first update copies.
        half_life: the decay ``2 ** -(dt / half_life)`` for ``dt`` steps (or samples, when
            ``update(step=)`` counts samples) since the last update (:class:`fastema.schedules.HalfLife`).
        bema: bias-corrected EMA (``True``, or a :class:`fastema.schedules.BEMA`): row 0 is the
            output ``EMA + alpha_t (theta_t - theta_0)``, row 1 the EMA, row 2 ``theta_0`` (the
            weights at the first update); ``swap()``/``copy_to()``/``averaged_state_dict()`` read
            row 0. Not with ``device_step``.
        warmup: ``None`` (constant decay), ``"num_updates"`` (``min(decay, (1+n)/(10+n))``,
            torch_ema/TF) or ``"power"`` (timm/diffusers/ema-pytorch:
            ``clamp(1 - (1 + s/inv_gamma)^-power, min_decay, decay)``, ``s = n - update_after_step - 1``).
        min_decay, inv_gamma, power, update_after_step: parameters of ``warmup="power"``.
        update_every: update on every k-th call of ``update()`` (the first call updates).
        compensate: with ``update_every=k``, use ``decay**k`` so the average spans the same time.
        debias: start the average from zero and divide out the bias (optax ``debias=True``,
            pandas ``ewm(adjust=True)``); the first update then copies the weights.
        shadow_dtype: ``"float32"`` (default: bfloat16/float16 weights keep moving),
            ``"same"`` or ``"bfloat16"``.
        rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).
        seed: stochastic-rounding seed; with the step it gives the same bits on every rank.
        buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default), ``"average"``
            or ``"ignore"``. Integer buffers are always copied.
        exclude: name patterns (fnmatch, normalised names) left out entirely.
        copy: name patterns copied instead of averaged.
        skip_nonfinite: skip an update (on the device, no sync) when a weight is inf/NaN.
        device_step: keep the update count, the schedule's weights, ``update_every``'s skips
            and the stochastic-rounding key in device memory, advanced by a one-thread kernel
            at every call, so ``update()`` captured in a CUDA graph (or ``mode="reduce-overhead"``)
            replays the schedule exactly: N replays equal N eager calls bit for bit. ``None``
            (default): on when the averaged weights are on a GPU. Every call then launches
            (a call that ``update_every`` skips writes nothing on the device). ``ema.updates``
            and ``ema.calls`` count eager calls; ``state_dict()`` reads the device's counts.
        offload: ``"cpu"`` keeps the shadow (every average, in ``shadow_dtype``) in host memory: the
            weights' device keeps no shadow, only two staging chunks of ``offload_chunk`` bytes. Each
            update cuts the weights into chunk-sized windows (several small tensors in one, a large
            tensor over several), packs each into a chunk on the weights' device, in their own dtype,
            copies it to a pinned host slot on a side stream and folds it into the host shadow on a
            worker thread, the next window's pack overlapping that fold. ``update()`` returns once
            the last window is staged (the weights may then change) and does not wait for the last
            folds; every read waits (:meth:`join`). With a DeepSpeed engine whose optimizer keeps
            float32 masters in host memory (ZeRO-Offload), the folds read the masters where they are
            (no chunk, no copy; the optimizer's next step waits for them; ``ema.source`` ends in
            ``-in-host-memory``). A fold that fails is raised at the next update or read and is not
            counted. Not with ``device_step=True`` or ``skip_nonfinite=True``. See the large-models guide.
        offload_chunk: bytes of each of the two staging chunks of ``offload="cpu"`` (default 64 MiB): the
            memory the weights' device keeps for the offloaded average (twice this), and the unit of its
            pipeline (smaller: less memory, more launches).
        trainable_only: average only the parameters with ``requires_grad=True`` at construction
            (LoRA and other adapters: the shadow holds the adapters, not the frozen base model), and
            only the buffers of modules with a trainable parameter of their own (a frozen module's
            BatchNorm statistics are left alone, as its weights are). The set is fixed at
            construction, as ``exclude=``'s is: a parameter unfrozen later is not averaged (its own
            value is exported), one frozen later is still averaged. ``None`` (default): True for a
            PEFT model (``peft.PeftModel``, or a model with adapters in ``peft_config``), saying so
            once with what is averaged; False for any other model. :meth:`export_peft` writes the
            averaged adapter in PEFT's format.
        shard_replicas: split the shadow over the ranks that hold replicas of the model (``True``:
            an FSDP2 HSDP mesh's replicate dimension, a DDP module's process group, else the default
            group; or a ``ProcessGroup``, or a 1-D ``DeviceMesh``): each rank keeps and updates one
            contiguous slice of every flat group
            (1/N of the memory and of the update's work), with no communication per update; the
            slices together equal the unsplit average bit for bit. Reading the average gathers it (a
            collective every rank of the group must join): ``swap()`` / ``average_parameters()``,
            ``copy_to()``, ``averaged_state_dict()``, ``full_state_dict()``, ``save()``;
            ``state_dict()`` holds this rank's pieces only, which ``torch.distributed.checkpoint``
            saves once per element and reloads on any number of ranks, split or not. Construction
            checks once that the ranks hold the same weights. See the large-models guide
            ("Splitting the average across replicas").
        gather_bucket: bytes of one gather of a swap or ``copy_to()`` with ``shard_replicas``, all
            ranks' parts together (the extra memory a read needs: the bucket, plus this rank's slice
            of the raw weights kept during a swap).
    """

    def __init__(self, model: nn.Module, decay: float | Sequence[float] | None = None, *,
                 sigma_rel: float | Sequence[float] | None = None, half_life: float | Sequence[float] | None = None,
                 bema: bool | schedules.BEMA | None = None, warmup: str | None = None,
                 min_decay: float = 0.0, inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0,
                 update_every: int = 1, compensate: bool = False, debias: bool = False,
                 shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0, buffers: str = "copy",
                 exclude: Sequence[str] = (), copy: Sequence[str] = (), skip_nonfinite: bool = False,
                 device_step: bool | None = None, offload: str | None = None, trainable_only: bool | None = None,
                 shard_replicas: Any = False, gather_bucket: int = 64 << 20, offload_chunk: int = 64 << 20):
        opts = EMAOptions(decay, sigma_rel=sigma_rel, half_life=half_life, bema=bema, warmup=warmup,
                          min_decay=min_decay, inv_gamma=inv_gamma, power=power, update_after_step=update_after_step,
                          update_every=update_every, compensate=compensate, debias=debias, shadow_dtype=shadow_dtype,
                          rounding=rounding, seed=seed, skip_nonfinite=skip_nonfinite, device_step=device_step,
                          offload=offload)
        # Built in one direction: the model side, its shadow, the engine over both, then the rest.
        swap = self._new_swap()
        side = TorchModel(model, Selection(buffers, exclude, copy, trainable_only), kind=type(self).__name__,
                          check=functools.partial(swap.refuse, "update()"), on_restart=self._restart_if_fresh)
        rows = opts.shadow_rows                                      # BEMA: output, EMA, theta_0
        if offload:
            _offload.check_chunk(offload_chunk)

        def split(group) -> Any:
            if offload:                                              # each rank offloads its slice
                return _replicas.OffloadedReplicaShadow(side.averaged, rows=rows, dtype=shadow_dtype, group=group,
                                                        bucket=gather_bucket, chunk=offload_chunk)
            return _replicas.ReplicaShadow(side.averaged, rows=rows, dtype=shadow_dtype, group=group,
                                           bucket=gather_bucket)

        shadow: Any = _replicas.split_shadow(                        # one collective: the replicas agree
            model, side, shard_replicas, type(self).__name__, f"{opts!r};{shadow_dtype};{rows}", gather_bucket,
            split, offload=offload)
        if shadow is None and offload and side.masters is not None and \
                all(t.device.type == "cpu" for t in side.averaged.values()):
            shadow = HostMastersShadow(side.averaged, rows=rows, dtype=shadow_dtype, optimizer=hook_of(side.engine))
        elif shadow is None and offload:
            shadow = _offload.OffloadedShadow(side.averaged, rows=rows, dtype=shadow_dtype, chunk=offload_chunk)
        elif shadow is None:
            shadow = FlatShadow(side.averaged, rows=rows, dtype=shadow_dtype)
        side.attach(shadow)
        self._core = core = Average(opts, FORMAT, shadow, adapter=side)   # the plan, the update driver, BEMA
        self.shadow_dtype, self.offload = shadow_dtype, offload
        self._bema = core.plan.schedules[0] if opts.is_bema else None
        super().__init__(side, swap, self._checkpoint_core(core), FORMAT, core.plan.cadence)
        self._on_gpu = any(t.device.type != "cpu" for t in shadow.sources)
        if device_step is None:
            device_step = self._on_gpu and not offload and self._bema is None
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
            _refuse_capture(bool(self.offload))           # a capture the plan on the host cannot replay
        steps = self._steps
        if steps is not None and not steps.new():         # DeepSpeed: a micro-step inside accumulation
            return
        if self.offload:                                  # every window staged, then counted, or none: a
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


def _refuse_capture(offloaded: bool) -> None:
    """Refuse a CUDA graph capture of ``update()`` that the plan on the host cannot replay."""
    if torch.cuda.is_current_stream_capturing():
        if offloaded:
            raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA is offloaded: "
                               "its update runs on a host thread, which a replay would not run. Call update() "
                               "outside the graph, or make the EMA without offload=.")
        raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA keeps its schedule "
                           "on the host (device_step=False): every replay would repeat this call's weights "
                           "and rounding key. Make the EMA with device_step=True (the default on a GPU).")
