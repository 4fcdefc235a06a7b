"""The host side of a model average's schedule: which calls update (:class:`Cadence`), what
the next call does (:class:`Pending`) and the decays, weights and counters (:class:`Plan`).

Pure Python numbers over the pure schedules of :mod:`fastema.schedules`: no framework, no
device read. :class:`fastema.average._device_plan.DevicePlan` keeps the same plan in device
memory for CUDA-graph replays.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .._checks import MAX_DECAYS
from ..schedules import (
    BEMA,
    MERGE_SCHEDULES,
    MOMENTUM_SCHEDULES,
    Constant,
    HalfLife,
    NumUpdates,
    PowerFunction,
    PowerWarmup,
    as_python,
    check_count,
    check_decay,
    check_step,
    compensated,
    debiased_weight,
    from_state,
    merged_weight,
)

__all__ = ["Cadence", "Mark", "Pending", "Plan"]


class Cadence:
    """Which calls of ``update()`` update: the first, then every ``every``-th. It counts the
    calls it is told were made (:meth:`called`), so a refused call counts nothing."""

    def __init__(self, every: int = 1):
        every = as_python(every)            # a NumPy int: the Python int in the checkpoints
        check_count("update_every", every, 1)
        self.every = every
        self.calls = 0                      # update() calls, skipped ones included

    def due(self) -> bool:
        """True when the next call updates."""
        return self.calls % self.every == 0

    def called(self) -> None:
        """Record a call that was made (an update or a skipped call)."""
        self.calls += 1


class Pending(NamedTuple):
    """What the call about to be made does, from :meth:`Plan.next`; nothing is recorded until
    :meth:`Plan.done`."""
    due: bool              # False: a call skipped by update_every (weights unused)
    n: int                 # the schedule's step
    weights: list          # w = 1 - decay (or the debiased weight), one per average
    decays: list
    norms: list
    time: float = 0.0      # the training time of this call (timed schedules)


_tuple_new = tuple.__new__


class Mark(NamedTuple):
    """The plan's counters at one moment (:meth:`Plan.mark`), to go back to (:meth:`Plan.restore`)
    when an update recorded since then is lost (an offloaded fold that failed on its worker)."""
    calls: int
    updates: int
    norms: list
    last_decays: list
    first_time: float | None
    last_time: float


STEP_SCHEDULES = (Constant, NumUpdates, PowerWarmup)         # decay(n) of the update count
TIMED_SCHEDULES = (PowerFunction, HalfLife, BEMA)             # over training time (see fastema.schedules)
_TIMED = TIMED_SCHEDULES + MERGE_SCHEDULES                     # what Plan.next() reads as timed (a per-step path)


def _schedule_of(d):
    """One average's schedule: a number is :class:`Constant`; a schedule is itself."""
    if isinstance(d, STEP_SCHEDULES + TIMED_SCHEDULES + MOMENTUM_SCHEDULES):
        return d
    check_decay("decay", d)
    return Constant(d)


def _merge_every_problem(schedule, every: int) -> str | None:
    """Why ``update_every=every`` cannot go with the merge schedule ``schedule`` (None: it can)."""
    if not isinstance(schedule, MERGE_SCHEDULES) or every == 1:
        return None
    return (f"{type(schedule).__name__}(...) is a merge schedule: it counts each checkpoint at its step, and "
            f"update_every={every} skips calls, so it misses checkpoints; leave update_every at 1 (the calls "
            f"between checkpoints already write nothing)")


class Plan:
    """The decay side of a model EMA, shared by the framework bridges.

    Holds the schedules (one per average), the update count, ``update_every`` with its
    optional compensation, and the debiasing normalisers, and turns "update now" into
    the kernels' weights ``w = 1 - decay`` (or the debiased weights). Everything is a
    Python number: no device is read. :meth:`state` / :meth:`load_state` carry it
    through checkpoints.

    Args:
        decay: a float, or up to 8 floats (one per average), or a schedule, or up to 8 schedules of
            one kind: a warm-up (:class:`~fastema.schedules.NumUpdates`,
            :class:`~fastema.schedules.PowerWarmup`), a schedule over training time
            (:class:`~fastema.schedules.PowerFunction`, EDM2's ``sigma_rel``;
            :class:`~fastema.schedules.HalfLife`; one :class:`~fastema.schedules.BEMA`), a momentum
            schedule (:class:`~fastema.schedules.Cosine`, ``Linear``, ``PiecewiseConstant``) or a
            merge schedule (:class:`~fastema.schedules.WSM`, ``EmaDecaySqrt``: checkpoint merging
            online, their running totals kept in ``norms``). Default 0.9999.
        update_every: update on every k-th call (the first call updates).
        compensate: with ``update_every=k``, use ``decay ** k`` (schedules of the update count only).
        debias: zero-init debiasing (:func:`debiased_weight`).
    """

    def __init__(self, decay=None, *, update_every: int = 1, compensate: bool = False, debias: bool = False):
        compensate, debias = as_python(compensate), as_python(debias)      # (a NumPy bool: a bool)
        for name, flag in (("compensate", compensate), ("debias", debias)):
            if not isinstance(flag, bool):          # ("no" read as True: momentum**k without a word)
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        cadence = Cadence(update_every)
        given = [0.9999] if decay is None else list(decay) if isinstance(decay, (list, tuple)) else [decay]
        if not 1 <= len(given) <= MAX_DECAYS:
            raise ValueError(f"1 to {MAX_DECAYS} decays (one per average), got {len(given)}")
        schedules = [_schedule_of(d) for d in given]
        kind = type(schedules[0])
        if any(type(d) is not kind for d in schedules):
            raise ValueError(f"decay= takes one kind of schedule for every average, got "
                             f"{', '.join(type(d).__name__ for d in schedules)}; for a constant decay d beside "
                             f"them give the same kind held at d (e.g. Linear(d, d, 1), PowerWarmup(d, ...))")
        if isinstance(schedules[0], TIMED_SCHEDULES):
            if compensate:
                raise ValueError(f"decay={kind.__name__}(...) is a schedule over training time, exact for any update "
                                 f"interval: it takes no compensate=; drop it")
            if kind is BEMA and (len(schedules) > 1 or debias):
                raise ValueError("decay=BEMA(...) keeps one average (its output, the EMA and theta_0 in three "
                                 "rows) and starts from a copy of the weights: give one BEMA, and no debias=")
        elif isinstance(schedules[0], MOMENTUM_SCHEDULES):
            if isinstance(schedules[0], MERGE_SCHEDULES) and (compensate or debias):
                raise ValueError(f"decay={kind.__name__}(...) is a weighted average of the samples normalised by "
                                 f"their total weight, a function of the step: it takes no "
                                 f"{'compensate=' if compensate else 'debias='} (it is never biased); drop it")
            problem = _merge_every_problem(schedules[0], cadence.every)
            if problem:
                raise ValueError(problem)
        self.schedules: list = schedules
        self.cadence = cadence              # counts the calls (shared with a model average that asks it)
        self.compensate, self.debias = compensate, debias
        self.updates = 0                    # updates made
        self.norms = [0.0] * self.rows      # debiasing normalisers
        self.last_decays = [0.0] * self.rows
        self.first_time: float | None = None    # time of the first update (timed schedules)
        self.last_time = 0.0                # time of the last update (0 before any)
        self._fixed: tuple = (None, [], [])  # (schedules, decays, weights) when they are Constant ones

    @property
    def timed(self) -> bool:
        """True for schedules over training time (see the module docstring)."""
        return isinstance(self.schedules[0], TIMED_SCHEDULES + MERGE_SCHEDULES)

    @property
    def reads_steps(self) -> bool:
        """Whether the decays depend on the steps given to ``update(step=)`` (not where every
        schedule is a constant: ranks passing other steps then fold the same decays)."""
        return not all(type(s) is Constant for s in self.schedules)

    def time_of(self, step: int | None) -> float:
        """The training time of the next call: ``step`` if given, else the calls so far + 1."""
        return float(self.calls + 1 if step is None else step)

    @property
    def rows(self) -> int:
        return len(self.schedules)

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        return self.cadence.calls

    @property
    def update_every(self) -> int:
        return self.cadence.every

    def decay_at(self, i: int, n: int, t: float | None = None) -> float:
        s = self.schedules[i]
        if self.timed:
            t = self.time_of(None) if t is None else t
            if isinstance(s, MERGE_SCHEDULES):          # a merge schedule: the running total's
                return 1.0 - merged_weight(s.weight(t), self.norms[i])[0]
            return s.between(self.first_time, self.last_time, t)
        d = s(n)
        return compensated(d, self.cadence.every) if self.compensate else d

    @property
    def decay(self) -> float | list[float]:
        """The decay(s) the next update will use if made by the next call with no ``step=`` (what
        :meth:`next` gives it). Where a schedule over training time would refuse that call (the last
        update was at a ``step=`` past the calls so far: the next call needs one), the decay(s) of an
        update at the last update's step, the earliest step the next call may take (1.0 where such an
        update folds nothing: a half-life's, a power function's, a merge schedule's)."""
        past = self.timed and self.time_of(None) < self.last_time
        d = list(self.next(int(self.last_time) if past else None).decays)     # records nothing
        return d[0] if len(d) == 1 else d

    def alpha(self, pending: Pending) -> float:
        """BEMA's bias-correction factor for the update ``pending`` describes."""
        return self.schedules[0].alpha(self.first_time, pending.time)

    def next(self, step: int | None = None) -> Pending:
        """What the next ``update()`` call does: whether it is due (the first call, then every
        ``update_every``-th), the schedule's step ``n`` (``step`` if given, else the update
        count) and the kernels' weights. ``step`` is checked; nothing is recorded: pass the
        result to :meth:`done` once the call has been made, so a refused call changes nothing."""
        n = self.updates + 1 if step is None else check_step(step)
        t = float(self.cadence.calls + 1 if step is None else step)    # self.time_of(step), inlined
        schedules = self.schedules                      # one pass per kind of schedule (a per-step path)
        fixed = self._fixed
        if fixed[0] is schedules and not (self.compensate or self.debias):      # constant decays: as last time
            cadence = self.cadence
            return _tuple_new(Pending, (cadence.calls % cadence.every == 0, n, fixed[2], fixed[1], self.norms, t))
        if isinstance(schedules[0], _TIMED):
            if t < self.last_time:
                raise ValueError(f"step={step} is before the last update's time {self.last_time:g}: a schedule "
                                 f"over training time needs steps that do not go back")
            if isinstance(schedules[0], MERGE_SCHEDULES):
                return self._merge_next(n, t)
            decays = [s.between(self.first_time, self.last_time, t) for s in schedules]
        elif self.compensate:
            every = self.cadence.every
            decays = [compensated(s(n), every) for s in schedules]
        else:
            decays = [s(n) for s in schedules]
        norms = self.norms                               # never changed in place: a new list when debiased
        if self.debias:
            norms, weights = list(norms), []
            for i, d in enumerate(decays):
                w, norms[i] = debiased_weight(d, norms[i])
                weights.append(w)
        else:
            weights = [1.0 - d for d in decays]
            if all(type(s) is Constant for s in schedules) and not self.compensate:
                self._fixed = (schedules, decays, weights)  # never changed in place (see done, mark)
        cadence = self.cadence                          # Pending(cadence.due(), ...) without its Python __new__
        return _tuple_new(Pending, (cadence.calls % cadence.every == 0, n, weights, decays, norms, t))

    def _merge_next(self, n: int, t: float) -> Pending:
        """:meth:`next` for merge schedules: each row's sample weight at ``t`` folded in with its
        running total (kept in ``norms``, :func:`~fastema.schedules.merged_weight`); a call whose
        weights are all 0 is not due (it would write nothing), as one ``update_every`` skips, nor a
        call at the last update's step (``update(step=global_step)`` per micro-batch): a checkpoint
        counts once."""
        if self.updates and t == self.last_time:
            return Pending(False, n, [0.0] * self.rows, [1.0] * self.rows, self.norms, t)
        raw = [s.weight(t) for s in self.schedules]
        norms, weights = list(self.norms), []
        for i, a in enumerate(raw):
            w, norms[i] = merged_weight(a, norms[i])
            weights.append(w)
        due = self.cadence.calls % self.cadence.every == 0 and any(a != 0.0 for a in raw)
        return Pending(due, n, weights, [1.0 - w for w in weights], norms, t)

    def done(self, pending: Pending) -> None:
        """Record the call :meth:`next` described: counted, and its update when it was due."""
        if pending.due:
            self.last_decays, self.norms = pending.decays, pending.norms
            self.updates += 1
            if self.first_time is None:
                self.first_time = pending.time
            self.last_time = pending.time
        self.cadence.calls += 1                 # self.cadence.called(), without a call more per step

    def mark(self) -> Mark:
        """The counters now, for :meth:`restore` (the schedules themselves never change with an update)."""
        return Mark(self.cadence.calls, self.updates, list(self.norms), list(self.last_decays), self.first_time,
                    self.last_time)

    def restore(self, mark: Mark) -> None:
        """Go back to the counters of :meth:`mark`: the calls recorded since then never happened."""
        self.cadence.calls, self.updates = mark.calls, mark.updates
        self.norms, self.last_decays = list(mark.norms), list(mark.last_decays)
        self.first_time, self.last_time = mark.first_time, mark.last_time

    def state(self) -> dict:
        return {"calls": self.calls, "updates": self.updates, "norms": list(self.norms),
                "schedules": [s.state() for s in self.schedules], "update_every": self.update_every,
                "compensate": self.compensate, "debias": self.debias,
                "first_time": self.first_time, "last_time": self.last_time}

    def refuse_other_options(self, state: dict, who: str, also: tuple = ()) -> None:
        """ValueError, before anything is loaded, where a saved ``state`` was made with options this
        plan was not (its decays, ``update_every``, ``compensate``, ``debias``; ``also``: the
        caller's own such differences). A load takes them from the state; a callback resuming one
        (``who``: its name) with options of its own refuses them rather than drop its own."""
        diffs = list(also)
        try:                                       # (as the load reads them: a field added since, its default)
            saved = [from_state(s) for s in state.get("schedules")]     # type: ignore[union-attr]
        except (AttributeError, KeyError, TypeError, ValueError):
            saved = None                           # unreadable: the load's own check names it
        if saved is not None and len(saved) == self.rows and saved != list(self.schedules):   # (another count: the
            diffs.insert(0, f"decays {[s.state() for s in saved]} where this callback's are "   # load's)
                            f"{[s.state() for s in self.schedules]}")
        for key, have in (("update_every", self.update_every), ("compensate", self.compensate),
                          ("debias", self.debias)):
            if key in state and state[key] != have:
                diffs.append(f"{key}={state[key]!r} where this callback's is {have!r}")
        if diffs:
            raise ValueError(f"the {who} average was saved with {' and '.join(diffs)}; give {who} the options it "
                             f"was saved with. Nothing was loaded")

    def check_state(self, state: dict, problems: list) -> None:
        """Append to ``problems`` what keeps ``state`` from loading here."""
        saved = state.get("schedules")
        if not isinstance(saved, list) or len(saved) != self.rows:
            n = len(saved) if isinstance(saved, list) else saved
            problems.append(f"checkpoint has {n} decay(s), this EMA {self.rows}")
            return
        try:
            schedules = [from_state(s) for s in saved]
            check_count("updates", state["updates"])
            check_count("calls", state["calls"])
            if state["updates"] > state["calls"]:             # each update is a call
                raise ValueError(f"updates ({state['updates']}) must be at most calls ({state['calls']})")
            check_count("update_every", state["update_every"], 1)
            problem = _merge_every_problem(schedules[0], state["update_every"])    # saved before it was refused
            if problem:
                problems.append(problem)
            norms = [float(x) for x in state["norms"]]
            if len(norms) != self.rows:
                raise ValueError(f"{len(norms)} norms for {self.rows} decays")
            if not all(math.isfinite(n) and n >= 0 for n in norms):
                raise ValueError(f"norms must be finite and >= 0, got {norms}")
            for key in ("compensate", "debias"):
                if not isinstance(state[key], bool):
                    raise ValueError(f"{key} must be a bool, got {state[key]!r}")
            first, last = state.get("first_time"), state.get("last_time", 0.0)
            if first is not None and not math.isfinite(float(first)):
                raise ValueError(f"first_time must be finite, got {first!r}")
            if not (math.isfinite(float(last)) and float(last) >= 0):
                raise ValueError(f"last_time must be finite and >= 0, got {last!r}")
            if isinstance(schedules[0], _TIMED) and first is not None and float(first) > float(last):
                # (time never goes back where it is read; a step schedule's update(step=) may)
                raise ValueError(f"first_time ({first!r}) must be at most last_time ({last!r})")
        except KeyError as err:
            problems.append(f"schedule state has no {err.args[0]!r}")
        except (TypeError, ValueError) as err:
            problems.append(f"schedule state unreadable ({err})")

    def load_state(self, state: dict) -> None:
        self.schedules = [from_state(s) for s in state["schedules"]]
        self.cadence.calls, self.updates = int(state["calls"]), int(state["updates"])
        self.norms = [float(x) for x in state["norms"]]
        self.cadence.every = int(state["update_every"])      # in place: a model average shares the cadence
        self.compensate, self.debias = bool(state["compensate"]), bool(state["debias"])
        first = state.get("first_time")       # absent in checkpoints before the timed schedules
        self.first_time = None if first is None else float(first)
        self.last_time = float(state.get("last_time", 0.0))
