"""``ema.attach(optimizer)``: a model average that rides the optimizer (``docs/guides/attach.md``).

An :class:`Attachment` joins one torch model average (an :class:`~fastema.torch.EMA`, a
:class:`~fastema.torch.PostHocEMA`, a :class:`~fastema.torch.WindowAverage`) to one optimizer by
torch's own hooks (``../shared/design/optimizer.md`` §4.2):

- a step pre-hook refuses a step while the average is swapped into the model
  (``average_parameters()``), and a step after the model's registrations changed that left a
  tracked trainable parameter out of the optimizer (``attach()``'s rule again), before the
  optimizer writes anything;
- a step post-hook updates the average once after every ``optimizer.step()`` that runs; not after
  the lr-0 step that DCP's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` run on an
  optimizer with no state (:func:`dummy_step`, the one rule of every form of ``step``: every
  group's lr 0 and DCP's ``_init_optim_state`` the caller, however many frames between,
  :mod:`fastema.torch._state.dcp_calls`: read only then, §4.3; in a compiled step decided when
  it runs, by the operator the traced hook leaves); a fused optimizer's step under
  ``GradScaler`` (which runs with ``optimizer.found_inf`` set, §4.4) updates behind that flag, on
  the device (the flag copied into the kernels' skip flags: no host sync);
- a state-dict post-hook puts the average's whole :meth:`state_dict` under the optimizer state
  dict's top-level key :data:`KEY` (plain tensors, numbers, strings, lists and dicts: what
  ``torch.load(weights_only=True)`` reads), outside ``state[param]``, so torch's load cast to
  the parameters' dtype (§4.1) and Lightning's move of the per-parameter state to the GPU never
  touch it: a float32 average of bfloat16 weights comes back bit for bit;
- a load-state-dict pre-hook (first of them) takes that entry out of a new dict and checks it
  (every check, agreed over a sharded or split average's ranks); the load post-hook writes it,
  once torch has loaded the rest (a load refused by fastema or by torch changes nothing); a state
  dict without it (an older checkpoint, or one made before ``attach``), or with one saved while
  a start-over waited (:data:`PENDING`), warns once and starts the average over from the
  weights as they are at the next step (loaded by then, in whatever order the trainer loads).

A sharded average (FSDP2, HSDP, tensor parallel: DTensor parameters), and any average when DCP's
``get_optimizer_state_dict`` asks (told by :func:`~fastema.torch._state.dcp_calls.context`, against
the table of :mod:`fastema.torch._state.dcp_calls`: a torch that changed it fails loudly), goes into
the per-parameter entries instead, which DCP keeps (:mod:`fastema.torch._state.attached`, its rule:
DTensors of the parameters' layout on the trainable parameters the optimizer steps, the record,
frozen parameters and averaged buffers on the first of them; taken out before the cast); its load
agrees over the mesh that every rank holds the entries or none does
(:func:`~fastema.torch._state.decisions.mesh_findings`).

The state-dict hooks make no collective (HF Trainer calls ``optimizer.state_dict()`` on the saving
rank only). An average split over replicas (``shard_replicas``: each rank holds pieces) rides DCP's
per-parameter entries as :class:`~fastema.torch.SplitEntry` values (each rank writes its own);
outside DCP its hook carries the whole copy that ``ema.gather_attached()`` made on every rank at
this state (:meth:`Attachment.gather`; the ``GatherAttached`` callbacks of
:mod:`fastema.transformers` and :mod:`fastema.lightning` call it when a save is due), or raises
naming what to do: never a file of one rank's pieces. One of DeepSpeed's ZeRO partitions is refused
here, by name; so is an optimizer whose ``state_dict`` / ``load_state_dict`` never run torch's
(torchtitan's ``OptimizersContainer``: the hooks would never run,
:func:`~fastema.torch._state.attach_checks.bypasses`), and one whose ``state_dict`` runs torch's but
drops the average's entry (one ``state_dict()`` call at attach, with a stand-in for the average,
where an override outside torch runs: :func:`~fastema.torch._state.attach_checks.overrides`).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch

from ... import _backends
from ..._shadow import Shadow
from .._state import attach_checks as _checks
from .._state import attached as _params
from .._state import dcp_calls as _dcp
from .._state.agree import Disagreement
from .._state.attach_checks import KEY, hooked, skip_refusal  # KEY: the state dict's key of it
from .._state.attached import Attachable, Face
from .._state.checkpoint import TorchCheckpoint
from .._state.decisions import mesh_findings, refuse_together
from .._tensors.model import TorchModel
from . import compiled as _compile
from .compiled import Compiled

__all__ = ["KEY", "Attachment", "Joined", "dummy_step", "skip_refusal"]

PENDING = "start_over_pending"      # in an entry saved while a start-over waited: re-armed at load

_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Attachment]" = (
    weakref.WeakKeyDictionary())


class Joined:
    """A torch model average as its attachment reads it (:class:`~fastema.torch._state.attached.
    Attachable`): its public surface (``face``) and the parts its ``attach()`` hands over, the
    same objects for the face's life, read at each use: the model side (``specs``, ``stale``),
    the shadow (``names``) and the checkpoint side (``agreement``, ``checked_load``)."""

    def __init__(self, face: Face, side: TorchModel, shadow: Shadow, checkpoint: TorchCheckpoint):
        self.kind, self.face, self.side, self.shadow = type(face).__name__, face, side, shadow
        self.model, self.specs, self.agreement = face.model, side.specs, checkpoint.agreement
        self.checked_load = checkpoint.checked_load
        self.state_dict, self.gathered_state_dict = face.state_dict, face.gathered_state_dict

    @property
    def names(self) -> list:
        return self.shadow.names

    @property
    def stale(self) -> bool:
        return self.side.stale

    @property
    def sharded(self) -> bool:
        return self.face.sharded

    @property
    def split(self) -> bool:
        return self.face.split

    @property
    def swapped(self) -> bool:
        return self.face.swapped

    @property
    def source(self) -> str:
        return self.face.source


class Attachment:
    """One average (:class:`~fastema.torch._state.attached.Attachable`) joined to one optimizer
    (see the module). Made by the face's ``attach()``, which hands over what the hooks call:
    ``compiled`` (the face's compiled-step contract: its eager update, and what a traced step's
    operator runs), ``skipping(flags)`` (its update behind device-side skip flags, or None),
    ``restart()`` (start over from the weights; False when the average already holds updates),
    ``devices`` (where its shadows are: one skip flag each), and ``cannot_skip`` (None, or why
    this face cannot take a device-side skip flag)."""

    def __init__(self, face: Attachable, optimizer: torch.optim.Optimizer, *, compiled: Compiled,
                 skipping: Callable[[dict], None] | None, restart: Callable[[], bool],
                 sources: list, devices: list, cannot_skip: str | None):
        kind = face.kind
        optimizer = hooked(optimizer)
        _checks.check(kind, face, optimizer, sources, _ATTACHED)
        _dcp.loaded()                            # DCP imported: what the hooks tell it by, checked
        self.kind, self.face, self.optimizer = kind, face, optimizer
        self.compiled, self.update = compiled, compiled.eager_update
        self.skipping, self.restart = skipping, restart
        self.devices, self.cannot_skip = devices, cannot_skip
        self.flags: dict = {}                    # device -> int32[1], made at the first fused skip
        self.reseed: Any = None                  # the step pre-hook of a pending start-over
        self.per_param = bool(face.sharded)      # a sharded average: in the per-parameter entries
        self.gathered: tuple | None = None       # a split's (calls, its gathered state): gather()
        self.pending: Callable[[], None] | None = None   # a checked load, written after torch's
        self.handles = [optimizer.register_step_pre_hook(self.stepping),
                        optimizer.register_step_post_hook(self.stepped),
                        optimizer.register_state_dict_post_hook(self.saving),
                        optimizer.register_load_state_dict_pre_hook(self.loading, prepend=True),
                        optimizer.register_state_dict_pre_hook(self.marking),  # flatten's keys
                        optimizer.register_load_state_dict_post_hook(self.loaded)]
        self.bare: list = []                     # states holding a marker alone (out at a step)
        self.marked = _params.mark(KEY, face, optimizer, self.bare)   # the live states marked (a count)
        self.step_handle = _compile.after_steps.add(self.after_step)   # a traced step's operator
        _ATTACHED[optimizer] = self

    def close(self) -> None:
        """Remove every hook (``detach()``); the average and the optimizer are left as they are."""
        for h in self.handles:
            h.remove()
        _params.unmark(KEY, self.optimizer)
        _compile.after_steps.drop(self.step_handle)    # a compiled step's operator does nothing
        if self.reseed is not None:
            self.reseed.remove()
            self.reseed = None
        _ATTACHED.pop(self.optimizer, None)

    def refuse(self, what: str) -> None:
        """``update()`` by hand on an attached average."""
        raise RuntimeError(f"{what} was called on an attached {self.kind} (attached to an "
                           f"optimizer, {type(self.optimizer).__name__}): every optimizer.step() "
                           f"updates it already. Drop the call, or detach() the average to update "
                           f"it by hand")

    # ------------------------------------------------------------ the step

    def stepping(self, optimizer, args, kwargs) -> None:
        """The step pre-hook, before the optimizer writes: refuse a step while the average is swapped in
        (it would step the average, which the swap back keeps) or a GradScaler step it cannot skip."""
        if torch.compiler.is_compiling():
            return
        try:
            if getattr(optimizer, "found_inf", None) is not None and (self.cannot_skip or self.skipping is None):
                raise self.skip_refused(self.cannot_skip or "")
            if self.bare and _params.unbare(KEY, optimizer, self.bare):   # Adam fills empty states only
                self.marked = -1                     # marked again after the step
            if self.face.stale:                # a registration since: attach()'s rule again
                _checks.missed(self.kind, self.face, optimizer, "after attach() (a submodule replaced?)")
            if self.face.swapped:
                raise RuntimeError(f"{type(optimizer).__name__}.step() inside average_parameters() (or after swap()): "
                                   f"the attached {self.kind}'s weights are in the model, so the optimizer would step "
                                   f"the average. Nothing was stepped; step outside the block, or swap() back first")
        except BaseException:   # no step: GradScaler's marks off (it drops them after a step that returns only)
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.__dict__.pop("found_inf", None)
            raise

    def stepped(self, optimizer, args, kwargs) -> None:
        """The step post-hook: :meth:`after_step`, decided and run when the step runs. Inside a
        traced step (``torch.compile(optimizer.step)``) it leaves one operator in the graph that
        runs :meth:`after_step` eagerly at each call of the compiled step: the same rule,
        never a decision baked into the trace."""
        if torch.compiler.is_compiling():
            if getattr(optimizer, "found_inf", None) is not None:
                raise self.skip_refused("inside torch.compile")
            _compile.compiled_step(self.compiled, self.step_handle)
            return
        self.after_step()

    def after_step(self) -> None:
        """One update after a step that ran, unless it was DCP's dummy step
        (:func:`dummy_step`); behind ``found_inf``."""
        optimizer = self.optimizer
        if dummy_step(optimizer):
            self.marked = _params.mark(KEY, self.face, optimizer, self.bare)   # every trainable one
            return                               # DCP's state init: lr 0, nothing moved, not a step
        if len(optimizer.state) != self.marked:  # new state (the first step): marked for flatten
            self.marked = _params.mark(KEY, self.face, optimizer)
        self.gathered = None                     # a split's gathered copy: of the last state only
        self.pending = None
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is None:
            self.update(None)
        else:
            skipping = self.skipping
            if self.cannot_skip is not None or skipping is None:
                raise self.skip_refused(self.cannot_skip or "")
            skipping(self.skip_flags(found_inf))

    def skip_flags(self, found_inf: torch.Tensor) -> dict:
        """The kernels' skip flags set from GradScaler's ``found_inf`` (non-zero: skipped), on the
        device with no host read."""
        flags = self.flags
        if not flags:
            flags.update({d: _backends.zeros(("torch", d), 1, np.int32) for d in self.devices})
        inf = found_inf.reshape(1)
        for flag in flags.values():
            flag.copy_(inf, non_blocking=True)
        return flags

    def skip_refused(self, why: str) -> RuntimeError:
        return RuntimeError(f"{type(self.optimizer).__name__}.step() ran under GradScaler with "
                            f"found_inf set (a fused or capturable optimizer: GradScaler steps it "
                            f"every time and the step skips on the device), but this {self.kind} "
                            f"cannot skip on the device ({why}). Use a non-fused optimizer "
                            f"(GradScaler then skips step() itself), or an EMA without it")

    # ------------------------------------------------------------ the checkpoint

    def marking(self, optimizer) -> None:
        """The state-dict pre-hook, when DCP calls: the live keys its
        ``flatten_optimizer_state_dict=True`` rebuilds a loaded entry from (also made after the
        first step, after DCP's dummy step and after every load: ``_state.attached.mark``)."""
        call = _dcp.context()
        if call is not None and call.function in (_dcp.GET, _dcp.LOAD):
            self.marked = _params.mark(KEY, self.face, optimizer, self.bare)

    def saving(self, optimizer, state_dict: dict) -> dict:
        """The state-dict post-hook: the average's whole state under :data:`KEY` (top level), or, for
        a sharded average and for DCP's ``get_optimizer_state_dict``, in the per-parameter entries
        (:mod:`fastema.torch._state.attached`); refused while the average is in the model."""
        if self.face.swapped:
            raise RuntimeError(f"{type(optimizer).__name__}.state_dict() inside average_parameters() (or after "
                               f"swap()): the attached {self.kind}'s average is in the model; save after it")
        if KEY in state_dict:
            raise ValueError(f"the optimizer's state dict already holds a key {KEY!r}; this "
                             f"{self.kind} keeps its state there. Rename that entry")
        flags = {PENDING: True} if self.reseed is not None else {}   # re-armed at its load
        out = _params.unmarked(KEY, state_dict)  # the live markers left out
        call = _dcp.context(info=self.face.split)
        getter = call is not None and call.function == _dcp.GET
        if call is not None and call.full_state_dict:   # GET's, read for a split average only
            raise ValueError(f"DCP's full_state_dict=True gathers DTensors only, not the pieces "
                             f"of this {self.kind} split over replicas (shard_replicas): save "
                             f"with the default options (dcp.save on every rank), or call "
                             f"ema.gather_attached() on every rank and save "
                             f"optimizer.state_dict() (the whole average at its top-level key)")
        if getter or (self.per_param and not self.face.split):
            return _params.per_param_state(KEY, self.face, optimizer, out, flags)
        out[KEY] = {**(self.whole() if self.face.split else self.face.state_dict()), **flags}
        return out

    def gather(self) -> None:
        """``gather_attached()``: a split average's whole state gathered now (a collective of its
        replica group), for the next ``optimizer.state_dict()`` outside DCP, on one rank or all."""
        if not self.face.split:
            return
        self.gathered = None                     # the old copy freed before the new one is made
        self.gathered = (self.calls(), self.face.gathered_state_dict())

    def calls(self) -> int:                      # the device's (CUDA graph replays count there)
        return int(self.face.agreement.calls(True))

    def whole(self) -> dict:
        """A split average's gathered copy, made by :meth:`gather` at this state; else the error
        that names what to do (the hook makes no collective: the other ranks may not be here)."""
        if self.gathered is not None and self.gathered[0] == self.calls():
            return self.gathered[1]
        when = "was not gathered" if self.gathered is None else "changed since it was gathered"
        raise RuntimeError(
            f"optimizer.state_dict() outside DCP on an attached {self.kind} split over replicas "
            f"(shard_replicas): each rank holds pieces of it, and this average {when}; the hook "
            f"makes no collective (HF Trainer calls it on the saving rank only). Either save "
            f"through DCP (get_state_dict + dcp.save on every rank: each rank writes its pieces), "
            f"or call ema.gather_attached() on every rank after the last step before the save "
            f"(the GatherAttached callback of fastema.transformers or fastema.lightning does "
            f"it), or make the average without shard_replicas")

    def loading(self, optimizer, state_dict: dict) -> dict:
        """The load pre-hook: every check of the average's entry (:data:`KEY`, or the
        per-parameter entries), agreed over a sharded average's ranks; a new dict without it goes
        on to torch. The average is written by the load post-hook (:meth:`loaded`), once torch has
        taken the rest: a load torch refuses changes nothing. Where there is no entry (or one
        saved while a start-over was pending), a start-over at the next step, with one warning."""
        self.pending = None
        try:                                     # any failure of the checks is a refusal, agreed
            entry, rest = self.read(optimizer, state_dict)
        except BaseException as err:             # (RecursionError of a deep record too)
            try:
                self.agree_present(None, err)
            except Disagreement:
                pass                             # every rank raises: this one its own error
            raise
        entry = self.agree_present(entry)        # a sharded average's ranks: all or none
        if entry is not None and entry.get(PENDING) is True:
            warnings.warn(f"the optimizer state dict's {KEY!r} entry was saved while the attached "
                          f"{self.kind} waited to start over (a checkpoint without the average "
                          f"had been loaded, and no step made since): it starts over from the "
                          f"model's weights at the next optimizer step, unless it holds updates "
                          f"made in this process (then it is kept as it is)", UserWarning,
                          stacklevel=3)
            entry = None
        elif entry is None:
            warnings.warn(f"the optimizer state dict holds no {KEY!r} entry (saved before "
                          f"attach(), or by an older fastema): the attached {self.kind} starts "
                          f"over from the model's weights at the next optimizer step, unless it "
                          f"holds updates made in this process (then it is kept as it is)",
                          UserWarning, stacklevel=3)
        if entry is None:
            self.pending = self.arm_restart
            return rest
        commit = self.face.checked_load(
            {k: v for k, v in entry.items() if k != PENDING})

        def write() -> None:
            commit()
            if self.reseed is not None:
                self.reseed.remove()
                self.reseed = None

        self.pending = write
        return rest

    def read(self, optimizer, state_dict: dict) -> tuple[dict | None, dict]:
        """``(the average's entry or None, the state dict torch loads)``; raises what is
        refused."""
        entry, rest = _params.split_entries(KEY, self.face, optimizer, state_dict)
        if entry is None and (not self.per_param or self.face.split):
            entry = rest.get(KEY)                # top level (a split's: gathered, full tensors)
            rest = {k: v for k, v in rest.items() if k != KEY}
            if entry is not None and not isinstance(entry, dict):
                raise TypeError(f"the optimizer state dict's {KEY!r} entry must be a "
                                f"{self.kind}'s state_dict(), got {type(entry).__name__}; "
                                f"nothing was loaded")
        _checks.check_groups(optimizer, rest)           # torch's own refusal, before the agreement
        _checks.check_broadcast(entry)                  # a torch before 2.13's broadcast of it
        return entry, rest

    def loaded(self, optimizer) -> None:
        """The load post-hook: torch took the rest; the checked average is written now (or its
        start-over armed), and the new live state marked."""
        pending, self.pending = self.pending, None
        self.gathered = None
        if pending is not None:
            pending()
        self.marked = _params.mark(KEY, self.face, optimizer, self.bare)

    def arm_restart(self) -> None:
        if self.reseed is None:
            self.reseed = self.optimizer.register_step_pre_hook(self.starting_over)

    def agree_present(self, entry: dict | None, err: BaseException | None = None) -> dict | None:
        """A sharded average's load: every rank of its mesh holds the average's entries, or none
        does (then every rank starts over); else, or where a rank refused its entries (``err``),
        every rank raises :class:`~fastema.torch._state.agree.Disagreement` (a ``ValueError``):
        one :func:`~fastema.torch._state.decisions.mesh_findings` over the mesh, under the process
        group's timeout."""
        groups = self.face.agreement.groups()
        if not groups:
            return entry
        what = f"optimizer.load_state_dict() of the attached {self.kind}"
        mine = (entry is not None, None if err is None else f"{type(err).__name__}: {err}")
        found = mesh_findings(mine, groups, waiting=(
            f"{what}: every rank's optimizer must have the average attached, and every rank "
            f"load; nothing was loaded here"))
        refuse_together(what, {rank: f[1] for rank, f in found.items()})
        held = [rank for rank, f in found.items() if f[0]]
        if held and len(held) < len(found):
            missing = [rank for rank in found if rank not in held]
            raise Disagreement(f"{what}: its entries are in the state dicts of some ranks and "
                               f"not of others (in: ranks {held}, not in: ranks {missing}, global "
                               f"ranks; this rank: {'in' if entry is not None else 'not in'} it): "
                               f"the ranks load different saves. Load one checkpoint on every "
                               f"rank; nothing was loaded, on every rank")
        return entry

    def starting_over(self, optimizer, args, kwargs) -> None:
        """The step pre-hook armed by a load without the average: start over from the weights."""
        if dummy_step(optimizer):
            return
        self.reseed.remove()
        self.reseed = None
        if not self.restart():
            warnings.warn(f"the attached {self.kind} already holds updates made in this "
                          f"process: it was kept as it is, not started over from the loaded "
                          f"weights", UserWarning, stacklevel=2)


def dummy_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step that runs is DCP's lr-0 dummy step: every group's lr is 0 and DCP's
    ``_init_optim_state`` (which steps an optimizer with no state only) made the call, however many
    frames between (wrappers of ``step``, ``torch.compile``'s runtime, a forwarding optimizer). The
    one rule of every form of ``step``; the stack is read only where every lr is 0."""
    if not _zero_lr(optimizer):
        return False
    call = _dcp.context()
    return call is not None and call.function == _dcp.INIT


def _zero_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Every group's lr is 0 (a float, or a host tensor: no device read), as DCP's dummy step
    sets."""
    for g in optimizer.param_groups:
        lr = g.get("lr", 0.0)
        if isinstance(lr, torch.Tensor):
            if lr.device.type != "cpu" or lr.numel() != 1 or lr.item() != 0:
                return False
        elif lr != 0:
            return False
    return True
