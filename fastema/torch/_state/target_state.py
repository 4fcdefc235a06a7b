"""A target network's checkpoint side (:class:`TargetState`, the part of
:class:`~fastema.torch.TargetNetwork` that :class:`~fastema.torch._state.checkpoint.TorchCheckpoint`
is of a model average): its counters and schedule, plain Python values, checked before one is
loaded; the averaged weights are the target's own tensors, which the user saves."""
from __future__ import annotations

from ..._checkpoint_format import check_header, load_refused
from ...average import Average, check_device_state
from ...schedules import MOMENTUM_SCHEDULES, Constant, NumUpdates, PowerWarmup, from_state
from .._tensors.pairs import TorchPairs

__all__ = ["FORMAT", "VERSION", "TargetState"]

FORMAT = "fastema.torch.TargetNetwork"
VERSION = 1

_MOMENTUMS = (Constant, NumUpdates, PowerWarmup, *MOMENTUM_SCHEDULES)   # what momentum= takes


class TargetState:
    """A target network's checkpoint side: its counters and its schedule, plain Python values, and
    the names it syncs (the averaged weights are the target's own tensors, which the user saves)."""

    def __init__(self, engine: Average, pairs: TorchPairs):
        self.engine, self.pairs = engine, pairs

    @property
    def names(self) -> dict[str, list[str]]:
        return dict(zip(("averaged", "copied", "integer"), (list(n) for n in self.pairs.sel.names)))

    def state_dict(self) -> dict:
        plan = self.engine.plan_now(replayed=True)     # replayed graphs advanced the device only
        return {"format": FORMAT, "version": VERSION, "plan": plan.state(),
                "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        engine = self.engine
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TargetNetwork.state_dict(), got "
                            f"{type(state).__name__}")
        check_header(state, FORMAT, VERSION, "pass what TargetNetwork.state_dict() returned")
        problems: list[str] = []
        names = state.get("names")
        if names != self.names:
            problems.append("the checkpoint's tensor names differ from these networks' (saved for "
                            "other networks, or with other exclude= / buffers=)")
        plan = state.get("plan")
        if not isinstance(plan, dict):
            problems.append("the checkpoint has no plan state")
        else:
            engine.plan.check_state(plan, problems)
            if not problems:                             # what TargetNetwork(...) itself refuses
                other = [s["kind"] for s in plan["schedules"]
                         if not isinstance(from_state(s), _MOMENTUMS)]
                if other:
                    problems.append(f"its schedule is {other[0]!r}, which momentum= does not "
                                    f"take (a float, a warm-up or a momentum schedule: Cosine, "
                                    f"Linear, PiecewiseConstant)")
                if plan["debias"]:
                    problems.append("its plan is debiased (debias=True), which a target network is "
                                    "not")
            if not problems and engine.device_plan is not None:
                check_device_state(engine.plan, plan, engine.seed, problems)
        if problems:
            raise load_refused("cannot load this TargetNetwork state: " + "; ".join(problems) + ".")
        engine.plan.load_state(state["plan"])
        if engine.device_plan is not None:
            engine.device_plan.load(engine.plan, engine.seed)
