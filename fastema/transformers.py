"""Hugging Face ``transformers.Trainer`` callback: an EMA of the weights, checkpointed with the run.

::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[fastema.transformers.EMACallback(decay=0.999, eval_with_ema=True,
                                                                  save_ema_model="out/ema")])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

:class:`EMACallback` makes a :class:`fastema.torch.EMA` of the model the Trainer trains when
training begins, updates it after every optimizer step (once per ``gradient_accumulation_steps``
micro-batches), evaluates and predicts with the averaged weights when asked, writes its state
into every Trainer checkpoint folder (``checkpoint-<step>/fastema_ema.safetensors``: safetensors
with a JSON header, no pickle) and restores it on ``trainer.train(resume_from_checkpoint=...)`` so
that a resumed run equals the uninterrupted one bit for bit. ``save_ema_model=dir`` exports the
averaged model with ``save_pretrained`` when training ends.

With accelerate alone (no Trainer), the EMA itself is what to register:
``accelerator.register_for_checkpointing(ema)`` (see the guide, "Hugging Face Trainer and accelerate").

Install with ``pip install "fastema[transformers]"``.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from typing import Any, Sequence

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:                                    # pragma: no cover - depends on the environment
    raise ImportError('fastema.transformers needs Hugging Face transformers: pip install "fastema[transformers]"') \
        from e

from . import _callback_files as _files
from . import _privates
from ._checkpoint_format import GROUPS, load_refused, to_named
from ._io.files import atomic_write
from .average import EMAOptions
from .schedules import BEMA
from .torch import EMA, SplitEntry, unwrap

__all__ = ["EMACallback", "GatherAttached", "STATE_FILE"]

#: The file :class:`EMACallback` writes into every Trainer checkpoint folder (one process's EMA:
#: replicated averages). A sharded average (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions on several
#: ranks, or split over replicas) writes one file per rank instead: ``fastema_ema-rank<r>-of-<world>.safetensors``
#: (a split one records the flat range of each tensor it holds, so any world size resumes from them).
STATE_FILE = _files.STATE_FILE


def _ema_options() -> tuple[str, ...]:
    """The keyword arguments :class:`fastema.torch.EMA` takes besides ``model`` and ``decay``, in
    its signature's order (the schedule and shadow options of :class:`~fastema.average.EMAOptions`,
    the model selection, and whatever this version of the face adds)."""
    params = inspect.signature(EMA.__init__).parameters
    return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _transformers_method(frame: Any) -> bool:
    """Whether ``frame`` runs a method (first argument ``self``) of a transformers module: the only
    frames whose locals :meth:`EMACallback._find_trainer` reads."""
    code = frame.f_code
    if not code.co_argcount or code.co_varnames[0] != "self":
        return False
    module = frame.f_globals.get("__name__", "")
    return isinstance(module, str) and (module == "transformers" or module.startswith("transformers."))


def _cast_evaluation(ema, model: torch.nn.Module, loop, args, kwargs):
    """``loop`` on the average where Trainer casts the model in place first (``bf16_full_eval`` /
    ``fp16_full_eval`` outside training: ``model.to(dtype)`` replaces every tensor, which a swapped-in
    average could not come back from): the average copied in (the EMA's own state untouched), the
    model's tensors kept beside it, and put back into the cast model on return or on an error, as
    Trainer leaves it (its raw weights in the eval dtype)."""
    kept = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    ema.copy_to(model)                                   # checked: an average holding inf or NaN is refused
    try:
        return loop(*args, **kwargs)
    finally:
        with torch.no_grad():
            for n, t in model.state_dict(keep_vars=True).items():
                t.copy_(kept[n])


class EMACallback(TrainerCallback):
    """An EMA of the weights of the model a ``transformers.Trainer`` trains.

    Args:
        decay: the EMA decay (default 0.9999), or several decays (the first is the one evaluated and
            exported); or a schedule
            of :mod:`fastema.schedules` (``decay=`` of :class:`fastema.average.EMAOptions`).
        eval_with_ema: run ``trainer.evaluate()`` and ``trainer.predict()`` (during training and
            after it) with the averaged weights swapped into the model, and the raw weights put
            back, bit for bit, when they return (or raise).
        save_ema_model: a directory: when training ends, write the averaged model there with the
            model's own ``save_pretrained`` (loadable with ``from_pretrained`` of its class); the
            trained model is left as it is.
        missing_state: what resuming from a checkpoint folder without the EMA's file does:
            ``"error"`` (default: ``FileNotFoundError`` before training goes on, nothing changed) or
            ``"restart"`` (a warning, and a new EMA of the resumed weights: for adding the callback
            to a run that had none).
        allow_nonfinite: resume, evaluate with and export an average holding inf or NaN (False:
            refused, naming its tensors; see :meth:`repair_nonfinite`).
        **ema_options: the rest of :class:`fastema.torch.EMA` (``update_every=``,
            ``shadow_dtype=``, ``exclude=`` ...). They
            are checked here: an unknown name is a ``TypeError`` listing the options, a bad value
            the EMA's own error.

    The EMA (:attr:`ema`, a :class:`fastema.torch.EMA`) is made at ``on_train_begin`` from the
    model the Trainer trains (its DDP / DeepSpeed / ``torch.compile`` wrappers looked through),
    after the Trainer has loaded a checkpoint it resumes from; every ``trainer.train()`` makes a
    new one. It updates at ``on_step_end`` with ``step=state.global_step``, so a warm-up
    (``PowerWarmup``'s ``update_after_step`` too) counts optimizer steps. With ``decay=BEMA()``, the
    callback makes BEMA's first update (its copy into ``theta_0`` and the EMA) at ``on_train_begin``
    unless it resumes, as TRL's
    ``BEMACallback`` does: BEMA's time is the optimizer step, counted from the weights training
    begins with (``update_every`` is TRL's ``update_freq``). ``on_save`` writes :data:`STATE_FILE`
    into the checkpoint folder the Trainer has just written (``save_total_limit`` removes it with its folder);
    resuming reads it from the folder ``train(resume_from_checkpoint=...)`` names and checks all of
    it (options, names, shapes, finiteness) before anything is loaded. With
    ``load_best_model_at_end``, the best checkpoint's EMA comes back with its weights at the end.

    ``eval_with_ema`` and finding the folder being resumed need the Trainer object: the callback
    finds it once per ``train()`` call among its callers (the Trainer method that fires the event),
    reading the variables of transformers' own methods only (so that nothing a caller deletes is
    kept alive).

    An average that inf or NaN reached (``skip_nonfinite`` off, an older checkpoint) is named in a
    warning at every ``on_save`` (and in the file's header), and refused, naming its tensors, by a
    resume, by ``eval_with_ema``'s swap and by the ``save_ema_model`` export, until
    :meth:`repair_nonfinite` resets those tensors from the model's weights
    (``EMACallback(allow_nonfinite=True)`` resumes it first).
    """

    def __init__(self, decay: float | Sequence[float] | None = None, *, eval_with_ema: bool = False,
                 save_ema_model: str | os.PathLike | None = None, missing_state: str = "error",
                 allow_nonfinite: bool = False, **ema_options: Any):
        known = _ema_options()
        unknown = sorted(set(ema_options) - set(known))
        if unknown:
            raise TypeError(f"unknown EMA option(s) {unknown}; the options are {', '.join(known)}")
        EMAOptions.of(decay, **{k: v for k, v in ema_options.items() if k in EMAOptions.names()})
        if not isinstance(eval_with_ema, bool):
            raise TypeError(f"eval_with_ema must be True or False, got {eval_with_ema!r}")
        if save_ema_model is not None and not isinstance(save_ema_model, (str, os.PathLike)):
            raise TypeError(f"save_ema_model must be a directory path or None, got {save_ema_model!r}")
        if missing_state not in ("error", "restart"):
            raise ValueError(f"missing_state must be 'error' or 'restart', got {missing_state!r}")
        if not isinstance(allow_nonfinite, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        self.allow_nonfinite = allow_nonfinite
        self.decay, self.eval_with_ema, self.missing_state = decay, eval_with_ema, missing_state
        self.save_ema_model = None if save_ema_model is None else os.fspath(save_ema_model)
        self.ema_options = dict(ema_options)
        self.ema: EMA = None  # type: ignore[assignment]   # made at on_train_begin

    # ------------------------------------------------------------ the Trainer

    def _find_trainer(self):
        """The Trainer that fires the current event (this callback is in its handler), from the
        callers' frames, or None; with the ``resume_from_checkpoint`` its ``train()`` resolved
        (``True`` is the last checkpoint by then), or None.

        Only the locals of transformers' own methods are read: on Python 3.10-3.12 reading a frame's
        ``f_locals`` snapshots its variables into a dict the frame keeps until it returns, so a
        caller's frame read here would keep what the caller deletes afterwards (a model, a 200 MB
        tensor) alive. ``f_code`` and ``f_globals`` are read without a snapshot."""
        trainer_cls = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
        if trainer_cls is None:                           # not imported: no Trainer exists (and none is loaded)
            return None, None
        _privates.get("transformers.trainer:Trainer.train")   # the locals read below: checked once
        frame: Any = sys._getframe(2)
        trainer, resume = None, None
        try:
            while frame is not None:
                if not _transformers_method(frame):
                    frame = frame.f_back
                    continue
                obj = frame.f_locals.get("self")
                if isinstance(obj, trainer_cls) and any(cb is self for cb in obj.callback_handler.callbacks):
                    trainer = obj
                    if "resume_from_checkpoint" in frame.f_locals:
                        resume = frame.f_locals["resume_from_checkpoint"]
                        break
                frame = frame.f_back
        finally:
            del frame
        return trainer, (os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None)

    def _wrap_evaluation(self, trainer) -> None:
        """Make ``trainer.evaluation_loop`` (what ``evaluate()`` and ``predict()`` run) swap the
        average in around the loop, once per Trainer."""
        if getattr(trainer.evaluation_loop, "_fastema_callback", None) is self:
            return
        loop = trainer.evaluation_loop
        callback = self

        def evaluation_loop(*args, **kwargs):
            ema = callback.ema
            if ema is None or ema.swapped:               # before training: nothing averaged yet
                return loop(*args, **kwargs)
            if not trainer.is_in_train and (trainer.args.bf16_full_eval or trainer.args.fp16_full_eval):
                return _cast_evaluation(ema, unwrap(trainer.model), loop, args, kwargs)
            with ema.average_parameters():               # raw weights back on return or on an error
                return loop(*args, **kwargs)

        evaluation_loop._fastema_callback = self         # type: ignore[attr-defined]
        trainer.evaluation_loop = evaluation_loop

    # ------------------------------------------------------------ events

    def on_init_end(self, args, state, control, **kwargs):
        trainer, _ = self._find_trainer()
        if trainer is not None and self.eval_with_ema:
            self._wrap_evaluation(trainer)                # trainer.evaluate() before train() too

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("EMACallback.on_train_begin was called without the model; it is a "
                               "transformers.Trainer callback: pass it in Trainer(callbacks=[...])")
        trainer, resume = self._find_trainer()
        handler = trainer.callback_handler.callbacks if trainer is not None else []
        strategy = args.save_strategy
        saves = resume is not None or getattr(strategy, "value", strategy) != "no"
        if saves and sum(isinstance(cb, EMACallback) for cb in handler) > 1:
            raise ValueError("one EMACallback per Trainer that saves: each writes its EMA to "
                             "fastema_ema.safetensors in the checkpoint folder, so a second one's "
                             "file takes the first's place (and, at a resume, its decay); average "
                             "several decays with one, EMACallback(decay=[0.999, 0.9999]) (the "
                             "first is the one evaluated)")
        if self.eval_with_ema:
            if trainer is None:
                raise RuntimeError("EMACallback(eval_with_ema=True) could not find the transformers.Trainer that "
                                   "runs it (it swaps the average in around trainer.evaluation_loop); add it with "
                                   "Trainer(callbacks=[...]) or trainer.add_callback(...)")
            self._wrap_evaluation(trainer)
        inner = unwrap(model)
        if self.save_ema_model is not None and not hasattr(inner, "save_pretrained"):
            raise TypeError(f"save_ema_model needs a model with save_pretrained (a transformers PreTrainedModel), "
                            f"got {type(inner).__name__}; leave it out and write the average with "
                            f"callback.ema.save('ema.safetensors') after training")
        if resume is None and state.global_step > 0:      # a Trainer we could not see resumed: its usual folder
            resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        folder = self._resume_folder(resume, state.global_step) if resume is not None else None
        # DeepSpeed: the engine (as fastema.torch documents for ZeRO-3: a swap releases gathered
        # persistent parameters through it); everything else: the model callbacks get
        wrapped = getattr(trainer, "model_wrapped", None)
        source = wrapped if type(wrapped).__name__ == "DeepSpeedEngine" and unwrap(wrapped) is inner else model
        ema = EMA(source, self.decay, **self.ema_options)
        ema.allow_nonfinite = self.allow_nonfinite        # its resume, evaluation and export
        if folder is not None:
            self._load(ema, folder)                       # refused: the callback keeps what it had
        elif isinstance(self.decay, BEMA):
            # TRL's BEMACallback: theta_0 (and the EMA) are the weights training begins with, and tau
            # counts optimizer steps from there; BEMA's first update is that copy
            ema.update(step=state.global_step)
        self.ema = ema

    def repair_nonfinite(self) -> list[str]:
        """Reset the averaged tensors holding inf or NaN from the model's weights, and return their
        names (:meth:`fastema.torch.EMA.repair_nonfinite`; on every rank of a sharded average)."""
        if self.ema is None:
            raise RuntimeError("EMACallback has no EMA yet: it is made when training begins")
        return self.ema.repair_nonfinite()

    def on_step_end(self, args, state, control, **kwargs):
        if self.ema is None:
            raise RuntimeError("EMACallback.on_step_end before on_train_begin: the Trainer did not begin training "
                               "with this callback in its handler")
        self.ema.update(step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.ema is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path, per_rank = self._file(self.ema, folder)
        if not per_rank and not args.should_save:
            return                                        # replicated: the saving process writes it
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"EMACallback.on_save: the Trainer's checkpoint folder {folder!r} does not exist "
                                    f"(the callback writes {os.path.basename(path)} next to the Trainer's files, "
                                    f"under args.output_dir); with hyperparameter search, save the EMA yourself "
                                    f"with callback.ema.save(path)")
        # the EMA's state as the one codec lays it out: a JSON header, tensors named "group/name" (this rank's parts)
        state = self.ema.state_dict()
        header, named = to_named(state, host=_files.local, who="EMACallback")
        tensors = {key: (t, t.dtype) for key, t in named.items()}
        meta = {"format": _files.FORMAT, "version": str(_files.VERSION), "ema": json.dumps(header)}
        ranges = {f"{g}/{n}": v.flat_range() for g in GROUPS for n, v in state.get(g, {}).items()
                  if isinstance(v, SplitEntry)}
        if ranges and None not in ranges.values():    # split over replicas: any world size can resume from them
            meta["pieces"] = json.dumps(ranges)
        from ._io.safetensors import stream_safetensors

        atomic_write(path, lambda f: stream_safetensors(f, tensors, meta, checksums=_files.CHECKSUMS))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.ema is None:
            return
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best is not None and os.path.isdir(best):      # the Trainer has put the best step's weights back:
            path, per_rank = self._file(self.ema, best)
            if per_rank:                                   # a collective: every rank loads, or every rank warns
                try:
                    self._load(self.ema, best)
                except (OSError, ValueError) as err:       # nothing was loaded on any rank
                    warnings.warn(f"EMACallback: the best checkpoint {best!r} has no readable EMA state on every "
                                  f"rank ({err}); the EMA stays the one of the last step ({state.global_step})",
                                  stacklevel=2)
            elif os.path.isfile(path):                     # the EMA of that step goes with them
                self._load(self.ema, best)
            else:
                warnings.warn(f"EMACallback: the best checkpoint {best!r} has no {STATE_FILE}; the EMA stays the one "
                              f"of the last step ({state.global_step})", stacklevel=2)
        if self.save_ema_model is None:
            return
        inner = unwrap(self.ema.model)
        per_rank = self._file(self.ema, "")[1]
        averaged = self.ema.full_state_dict(rank0_only=True) if per_rank else self.ema.averaged_state_dict()
        if args.should_save:
            inner.save_pretrained(self.save_ema_model, state_dict=averaged)

    # ------------------------------------------------------------ the file

    @staticmethod
    def _file(ema: EMA, folder: str) -> tuple[str, bool]:
        """``ema``'s file in ``folder``, and whether each rank has its own (a sharded average)."""
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        per_rank = world > 1 and ema.sharded        # FSDP2 / tensor parallel DTensors, ZeRO-3 partitions
        if not per_rank:
            return os.path.join(folder, STATE_FILE), False
        stem = STATE_FILE.removesuffix(".safetensors")
        return os.path.join(folder, f"{stem}-rank{dist.get_rank()}-of-{world}.safetensors"), True

    def _resume_folder(self, folder: str, step: int) -> str | None:
        """``folder`` if it holds the EMA's state, None when it does not and ``missing_state="restart"``
        (with a warning); ``FileNotFoundError`` otherwise."""
        if os.path.isdir(folder) and any(n.startswith("fastema_ema") for n in os.listdir(folder)):
            return folder
        if self.missing_state == "restart":
            warnings.warn(f"EMACallback: resuming from {folder!r}, which has no {STATE_FILE}: the EMA starts "
                          f"over from the resumed weights at step {step} (missing_state='restart')", stacklevel=3)
            return None
        raise FileNotFoundError(f"EMACallback: resuming from {folder!r}, which has no {STATE_FILE} (the EMA's "
                                f"state: the run that wrote the checkpoint had no EMACallback, or the file was "
                                f"removed); to start a new EMA from the resumed weights, pass "
                                f"EMACallback(..., missing_state='restart')")

    @staticmethod
    def _load(ema: EMA, folder: str) -> None:
        """Load this process's file in checkpoint ``folder`` into ``ema``, checked whole first by
        :meth:`fastema.torch.EMA.load_state_dict` (nothing changes if it refuses)."""
        path, per_rank = EMACallback._file(ema, folder)
        template = ema.state_dict() if per_rank else None  # on every rank, before any read can refuse (ZeRO-1/2
        try:                                               # masters gather in it: a collective)
            state = EMACallback._read_for(ema, folder, path, per_rank, template)
            ema.plan.refuse_other_options(state, "EMACallback")   # (the load would take the file's decays)
        except Exception as err:                         # every rank refuses with it, at once (never a hang)
            if per_rank:
                ema.refuse_on_every_rank(err)
            raise
        ema.load_state_dict(state)

    @staticmethod
    def _read_for(ema: EMA, folder: str, path: str, per_rank: bool, template: dict | None = None) -> dict:
        """This process's state in checkpoint ``folder`` (its own file ``path``, or the files of another
        world size), not yet checked against ``ema``; refused by name when unreadable or damaged."""
        from safetensors import SafetensorError

        own = os.path.isfile(path)                       # else: another world size, split or not (or refused)
        try:
            state = _files.read(path) if own else _files.resharded(ema, folder, os.path.basename(path), template)
        except SafetensorError as err:                   # cut short, emptied, overwritten: safetensors names no file
            where = path if own else f"a fastema_ema file in {folder}"
            raise load_refused(f"EMACallback: {where!r} is not a readable safetensors file ({err}): the file is "
                               f"damaged (truncated, emptied or overwritten). Resume from another checkpoint "
                               f"folder, or delete the file and pass EMACallback(..., missing_state='restart') to "
                               f"start a new EMA from the resumed weights.") from None
        if per_rank and own:                              # this rank's parts into DTensors of the EMA's layout
            template = template if template is not None else ema.state_dict()
            for group in GROUPS:
                for name, value in template[group].items():
                    local = state[group].get(name)
                    if _files.parted(value) and isinstance(local, torch.Tensor):
                        if tuple(local.shape) != tuple(value.to_local().shape):
                            raise ValueError(f"{path!r}: {group} {name!r} has shape {tuple(local.shape)}, this rank "
                                             f"holds {tuple(value.to_local().shape)}; resume with the same world "
                                             f"size and sharding")
                        if isinstance(value, SplitEntry):   # split over replicas: its pieces
                            value.load_local(local)
                        else:
                            value.to_local().copy_(local)
                        state[group][name] = value
        return state


class GatherAttached(TrainerCallback):
    """For an average attached to the Trainer's optimizer (``ema.attach(optimizer)``) and split over
    replicas (``shard_replicas``): gathers it on every rank when a save is due, so the
    ``optimizer.pt`` the saving rank writes alone holds it whole (the optimizer's state-dict hook
    makes no collective: without this callback it raises, naming it). Add it with
    ``Trainer(..., optimizers=(optimizer, None), callbacks=[GatherAttached(ema)])``.

    The Trainer decides a save in ``on_step_end`` / ``on_epoch_end`` (its flow callback runs
    first) and saves right after, so the average is gathered then, on every rank: a host copy of
    the whole average on each rank until the next step. With ``save_strategy="best"`` the save
    is decided after the evaluation, so it gathers at every evaluation. It gathers at the end of
    the Trainer's ``__init__`` too (every rank builds the Trainer): ``train()`` prepares the
    optimizer with accelerate, whose ``AcceleratedOptimizer`` passes its state through
    ``state_dict()`` and ``load_state_dict()`` on every rank before the first step."""

    def __init__(self, ema):
        if not callable(getattr(ema, "gather_attached", None)):
            raise TypeError(f"GatherAttached takes a fastema.torch average attached to the "
                            f"Trainer's optimizer, got {type(ema).__name__}")
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
        if control.should_save or (best and control.should_evaluate):
            self.ema.gather_attached()

    on_epoch_end = on_step_end

    def on_init_end(self, args, state, control, **kwargs):
        if self.ema.attached is not None:          # attached later: prepare() then says to gather
            self.ema.gather_attached()
