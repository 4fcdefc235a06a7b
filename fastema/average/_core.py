"""The model-average engine: when and in what order an EMA's update runs, and its checkpoint.

:class:`Average` holds a model EMA's options, its :class:`~fastema.average.Plan` and a
:class:`~fastema.flat.FlatShadow` of the model's floating tensors, and drives every update
the same way on every face: the plan says what the call does, the face's adapter hands the
current tensors over (or none: the shadow follows them itself), one kernel launch per
(device, dtype) group folds them in, BEMA's correction runs as one more launch, and the
plan records the call. It names no framework: the faces (:mod:`fastema.jax`,
:mod:`fastema.tensorflow`) are adapters that find the model's tensors and put values back.
Its checkpoint (:meth:`Average.state_dict`) is plain Python and NumPy, validated in full before
anything is loaded.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from .. import _backends
from .._checkpoint_format import check_header, refuse_load
from .._checks import load_dtype_problem, resolve_weights, shadow_problems, stochastic_rounding
from .._interrupts import ctrl_c_held
from .._shadow import Updatable
from ..flat import FlatShadow
from . import _nonfinite
from ._device_plan import DevicePlan
from ._device_plan import check_state as check_device_state
from ._options import EMAOptions
from ._plan import Pending, Plan

__all__ = ["Average", "Face", "ModelAdapter"]


class Face:
    """The read side every face built on an :class:`Average` (``self._core``) shares: its plan,
    counters and shadow settings, one definition so they read the same on every face. ``decay``,
    ``updates`` and ``rows`` are the conveniences; everything else is read on ``ema.plan``."""

    _core: "Average"

    @property
    def plan(self) -> Plan:
        """The schedule and the counters (:class:`fastema.average.Plan`): Python numbers, no device
        read but after compiled steps advanced them in the graph (:meth:`Average.plan_now`)."""
        return self._core.plan_now()

    @property
    def decay(self) -> float | list[float]:
        """The decay(s) the next ``update()`` will use: Python floats, read as :attr:`plan` is (:attr:`Plan.decay`)."""
        return self._core.plan_now().decay

    @property
    def updates(self) -> int:
        """Updates made (calls skipped by ``update_every`` not counted)."""
        return self._core.plan_now().updates

    @property
    def rows(self) -> int:
        """Averages kept (one per decay or profile; BEMA's output is one)."""
        return self._core.plan.rows

    @property
    def rounding(self) -> str:
        """``"nearest"`` or ``"stochastic"`` (as made, or as a loaded checkpoint says)."""
        return self._core.rounding

    @property
    def seed(self) -> int:
        """The stochastic-rounding seed (as made, or as a loaded checkpoint says)."""
        return self._core.seed

    @property
    def skip_nonfinite(self) -> bool:
        """Whether an update is skipped (decided on the device, no sync) when a tensor it reads holds inf/NaN; it
        may be switched between updates (not where the shadow folds on a host thread: an offloaded average)."""
        return self._core.skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {value!r}")
        if value:
            self._core.refuse_on_the_host("skip_nonfinite=True", "to guard its updates")
        self._core.skip_nonfinite = value


class FaceMemory:
    """``memory()`` and ``nbytes`` of a face whose average is all its :class:`Average` holds (the
    JAX and TensorFlow faces; the torch face counts its copies, backups and staging too)."""

    _core: "Average"

    def memory(self) -> dict[str, int]:
        """Bytes this average holds, by device: its shadow rows, launch tables and device plan (the
        model's own arrays are not counted). Sums to :attr:`nbytes`."""
        return self._core.memory()

    @property
    def nbytes(self) -> int:
        """Bytes this average holds on every device together (see :meth:`memory`)."""
        return sum(self.memory().values())


class FaceNonFinite:
    """``allow_nonfinite``, the setting of a face whose average is an :class:`Average`'s (the JAX
    and TensorFlow faces, Keras's JAX average); the torch faces keep their own."""

    _core: "Average"

    @property
    def allow_nonfinite(self) -> bool:
        """Whether an average holding inf or NaN is handed out (a swap in, ``copy_to()``, a read of the average)
        and loaded (with a warning) without a call's own ``allow_nonfinite=``: the default of every such call, and
        what a load another library makes reads (a checkpoint's restore, a callback's resume). False: refused,
        naming the tensors; see ``repair_nonfinite()`` and ``docs/guides/nonfinite.md``."""
        return self._core.allow_nonfinite

    @allow_nonfinite.setter
    def allow_nonfinite(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {value!r}")
        self._core.allow_nonfinite = value


class ModelAdapter(Protocol):
    """What the update driver asks of a face that checks and follows the model's tensors itself
    (the torch face: it compares the model's slots with the shadow's addresses once per update;
    a target network: both networks' slots against its pairs)."""

    def begin(self, due: bool) -> None:
        """Before an update call: refuse it (a swapped model, a capture the plan cannot replay), and
        when ``due`` (this call folds), follow moved tensors or refuse, before anything is written."""

    def scan(self, flags: dict | None) -> dict:
        """Non-finite flags of every tensor the update reads (device values, no sync)."""

    def carry(self, flags: dict | None) -> None:
        """After the update: the tensors carried along as they are (copied buffers), skipped where ``flags`` is set."""


class Average:
    """A model EMA over a shadow of the model's floating tensors: a :class:`~fastema.flat.FlatShadow`
    (fastema's own buffers), or a :class:`~fastema.pairs.PairShadow` (the average kept in the
    caller's tensors: a target network), or a torch face's placement; whatever it is, it holds to
    :class:`fastema._shadow.Updatable` (mypy checks it at each construction), and what it can do is
    read off its declared capabilities, never its kind.

    Args:
        options: the checked options (:class:`~fastema.average.EMAOptions`).
        fmt: the checkpoint's ``format`` (``"fastema.jax.EMA"``...).
        shadow: the shadow, one row per average (BEMA: three); see :meth:`of_sources`.
        shapes: each source's shape, as the checkpoint keeps it.
        adapter: a :class:`ModelAdapter` when the face checks the model's addresses itself before
            each update (then the shadow is updated unchecked); None: the shadow checks and follows
            the sources it is handed. The plan on the device (:meth:`plan_on_device`) needs one.

    A shadow whose ``update_checked`` only queues the fold (``folds_later = True``: the offloaded
    shadow of :mod:`fastema.torch`) is handed, after each call it queued, a function that puts
    the plan back as it was before that call (``shadow.queued(undo)``); when the fold fails, the
    shadow calls the undo of the first fold lost as it raises the error, so the counters stay
    those of the last fold that finished.

    A BEMA average keeps three shadow rows (the output, the EMA, ``theta_0``) and shows one
    (``plan.rows``): every read of row 0 is the output.
    """

    version = 1

    def __init__(self, options: EMAOptions, fmt: str, shadow: Updatable, shapes: Sequence = (),
                 adapter: ModelAdapter | None = None):
        self.options = options
        self.plan: Plan = options.plan()       # the schedule and the counters
        self.shadow_dtype, self.rounding, self.seed, self.skip_nonfinite = options.shadow()
        self.format = fmt
        self.shapes = [tuple(s) for s in shapes]
        self.shadow: Updatable = shadow         # FlatShadow, PairShadow, a torch placement
        self.adapter: ModelAdapter | None = adapter
        if self.skip_nonfinite:
            self.refuse_on_the_host("skip_nonfinite=True", "to guard its updates")
        self._weights_memo: tuple | None = None    # (groups, weights, rounding, weights_by_device's answer)
        self._bema = options.is_bema            # the options are frozen
        self.device_plan: DevicePlan | None = None   # see plan_on_device()
        self.allow_nonfinite = False            # inf or NaN handed out and loaded (_nonfinite)
        self.nonfinite_flags: dict = {}         # the non-finite scan's flags, by device, made once

    @classmethod
    def of_sources(cls, options: EMAOptions, sources: Mapping, shapes: Sequence, fmt: str) -> "Average":
        """An average with a new :class:`~fastema.flat.FlatShadow` of ``sources`` (``name -> tensor``;
        their values start it), one row per average (BEMA: three)."""
        return cls(options, fmt, FlatShadow(sources, rows=options.shadow_rows, dtype=options.shadow_dtype), shapes)

    @property
    def names(self) -> list:
        return list(self.shadow.names)

    def check_row(self, row: int) -> None:
        """``row`` is one of the averages shown (BEMA: only its output, 0)."""
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.plan.rows:
            raise IndexError(f"row must be an int in [0, {self.plan.rows}) (one per average), got {row!r}")

    # ------------------------------------------------------------ the update driver

    def update(self, step: int | None = None, read: Callable[[], Sequence | None] | None = None,
               skip_if: dict | None = None) -> None:
        """One ``update()`` call of every face: the plan says what it does (``step`` checked first, after compiled
        steps against the device's counters, as a plain call's time once a timed schedule took a step, and any
        call's before the first update, whose time the host keeps; nothing is recorded when a check refuses the
        call); the adapter, when there is one, checks and follows the model (:meth:`ModelAdapter.begin`); with the
        plan on the device every call launches (:meth:`fold_on_device`: the device skips what ``update_every``
        skips; after compiled steps the host's counts wait for :meth:`plan_now`), else a due call folds
        (:meth:`fold`) from ``read()`` (the model's tensors, or None), called only when the call updates.
        ``skip_if``: ``device -> int32[1]`` flags (``found_inf``, :mod:`fastema.torch._face.attach`): set, the
        call writes nothing on its device but is counted; host plan only."""
        plan = self.device_plan
        if plan is not None and skip_if is not None:
            raise ValueError("skip_if= goes with the plan on the host only (device_step=False)")
        now = plan is not None and plan.in_graph and (step is not None or plan.stepped or self.plan.first_time is None)
        pending = (self.plan_now() if now else self.plan).next(step)    # checks; records nothing
        adapter = self.adapter
        if plan is not None:                    # every call launches; the device skips
            assert adapter is not None          # (plan_on_device needs one)
            adapter.begin(True)
            self.fold_on_device(step, plan)
            if plan.in_graph:                   # counted on the device alone, as compiled steps are: no
                if now and pending.due and self.plan.first_time is None:    # (the device keeps no first time)
                    self.plan.first_time = pending.time
                return                          # read back per step (plan_now() reads where it is read)
        elif pending.due:
            if adapter is not None:
                adapter.begin(True)             # addresses checked (or refused) here
            self.fold(pending, None if read is None else read(), skip_if)
            return
        elif adapter is not None:
            adapter.begin(False)
        self.plan.done(pending)

    def plan_now(self, replayed: bool | None = False) -> Plan:
        """:attr:`plan`, its counters first read from the device (one sync) where compiled steps advance them in the
        graph alone (:attr:`DevicePlan.in_graph`) or, ``replayed``, wherever the plan is there (replays: for reads,
        never in a step); ``None``: the host's as they are."""
        device = self.device_plan
        if device is not None and replayed is not None and (device.in_graph or replayed):
            device.read_into(self.plan)
        return self.plan

    def fold(self, pending: Pending, sources: Sequence | None = None, skip_if: dict | None = None) -> None:
        """The update :meth:`fastema.average.Plan.next` described, from ``sources`` (None: as
        the shadow holds them), then recorded. Nothing is recorded when a check refuses it."""
        weights = pending.weights
        shadow, adapter, plan = self.shadow, self.adapter, self.plan
        # a shadow that folds later (offload) gets, with each fold it queued, the way back to the
        # plan before this call: when that fold fails on its worker, the counters follow the shadow
        before = plan.mark() if shadow.folds_later else None
        if self._bema:                          # rows: output <- theta_t, EMA, theta_0 (first update)
            weights = [1.0, weights[0], 1.0 if plan.first_time is None else 0.0]
        if adapter is None:
            shadow.update(weight=weights, rounding=self.rounding, seed=self.seed, step=pending.n,
                          skip_nonfinite=self.skip_nonfinite, sources=sources)
            flags = shadow.skipped if self.skip_nonfinite else None
        else:                                   # the face checked the addresses in this call
            flags = adapter.scan(skip_if) if self.skip_nonfinite else skip_if
            memo = self._weights_memo           # weights_by_device's memo, looked at here (the per-step path)
            by_device = memo[3] if (memo is not None and memo[0] is shadow.layout.groups and memo[1] == weights
                                    and memo[2] == self.rounding) else self.weights_by_device(weights)
            shadow.update_checked(by_device, self.rounding, self.seed, pending.n, flags)
        if self._bema:
            shadow.bias_correct(plan.alpha(pending), skip_if=flags)
        if adapter is not None:
            adapter.carry(flags)
        plan.done(pending)
        if before is not None:
            shadow.queued(functools.partial(plan.restore, before))

    def weights_by_device(self, weights: Sequence[float]) -> dict:
        """The kernels' weights per device (host floats, no device read), with the rounding checked
        against each group's shadow dtype; the last call's, when its weights, groups and rounding
        are this call's (a constant decay: every step)."""
        groups, memo = self.shadow.layout.groups, self._weights_memo
        if memo is not None and memo[0] is groups and memo[1] == weights and memo[2] == self.rounding:
            return memo[3]
        out = {}
        for g in self.shadow.layout.groups:
            if g.device not in out:
                out[g.device] = resolve_weights(None, weights, self.shadow.rows, g.device)
            stochastic_rounding(self.rounding, g.shadow_kind)
        self._weights_memo = (groups, list(weights), self.rounding, out)
        return out

    def fold_on_device(self, step: int | None, plan) -> None:
        """The launches of one ``update()`` call with the plan on the device (``plan``, a :class:`DevicePlan`):
        what a CUDA graph replays (no host value but ``step`` baked in). The plan step rides in each device's first
        lerp launch (``DevicePlan.carriers``), but behind a non-finite scan (run between the two). The adapter
        carries the rest behind the flags; a timed schedule's ``step`` marks the plan ``stepped``."""
        flags = plan.flags
        assert self.adapter is not None, "a plan on the device goes with an adapter (plan_on_device)"
        if self.skip_nonfinite:
            plan.advance(step)
            flags = self.adapter.scan(flags)
            self.shadow.update_checked(None, self.rounding, self.seed, 0, flags, plan=plan)
        else:
            if plan.uncarried:                  # the devices no lerp launch carries it for
                plan.advance(step, carried=True)
            self.shadow.update_checked(None, self.rounding, self.seed, 0, flags, plan=plan,
                                       given=-1 if step is None else step)
        self.adapter.carry(flags)
        if step is not None and self.plan.timed:
            plan.stepped = True

    def refuse_on_the_host(self, what: str, why: str) -> None:
        """ValueError naming ``what`` where the shadow folds on a host thread (it declares
        ``host_plan_only``: an offloaded one), which takes no device plan and no skip flags."""
        if self.shadow.host_plan_only:
            placement = self.shadow.placement or "this placement"
            raise ValueError(f"{what} does not go with {placement} (its folds run on a host "
                             f"thread, on the host's plan); make the average without {placement} "
                             f"{why}")

    def plan_on_device(self, also: Sequence = ()) -> None:
        """Keep the plan in device memory from now on (:class:`~fastema.average._device_plan.DevicePlan`
        over the shadow's groups; ``also``: ``(framework, device)`` of what the adapter carries
        where no group is), and compile and load every kernel an update launches now, not inside a
        first graph capture: one update against a scratch plan whose call is skipped, so every
        kernel runs and none writes. Refused where the shadow folds on a host thread."""
        self.refuse_on_the_host("device_step=True", "to replay its updates in CUDA graphs")
        groups = self.shadow.layout.groups
        self.device_plan = DevicePlan(self.plan, groups, self.seed, also=also)
        scratch = DevicePlan(self.plan, groups, self.seed, also=also)
        scratch.skip_next()
        self.fold_on_device(None, scratch)
        self.shadow.skipped = {}

    def refuse_nonfinite(self, what: str, row: int, allow: bool | None = None) -> None:
        """ValueError naming the tensors of average ``row`` holding inf or NaN, where the face's
        ``what`` (``"swap()"``...) would hand it out as a model, unless allowed (``allow``, None:
        :attr:`allow_nonfinite`): one scan on the shadow's devices (:mod:`._nonfinite`)."""
        _nonfinite.refuse(self, what, row, allow)

    def repair_nonfinite(self, live: Sequence) -> list[str]:
        """Every (tensor, row) holding inf or NaN <- ``live`` (the model's arrays in source order),
        rounded to the shadow's dtype; returns the names reset (:mod:`._nonfinite`)."""
        return _nonfinite.repair(self, live)

    def view(self, slot: int, row: int = 0):
        """Average ``row`` of source ``slot``, a view of the shadow in its dtype."""
        self.check_row(row)
        return self.shadow.view(slot, row)

    # ------------------------------------------------------------ checkpoints

    def plan_state(self) -> dict:
        """The plan's counters (read off the device where it counts) and the shadow settings."""
        self.plan_now(replayed=True)
        return {**self.plan.state(), "shadow_dtype": self.shadow_dtype, "rounding": self.rounding, "seed": self.seed}

    def check_plan_state(self, state: dict, problems: list) -> None:
        """Append to ``problems`` what keeps :meth:`plan_state`'s part of ``state`` from loading."""
        self.plan.check_state(state, problems)
        if "rounding" not in state or "seed" not in state:
            problems.append("no 'rounding' or 'seed'")
        else:
            problems += shadow_problems(self.shadow_dtype, state["rounding"], state["seed"])
        if self.device_plan is not None and not problems:   # before anything is written (M4)
            check_device_state(self.plan, state, state["seed"], problems)

    def load_plan_state(self, state: dict) -> None:
        """Load what :meth:`check_plan_state` passed."""
        self.plan.load_state(state)
        self.rounding, self.seed = state["rounding"], state["seed"]
        if self.device_plan is not None:
            self.device_plan.load(self.plan, self.seed)

    def memory(self) -> dict[str, int]:
        """Bytes this average holds by device: the shadow's buffers and launch tables (arrays of the
        framework or of NumPy, each with ``nbytes``) and the device plan's arrays."""
        out: dict[str, int] = {}
        arrays = []
        for g in self.shadow.layout.groups:
            t = g.tables
            arrays += [(g.device, g.buffer)] + [("cpu" if isinstance(a, np.ndarray) else g.device, a)
                                                for a in (t.shadow_addr, t.seg_addr, t.seg_offset, t.chunk_seg,
                                                          t.chunk_begin)]
        if self.device_plan is not None:
            arrays += [(str(getattr(a, "device", "cpu")), a) for a in self.device_plan.tensors()]
        for device, a in arrays:
            out[device] = out.get(device, 0) + int(getattr(a, "nbytes", 0))
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume: every shadow row of every source keyed by name (NumPy copies,
        ``(shadow rows, *shape)``), the counters and the settings. Plain Python and NumPy: it goes
        through pickle, ``np.savez``, orbax or flax serialization. Averages holding inf or NaN are
        named in a warning and listed under ``"nonfinite"`` (information: a load checks them; a
        finite average's state has no such entry)."""
        averaged = {name: _backends.to_host(self.shadow.view(i, None))
                    for i, name in enumerate(self.names)}
        bad = _nonfinite.saved(self, averaged)          # in the shadow's own dtype
        return {"format": self.format, "version": self.version, **self.plan_state(),
                "averaged": averaged, **({"nonfinite": bad} if bad else {})}

    def load_state_dict(self, state: dict, allow_nonfinite: bool | None = None) -> None:
        """Restore :meth:`state_dict`: format, version, plan, every array's shape, dtype and
        finiteness (as it lands in the shadow's dtype) are checked first; nothing changes if
        anything is off. Averages holding inf or NaN load where allowed (``allow_nonfinite``, None:
        :attr:`allow_nonfinite`), with a warning."""
        check_header(state, self.format, self.version, "pass what EMA.state_dict() returned")
        problems: list[str] = []
        self.check_plan_state(state, problems)
        saved = state.get("averaged")
        if not isinstance(saved, dict):
            problems.append("no 'averaged' arrays")
            saved = {}
        missing = [n for n in self.names if n not in saved]
        extra = [n for n in saved if n not in self.names]
        if missing:
            problems.append(f"missing {missing[:5]}")
        if extra:
            problems.append(f"unexpected {extra[:5]}")
        arrays = {}
        for slot, (n, shape) in enumerate(zip(self.names, self.shapes)):
            if n not in saved:
                continue
            a = np.asarray(saved[n])
            expected = (self.shadow.rows, *shape)
            if a.shape != expected:
                problems.append(f"{n} has shape {a.shape}, expected {expected}")
            elif wrong := load_dtype_problem(n, a.dtype, self.shadow.view(slot, 0).dtype, state,
                                              self.shadow_dtype):
                problems.append(wrong)
            else:
                arrays[slot] = a
        poisoned = _nonfinite.checked_load(self, arrays, problems, allow_nonfinite)
        refuse_load(self.format, problems)
        with ctrl_c_held():                     # a Ctrl-C here is raised once every row and the plan are in
            for slot, a in arrays.items():
                for r in range(self.shadow.rows):
                    _backends.copy_from_host(self.shadow.view(slot, r), np.asarray(a[r]))
            self.load_plan_state(state)
        if poisoned:
            _nonfinite.warn_loaded(self, poisoned)
