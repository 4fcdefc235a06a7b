"""``fastema.torch.WindowAverage``: the mean of the last ``window`` snapshots of a model's weights,
or of all of them (SWA)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..average.plan import Cadence
from ..flat import FlatShadow
from ..window import WindowShadow
from ._average import TorchAverage
from ._hooks import _match_names

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
        buffers, exclude, copy, trainable_only: as in :class:`EMA` (adapters only for a PEFT model;
            :meth:`export_peft` writes the averaged adapter).
    """

    _format = "fastema.torch.WindowAverage"

    def __init__(self, model: nn.Module, window: int | None, *, every: int = 1, ring_dtype: str = "float32",
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = (),
                 trainable_only: bool | None = None):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None (cumulative mean), got {window!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        self.window, self.every, self.ring_dtype = window, every, ring_dtype
        make = (lambda avg: FlatShadow(avg, dtype="float32")) if window is None else \
            (lambda avg: WindowShadow(avg, window, ring_dtype=ring_dtype))
        super().__init__(model, make, buffers=buffers, exclude=exclude, copy=copy, trainable_only=trainable_only)
        self.snapshots = 1                      # snapshots taken (the construction is the first)

    def _cadence(self) -> Cadence:
        return Cadence(self.every)

    @property
    def count(self) -> int:
        """Snapshots in the average now."""
        return self.snapshots if self.window is None else min(self.snapshots, self.window)

    def update(self) -> None:
        """Take a snapshot of the model's weights (on every ``every``-th call)."""
        if torch.compiler.is_compiling():                 # one operator in the graph (see _compile)
            written, read = self._ops["update"]
            torch.ops.fastema.update_(written, read, self._handle, -1)
            return
        self._eager_update(None)

    def _eager_update(self, step: int | None) -> None:
        steps = self._steps
        if steps is not None and not steps.new():         # DeepSpeed: a micro-step inside gradient accumulation
            return
        due = self.cadence.due()
        self._model.begin(due)                            # refusals, and when due the model followed
        if due:
            if self.window is None:
                self._avg.update(weight=1.0 / (self.snapshots + 1))
            else:
                self._avg.push()
            self._model.copy_buffers()
            self.snapshots += 1
        self.cadence.called()
        if steps is not None:
            steps.done()

    def _restart(self, model: nn.Module | None = None) -> None:
        if self.window is None:
            self._avg.copy_from_sources()
        else:
            self._avg.restart()
        self._model.copy_buffers()
        self.snapshots = 1

    def _extra_state(self) -> dict:
        state: dict = {"snapshots": self.snapshots, "window": self.window, "every": self.every,
                 "ring_dtype": self.ring_dtype}
        if self.window is not None:
            state["ring"] = self._staged({n: self._avg.ring_view(n) for n in self._avg.names}, True)
            state["pushes"] = self._avg.pushes
        return state

    def _check_extra(self, state: dict, problems: list) -> None:
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
            ring = state.get("ring")
            matched = _match_names(ring, self._avg.names)[0] if isinstance(ring, dict) else {}
            for n in self._avg.names:
                v = matched.get(n)
                want = self._global(n, self._avg.ring_view(n), True).shape
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want):
                    problems.append(f"ring {n!r} missing or of another shape")

    def _load_extra(self, state: dict) -> None:
        self.snapshots, self.every = int(state["snapshots"]), int(state["every"])
        if self.window is not None:
            ring = _match_names(state["ring"], self._avg.names)[0]
            with torch.no_grad():
                for n in self._avg.names:
                    dst = self._avg.ring_view(n)
                    dst.copy_(self._local_part(n, ring[n], dst, True))
            self._avg.pushes = int(state["pushes"])

    def __repr__(self) -> str:
        kind = "cumulative" if self.window is None else f"window={self.window}"
        return f"WindowAverage({kind}, snapshots={self.snapshots}, averaged={len(self._avg)} tensors)"
