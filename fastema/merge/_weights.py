"""The weight styles of a checkpoint merge, their formulas in :func:`merge_weights`."""
from __future__ import annotations

import math
import random
import re
from typing import NamedTuple, Sequence

from ..schedules import WSM_SHAPES as _WSM
from ..schedules import wsm_coefficients

__all__ = ["STYLES", "Weights", "merge_weights", "parse_style"]

STYLES = ("uniform", "linear", "minus-sqrt", "ema:HALF_LIFE", "ema:DECAY", "wsm:linear", "wsm:cosine", "wsm:1-sqrt",
          "sigma_rel:X", "W0,W1,...")
"""The weight styles :func:`merge_weights` takes (``linear`` and ``minus-sqrt`` also with Megatron's
``__reverse`` or ``__scramble``)."""

_MEGATRON = {"linear": lambda x: 1.0 - x, "minus-sqrt": lambda x: 1.0 - math.sqrt(x)}
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


class Weights(NamedTuple):
    """The weights of one merge, one per input in the order given."""
    values: tuple        # normalised: they sum to 1
    style: str           # the style as given
    formula: str         # what was computed, one line (printed before a merge)
    raw: tuple           # the coefficients before normalisation


def parse_style(style) -> tuple:
    """``(kind, argument)`` of a style: ``("uniform", None)``, ``("megatron", (base, modifier))``,
    ``("ema", number)``, ``("wsm", decay)``, ``("sigma_rel", number)``, ``("list", [numbers])``;
    ValueError naming the style and the ones there are."""
    if not isinstance(style, str):
        try:
            values = [float(v) for v in style]
        except (TypeError, ValueError):
            raise ValueError(f"weights must be a style name or a list of numbers, got {style!r}") from None
        return "list", values
    text = style.strip()
    if text == "uniform":
        return "uniform", None
    base, _, modifier = text.partition("__")
    if base in _MEGATRON:
        if modifier not in ("", "reverse", "scramble"):
            raise ValueError(f"weights {style!r}: the modifiers are __reverse and __scramble (Megatron-LM's), got "
                             f"__{modifier}")
        return "megatron", (base, modifier or None)
    kind, sep, arg = text.partition(":")
    if sep and kind in ("ema", "sigma_rel"):
        if not _NUMBER.match(arg) or not (0 < float(arg) < math.inf):
            raise ValueError(f"weights {style!r}: {kind}: takes a number > 0"
                             + (" (a half-life in steps >= 1, or a decay per step in (0, 1))" if kind == "ema" else
                                " (the relative width of the target profile, EDM2's sigma_rel, e.g. 0.05)"))
        if kind == "ema" and float(arg) == 1.0:
            raise ValueError(f"weights {style!r}: 1 is neither a decay (< 1) nor a useful half-life; give a decay "
                             f"in (0, 1) or a half-life in steps > 1")
        return kind, float(arg)
    if sep and kind == "wsm":
        if arg not in _WSM:
            raise ValueError(f"weights {style!r}: WSM's decays are {', '.join('wsm:' + k for k in _WSM)}")
        return "wsm", arg
    if "," in text or _NUMBER.match(text):
        parts = [p for p in text.split(",")]
        if not all(_NUMBER.match(p) for p in parts):
            raise ValueError(f"weights {style!r}: an explicit list is numbers separated by commas, e.g. 0.1,0.2,0.7")
        return "list", [float(p) for p in parts]
    raise ValueError(f"unknown weights {style!r}; the styles are {', '.join(STYLES)} (linear and minus-sqrt also "
                     f"with __reverse or __scramble)")


def merge_weights(style, count: int, *, steps: Sequence[float] | None = None, seed: int = 0,
                  profiles: Sequence[tuple] | None = None, allow_negative: bool = False,
                  max_error: float | None = None) -> Weights:
    """The normalised weights of ``count`` inputs (oldest first) in ``style``: how much each of the
    K checkpoints counts.

    Every style gives raw coefficients ``c_0 .. c_{K-1}`` for the inputs in the order given (oldest
    first), normalised here to sum to 1; negative ones (unless ``allow_negative``), non-finite ones
    and a sum that is not positive are refused. Styles (``K`` inputs,
    ``s_i`` their steps):

    ``uniform``
        ``c_i = 1 / K`` (fairseq's ``average_checkpoints.py``; mergekit's ``linear`` with equal weights).
    ``linear``, ``minus-sqrt`` (Megatron-LM ``tools/checkpoint/weighted_merge.py``)
        a decay schedule ``f`` sampled at ``d_i = f(i / K)``, ``i = 0 .. K-1``, turned into
        coefficients ``c_{K-1} = d_{K-1}``, ``c_i = d_i - d_{i+1}`` (``0 < i < K-1``),
        ``c_0 = 1 - sum(c_1 ..)``; ``f(x) = 1 - x`` (``linear``: every ``c_i = 1/K``) or
        ``1 - sqrt(x)`` (``minus-sqrt``: the oldest checkpoint counts most). ``__reverse`` reverses
        the list, ``__scramble`` shuffles it with ``random.Random(seed)`` (Megatron's modifiers and
        spelling, e.g. ``minus-sqrt__reverse``).
    ``ema:HALF_LIFE`` or ``ema:DECAY``
        the EMA of the checkpoints taken at steps ``s_0 < s_1 < ...`` with a per-step decay ``b``
        (``DECAY`` in (0, 1), or ``b = 2 ** (-1 / HALF_LIFE)`` for a number >= 1), each update's
        decay compensated for the steps since the last one (``b ** (s_i - s_{i-1})``), started at
        the first checkpoint: ``c_0 = b ** (s_{K-1} - s_0)``,
        ``c_i = (1 - b ** (s_i - s_{i-1})) * b ** (s_{K-1} - s_i)``. They sum to 1.
    ``wsm:linear``, ``wsm:cosine``, ``wsm:1-sqrt`` (WSM, Tian et al., arXiv 2507.17634)
        the merge that emulates that learning-rate decay over the merged span: by WSM's theorem the
        merge ``sum_j c_j theta_j`` of checkpoints of a constant-LR run equals the last one trained
        with the gradient between checkpoints ``i-1`` and ``i`` scaled by ``w_i = sum_{j>=i} c_j``,
        so ``c_0 = 1 - w_1``, ``c_j = w_j - w_{j+1}``, ``c_{K-1} = w_{K-1}``. Here ``w_i`` is the
        mean of the decay ``f`` over that interval, positions ``x_j = (s_j - s_0) / (s_{K-1} - s_0)``
        (the steps when every input has one, else ``x_j = j / (K-1)``):
        ``w_i = (F(x_i) - F(x_{i-1})) / (x_i - x_{i-1})`` with ``F`` the antiderivative of
        ``f(x) = 1 - x``, ``(1 + cos(pi x)) / 2`` or ``1 - sqrt(x)``. ``wsm:linear`` over equal
        intervals is the trapezoid rule (half weights at both ends).
    ``sigma_rel:X``
        EDM2's post-hoc EMA (Karras et al., arXiv 2312.02696): the least-squares combination of the
        stored power-function profiles (one per row of each snapshot of fastema's post-hoc snapshot
        folders, at the snapshot's time) closest to the profile of width ``X`` at the last time
        (:func:`fastema.posthoc.solve`). Its coefficients may be negative: pass ``allow_negative``.
    an explicit list, ``"0.1,0.2,0.7"`` (or a sequence of numbers)
        ``c_i`` as given, one per input.

    Megatron's weights are reproduced exactly (its defaults: ``seed`` 0); ``ema:`` and ``wsm:``
    are fastema's. Deviations from the peers: every style is normalised (Megatron's and mergekit's
    explicit weights are used as given unless asked to normalise), and negative weights are refused
    unless asked for (Megatron warns and goes on).

    Args:
        style: a style name (``"uniform"``, ``"minus-sqrt__reverse"``, ``"ema:1000"``,
            ``"wsm:cosine"``, ``"sigma_rel:0.05"``, ``"0.2,0.3,0.5"``) or a list of numbers.
        count: the number of inputs.
        steps: each input's training step (``ema:`` needs them, increasing; ``wsm:`` uses them
            when given).
        seed: the shuffle of ``__scramble`` (``random.Random(seed)``, as Megatron-LM).
        profiles: ``(time, gamma)`` of each input, for ``sigma_rel:`` (post-hoc snapshots), or
            ``(time, gamma, run_id)``: the profiles of two runs, or one given twice, are refused.
        allow_negative: accept negative weights (else ValueError).
        max_error: ``sigma_rel:``'s largest relative L2 error (:func:`fastema.posthoc.solve`).

    Raises:
        ValueError: an unknown style, a list of the wrong length, steps missing or not
            increasing, weights that are not finite, negative (unless ``allow_negative``) or
            whose sum is not positive; the message names the style and the fix.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1 (the number of inputs), got {count!r}")
    kind, arg = parse_style(style)
    name = style if isinstance(style, str) else ",".join(f"{v:g}" for v in arg)
    if max_error is not None and kind != "sigma_rel":
        raise ValueError(f"max_error bounds the fit of sigma_rel: weights, and weights {name!r} fit nothing: drop it")
    if kind == "uniform":
        raw, formula = [1.0] * count, f"uniform: 1/{count} each"
    elif kind == "megatron":
        raw, formula = _megatron(arg[0], arg[1], count, seed)
    elif kind == "list":
        if len(arg) != count:
            raise ValueError(f"weights {name!r} gives {len(arg)} number(s) for {count} input(s): give one per input")
        raw, formula = list(arg), "as given"
    elif kind == "ema":
        raw, formula = _ema(arg, _steps(name, steps, count, required=True))
    elif kind == "wsm":
        raw, formula = _wsm(arg, _steps(name, steps, count, required=False), count)
    else:
        raw, formula = _sigma_rel(name, arg, profiles, count, max_error)
    return _normalised(name, raw, formula, allow_negative)


def _megatron(base: str, modifier, count: int, seed: int) -> tuple:
    f = _MEGATRON[base]
    if count <= 1:
        coefficients = [1.0] * count
    else:
        decay = [f(i / count) for i in range(count)]
        coefficients = [0.0] * count
        coefficients[-1] = decay[-1]
        for i in range(1, count - 1):
            coefficients[i] = decay[i] - decay[i + 1]
        coefficients[0] = 1 - sum(coefficients)
    if modifier == "reverse":
        coefficients = coefficients[::-1]
    elif modifier == "scramble":
        random.Random(seed).shuffle(coefficients)
    fx = "1 - x" if base == "linear" else "1 - sqrt(x)"
    what = {None: "", "reverse": ", reversed", "scramble": f", shuffled by random.Random({seed})"}[modifier]
    return coefficients, f"Megatron-LM {base}: d_i = {fx} at x = i/{count}, c_i = d_i - d_(i+1){what}"


def _steps(name: str, steps, count: int, required: bool):
    if steps is None or any(s is None for s in steps):
        if required:
            raise ValueError(f"weights {name!r} needs each input's step: pass steps= (--steps 1000,2000,...), or "
                             f"merge checkpoints that record it")
        return None
    s = [float(v) for v in steps]
    if len(s) != count:
        raise ValueError(f"{len(s)} step(s) given for {count} input(s): give one per input")
    if not all(math.isfinite(v) for v in s) or any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError(f"weights {name!r}: the steps {[int(v) if v.is_integer() else v for v in s]} must be finite "
                         f"and increase: list the inputs oldest first")
    return s


def _ema(value: float, s: list) -> tuple:
    b = value if value < 1 else 2.0 ** (-1.0 / value)
    last = s[-1]
    raw = [b ** (last - s[0])] + [(1 - b ** (s[i] - s[i - 1])) * b ** (last - s[i]) for i in range(1, len(s))]
    what = f"decay {value:g} per step" if value < 1 else f"half-life {value:g} steps (decay {b:.6g} per step)"
    return raw, f"EMA of the checkpoints, {what}, decay compensated for the steps between them"


def _wsm(decay: str, s, count: int) -> tuple:
    if count == 1:
        return [1.0], f"WSM {decay}: one checkpoint"
    if s is None:
        x = [j / (count - 1) for j in range(count)]
        where = "equally spaced"
    else:
        x = [(v - s[0]) / (s[-1] - s[0]) for v in s]
        where = "at the inputs' steps"
    raw = wsm_coefficients(decay, x)         # the formulas fastema.schedules.WSM folds in online
    return raw, f"WSM {decay} decay over the merged span ({where}): c_j = w_j - w_(j+1), w_i the decay's mean " \
                f"between checkpoints i-1 and i"


def _sigma_rel(name: str, sigma_rel: float, profiles, count: int, max_error) -> tuple:
    from ..posthoc import MAX_ERROR, same_run, solve
    from ..schedules import SIGMA_REL_MAX

    if profiles is None or len(profiles) != count or any(p is None for p in profiles):
        raise ValueError(f"weights {name!r} combines post-hoc EMA profiles: every input must be a snapshot folder (or "
                         f"snapshot) of fastema's PostHocEMA")
    if not sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"weights {name!r}: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f})")
    runs = sorted({"version-1 snapshots (no run id)" if same_run(p[2]) is None else f"run {same_run(p[2])}"
                   for p in profiles if len(p) > 2})
    if len(runs) > 1:
        raise ValueError(f"weights {name!r} combine the profiles of one training run, but the inputs hold the "
                         f"snapshots of {len(runs)} runs ({', '.join(runs)}): give one run's snapshots (its "
                         f"folder, or files of it)")
    seen: set = set()
    for p in profiles:
        if (p[0], p[1]) in seen:
            raise ValueError(f"weights {name!r}: two stored profiles are one (time {p[0]:g}, gamma {p[1]:.6g}): "
                             f"the snapshot of time {p[0]:g} is given twice; give each snapshot once")
        seen.add((p[0], p[1]))
    times = [p[0] for p in profiles]
    gammas = [p[1] for p in profiles]
    sol = solve(times, gammas, sigma_rel=sigma_rel, max_error=MAX_ERROR if max_error is None else max_error)
    return list(sol.coefficients), (f"EDM2 post-hoc EMA sigma_rel={sigma_rel:g} (gamma {sol.gamma:.4g}) at time "
                                    f"{sol.time:g} from {count} stored profiles: relative L2 error {sol.error:.3g}, "
                                    f"condition {sol.condition:.3g}")


def _normalised(name: str, raw: list, formula: str, allow_negative: bool) -> Weights:
    raw = [float(v) for v in raw]
    if not all(math.isfinite(v) for v in raw):
        raise ValueError(f"weights {name!r} are not all finite: {raw}")
    negative = [i for i, v in enumerate(raw) if v < 0]
    if negative and not allow_negative:
        shown = ", ".join(f"input {i}: {raw[i]:.6g}" for i in negative[:4])
        raise ValueError(f"weights {name!r} has negative weights ({shown}); a merge with negative weights "
                         f"extrapolates beyond the checkpoints: pass allow_negative=True (--allow-negative) if that is "
                         f"what you want")
    total = math.fsum(raw)
    if not total > 0:
        raise ValueError(f"weights {name!r} sum to {total:g}; they must sum to a number > 0 (some weight must be "
                         f"positive)")
    return Weights(tuple(v / total for v in raw), name, formula, tuple(raw))
