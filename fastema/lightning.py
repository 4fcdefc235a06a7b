"""PyTorch Lightning callbacks: an EMA of the weights, and smoothed metric logging.

::

    trainer = Trainer(callbacks=[fastema.lightning.WeightEMA(decay=0.999),
                                 fastema.lightning.MovingAverageLogs(metrics=("loss",))])

``WeightEMA`` updates a :class:`fastema.torch.EMA` after every optimizer step, validates and
tests with the averaged weights (swapped in place, and back afterwards), and saves the EMA
in Lightning's checkpoints so that ``trainer.fit(ckpt_path=...)`` resumes it exactly.

A ``.ckpt`` written by Lightning's own ``EMAWeightAveraging`` resumes in ``WeightEMA`` too (the
raw weights into the model, Lightning's average and its counters into the EMA).

``MovingAverageLogs`` logs ``<metric>_ema`` and ``<metric>_sma`` of the training loss (and of
any metric the module returns or logs per step). The averages are kept on the device and
handed to ``self.log`` as tensors: values reach the host when Lightning writes its logs (every
``log_every_n_steps``).

Works with ``lightning`` (``lightning.pytorch``) or the ``pytorch-lightning`` package.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as e:                                # pragma: no cover - depends on the environment
        raise ImportError("fastema.lightning needs PyTorch Lightning (pip install 'fastema[lightning]')") from e

from ._lightning_ckpt import PeerAverage, peer_state, read_peer
from .average import EMAOptions
from .torch import EMA
from .torch.ema import PLACEMENT
from .track import Tracker

__all__ = ["GatherAttached", "MovingAverageLogs", "WeightEMA"]


class WeightEMA(pl.Callback):
    """An EMA of the LightningModule's weights, used for validation and test.

    Args:
        decay: the EMA decay (default 0.9999), or a list of decays (the first is used for
            evaluation); or a schedule
            of :mod:`fastema.schedules` (``decay=`` of :class:`fastema.average.EMAOptions`).
        validate_with_ema: swap the EMA in for validation (and back after it).
        test_with_ema: swap the EMA in for ``trainer.test`` / ``trainer.predict``.
        allow_nonfinite: resume, swap in and evaluate an average holding inf or NaN (False: refused,
            naming its tensors; see :meth:`repair_nonfinite`).
        **ema_kwargs: the rest of :class:`fastema.torch.EMA` (``update_every=``,
            ``shadow_dtype=``, ``exclude=``, ``shard_replicas=True`` under the
            DDP strategy ...).

    The EMA is made when fitting (or testing) starts, after Lightning has moved the model
    to its device; it updates once per optimizer step (gradient accumulation respected).
    Checkpoints hold the raw weights as the model's ``state_dict`` and the EMA under this
    callback's state, even when saved while the EMA is swapped in (a copy of the raw weights, then
    the EMA goes back in for the rest of the validation). :attr:`ema` is the
    :class:`fastema.torch.EMA` (``callback.ema.save(path)`` writes the averaged weights).

    ``trainer.fit(ckpt_path=...)`` also resumes a checkpoint of Lightning's ``WeightAveraging``
    callbacks (``EMAWeightAveraging``...), whose ``state_dict`` is the average: the raw weights
    (``current_model_state``) go into the model, the average into every row of this EMA, and its
    counters carry over (``n_averaged`` updates, ``global_step`` calls, the last update's step), so
    this EMA's schedule continues Lightning's average. A checkpoint holding an average this
    callback cannot read (half of that layout, an average saved without the raw weights, an
    unknown callback's copy of the weights) is refused by name before any step.

    An average that inf or NaN reached (a run with ``skip_nonfinite`` off, an older checkpoint) is
    named in a warning at every save, and refused by the validation and test swaps and by a
    resume, naming its tensors: ``WeightEMA(allow_nonfinite=True)`` resumes it, then
    :meth:`repair_nonfinite` resets those tensors from the live weights.
    """

    def __init__(self, decay=None, *, validate_with_ema: bool = True, test_with_ema: bool = True,
                 allow_nonfinite: bool = False, **ema_kwargs):
        super().__init__()
        if not isinstance(allow_nonfinite, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        self.allow_nonfinite = allow_nonfinite
        placement = {k: v for k, v in ema_kwargs.items() if k in PLACEMENT}   # the torch face's own
        EMAOptions.of(decay, **EMAOptions.split({k: v for k, v in ema_kwargs.items() if k not in placement})[0])
        self.decay, self.validate_with_ema, self.test_with_ema = decay, validate_with_ema, test_with_ema
        self.ema_kwargs = ema_kwargs
        self.ema: EMA = None  # type: ignore[assignment]   # made when fitting (or testing) starts
        self._pending: dict | None = None
        self._peer: PeerAverage | None = None          # Lightning's WeightAveraging checkpoint, read when made
        self._step_seen: int | None = None
        self._stage: str | None = None                 # what the trainer runs (setup's stage)
        self._saving_out = False                       # state_dict() swapped the EMA out for a save

    def _ensure(self, pl_module) -> None:
        if self.ema is None:
            self.ema = EMA(pl_module, self.decay, **self.ema_kwargs)
            self.ema.allow_nonfinite = self.allow_nonfinite      # its resume below, its swaps
        elif self.ema.model is not pl_module:
            raise RuntimeError("this WeightEMA follows another LightningModule; make one callback per model")
        if self._pending is not None:
            self._load(self._pending)                  # (kept where refused: a fit again refuses again)
            self._pending = None
        if self._peer is not None:
            peer, self._peer = self._peer, None
            self._load_peer(peer)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage                               # (before Lightning restores a checkpoint)

    def _load(self, state: dict) -> None:
        """A checkpoint of this callback's into its EMA; to fit, refused where it was made with other
        options (the EMA's load would take its decays and cadence in place of the callback's; an
        evaluation of the saved average uses none of them)."""
        if self._stage in (None, "fit"):
            self.ema.plan.refuse_other_options(state, "WeightEMA")
        self.ema.load_state_dict(state)

    def _load_peer(self, peer: PeerAverage) -> None:
        # the EMA's own state (its settings and schedules) with Lightning's average and counters in it,
        # then the EMA's checked load: every check first, nothing written if one fails
        template = self.ema.gathered_state_dict() if self.ema.split else self.ema.state_dict()
        self.ema.load_state_dict(peer_state(peer, template))

    def repair_nonfinite(self) -> list[str]:
        """Reset the averaged tensors holding inf or NaN from the model's weights, and return their
        names (:meth:`fastema.torch.EMA.repair_nonfinite`); e.g. from ``on_train_start`` after a
        resume with ``allow_nonfinite=True``."""
        if self.ema is None:
            raise RuntimeError("WeightEMA has no EMA yet: it is made when fitting (or testing) "
                               "starts")
        return self.ema.repair_nonfinite()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._ensure(pl_module)
        self._step_seen = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed fit restores global_step after on_fit_start: count optimizer steps from here, or the
        # first batch of a resumed run under gradient accumulation is taken for an optimizer step
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step_seen:          # an optimizer step happened
            self._step_seen = trainer.global_step
            self.ema.update()

    def _swap_in(self, pl_module, wanted: bool) -> None:
        if not wanted:
            return
        self._ensure(pl_module)
        if not self.ema.swapped:
            self.ema.swap()

    def _swap_out(self) -> None:
        self._saving_out = False
        if self.ema is not None and self.ema.swapped:
            self.ema.swap()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module, self.validate_with_ema)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_out()

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module, self.test_with_ema)

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module, self.test_with_ema)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._swap_out()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.ema is not None and self.ema.swapped and self.ema.split:
            # split over replicas: the swap back is a collective that the other ranks, elsewhere, never join
            warnings.warn("WeightEMA: training stopped with the EMA weights swapped into the model, and this "
                          "average is split over replicas (shard_replicas), whose swap back is a collective the "
                          "other ranks are not in: the model holds the EMA weights, not the raw ones. Resume from "
                          "a checkpoint, or call callback.ema.swap() on every rank together.", stacklevel=2)
            return
        self._swap_out()                                     # never leave the user with the EMA in place

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending) if self._pending is not None else {}
        # A checkpoint written while the EMA is swapped in (trainer.save_checkpoint() from a validation
        # or test step) must hold the raw weights as the model and the average here: put them back
        # first (the model's state_dict, read before this, holds references to the live tensors);
        # on_save_checkpoint keeps copies of them and swaps the EMA back in for the rest of the loop
        swapped = self.ema.swapped
        self._swap_out()
        self._saving_out = swapped
        # Lightning calls this on every rank and rank 0 writes the checkpoint whole (torch.save): a split
        # average (shard_replicas) gathers its slices into full tensors here, which loads on any world size
        return self.ema.gathered_state_dict() if self.ema.split else self.ema.state_dict()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """After :meth:`state_dict` swapped the EMA out for a save (Lightning calls both on every rank,
        and writes the file after this returns): the checkpoint keeps copies of the raw weights, and
        the EMA goes back in, so the rest of the validation (test, predict) runs on it. A save with
        the raw weights in place copies nothing."""
        if not self._saving_out:
            return
        self._saving_out = False
        if self.ema is None or self.ema.swapped:
            return
        model = checkpoint.get("state_dict")
        if isinstance(model, dict):                     # (in place: the dict keeps its _metadata)
            for k, v in list(model.items()):
                if isinstance(v, torch.Tensor):
                    model[k] = v.detach().clone()
        self.ema.swap()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict                       # applied when the EMA is made
        else:
            self._load(state_dict)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of Lightning's ``WeightAveraging`` (``EMAWeightAveraging``...): its raw weights
        (``current_model_state``) into the model, where Lightning has loaded its average
        (``state_dict``), and the average and its counters into this EMA. Runs before
        :meth:`load_state_dict`, whose own state (a checkpoint ``WeightEMA`` wrote) wins. A checkpoint
        holding an average this callback cannot read is refused, naming what it holds."""
        present = {cb.state_key for cb in trainer.callbacks}
        names = [n for n, _ in pl_module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in pl_module.named_buffers(remove_duplicate=False)]   # no state_dict(): no gather
        peer = read_peer(checkpoint, self.state_key, present, names)
        raw = checkpoint.get("current_model_state")
        if isinstance(raw, dict):                            # Lightning loaded the average into the model
            pl_module.load_state_dict(raw, strict=getattr(pl_module, "strict_loading", True))
        if peer is None:
            return
        if self.ema is None:
            self._peer = peer                                # read when the EMA is made (on_fit_start)
        else:
            self._load_peer(peer)


class MovingAverageLogs(pl.Callback):
    """Log the EMA and SMA of training metrics per step, on the device.

    Args:
        ema: EMA decay per step (``0.9``), a dict of :class:`fastema.Smoother` parameters
            (``{"span": 50}``), or None.
        sma: SMA window in steps, or None.
        metrics: what to smooth: ``"loss"`` is the loss ``training_step`` returns (Lightning's
            outputs hold it divided by ``accumulate_grad_batches``: multiplied back, exact for
            a power of two, else to one rounding); other names are values it returns in its
            output dict or logs (``self.log(name, value)``).
        prog_bar: also show the averages in the progress bar (the bar reads them to the
            host at each refresh).

    Logged as ``<metric>_ema`` and ``<metric>_sma`` on every training batch (Lightning
    writes them every ``log_every_n_steps``). The averages continue across epochs and are
    saved in checkpoints. A batch ``training_step`` skipped (it returned None) leaves them as
    they are. A logged metric counts at the steps it was logged: a value logged every k steps
    is not taken again in between (it weighs 0 there, so its SMA is that of the values logged in
    the last ``sma`` steps, NaN where there were none); a name validation logs too is read as
    the last one logged; a name neither returned nor logged in a whole epoch is refused at its
    end. No host sync of its own for the loss and the output dict's values; a logged value is
    read through ``trainer.callback_metrics``, for which Lightning converts every
    ``prog_bar=True`` metric to a host number (a sync, as its progress bar makes at each
    refresh): return such a metric in the output dict instead.
    """

    def __init__(self, ema=0.9, sma: int | None = 50, metrics: Sequence[str] = ("loss",), prog_bar: bool = False):
        super().__init__()
        self.metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        self.tracker = Tracker(self.metrics, ema=ema, sma=sma)
        self.prog_bar = prog_bar
        self._pending: dict | None = None
        self._logged: dict[str, torch.Tensor] = {}     # each logged metric's last value (held: its address)
        self._weights: dict[tuple, torch.Tensor] = {}  # (device, which are new) -> the sample weights
        self._returned: set[str] = set()                # the metrics training_step has returned

    def _value(self, trainer, pl_module, outputs, name):
        """``name``'s value of this step, or None where none came (a skipped batch, a metric logged
        at an earlier step: Lightning keeps it, and a value logged anew is a new tensor)."""
        if isinstance(outputs, torch.Tensor) and name == "loss":
            self._returned.add(name)
            return outputs
        if isinstance(outputs, dict) and name in outputs:
            self._returned.add(name)
            value, k = outputs[name], trainer.accumulate_grad_batches
            if name == "loss" and value is not None and pl_module.automatic_optimization and k != 1:
                value = value * k                            # (Lightning's closure divided it by k)
            return value
        if name == "loss" and not outputs and pl_module.automatic_optimization:
            return None                                      # training_step returned None: skipped
        logged = trainer.callback_metrics
        for key in (f"{name}_step", name):                   # (on_epoch too: name is the epoch's mean)
            if key in logged:
                value, before = logged[key], self._logged.get(name)
                self._logged[name] = value
                return None if before is not None and value.data_ptr() == before.data_ptr() else value
        return None                                          # not logged yet (on_train_epoch_end checks)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        never = [n for n in self.metrics if n not in self._logged and n not in self._returned]
        if never:
            raise KeyError(f"MovingAverageLogs: no training metric {never[0]!r} in a whole epoch; training_step "
                           f"logged {sorted(trainer.callback_metrics)}. Return it in its output dict, or log it "
                           f"with self.log({never[0]!r}, value) in training_step.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        found = [self._value(trainer, pl_module, outputs, n) for n in self.metrics]
        if all(v is None for v in found):
            return                                           # nothing new: the averages stay
        values = [v if isinstance(v, torch.Tensor) or v is None else torch.as_tensor(v, device=pl_module.device)
                  for v in found]
        device = next(v.device for v in values if v is not None)
        weight = None
        if any(v is None for v in values):                   # left out this step: weight 0
            new = tuple(v is not None for v in values)
            weight = self._weights.get((device, new))
            if weight is None:
                weight = self._weights[(device, new)] = torch.tensor(new, dtype=torch.float64, device=device)
            zero = self._weights.get((device, ()))
            if zero is None:
                zero = self._weights[(device, ())] = torch.zeros((), device=device)
            values = [zero if v is None else v for v in values]
        if self._pending is not None:
            self.tracker.load_state_dict(_to_device(self._pending, device))
            self._pending = None
        self.tracker.update(*values, sample_weight=weight)
        for key, value in self.tracker.smoothed().items():
            pl_module.log(key, value.float(), on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                          batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        if self.tracker.count == 0:
            return dict(self._pending) if self._pending is not None else {}
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = state_dict                       # moved to the metrics' device at the next step


def _to_device(state, device):
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    return state


class GatherAttached(pl.Callback):
    """For an average attached to the module's optimizer (``ema.attach(optimizer)``) and split over
    replicas (``shard_replicas``): gathers it on every rank before each checkpoint's optimizer
    states are read, so the ``.ckpt`` that rank 0 writes holds it whole (the optimizer's
    state-dict hook makes no collective: without this callback it raises, naming it).

    Lightning reads every callback's ``state_dict()`` before the optimizers' (its checkpoint
    connector's ``dump_checkpoint``, on every rank), so the gather runs there. ``ema``: the
    average, or the name of the LightningModule's attribute holding it (an average made in
    ``configure_optimizers``: ``GatherAttached("ema")``)."""

    def __init__(self, ema: Any = "ema"):
        self.ema, self.module = ema, None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.module = pl_module

    def state_dict(self) -> dict[str, Any]:
        ema = self.ema
        if isinstance(ema, str):
            if self.module is None or not hasattr(self.module, ema):
                raise AttributeError(f"GatherAttached({ema!r}): the LightningModule has no "
                                     f"attribute {ema!r} holding the attached average")
            ema = getattr(self.module, ema)
        if getattr(ema, "attached", None) is not None and ema.split:
            ema.gather_attached()
        return {}
