"""Where a model EMA's average lives: the placement part of the one option list
(:class:`fastema.average.EMAOptions` is the engine's options and these), declared here, beside the
engine and not in it.

The engine never reads a placement. A face turns it into a shadow (the torch face's picker,
``fastema.torch._placement.pick.make_shadow``: a storage, optionally split over replicas), and the
engine reads what that shadow declares it can do (:class:`fastema._shadow.Capabilities`:
``folds_later``, ``host_plan_only``, ``placement`` for the words of a refusal). A face whose shadow
always lives on its arrays' device (JAX, TensorFlow) refuses a placement by name
(:data:`PLACEMENT_REFUSALS`); the torch face's own placement argument ``shard_replicas=`` is not an
option of every face, and stays in its signature.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PLACEMENT_REFUSALS", "PlacementOptions"]

#: What a face that keeps its shadow where its arrays are refuses of the placement options, and why.
PLACEMENT_REFUSALS = {
    "offload": "offload='cpu' is the torch face's (pinned host memory, CUDA side streams); here "
               "the shadow lives on the device of the arrays it averages",
}


@dataclass(frozen=True)
class PlacementOptions:
    """The placement options (the last fields of :class:`fastema.average.EMAOptions`).

    Args:
        offload: ``"cpu"`` keeps the shadow in host memory (torch on a GPU), or ``None``.
    """

    offload: str | None = None

    def check_placement(self, device_step: bool | None, skip_nonfinite: bool) -> None:
        """The placement's own refusals, when the options are made (a callback's, at its
        construction): a value it does not know, and ``offload="cpu"`` with what needs the plan or
        the guard on the device (its folds run on a host thread; the engine refuses the same of any
        shadow that declares ``host_plan_only``)."""
        if self.offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {self.offload!r}")
        if self.offload and (device_step or skip_nonfinite):
            raise ValueError("offload='cpu' keeps the schedule on the host and folds on a worker "
                             "thread: it does not take device_step=True or skip_nonfinite=True; "
                             "drop one of them")
