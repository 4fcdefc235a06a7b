"""The torch-face contract: what every torch face is built from, and the one base that takes it.

A face is three things: a *side* (the tensors it reads and writes, followed as the model changes:
:class:`~fastema.torch._tensors.model.TorchModel` for a model average,
:class:`~fastema.torch._tensors.pairs.TorchPairs` for a target network's two networks), a *builder*
(a function that makes the face's parts before the face exists: :class:`FaceParts`) and the *face*
(a subclass of :class:`TorchFace`: its arguments, its ``update()``, its reads). Every part is
complete when made and is handed to the face at once; the face hands itself to nobody while it is
being made. :class:`TorchFace` shows the compiled-step contract as ``face.compiled``
(:class:`fastema.torch._face.compiled.Compiled`), made from the parts once the face is complete.

The model averages (:class:`~fastema.torch.EMA`, :class:`~fastema.torch.WindowAverage`,
:class:`~fastema.torch.PostHocEMA`) share :func:`model_parts`: after a face's builder has made its
side, its shadow (:func:`~fastema.torch._placement.pick.make_shadow`) and its engine, it makes the
average's agreement, its swap and copy-out (:class:`~fastema.torch._swap.ShadowSwap`), the restart
after a DDP wrap (:class:`Restart`), attaches them to the side, and makes the checkpoint side.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from ..._shadow import AveragingShadow, Shadow, Updatable, WindowingShadow
from ...average import Average, Cadence, DevicePlan, ModelSwap, Plan
from .._state.agree import Agreement, plan_digest
from .._state.checkpoint import CheckpointCore, TorchCheckpoint
from .._state.nonfinite import NonFinite
from .._state.peft import announce
from .._swap import ShadowSwap
from .._tensors.model import TorchModel, static
from .compiled import Compiled
from .lowered import Lowered

__all__ = ["CheckpointSide", "Engine", "FaceParts", "FaceSide", "ModelParts", "Restart", "TorchFace",
           "model_parts", "with_lowered"]


class FaceSide(Protocol):
    """What the face base reads of its side (:class:`~fastema.torch._tensors.model.TorchModel`,
    :class:`~fastema.torch._tensors.pairs.TorchPairs`): the compiled step's read of the tensors."""

    def read_from(self, read: list) -> Callable[[], None]: ...


class Engine(Protocol):
    """The update driver a face calls (:class:`fastema.average.Average`): ``update()`` makes the
    plan's call, checks and follows the side, and launches through the shadow (``Updatable``)."""

    @property
    def device_plan(self) -> DevicePlan | None: ...

    def update(self, step: int | None = None, read: Callable[[], Sequence | None] | None = None,
               skip_if: dict | None = None) -> None: ...

    def plan_now(self, replayed: bool | None = False) -> Plan: ...


class CheckpointSide(Protocol):
    """A face's checkpoint side (a model average's
    :class:`~fastema.torch._state.checkpoint.TorchCheckpoint`, a target network's counters)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FaceParts(NamedTuple):
    """Everything a torch face is built from, made by its builder before the face exists.

    ``side``: the tensors read and written (a model side, or a target network's pairs); ``shadow``:
    where the average lives (:mod:`fastema._shadow`'s protocols); ``engine``: the update driver
    (:class:`~fastema.average.Average`; None for a window average, which pushes snapshots);
    ``checkpoint``: the checkpoint side (a model average's
    :class:`~fastema.torch._state.checkpoint.TorchCheckpoint`, a target network's counters);
    ``swap``: the swap and copy-out (:class:`~fastema.torch._swap.ShadowSwap`; None for a target
    network, which writes no model); ``cadence``: counts ``update()`` calls; ``ops``: the compiled
    operators' lists (see :class:`~fastema.torch._face.compiled.Compiled`); ``lowered``: the
    update written in a compiled graph (:class:`~fastema.torch._face.lowered.Lowered`; an EMA's,
    or None)."""

    side: FaceSide
    shadow: Shadow | Updatable
    engine: Engine | None
    checkpoint: CheckpointSide
    swap: ShadowSwap | None
    cadence: Cadence
    ops: Callable[[], dict]
    lowered: Lowered | None = None


class ModelParts(NamedTuple):
    """A model average's parts (:func:`model_parts`; :class:`FaceParts`' fields, of the types a
    model average reads): its side a :class:`~fastema.torch._tensors.model.TorchModel`, its shadow
    one of :mod:`fastema._shadow`'s (an EMA's ``AveragingShadow``, a window average's
    ``WindowingShadow``), its engine :class:`~fastema.average.Average` (None for a window average),
    its checkpoint side a :class:`~fastema.torch._state.checkpoint.TorchCheckpoint`, its swap a
    :class:`~fastema.torch._swap.ShadowSwap`."""

    side: TorchModel
    shadow: AveragingShadow | WindowingShadow
    engine: Average | None
    checkpoint: TorchCheckpoint
    swap: ShadowSwap
    cadence: Cadence
    ops: Callable[[], dict]
    lowered: Lowered | None = None


class Parts(Protocol):
    """What :class:`TorchFace` takes: :class:`FaceParts` or :class:`ModelParts` (read-only fields,
    so a part of a narrower type fits)."""

    @property
    def side(self) -> FaceSide: ...

    @property
    def shadow(self) -> Shadow | Updatable: ...

    @property
    def engine(self) -> Engine | None: ...

    @property
    def checkpoint(self) -> CheckpointSide: ...

    @property
    def swap(self) -> ShadowSwap | None: ...

    @property
    def cadence(self) -> Cadence: ...

    @property
    def ops(self) -> Callable[[], dict]: ...

    @property
    def lowered(self) -> Lowered | None: ...


class TorchFace:
    """The one base of fastema's torch faces: it takes the :class:`FaceParts` its builder made
    (``_side``, ``_avg``, ``_core``, ``_checkpoint``, ``_swap``: the swap state, ``cadence``) and
    makes ``compiled`` (:class:`~fastema.torch._face.compiled.Compiled`), the documented compiled-step
    contract: a subclass sets its own fields first, and calls ``TorchFace.__init__`` last, so the
    face is complete when its eager update is handed out. It defines ``_eager_update(step)``."""

    _eager_update: Callable[[int | None], None]      # its update(): checks, schedule, launches
    # the parts, typed by what they are; a face narrows them to the types its builder makes
    # (an EMA's _core is an Average, its _avg an AveragingShadow: mypy follows its update())
    _side: FaceSide
    _avg: Shadow | Updatable
    _core: Engine | None
    _checkpoint: CheckpointSide
    _swap: ModelSwap | None

    def __init__(self, parts: Parts):
        self._side = parts.side
        self._avg = parts.shadow
        self._core = parts.engine
        self._checkpoint = parts.checkpoint
        self._swap = None if parts.swap is None else parts.swap.state
        self.cadence = parts.cadence                     # counts update() calls
        self.compiled = Compiled(parts.ops, self._eager_update, parts.side.read_from,
                                 eager_copy_to=None if parts.swap is None else parts.swap.copy_to,
                                 swap=self._swap, lowered=parts.lowered)

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        if self._core is not None:
            self._core.plan_now()                        # counted on the device by compiled steps
        return self.cadence.calls

    def __copy__(self):
        raise TypeError(f"a {type(self).__name__} cannot be copied: its kernel tables hold the "
                        f"addresses of the tensors it reads and writes. Make a new one of the "
                        f"(copied) model and load this one's state: "
                        f"new.load_state_dict(old.state_dict())")

    def __deepcopy__(self, memo):
        self.__copy__()


class Restart:
    """What a DDP wrap after construction does to a model average (its side's restart, see
    :attr:`~fastema.torch._tensors.model.TorchModel.resync`): start the averages over from the
    model's weights (``start_over()``), unless something but the construction went into them (an
    ``update()`` call, ``calls()``, or a swap in); then False."""

    def __init__(self, calls: Callable[[], int], swap: ShadowSwap, start_over: Callable[[], None]):
        self.calls, self.swap, self.start_over = calls, swap, start_over

    def __call__(self) -> bool:
        if self.calls() or self.swap.state.swapped:
            return False
        self.start_over()
        return True


class _WithWritten:
    """The model side's operator lists with the tensors every update writes besides its shadows
    (the device plan's arrays): made now, and again when the side has made new lists (a changed
    model, followed in an eager call), in plain Python Dynamo traces (a ``torch.compile``-d
    function reading them first after a change)."""

    def __init__(self, side: TorchModel, written: list):
        self.side, self.written = side, static(written)
        self.of: dict = {}
        self.made: dict = {}
        self()

    def __call__(self) -> dict:
        ops = self.side.ops
        if not self.written:
            return ops
        if ops is not self.of:
            written, read = ops["update"]
            self.made = {"update": (written + self.written, read), "swap": ops["swap"],
                         "copy_to": ops["copy_to"]}
            self.of = ops
        return self.made


def model_parts(side: TorchModel, shadow: AveragingShadow | WindowingShadow,
                engine: Average | None, core: CheckpointCore, fmt: str, cadence: Cadence,
                start_over: Callable[[], None], *,
                device_step: bool = False) -> ModelParts:
    """The parts of a model average, once its builder has made ``side`` (not attached yet), its
    ``shadow`` and its ``engine`` (or None) with ``core``, what its checkpoint keeps besides the
    tensors: the agreement, the swap and copy-out, the restart after a DDP wrap
    (``start_over``), the side attached to all of them, the plan put on the device
    (``device_step``: every kernel compiled and loaded now), the checkpoint side (``fmt``) and the
    compiled operators' lists (the device plan's arrays are written by every update too)."""
    kind = side.kind

    def calls(replayed: bool | None = False) -> int:
        """``update()`` calls so far: the device's count where compiled steps counted them there
        alone, or, ``replayed``, wherever the plan is on the device (CUDA graph replays too; a sync
        on a GPU: :meth:`Average.plan_now`, for reads, never in a step); ``replayed=None``: the
        host's count as it is (a stream's check between its two reads of the device)."""
        return cadence.calls if engine is None else engine.plan_now(replayed).calls

    def counters() -> int:
        """A digest of the host plan's counters (ranks that passed other ``update(step=)`` differ
        there): host numbers, read at reads only, after ``calls()``; a window's: 0 (its calls say it)."""
        return 0 if engine is None else plan_digest(engine.plan.state(), times=engine.plan.reads_steps)
    agreement = Agreement(side, kind, calls, counters)
    nonfinite = NonFinite(side, agreement)                  # inf or NaN: named, refused, repaired
    swap = ShadowSwap(side, agreement, core.check_row, nonfinite)
    side.attach(shadow, check=functools.partial(swap.state.refuse, "update()"),
                restart=Restart(calls, swap, start_over))
    ops: Callable[[], dict] = _WithWritten(side, [])
    if device_step:
        assert engine is not None                       # a window average has no device plan
        engine.plan_on_device()
        assert engine.device_plan is not None
        plan = engine.device_plan.tensors()
        ops = _WithWritten(side, [t for t in plan if isinstance(t, torch.Tensor)])
    if side.defaulted:
        announce(kind, shadow)                   # trainable_only=None on PEFT: what is averaged
    checkpoint = TorchCheckpoint(side, core, fmt, swap=swap.state, agreement=agreement,
                                 nonfinite=nonfinite)
    return ModelParts(side, shadow, engine, checkpoint, swap, cadence, ops)


def with_lowered(parts: ModelParts) -> ModelParts:
    """``parts`` (an EMA's: its update is the face's own) with the plain case's update written in a
    compiled graph (:class:`~fastema.torch._face.lowered.Lowered`) where the plan is on the device,
    its lists made now and again whenever the operators' lists are; else ``parts`` as they are."""
    engine = parts.engine
    if engine is None or engine.device_plan is None:
        return parts
    lowered = Lowered(parts.side, engine, parts.swap.state)
    parts.side.lowering = lowered.refresh               # told whenever the lists are made again
    lowered.refresh()
    return parts._replace(lowered=lowered)
