"""Named, smoothed training metrics for plain loops, and the engine of the Keras and Lightning callbacks.

``Tracker(("loss", "acc"), ema=0.9, sma=50)`` keeps an EMA and a windowed SMA of each
named metric in one :class:`fastema.Smoother` (one kernel launch per update for all of
them). Updates stay on the device of the values and never sync; :meth:`Tracker.read`
brings every smoothed value to the host in one transfer, and :meth:`Tracker.update`
does that itself every ``every`` steps, for a progress bar::

    tracker = fastema.Tracker(["loss"], ema=0.98, sma=100, every=50)
    for step in tracker.progress(range(steps)):      # a tqdm bar showing loss_ema / loss_sma
        loss = train_step()
        tracker.update(loss=loss)                    # no host sync but one every 50 steps
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from . import _backends
from .smooth import Smoother

__all__ = ["Tracker"]


_EMA_KEYS = ("decay", "alpha", "span", "halflife", "com", "mode", "adjust")


def _ema_kwargs(ema) -> dict:
    """``ema=0.9`` is a decay (TensorBoard's smoothing weight); a dict gives pandas' parameters:
    one of decay/alpha/span/halflife/com, and optionally ``mode`` (or pandas' ``adjust``)."""
    if ema is None:
        return {}
    if isinstance(ema, dict):
        unknown = sorted(k for k in ema if k not in _EMA_KEYS)
        if unknown:
            raise TypeError(f"ema={ema!r}: unknown key(s) {unknown}; the EMA's keys are {', '.join(_EMA_KEYS)} "
                            f"(the SMA's window is sma=, min_periods= and nonfinite= are Tracker arguments)")
        out = dict(ema)
        if "adjust" in out:                                 # pandas' name: adjust=False is the seeded EMA
            adjust = out.pop("adjust")
            if not isinstance(adjust, bool):
                raise TypeError(f"ema['adjust'] must be True or False (pandas' ewm adjust=), got {adjust!r}")
            mode = "debiased" if adjust else "seeded"
            if out.setdefault("mode", mode) != mode:
                raise ValueError(f"ema={ema!r} gives adjust={adjust} and mode={out['mode']!r}, which disagree; "
                                 f"give one of them (adjust=False is mode='seeded', adjust=True is 'debiased')")
        return out
    if isinstance(ema, (int, float)) and not isinstance(ema, bool):
        return {"decay": float(ema)}
    raise TypeError(f"ema must be a decay in [0, 1), a dict such as {{'span': 50}}, or None; got {ema!r}")


class Tracker:
    """EMA and SMA of named metric streams, updated on the device, read in one sync.

    Args:
        names: the metrics, in order (``update`` takes them by keyword or position).
        ema: the EMA: a decay (``0.9``), a dict of :class:`Smoother` parameters
            (``{"span": 50}``, ``{"halflife": 20}``, and ``"mode"``: ``{"span": 50, "mode": "seeded"}``
            is pandas' ``ewm(span=50, adjust=False)``, which ``{"span": 50, "adjust": False}`` also
            gives), or None for none.
        sma: the SMA's window (number of updates), or None for none.
        every: :meth:`update` reads the smoothed values to the host every ``every`` updates
            (one transfer) and returns them, showing them on ``bar`` if one is set; None
            (default) never reads on its own.
        mode: the EMA's mode, as in :class:`Smoother` (default ``"debiased"``, pandas
            ``adjust=True``; ``"seeded"`` is ``adjust=False``); it may instead be given in ``ema``.
        min_periods, nonfinite: as in :class:`Smoother` (by default inf/NaN values are skipped,
            TensorBoard's rule).
        bar: a tqdm progress bar (or anything with ``set_postfix``) to show the values on.
    """

    def __init__(self, names: Sequence[str] = ("loss",), *, ema=0.9, sma: int | None = 50, every: int | None = None,
                 mode: str | None = None, min_periods: int = 1, nonfinite: str = "skip", bar=None):
        if isinstance(names, str):
            names = (names,)
        self.names = tuple(names)
        if not self.names or len(set(self.names)) != len(self.names) or \
                not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"names must be distinct non-empty strings, got {names!r}")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1 or None, got {every!r}")
        ema_kwargs = _ema_kwargs(ema)
        if mode is not None and ema_kwargs.setdefault("mode", mode) != mode:
            raise ValueError(f"mode={mode!r} and ema={ema!r} name two EMA modes; give the mode once")
        self.smoother = Smoother(**ema_kwargs, window=sma,
                                 min_periods=min(min_periods, sma) if sma else min_periods, nonfinite=nonfinite)
        self.every, self.bar = every, bar
        self.last: dict[str, float] = {}       # the values of the last read

    @property
    def count(self) -> int:
        """Updates so far."""
        return self.smoother.count

    def _stack(self, values: tuple, named: dict):
        if values and named:
            raise TypeError("give the metrics by position or by name, not both")
        if named:
            unknown = sorted(set(named) - set(self.names))
            missing = [n for n in self.names if n not in named]
            if unknown or missing:
                raise ValueError(f"this tracker follows {list(self.names)}; got unknown {unknown}, missing {missing}")
            values = tuple(named[n] for n in self.names)
        vec: Any = values[0] if len(values) == 1 else None
        # one vector of all the metrics: a NumPy array or a torch tensor (metric_vector: else None)
        vector = _backends.metric_vector(vec) if vec is not None and (len(self.names) > 1 or np.ndim(vec) == 1) \
            else None
        if vector is not None:
            if tuple(vec.shape) != (len(self.names),):
                raise ValueError(f"expected a vector of {len(self.names)} values ({list(self.names)}), "
                                 f"got shape {tuple(vec.shape)}")
            return vector
        if len(values) != len(self.names):
            whole = f" ({type(vec).__module__}.{type(vec).__qualname__} of shape {tuple(np.shape(vec))}): the " \
                    f"vector of them all must be a NumPy array or a torch tensor (np.asarray(values), a host " \
                    f"copy), or give one value per metric" if np.ndim(vec) == 1 else ""
            raise ValueError(f"expected {len(self.names)} values ({list(self.names)}), got {len(values)}{whole}")
        on_device = [_backends.keeps_on_device(v) for v in values]
        if all(on_device):                         # torch tensors: stacked on their device
            return _backends.stack(values, self.names)
        if any(on_device):
            raise TypeError("give all metrics as tensors (on one device) or all as numbers: a number next "
                            "to a GPU tensor would need a host transfer every step")
        out = np.asarray(values, dtype=np.float64)
        if out.shape != (len(self.names),):
            raise ValueError(f"each metric must be one number, got {values!r}")
        return out

    def update(self, *values, sample_weight=None, **named) -> dict[str, float] | None:
        """Add one value of each metric (tensors stay on their device; no host sync).

        Returns the smoothed values as host floats every ``every`` updates (one transfer),
        else None (always None with ``every=None``). ``sample_weight`` weighs this update (e.g.
        its sample count) as :meth:`Smoother.update` does: in the debiased EMA and the SMA (the
        ``"seeded"`` and ``"zeros"`` EMAs take a value of a positive weight as one step); a weight
        of 0 leaves the value out.
        """
        self.smoother.update(self._stack(values, named), sample_weight)
        if self.every is not None and self.smoother.count % self.every == 0:
            return self.read()
        return None

    def smoothed(self) -> dict[str, Any]:
        """``{name_ema: value, name_sma: value}`` as 0-d tensors/arrays on the device: no host sync."""
        out = {}
        for kind in ("ema", "sma"):
            if self._has(kind):
                vec = getattr(self.smoother, kind)
                out.update({f"{n}_{kind}": vec[i] for i, n in enumerate(self.names)})
        return out

    def _has(self, kind: str) -> bool:
        return (self.smoother.alpha if kind == "ema" else self.smoother.window) is not None

    def read(self) -> dict[str, float]:
        """The smoothed values as Python floats, in one device-to-host transfer."""
        parts = [getattr(self.smoother, k) for k in ("ema", "sma") if self._has(k)]
        flat = _backends.concat(parts).tolist()
        keys = [f"{n}_{k}" for k in ("ema", "sma") if self._has(k) for n in self.names]
        self.last = dict(zip(keys, flat))
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.last.items()}, refresh=False)
        return self.last

    def progress(self, iterable: Iterable, **tqdm_kwargs):
        """Wrap ``iterable`` in a tqdm progress bar that shows the smoothed values (needs tqdm)."""
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("Tracker.progress needs tqdm (pip install tqdm)") from None
        self.bar = tqdm(iterable, **tqdm_kwargs)
        return self.bar

    def state_dict(self) -> dict:
        return {"names": list(self.names), "every": self.every, "smoother": self.smoother.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: refused (ValueError naming what differs, nothing changed) where it
        is no Tracker's or follows other names (``every``, how often values are read, may differ)."""
        if not isinstance(state, dict) or not {"names", "every", "smoother"} <= set(state):
            raise ValueError("not a fastema.Tracker state dict (names, every and smoother): pass what "
                             "Tracker.state_dict() returned")
        names = state["names"]
        if not isinstance(names, (list, tuple)) or list(names) != list(self.names):
            raise ValueError(f"checkpoint tracker follows {names!r}, this one {list(self.names)}: make the Tracker "
                             f"with the names it was saved with")
        self.smoother.load_state_dict(state["smoother"])

    def __repr__(self) -> str:
        return f"Tracker(names={list(self.names)}, count={self.count}, last={self.last})"
