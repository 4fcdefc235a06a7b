"""What the model EMAs share: option checks and the decay plan (fastema.torch, .jax,
.tensorflow), and for the framework EMAs (fastema.jax, fastema.tensorflow) the update
step and checkpoints of a FlatShadow's averages as NumPy arrays, validated before
anything is loaded."""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _backends
from ._average import check_header
from . import schedules as S


class ShadowSettings(NamedTuple):
    """How a model EMA keeps and updates its shadow (checked by :func:`make_plan`)."""
    shadow_dtype: str
    rounding: str
    seed: int
    skip_nonfinite: bool


def make_plan(decay, *, shadow_dtype: str, rounding: str, seed: int, skip_nonfinite: bool,
              **plan) -> tuple[S.Plan, ShadowSettings]:
    """Check a model EMA's decay, schedule and shadow options; its :class:`fastema.schedules.Plan`
    and :class:`ShadowSettings`."""
    problems = []
    check_shadow_settings(shadow_dtype, rounding, seed, problems)
    if problems:
        raise ValueError(problems[0])
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    return S.Plan(decay, **plan), ShadowSettings(shadow_dtype, rounding, seed, skip_nonfinite)


_PLAN_OPTIONS = ("warmup", "min_decay", "inv_gamma", "power", "update_after_step", "update_every", "compensate",
                 "debias", "sigma_rel", "half_life", "bema")


def check_options(decay, options: dict) -> None:
    """Check a model EMA's decay and options before the model exists (the Keras and Lightning
    callbacks make their EMA when training starts): a bad value is refused at construction."""
    shadow = {k: options.get(k, d) for k, d in (("shadow_dtype", "float32"), ("rounding", "nearest"),
                                                 ("seed", 0), ("skip_nonfinite", False))}
    make_plan(decay, **shadow, **{k: options[k] for k in _PLAN_OPTIONS if k in options})


def check_shadow_settings(shadow_dtype, rounding, seed, problems: list) -> None:
    """Append what is wrong with a shadow dtype / rounding / seed combination to ``problems``."""
    if rounding not in ("nearest", "stochastic"):
        problems.append(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    elif rounding == "stochastic" and shadow_dtype != "bfloat16":
        problems.append("rounding='stochastic' is for shadow_dtype='bfloat16'")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        problems.append(f"seed must be an int in [0, 2**64), got {seed!r}")


class PlanReader:
    """The read-only counters and settings every model EMA (torch, JAX, TensorFlow) shows of its
    ``self.plan``: one definition, so they read the same everywhere."""

    @property
    def decay(self) -> float | list[float]:
        """The decay(s) the next ``update()`` will use: Python floats, no device read."""
        return self.plan.decay

    @property
    def updates(self) -> int:
        """Updates made (calls skipped by ``update_every`` not counted)."""
        return self.plan.updates

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def norms(self) -> list:
        return self.plan.norms

    @property
    def schedules(self) -> list:
        return self.plan.schedules

    @property
    def update_every(self) -> int:
        return self.plan.update_every

    @property
    def compensate(self) -> bool:
        return self.plan.compensate

    @property
    def debias(self) -> bool:
        return self.plan.debias


class FrameworkEMA(PlanReader):
    """Base of fastema.jax.EMA and fastema.tensorflow.EMA: ``self._flat`` holds the averages of
    the floating sources in order; subclasses set ``_format`` and ``_shapes``."""

    _format = ""
    _version = 1
    _flat = None
    _shapes: list = []

    def _settings(self, plan: S.Plan, settings: ShadowSettings) -> None:
        self.plan = plan
        self.shadow_dtype, self.rounding, self.seed, self.skip_nonfinite = settings

    def _fold(self, pending: S.Pending, sources=None) -> None:
        """The update :meth:`fastema.schedules.Plan.next` described, from the sources (new objects,
        or None: as adopted), then recorded."""
        self._flat.update(weight=pending.weights, rounding=self.rounding, seed=self.seed, step=pending.n,
                          skip_nonfinite=self.skip_nonfinite, sources=sources)
        self.plan.done(pending)

    def state_dict(self) -> dict:
        """Everything needed to resume: averages keyed by name (NumPy copies, shape
        ``(rows, *shape)``), counters and settings. Plain Python and NumPy: it goes through
        pickle, ``np.savez``, orbax or flax serialization."""
        return {"format": self._format, "version": self._version, **self.plan.state(),
                "averaged": averaged_arrays(self._flat), "shadow_dtype": self.shadow_dtype,
                "rounding": self.rounding, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; checks everything first and changes nothing if anything is off."""
        load_averages(self, state, self._format, self._version, self._shapes)


to_host = _backends.to_host


def averaged_arrays(flat) -> dict:
    """``name -> (rows, *shape)`` NumPy copy of every source's averages."""
    return {name: to_host(flat.view(i, None)) for i, name in enumerate(flat.names)}


def load_averages(ema, state, fmt: str, version: int, shapes: list) -> None:
    """Validate a framework EMA's state dict (format, version, plan, every average's shape, dtype
    and finiteness), then load it into ``ema._flat`` and ``ema.plan``. Nothing changes on error."""
    check_header(state, fmt, version, "pass what EMA.state_dict() returned")
    problems: list[str] = []
    ema.plan.check_state(state, problems)
    if "rounding" not in state or "seed" not in state:
        problems.append("no 'rounding' or 'seed'")
    else:
        check_shadow_settings(ema.shadow_dtype, state["rounding"], state["seed"], problems)
    saved = state.get("averaged")
    if not isinstance(saved, dict):
        problems.append("no 'averaged' arrays")
        saved = {}
    wanted = list(ema._flat.names)
    missing = [n for n in wanted if n not in saved]
    extra = [n for n in saved if n not in wanted]
    if missing:
        problems.append(f"missing {missing[:5]}")
    if extra:
        problems.append(f"unexpected {extra[:5]}")
    arrays = {}
    for slot, (n, shape) in enumerate(zip(wanted, shapes)):
        if n not in saved:
            continue
        a = np.asarray(saved[n])
        expected = (ema.rows, *shape)
        if a.shape != expected:
            problems.append(f"{n} has shape {a.shape}, expected {expected}")
        elif a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            problems.append(f"{n} has dtype {a.dtype}, expected a floating dtype")
        elif not np.all(np.isfinite(a.astype(np.float32))):
            problems.append(f"{n} holds inf or NaN")
        arrays[slot] = a
    if problems:
        raise ValueError(f"{fmt} checkpoint does not match: " + "; ".join(problems) + ". Nothing was loaded.")
    for slot, a in arrays.items():
        for r in range(ema.rows):
            dst = ema._flat.view(slot, r)
            _backends.copy_from_host(dst, np.asarray(a[r]))
    ema.plan.load_state(state)
    ema.rounding, ema.seed = state["rounding"], state["seed"]
