"""``fastema.torch.WindowAverage``: the mean of the last ``window`` snapshots of a model's weights,
or of all of them (SWA)."""
from __future__ import annotations

from typing import Any, Sequence, cast

import torch
from torch import nn

from .._shadow import AveragingShadow, WindowingShadow
from ..average import Cadence, document
from ..schedules import as_python
from ._face.average import TorchAverage
from ._face.contract import model_parts
from ._placement.pick import PLACEMENT_DOCS, Placement, Window, make_shadow
from ._state.entries import global_shape, lands_finite, local_part, staged
from ._tensors.hooks import match_names
from ._tensors.model import TorchModel
from ._tensors.selection import SELECTION_DOCS, Selection

__all__ = ["WindowAverage"]


class WindowAverage(TorchAverage):
    """The mean of the last ``window`` snapshots of a model's weights, or of all of them (SWA).

    ``window=W``: a ring of W flat snapshots per (device, dtype) group and a compensated
    float32 running sum; each snapshot is one kernel launch, and the mean stays within
    2 ulp of an exact recomputation over the ring however many snapshots pass.
    ``window=None``: the cumulative mean of every snapshot (stochastic weight averaging,
    ``avg <- avg + (w - avg) / (n + 1)``), no ring. The weights at construction are the
    first snapshot. Swap, ``average_parameters()``, ``copy_to``, checkpoints and ``save``
    behave as in :class:`EMA`.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped).
        window: snapshots in the window, or None for the cumulative mean.
        every: take a snapshot on every k-th call of ``update()`` (the first call snapshots).
        ring_dtype: ``"float32"`` or ``"bfloat16"`` snapshots (half the memory; each snapshot
            is rounded to bfloat16, the mean and the sum stay float32).
        {buffers}
        {exclude}
        {copy}
        {trainable_only}
        {shard_replicas}
            A window average split so keeps 1/N of the mean, of the running sums and of the ring
            (``window=W`` holds W snapshots: 1/N of them a rank), and ``state_dict()`` holds this
            rank's pieces (the ring's too).
    """

    _avg: AveragingShadow | WindowingShadow      # a cumulative mean's is averaging
    _core: None                         # a window average pushes snapshots: no engine

    def __init__(self, model: nn.Module, window: int | None, *, every: int = 1, ring_dtype: str = "float32",
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = (),
                 trainable_only: bool | None = None, shard_replicas: Any = False):
        window, every = as_python(window), as_python(every)     # a NumPy int: its Python int, as EMA takes it
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None (cumulative mean), got {window!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        self.window, self.ring_dtype = window, ring_dtype
        kind = type(self).__name__
        side = TorchModel(model, Selection(buffers, exclude, copy, trainable_only), kind=kind)
        rows = 1 if window is None else Window(window, ring_dtype)    # a cumulative mean is one float32 row
        shadow = make_shadow(side, rows, "float32", Placement.of(None, shard_replicas), kind=kind,
                             settings=f"{window};{every};{ring_dtype}")
        self._counts = counts = _Counts(side, window, ring_dtype, Cadence(every))
        super().__init__(model_parts(side, shadow, None, counts, "fastema.torch.WindowAverage",
                                     counts.cadence, counts.start_over))

    @property
    def every(self) -> int:
        """A snapshot on every ``every``-th call of ``update()``."""
        return self.cadence.every

    @property
    def snapshots(self) -> int:
        """Snapshots taken (the construction is the first)."""
        return self._counts.snapshots

    @property
    def count(self) -> int:
        """Snapshots in the average now."""
        return self.snapshots if self.window is None else min(self.snapshots, self.window)

    def update(self) -> None:
        """Take a snapshot of the model's weights (on every ``every``-th call)."""
        if self._attachment is not None:                  # attach(optimizer): its steps update
            self._attachment.refuse("update()")
        if torch.compiler.is_compiling():                 # one operator in the graph (see _compile)
            written, read = self.compiled.ops["update"]
            torch.ops.fastema.update_(written, read, self.compiled.handle, -1)
            return
        self._eager_update(None)

    def _eager_update(self, step: int | None) -> None:
        steps = self._steps
        if steps is not None and not steps.new():         # DeepSpeed: a micro-step inside gradient accumulation
            return
        due = self.cadence.due()
        self._side.begin(due)                             # refusals; when due, the model followed
        if due:
            if self.window is None:
                cast(AveragingShadow, self._avg).update(weight=1.0 / (self.snapshots + 1))
            else:
                cast(WindowingShadow, self._avg).push()
            self._side.copy_buffers()
            self._counts.snapshots += 1
        self.cadence.called()
        if steps is not None:
            steps.done()

    def __repr__(self) -> str:
        kind = "cumulative" if self.window is None else f"window={self.window}"
        return f"WindowAverage({kind}, snapshots={self.snapshots}, averaged={len(self._avg)} tensors)"



WindowAverage.__doc__ = document(WindowAverage.__doc__, SELECTION_DOCS, PLACEMENT_DOCS)

class _Counts:
    """What a window average's checkpoint keeps besides the model side's tensors (the checkpoint
    side's core): the calls, the snapshots taken, the settings, and the ring (``window=W``)."""

    shadow_dtype = "float32"                    # the mean's row (a window's checkpoint names none)

    def __init__(self, side: TorchModel, window: int | None, ring_dtype: str, cadence: Cadence):
        self.side, self.window, self.ring_dtype, self.cadence = side, window, ring_dtype, cadence
        self._ring: dict = {}                   # a load's ring parts, checked, till written
        self.snapshots = 1                      # snapshots taken (the construction is the first)

    def check_row(self, row: int) -> None:
        self.side.avg.check_row(row)

    def start_over(self) -> None:
        """The window from the model's weights as they are: one snapshot (after a DDP wrap)."""
        if self.window is None:
            self.side.avg.copy_from_sources()
        else:
            self.side.avg.restart()
        self.side.copy_buffers()
        self.snapshots = 1

    def plan_state(self) -> dict:
        avg = self.side.avg
        state: dict = {"calls": self.cadence.calls, "snapshots": self.snapshots, "window": self.window,
                       "every": self.cadence.every, "ring_dtype": self.ring_dtype}
        if self.window is not None:
            state["ring"] = staged(self.side, {n: avg.ring_view(n) for n in avg.names}, True)
            state["pushes"] = avg.pushes
        return state

    def check_plan_state(self, state: dict, problems: list) -> None:
        if (state.get("window"), state.get("ring_dtype")) != (self.window, self.ring_dtype):
            problems.append(f"checkpoint window/ring_dtype {state.get('window')!r}/{state.get('ring_dtype')!r}, "
                            f"this average {self.window!r}/{self.ring_dtype!r}")
            return
        counts = [("snapshots", 1), ("every", 1)] + ([("pushes", 1)] if self.window is not None else [])
        for key, least in counts:
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                problems.append(f"{key} must be an int >= {least}, got {v!r}")
        if self.window is not None:
            if not problems and state["pushes"] != state["snapshots"]:     # each snapshot is a push
                problems.append(f"pushes {state['pushes']!r} and snapshots {state['snapshots']!r} "
                                f"differ")
            self._ring = self._checked_ring(state, problems)

    def _checked_ring(self, state: dict, problems: list) -> dict:
        """This rank's part of each ring entry of ``state``, checked before anything is written: a
        floating tensor with values, of the ring's shape, finite as it lands in the ring's dtype
        where its average is (a snapshot holding inf or NaN makes the running sum so until the
        window rebuilds it: a finite average beside it is a damaged checkpoint)."""
        avg, side, parts = self.side.avg, self.side, {}
        ring, saved = state.get("ring"), state.get("averaged")
        matched = match_names(ring, avg.names)[0] if isinstance(ring, dict) else {}
        averaged = match_names(saved, avg.names)[0] if isinstance(saved, dict) else {}
        pushes = state.get("pushes")
        window = cast(int, self.window)                 # (a ring: a window's)
        filled = min(pushes, window) if isinstance(pushes, int) else window   # slots 0.. pushed
        for n in avg.names:
            v, dst = matched.get(n), avg.ring_view(n)
            want = global_shape(side, n, dst, True)             # no collective
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want):
                problems.append(f"ring {n!r} missing or of another shape")
            elif v.is_meta or not v.is_floating_point():
                meta = "meta " if v.is_meta else ""
                problems.append(f"ring {n!r} is a {meta}tensor of {v.dtype}, expected one holding "
                                f"floating values")
            else:
                try:
                    parts[n] = part = local_part(side, n, v, dst, True)
                    mean, rows = averaged.get(n), avg.state_view(n)
                    if not lands_finite(part[:filled], dst.dtype) and \
                            isinstance(mean, torch.Tensor) and \
                            lands_finite(local_part(side, n, mean, rows, True), mean.dtype):
                        problems.append(f"ring {n!r} holds inf or NaN (as it lands in "
                                        f"{self.ring_dtype}) where its average is finite: a "
                                        f"damaged checkpoint")
                except ValueError as e:              # a refusal, as the averages' (checkpoint.py)
                    problems.append(f"ring {n!r}: {e}")
        return parts

    def load_plan_state(self, state: dict) -> None:
        self.cadence.calls, self.cadence.every = int(state["calls"]), int(state["every"])
        self.snapshots = int(state["snapshots"])
        if self.window is not None:
            avg, parts, self._ring = self.side.avg, self._ring, {}
            with torch.no_grad():
                for n in avg.names:
                    avg.ring_view(n).copy_(parts[n])       # checked by check_plan_state
            avg.pushes = int(state["pushes"])
