"""The one list of a model EMA's options, and their checks.

Every face (:class:`fastema.torch.EMA`, :class:`fastema.jax.EMA`,
:class:`fastema.tensorflow.EMA`) and every callback (Keras, Lightning) validates its options
through :class:`EMAOptions`, so an option means the same everywhere and a bad value is
refused with the same words, when it is given (a callback's EMA is made when training
starts: its options are checked at the callback's construction).

A face that cannot run an option refuses it by name, with the reason
(:meth:`EMAOptions.refuse`): never a ``TypeError`` for an option another face takes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple

from .._checks import shadow_problems
from .._placement_options import PLACEMENT_REFUSALS, PlacementOptions
from ..schedules import BEMA, as_python
from ._plan import Plan

__all__ = ["EMAOptions", "HOST_ONLY_REFUSALS", "OPTION_DOCS", "SELECTION", "ShadowSettings", "document"]

#: The schedule options (passed to :class:`fastema.average.Plan`).
PLAN_OPTIONS = ("decay", "update_every", "compensate", "debias")

#: Options that choose which of a model's tensors are averaged: the torch face's model
#: adapter takes them (the JAX and TensorFlow faces average what they are given).
SELECTION = ("buffers", "exclude", "copy", "trainable_only")


#: What a face whose update runs eagerly with the plan on the host (JAX, TensorFlow) refuses, and
#: why: the placements (where the average lives: fastema._placement_options) and the plan on the
#: device.
HOST_ONLY_REFUSALS = {
    **PLACEMENT_REFUSALS,
    "device_step": "the plan on the device exists for CUDA-graph replays of torch's update(); this face updates "
                   "eagerly with the plan on the host, exact for every schedule: leave device_step unset",
}


class ShadowSettings(NamedTuple):
    """How a model EMA keeps and updates its shadow."""
    shadow_dtype: str
    rounding: str
    seed: int
    skip_nonfinite: bool


@dataclass(frozen=True)
class _EngineOptions:
    """The engine's options: the fields of :class:`EMAOptions` before the placement's."""

    decay: Any = None
    update_every: int = 1
    compensate: bool = False
    debias: bool = False
    shadow_dtype: str = "float32"
    rounding: str = "nearest"
    seed: int = 0
    skip_nonfinite: bool = False
    device_step: bool | None = None


@dataclass(frozen=True)
class EMAOptions(PlacementOptions, _EngineOptions):
    """A model EMA's options, checked together at construction: the engine's (the schedule, the
    shadow's dtype and rounding, the guard, where the plan lives) and the placement's (where the
    average lives: :class:`fastema._placement_options.PlacementOptions`, which the engine never
    reads; it reads what the shadow made of them declares). A number may be given as a NumPy
    scalar (``np.float32(0.99)``): it is kept as the Python number of its value, so states and
    checkpoints stay plain Python (:func:`fastema.schedules.as_python`).

    Args:
        decay: what the average follows, one knob: a float, or up to 8 floats for several averages
            kept in one pass (default 0.9999), or a schedule of :mod:`fastema.schedules` (or up to 8 of
            one kind): a warm-up (``NumUpdates(d)``, torch_ema's and TF's; ``PowerWarmup(d, ...)``,
            timm's, diffusers' and ema-pytorch's), EDM2's power-function profile
            (``PowerFunction.of(sigma_rel)``), a half-life (``HalfLife(h)``), bias-corrected EMA
            (``BEMA()``), a momentum schedule (``Cosine``, ``Linear``, ``PiecewiseConstant``: DINO's,
            I-JEPA's teacher momentum) or a merge schedule (``WSM``, ``EmaDecaySqrt``).
        update_every: update on every k-th call of ``update()`` (the first call updates).
        compensate: with ``update_every=k``, use ``decay**k``.
        debias: start from zero and divide out the bias (the first update copies).
        shadow_dtype: ``"float32"``, ``"same"`` or ``"bfloat16"`` (and ``"float16"``/``"float64"``).
        rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).
        seed: stochastic-rounding seed, an int in ``[0, 2**64)``.
        skip_nonfinite: skip an update (decided on the device) when a weight is inf/NaN.
        device_step: keep the plan in device memory (CUDA-graph replays); ``None``: the face's default.
        offload: ``"cpu"`` keeps the shadow in host memory (torch on a GPU), or ``None``.
    """

    def __post_init__(self):
        for f in fields(self):          # NumPy scalars as Python numbers (plain checkpoints); lists as tuples
            value = getattr(self, f.name)
            plain = as_python(tuple(value) if isinstance(value, list) else value)
            if plain is not value:
                object.__setattr__(self, f.name, plain)
        self.plan()                                   # the schedule's checks
        problems = shadow_problems(self.shadow_dtype, self.rounding, self.seed)
        if problems:
            raise ValueError(problems[0])
        if not isinstance(self.skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {self.skip_nonfinite!r}")
        if self.device_step is not None and not isinstance(self.device_step, bool):
            raise TypeError(f"device_step must be True, False or None, got {self.device_step!r}")
        self.check_placement(self.device_step, self.skip_nonfinite)
        if self.is_bema and self.device_step:
            raise ValueError("decay=BEMA(...) applies its bias correction after each update on the host's schedule: "
                             "it does not take device_step=True; drop it")

    @classmethod
    def of(cls, decay=None, /, **options) -> "EMAOptions":
        """The options of ``EMA(model, decay, **options)``: an unknown name is refused with the list."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown EMA option(s) {unknown}; the options are {', '.join(cls.names())}")
        return cls(decay, **options)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name, in the order of the signature."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(EMA options, model-selection options)`` of a callback's ``**ema_kwargs``; anything else
        is refused with the list of names."""
        unknown = sorted(set(options) - set(cls.names()) - set(SELECTION))
        if unknown:
            raise TypeError(f"unknown EMA option(s) {unknown}; the options are "
                            f"{', '.join(cls.names() + SELECTION)}")
        return ({k: v for k, v in options.items() if k not in SELECTION},
                {k: v for k, v in options.items() if k in SELECTION})

    @property
    def is_bema(self) -> bool:
        return isinstance(self.decay, BEMA) or (isinstance(self.decay, tuple) and any(isinstance(d, BEMA)
                                                                                     for d in self.decay))

    @property
    def shadow_rows(self) -> int:
        """Rows the shadow keeps: one per average, or 3 for BEMA (output, EMA, theta_0)."""
        return 3 if self.is_bema else len(self.plan().schedules)

    def plan(self) -> Plan:
        """A new :class:`fastema.average.Plan` (counters at zero) for these options."""
        options: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k in PLAN_OPTIONS[1:]
                                   for v in (getattr(self, k),)}
        return Plan(list(self.decay) if isinstance(self.decay, tuple) else self.decay, **options)

    def shadow(self) -> ShadowSettings:
        return ShadowSettings(self.shadow_dtype, self.rounding, self.seed, self.skip_nonfinite)

    def given(self) -> dict:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def refuse(self, face: str, reasons: Mapping[str, str]) -> None:
        """ValueError naming the first option given here that ``face`` cannot run, with its reason.

        ``reasons``: option name -> why ``face`` does not run it and what to do. An option left at
        its default is not refused, nor one switched off explicitly (``False`` where the default is
        ``None``: ``device_step=False``); ``device_step`` is refused only when ``True`` (``False`` and
        ``None`` mean the host plan)."""
        for name, why in reasons.items():
            value = getattr(self, name)
            default = next(f.default for f in fields(self) if f.name == name)
            off = value == default or (value is False and default is None)
            if (value is True) if name == "device_step" else not off:
                raise ValueError(f"{face} does not take {name}={value!r}: {why}")

    def replace(self, **changes) -> "EMAOptions":
        return dataclasses.replace(self, **changes)


#: Each option's text, written once: a face's docstring names an option on a line of its own
#: (``{decay}``) and :func:`document` puts the text there. The torch face adds its own
#: (``fastema.torch._tensors.selection.SELECTION_DOCS``, ``fastema.torch._placement.pick.PLACEMENT_DOCS``).
OPTION_DOCS = {
    "decay": """decay: what the average follows, one knob: a float, or up to 8 floats for several averages
    kept in one pass (default 0.9999); or a schedule of :mod:`fastema.schedules`, or up to 8 of
    one kind: a warm-up (``NumUpdates(d)``: ``min(d, (1+n)/(10+n))``, torch_ema's and TF's;
    ``PowerWarmup(d, min_decay, inv_gamma, power, update_after_step)``: timm's, diffusers' and
    ema-pytorch's), EDM2's power-function profile (``PowerFunction.of(sigma_rel)``, exact for any
    ``update_every`` or irregular ``update(step=)``; the first update copies), a half-life
    (``HalfLife(h)``: ``2 ** -(dt / h)`` for ``dt`` steps, or samples when ``update(step=)``
    counts samples), bias-corrected EMA (``BEMA()``: row 0 is the output
    ``EMA + alpha_t (theta_t - theta_0)``, row 1 the EMA, row 2 ``theta_0``; reads give row 0;
    not with ``device_step``), a momentum schedule (``Cosine``, ``Linear``, ``PiecewiseConstant``:
    DINO's, I-JEPA's teacher momentum) or a merge schedule (``WSM``, ``EmaDecaySqrt``).""",
    "update_every": """update_every: update on every k-th call of ``update()`` (the first call updates).""",
    "compensate": """compensate: with ``update_every=k``, use ``decay**k`` so the average spans the same time.""",
    "debias": """debias: start the average from zero and divide out the bias (optax ``debias=True``,
    pandas ``ewm(adjust=True)``); the first update then copies the weights.""",
    "shadow_dtype": """shadow_dtype: ``"float32"`` (default: bfloat16/float16 weights keep moving),
    ``"same"`` or ``"bfloat16"`` (and ``"float16"``, ``"float64"``).""",
    "rounding": """rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).""",
    "seed": """seed: stochastic-rounding seed, an int in ``[0, 2**64)``; with the step it gives the same
    bits on every rank.""",
    "skip_nonfinite": """skip_nonfinite: skip an update (decided on the device, no sync) when a weight is
    inf/NaN.""",
    "device_step": """device_step: keep the update count, the schedule's weights, ``update_every``'s skips
    and the stochastic-rounding key in device memory, advanced by a one-thread kernel at every
    call, so ``update()`` captured in a CUDA graph (or ``mode="reduce-overhead"``) replays the
    schedule exactly: N replays equal N eager calls bit for bit. ``None`` (default): on when the
    averaged weights are on a GPU. Every call then launches (a call that ``update_every`` skips
    writes nothing on the device). ``ema.updates`` and ``ema.calls`` count eager calls;
    ``state_dict()`` reads the device's counts.""",
}


def document(doc: str | None, *tables: Mapping[str, str]) -> str:
    """``doc`` with every line that is only ``{name}`` replaced by option ``name``'s text (from
    :data:`OPTION_DOCS` and ``tables``), indented as that line is (its continuation lines 4 more).
    An unknown name raises: a face documents only options that are written down once."""
    texts: dict = dict(OPTION_DOCS)
    for t in tables:
        texts.update(t)
    out = []
    for line in (doc or "").split("\n"):
        name = line.strip()
        if name.startswith("{") and name.endswith("}") and name[1:-1].isidentifier():
            indent = line[:len(line) - len(line.lstrip())]
            out += [indent + t for t in texts[name[1:-1]].split("\n")]
        else:
            out.append(line)
    return "\n".join(out)
