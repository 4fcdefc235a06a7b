"""TRL callback: a trainer's reference or teacher model kept as the moving average of the policy.

::

    trainer = DPOTrainer(model, ref_model=ref, args=DPOConfig(..., sync_ref_model=True,
                         ref_model_mixup_alpha=0.6, ref_model_sync_steps=512), ...)
    fastema.trl.replace_sync(trainer)        # TRL's SyncRefModelCallback out, RefSyncCallback in
    trainer.train()

:class:`RefSyncCallback` is a drop-in for TRL's ``SyncRefModelCallback`` (TR-DPO's reference sync in
the DPO, GRPO, RLOO and KTO trainers) and for the ``SyncTeacherModelCallback`` of the
self-distillation trainers (SDPO, SDFT: ``teacher_model_kind="ema"``): every ``sync_steps``
optimizer steps, ``ref <- (1 - rate) * ref + rate * policy``, where the rate is the weight of the
**policy** (the student) in TRL's every spelling (``ref_model_mixup_alpha``,
``teacher_update_rate``). The sync is :class:`fastema.torch.TargetNetwork`: one kernel launch per
dtype group of (ref, policy) tensors, no host sync, no copy of the weights, each rank's own shards
under FSDP2 and its own partitions under DeepSpeed ZeRO-3 (no gather, no collective).

Install with ``pip install "fastema[transformers]" trl``.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, Callable

try:
    from transformers import TrainerCallback
except ImportError as e:                                    # pragma: no cover - depends on the environment
    raise ImportError('fastema.trl needs Hugging Face transformers (and TRL): pip install '
                      '"fastema[transformers]" trl') from e

from torch import nn

from .torch import TargetNetwork, unwrap
from .torch.target import made_on_every_rank

__all__ = ["SPELLINGS", "RefSyncCallback", "replace_sync"]

#: The trainer-argument names :class:`RefSyncCallback` reads each of its two knobs from: TR-DPO's
#: (``DPOConfig``, ``GRPOConfig``, ``RLOOConfig``, ``KTOConfig``) and the self-distillation
#: teachers' (``SDPOConfig``, ``SDFTConfig``). Both rates mean the same: the weight of the policy
#: (the student) in a sync; both periods count optimizer steps.
SPELLINGS = {"update_rate": ("ref_model_mixup_alpha", "teacher_update_rate"),
             "sync_steps": ("ref_model_sync_steps", "teacher_sync_steps")}

# TargetNetwork's options that this callback sets itself, and why they are not taken here.
_OWN = {"tau": "the rate is update_rate= (the weight of the policy, TRL's ref_model_mixup_alpha / "
               "teacher_update_rate)",
        "momentum": "the rate is update_rate= (the weight of the policy, 1 - momentum), as TRL "
                    "spells it",
        "update_every": "the period is sync_steps= (optimizer steps, TRL's ref_model_sync_steps / "
                        "teacher_sync_steps)",
        "compensate": "a sync every sync_steps steps uses the rate as it is, as TRL's does"}
_MEANING = {"update_rate": "the weight of the policy in each sync",
            "sync_steps": "optimizer steps between syncs"}


def _target_options() -> tuple[str, ...]:
    """The keyword options of :class:`fastema.torch.TargetNetwork` this callback passes on."""
    params = inspect.signature(TargetNetwork.__init__).parameters
    return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _OWN)


def _check(knob: str, value: Any, where: str) -> Any:
    """``value`` for ``knob`` (from ``where``), checked: a rate in [0, 1], a period an int >= 1."""
    if knob == "update_rate":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{where} must be a number in [0, 1] (the weight of the policy in a "
                             f"sync), got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an int >= 1 (optimizer steps between syncs), got "
                         f"{value!r}")
    return value


def _spellings(args: Any) -> Callable[[Any], Any]:
    """A reader of the spellings of :data:`SPELLINGS` that ``args`` has: their values now (one
    ``attrgetter`` call a step, the per-step path)."""
    present = [n for names in SPELLINGS.values() for n in names if hasattr(args, n)]
    return operator.attrgetter(*present) if present else _nothing


def _nothing(args: Any) -> None:
    return None


def _defaults(args: Any) -> dict[str, Any]:
    """The default of each field of ``args`` (a dataclass such as ``DPOConfig``), by name; {}
    otherwise."""
    if not dataclasses.is_dataclass(args):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(args):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _resolve(knob: str, given: Any, args: Any) -> Any:
    """The value of ``knob`` (``"update_rate"`` or ``"sync_steps"``): the constructor's, else the
    trainer's arguments' (either spelling of :data:`SPELLINGS`); contradictions refused by name.

    An argument the user set (a value other than its field's default) must agree with the
    constructor's and with the other spelling; a defaulted one gives way to the constructor's
    value."""
    names = SPELLINGS[knob]
    found = {n: getattr(args, n) for n in names if args is not None and hasattr(args, n)}
    defaults = _defaults(args)
    chosen = {n: v for n, v in found.items() if n not in defaults or v != defaults[n]}
    if given is not None:
        for n, v in chosen.items():
            if v != given:
                raise ValueError(f"RefSyncCallback({knob}={given!r}) contradicts the trainer's "
                                 f"args.{n}={v!r} (the same knob: {_MEANING[knob]}); set one of "
                                 "them, or make them equal")
        return given
    pool = chosen or found
    if len(set(pool.values())) > 1:
        (a, va), (b, vb) = list(pool.items())[:2]
        raise ValueError(f"the trainer's args.{a}={va!r} and args.{b}={vb!r} contradict each other "
                         f"(RefSyncCallback reads both as the same knob: {_MEANING[knob]}); make "
                         f"them equal, or give RefSyncCallback({knob}=...)")
    if not pool:
        raise ValueError(f"RefSyncCallback has no {knob}: give RefSyncCallback({knob}=...) or "
                         f"train with TRL arguments that have {' or '.join(names)} "
                         f"({_MEANING[knob]})")
    name, value = next(iter(pool.items()))
    return _check(knob, value, f"args.{name}")


class RefSyncCallback(TrainerCallback):
    """A TRL trainer's reference or teacher model kept as the moving average of the policy.

    A drop-in for TRL's ``SyncRefModelCallback(ref_model, accelerator)`` and for the
    self-distillation trainers' ``SyncTeacherModelCallback(teacher_model, accelerator)``: at
    ``on_step_end``, when ``state.global_step`` (optimizer steps, so once per
    ``gradient_accumulation_steps`` micro-batches) is a multiple of ``sync_steps``, ``ref <- (1 -
    update_rate) * ref + update_rate * policy`` for every floating parameter of ``ref_model``, in
    its own tensors. The policy is the ``model`` the trainer passes to its callbacks, unwrapped as
    TRL does (``accelerator.unwrap_model``, then DDP, ``DataParallel``, DeepSpeed and
    ``torch.compile`` wrappers); the pairs are matched by name.

    **The rate is the weight of the policy (student)**, in every spelling: TR-DPO's
    ``ref_model_mixup_alpha`` and SDPO/SDFT's ``teacher_update_rate`` (0.05 moves the teacher 5 % of
    the way to the student; TRL's review of its SDPO trainer found it passed inverted, as the
    retention). In fastema's words ``update_rate`` is :class:`~fastema.torch.TargetNetwork`'s
    ``tau``, ``1 - momentum``.

    Each knob comes from the constructor or from the trainer's arguments (``args``) in either
    spelling of :data:`SPELLINGS`, resolved when training begins and again whenever their values in
    ``args`` change (TRL's callbacks read them at every step: a trainer that anneals them in place
    syncs as TRL's). A value set in ``args`` (other than its field's default) that contradicts the
    constructor's or the other spelling's is refused by name; a defaulted one (``DPOConfig``'s
    ``ref_model_mixup_alpha=0.6``) gives way to the constructor's.

    The arithmetic is :class:`fastema.torch.TargetNetwork`'s: ``ref.lerp_(policy, update_rate)``
    computed in float32 (float64 for float64 tensors), rounded once to the ref's dtype, one kernel
    launch per (device, dtype) group, no host sync. TRL computes ``ref.mul_(1 - alpha).add_(policy,
    alpha=alpha)``, two roundings (and ``float32(1 - alpha) + float32(alpha)`` need not be 1). In
    float32 the two agree bit for bit at rates 0 and 1 (for finite weights: an infinite reference
    element at rate 0 stays infinite in TRL's and becomes NaN in the lerp, as in ``torch.lerp``;
    ``network.hard_update()`` copies exactly) and on most elements otherwise (61-99 % measured, by
    rate); elsewhere they differ by 1 ulp of ``max(|ref|, |policy|, |policy - ref|)`` per sync, at
    most (measured on the CPU, rates 0.001 to 0.999; the tests assert it, inside a real
    ``DPOTrainer`` too). Against a float64 reference the lerp is as close or closer on average (mean
    error 0.21 ulp against TRL's 0.29 at rate 0.05, equal at 0.5). In a bfloat16 reference small
    rates stall under round-to-nearest with either arithmetic; ``rounding="stochastic"`` follows the
    exact average.

    Supported: plain, DDP (and ZeRO-1/2: full parameters on every rank), FSDP2 with both models
    sharded alike, and DeepSpeed ZeRO-3 with both models partitioned alike (the policy's engine and
    the reference engine TRL's ``prepare_deepspeed`` makes with the same stage-3 config): each rank
    averages its own shards or partitions in place, with no gather and no collective in a sync,
    where TRL's callback gathers every parameter of both models under ZeRO-3
    (``deepspeed.zero.GatheredParameters``), computes on rank 0 and broadcasts. Under ZeRO-3 the
    reference's persistent parameters (those DeepSpeed keeps gathered, under
    ``stage3_param_persistence_threshold``) are released at a sync, as TRL's gather releases them,
    so that its next forward gathers the synced partitions. Models partitioned differently (one of
    them not ZeRO-3, or over other ranks) are refused by name when training begins, nothing written,
    on every rank (:meth:`on_train_begin`: the ranks agree, once). A sync is rank-local: one that
    raises on one rank alone wrote and counted nothing there; make it again on that rank before the
    reference is read (its forward, ``network.iter_weights()``, which refuses on every rank while
    the ranks' counts differ).

    Args:
        ref_model: the reference (TR-DPO) or teacher (SDPO/SDFT) model, updated in place
            (``trainer.ref_model``, ``trainer.teacher_model``).
        accelerator: the trainer's ``accelerate.Accelerator`` (``trainer.accelerator``), used to
            unwrap the policy as TRL does; None: the DDP / DeepSpeed / ``torch.compile`` wrappers
            are looked through.
        update_rate: the weight of the policy in a sync, in [0, 1]; default: the trainer's
            ``args.ref_model_mixup_alpha`` or ``args.teacher_update_rate``.
        sync_steps: sync every ``sync_steps`` optimizer steps; default: the trainer's
            ``args.ref_model_sync_steps`` or ``args.teacher_sync_steps``.
        **options: passed to :class:`fastema.torch.TargetNetwork`: ``buffers`` (default
            ``"ignore"``: TRL syncs parameters only), ``exclude``, ``rounding``, ``seed``,
            ``skip_nonfinite``, ``device_step``. The rate and the period are this callback's
            (``tau``, ``momentum``, ``update_every`` and ``compensate`` are refused by name).

    :attr:`network` is the :class:`~fastema.torch.TargetNetwork`, made when training begins (or at
    the first sync) and made again when the trainer hands its callbacks another policy;
    :attr:`syncs` counts the syncs made.
    """

    def __init__(self, ref_model: nn.Module, accelerator: Any = None, *, update_rate: float | None = None,
                 sync_steps: int | None = None, **options: Any):
        if not isinstance(ref_model, nn.Module):
            raise TypeError("ref_model must be a torch.nn.Module (the trainer's ref_model or "
                            f"teacher_model), got {type(ref_model).__name__}: there is nothing to "
                            "sync")
        own = sorted(set(options) & set(_OWN))
        if own:
            raise TypeError(f"RefSyncCallback does not take {own[0]}=: {_OWN[own[0]]}")
        known = _target_options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown TargetNetwork option(s) {unknown}; RefSyncCallback takes "
                            f"update_rate, sync_steps and {', '.join(known)}")
        self.update_rate = None if update_rate is None else _check("update_rate", update_rate, "update_rate")
        self.sync_steps = None if sync_steps is None else _check("sync_steps", sync_steps, "sync_steps")
        self.ref_model, self.accelerator = ref_model, accelerator
        self.options = {"buffers": "ignore", **options}
        self.network: TargetNetwork | None = None
        self.syncs = 0
        # (args, rate, period, the spellings' values, their reader)
        self._resolved: tuple[Any, float, int, Any, Callable[[Any], Any]] | None = None

    def __repr__(self) -> str:
        rate = self.update_rate if self._resolved is None else self._resolved[1]
        steps = self.sync_steps if self._resolved is None else self._resolved[2]
        return f"RefSyncCallback(update_rate={rate!r}, sync_steps={steps!r}, syncs={self.syncs})"

    # ------------------------------------------------------------ what to sync

    def resolve(self, args: Any) -> tuple[float, int]:
        """``(update_rate, sync_steps)`` for the trainer arguments ``args`` (see the class
        docstring); refused by name when missing, out of range or contradictory. Read again when
        ``args`` or the value of one of its spellings changed (as TRL's callbacks read them at every
        step)."""
        last = self._resolved
        if last is not None and last[0] is args and last[4](args) == last[3]:
            return last[1], last[2]
        rate = _resolve("update_rate", self.update_rate, args)
        steps = _resolve("sync_steps", self.sync_steps, args)
        if self.network is not None and last is not None and rate != last[1]:
            self.network = None                           # the rate is the network's: made again
        read = _spellings(args)
        self._resolved = (args, rate, steps, read(args), read)
        return rate, steps

    def _policy(self, model: nn.Module) -> nn.Module:
        if self.accelerator is not None:
            model = self.accelerator.unwrap_model(model)
        return unwrap(model)

    def _network(self, model: nn.Module | None, rate: float) -> TargetNetwork:
        if model is None:
            raise RuntimeError("RefSyncCallback was called without the model; it is a "
                               "transformers.Trainer callback: add it with "
                               "trainer.add_callback(...) or Trainer(callbacks=[...])")
        policy = self._policy(model)
        if self.network is None or self.network.online is not policy:
            self.network = TargetNetwork(policy, unwrap(self.ref_model), tau=rate, **self.options)
        return self.network

    # ------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """The knobs resolved and the network made: refusals now, before the first step. Under
        ``torch.distributed`` (more than one rank) the ranks then agree, once
        (``fastema.torch.target.made_on_every_rank``): a rank that refused makes every rank
        raise, with its reason (a reference partitioned otherwise on that rank alone, a bad
        argument there), and ranks whose rate, period, options or synced names differ refuse
        alike; else the others would go on into the first step's collectives and wait there for
        the rank that raised. Every rank must call it."""
        def make():
            rate, steps = self.resolve(args)
            options = {k: tuple(v) if k == "exclude" else v            # a seed may be the rank's
                       for k, v in sorted(self.options.items()) if k != "seed"}
            return self._network(model, rate), f"update_rate={rate}, sync_steps={steps}, {options}"

        try:
            made_on_every_rank(make, "RefSyncCallback.on_train_begin()")
        except BaseException:                         # nothing kept: the next begin makes it again
            self.network = None
            raise

    def on_step_end(self, args, state, control, model=None, **kwargs):
        rate, steps = self.resolve(args)
        if state.global_step % steps:
            return
        self._network(model, rate).update()
        self.syncs += 1


def replace_sync(trainer: Any, **kwargs: Any) -> RefSyncCallback:
    """Replace TRL's sync callback in ``trainer`` by a :class:`RefSyncCallback` of the same model.

    Finds the one ``SyncRefModelCallback`` (or subclass: SDPO/SDFT's
    ``SyncTeacherModelCallback``) that TRL's trainer added (``sync_ref_model=True``;
    ``teacher_model_kind="ema"``), removes it, and adds a :class:`RefSyncCallback` of its model
    with the trainer's accelerator; ``kwargs`` go to :class:`RefSyncCallback` (``update_rate=``,
    ``sync_steps=``, TargetNetwork options). Returns it. Refused by name (the trainer unchanged)
    when the trainer has no such callback, or several."""
    try:
        from trl.trainer.callbacks import SyncRefModelCallback
    except ImportError as e:                                # pragma: no cover - depends on the environment
        raise ImportError("fastema.trl.replace_sync needs TRL: pip install trl") from e
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SyncRefModelCallback)]
    if len(found) != 1:
        what = "no SyncRefModelCallback (TRL adds it with sync_ref_model=True, or teacher_model_kind='ema')" \
            if not found else f"{len(found)} SyncRefModelCallbacks ({', '.join(type(c).__name__ for c in found)})"
        raise ValueError(f"replace_sync: the trainer has {what}; add RefSyncCallback(model, "
                         "trainer.accelerator) yourself with trainer.add_callback(...)")
    old = found[0]
    new = RefSyncCallback(old.ref_model, getattr(trainer, "accelerator", None), **kwargs)
    trainer.remove_callback(old)
    trainer.add_callback(new)
    return new
