"""A :class:`~fastema.torch.PostHocEMA` run as its checkpoint keeps it (its checkpoint side's
core, passed to the EMA builder as ``run=``): the engine's plan and counters, the run's id, and
what a load must refuse of another run's checkpoint."""
from __future__ import annotations

import math
import numbers
import uuid

from ...average import Average
from ...posthoc import LEGACY_RUN_ID, valid_run_id
from ...schedules import gamma_to_sigma_rel, sigma_rel_to_gamma
from .dcp_calls import loading

__all__ = ["Run"]


def _describe(state) -> str:
    if not isinstance(state, dict):
        return repr(state)
    kind = state.get("kind")
    if kind == "constant":
        return f"a constant decay {state.get('decay')!r}"
    if kind == "power_function":
        return f"a power function of gamma {state.get('gamma')!r}"
    return f"a {kind} schedule"


class Run:
    """A PostHocEMA run as its checkpoint keeps it (the checkpoint side's core): the engine's plan
    and counters, and the run's id (its snapshots carry it; a resume takes the checkpoint's, a
    fastema 0.1 checkpoint, which has none, goes on as the legacy run); whether its folder was
    checked since construction or the last load; the snapshot due and not written yet (a failed
    write: the checkpoint keeps it as ``"due_snapshot"``, ``[time, updates]``, and a resume writes it
    at its next update; a checkpoint without one has none due)."""

    def __init__(self, core: Average, given: tuple):
        self.core, self.given = core, given
        self.shadow_dtype = core.shadow_dtype     # its averages' setting (CheckpointCore)
        self.id = uuid.uuid4().hex
        self.checked = False
        self.due: tuple | None = None            # (time, updates) of a snapshot due, not written

    @property
    def gammas(self) -> list[float]:
        return [float(s.gamma) for s in self.core.plan.schedules]

    @property
    def sigma_rels(self) -> tuple:
        if [sigma_rel_to_gamma(s) for s in self.given] == self.gammas:
            return self.given
        return tuple(gamma_to_sigma_rel(g) for g in self.gammas)

    def check_row(self, row: int) -> None:
        self.core.check_row(row)

    def plan_state(self) -> dict:
        state = {**self.core.plan_state(), "run_id": self.id}
        if self.due is not None and not loading():      # (dcp.load's template: no key a file may lack)
            state["due_snapshot"] = [float(self.due[0]), int(self.due[1])]
        return state

    def check_plan_state(self, state: dict, problems: list) -> None:
        self.core.check_plan_state(state, problems)      # the device plan's checks too (M4)
        run_id = state.get("run_id")
        if run_id is not None and not valid_run_id(run_id):
            problems.append(f"run_id must be the id of a PostHocEMA run, got {run_id!r}")
        if "due_snapshot" in state and _due(state) is None:
            problems.append(f"due_snapshot must be [time, updates] of a snapshot not written yet (a time > 0 up to "
                            f"last_time, updates 1 to the checkpoint's updates), got {state['due_snapshot']!r}: "
                            f"pass what state_dict() returned (a state without it has no snapshot due)")
        saved = state.get("schedules")
        if not isinstance(saved, list) or not saved:
            return                                        # the plan says what is wrong
        kinds = [s.get("kind") if isinstance(s, dict) else None for s in saved]
        mine = [round(s, 4) for s in self.sigma_rels]
        if any(k != "power_function" for k in kinds):
            described = ", ".join(_describe(s) for s in saved)
            problems.append(f"its averages are {described}, not power-function profiles: it is "
                            f"not a PostHocEMA checkpoint. This PostHocEMA tracks sigma_rels="
                            f"{mine}; load a checkpoint of a PostHocEMA of the same sigma_rels (a "
                            f"plain EMA's goes to an EMA)")
            return
        try:
            theirs = [float(s["gamma"]) for s in saved]
        except (KeyError, TypeError, ValueError):
            return                                        # the plan reports an unreadable schedule
        if len(theirs) != len(self.gammas) or \
                any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(theirs, self.gammas)):
            widths: list = []
            try:
                widths = [round(gamma_to_sigma_rel(g), 4) for g in theirs]
            except (OverflowError, ValueError):
                widths = [f"gamma={g!r}" for g in theirs]
            saved_g = [round(g, 3) for g in theirs]
            my_g = [round(g, 3) for g in self.gammas]
            problems.append(f"its profiles are sigma_rels={widths} (gammas {saved_g}), but "
                            f"this PostHocEMA tracks sigma_rels={mine} (gammas {my_g}). A run "
                            f"keeps its profiles (its snapshots are combined by them): make the "
                            f"PostHocEMA with sigma_rels={tuple(widths)} to resume that run")

    def load_plan_state(self, state: dict) -> None:
        self.core.load_plan_state(state)
        run_id = state.get("run_id")
        # the resumed run writes on into its snapshots; a fastema 0.1 checkpoint (no run id)
        # continues the legacy run: its snapshots go on beside the version-1 ones, read as one run
        self.id = LEGACY_RUN_ID if run_id is None else run_id
        self.checked = False                  # the folder is checked again for this run and time
        self.due = _due(state)                # the checkpoint's missed snapshot (the replaced state's goes)


def _due(state: dict) -> tuple | None:
    """``state``'s ``"due_snapshot"`` as ``(time, updates)``; None where it has none or it is not
    one this checkpoint's counters can have left (:meth:`Run.check_plan_state` refuses that)."""
    due = state.get("due_snapshot")
    if not isinstance(due, (list, tuple)) or len(due) != 2:
        return None
    (time, n), updates, last = due, state.get("updates"), state.get("last_time", 0.0)
    reals = all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (time, last))
    ints = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (n, updates))
    if not (reals and ints and math.isfinite(time) and 0 < time <= last and 1 <= n <= updates):
        return None
    return float(time), int(n)
