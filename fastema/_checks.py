"""User-facing checks shared by the array functions, the shadows and the model averages:
one wording per rule, and the limits (:data:`MAX_DECAYS`) spelled once."""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np

from . import _backends
from ._backends import READ_ONLY_HINTS, Buf, describe, layout, overlaps
from ._launch import sr_noise
from .kernels.kinds import KIND_NAMES, MAX_ROWS

__all__ = ["MAX_DECAYS", "check_rounding", "check_seed", "check_written", "moded", "pair", "resolve_weights",
           "same_shape", "shadow_problems", "sr_key", "stochastic_rounding", "written_refusal"]

#: The most averages (shadow rows) one launch updates: the kernels keep one weight per row in registers.
MAX_DECAYS = MAX_ROWS


def check_rounding(rounding, shadow_dtype: str) -> None:
    """``rounding`` is ``"nearest"``, or ``"stochastic"`` for a bfloat16 shadow (``shadow_dtype``
    the shadow's dtype name; ``"same"`` counts as not bfloat16)."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and shadow_dtype != "bfloat16":
        raise ValueError(f"stochastic rounding is for bfloat16 shadows; this shadow is {shadow_dtype}: use "
                         f"rounding='nearest', or shadow_dtype='bfloat16'")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")


def shadow_problems(shadow_dtype: str, rounding, seed) -> list[str]:
    """What is wrong with a shadow dtype / rounding / seed combination (empty: nothing)."""
    problems = []
    for check in (lambda: check_rounding(rounding, shadow_dtype), lambda: check_seed(seed)):
        try:
            check()
        except ValueError as err:
            problems.append(str(err))
    return problems


# (saved, shadow): every value held exactly
_EXACT = {("float16", "float32"), ("float16", "float64"), ("bfloat16", "float32"),
          ("bfloat16", "float64"), ("float32", "float64")}


def load_dtype_problem(name: str, saved: Any, shadow: Any, state: dict, setting: Any) -> str | None:
    """Why an average saved as ``saved`` does not load into a shadow of dtype ``shadow`` (NumPy's,
    JAX's or torch's dtypes), or None. Where the state was written with another ``shadow_dtype``
    than this EMA's ``setting`` (its ``"shadow_dtype"`` entry; none: the same), an average its
    shadow would round is refused (a resume with another shadow dtype, which every face refuses),
    and one it holds exactly (the same dtype, a wider one, a ``"same"`` shadow of that dtype)
    loads. Arrays of another dtype in a state of this EMA's own setting are converted, their
    finiteness checked as they land."""
    resumed = state.get("shadow_dtype", setting) != setting
    a, b = (str(getattr(d, "name", d)).replace("torch.", "") for d in (saved, shadow))
    if not a.startswith("float") and a != "bfloat16":
        return f"{name} has dtype {a}, expected a floating dtype"
    if resumed and a != b and (a, b) not in _EXACT:
        return (f"{name} was saved as {a}, this EMA keeps it as {b} (shadow_dtype=), which would "
                f"round it: make the EMA with the shadow dtype it was saved with")
    return None


def _host_weights(values: Sequence, what: str, is_decay: bool) -> tuple:
    out = []
    for v in values:
        if type(v) is not float and (isinstance(v, bool) or not isinstance(v, (numbers.Real, np.floating,
                                                                                 np.integer))):
            raise TypeError(
                f"{what} must be a Python float in [0, 1], got {type(v).__name__}; to pass a value that "
                f"lives on the device (no host sync, CUDA-graph friendly) use weight= with a float32 "
                f"array holding 1 - decay")
        v = float(v)
        if not 0.0 <= v <= 1.0:              # also refuses NaN
            raise ValueError(f"{what} must be in [0, 1], got {v!r}")
        out.append(1.0 - v if is_decay else v)      # rounded to the kernel's type at launch
    return tuple(out)


def resolve_weights(decays, weights, count: int, device: str, written: Callable[[Buf], bool] | None = None):
    """The kernels' ``weights``: a tuple of Python floats (host values) or a device array view.

    Exactly one of ``decays`` (floats) and ``weights`` (floats, or a float32 array of
    ``count`` elements on ``device``) must be given. ``written(buf)``: whether the update writes
    any byte of ``buf`` (a device weight there is refused: the kernel would read weights it has
    already written).
    """
    if (decays is None) == (weights is None):
        raise TypeError("give exactly one of decay= and weight= (weight = 1 - decay)")
    if decays is not None:
        w = _host_weights(decays, "decay", True)
    elif isinstance(weights, (list, tuple, numbers.Real)):
        w = _host_weights(weights if isinstance(weights, (list, tuple)) else [weights], "weight", False)
    else:
        view = _backends.control_view(weights, "weight", np.float32, count, device, writable=False)
        if written is not None and written(describe(weights, "weight")):
            raise ValueError("weight shares memory with the shadow, which the update writes while it "
                             "reads the weight: give the weight an array of its own")
        return view
    if len(w) != count:
        raise ValueError(f"expected {count} decay value(s) (one per shadow row), got {len(w)}")
    return w


def stochastic_rounding(rounding: str, shadow_kind: int) -> bool:
    """Validate ``rounding`` for a shadow of ``shadow_kind``; True for stochastic."""
    if rounding == "nearest":
        return False
    check_rounding(rounding, KIND_NAMES[shadow_kind])
    return True


def sr_key(seed: int, step: int) -> int:
    """uint32 stochastic-rounding key of (seed, step); the same on every device and rank."""
    if not (isinstance(seed, numbers.Integral) and isinstance(step, numbers.Integral)) or seed < 0 or step < 0 \
            or seed >= 2 ** 64 or step >= 2 ** 63:
        raise ValueError(f"seed and step must be integers, seed in [0, 2**64) and step in [0, 2**63), got "
                         f"seed={seed!r}, step={step!r}")
    return sr_noise((seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF), step)


def pair(a, b, a_name: str, b_name: str, write_b: bool = False) -> tuple[Buf, Buf]:
    """``a`` (written) and ``b`` (read, or written with ``write_b``) described, on one device, writable,
    sharing no memory; or the error naming them."""
    s, x = describe(a, a_name), describe(b, b_name)
    for buf, name, write in ((s, a_name, True), (x, b_name, write_b)):
        if write and not buf.writable:
            hint = READ_ONLY_HINTS.get(buf.framework, "pass a writable array (it is updated in place)")
            raise ValueError(f"{name} is read-only: {hint}")
    if s.device != x.device:
        raise ValueError(f"{a_name} is on {s.device} but {b_name} is on {x.device}; "
                         f"put both on one device")
    if overlaps(s, x):
        raise ValueError(f"{a_name} and {b_name} share memory; give the shadow a buffer of its own")
    return s, x


def check_written(arrays: Sequence, names: Sequence) -> None:
    """Refuse what each array's framework refuses to write in place now, as its own in-place ops
    do (torch, as ``lerp_``: a leaf that requires grad in grad mode, an inference tensor outside
    inference mode): a ``RuntimeError`` in its words, with the fix. What is read is never refused."""
    why = written_refusal(arrays, names)
    if why is not None:
        raise RuntimeError(why)


def written_refusal(arrays: Sequence, names: Sequence) -> str | None:
    """:func:`check_written`'s message, or None where every array may be written now."""
    for x, name in zip(arrays, names):
        backend = _backends.backend_of(x)
        why = None if backend is None else backend.inplace_refusal(x, name)
        if why is not None:
            return why
    return None


def moded(x) -> bool:
    """Whether :func:`check_written` of ``x`` may say otherwise under other framework modes (torch:
    grad mode, inference mode) while ``x``'s layout guard holds: a cache rechecks it at a hit."""
    backend = _backends.backend_of(x)
    return backend is not None and backend.inplace_moded(x)


def same_shape(s: Buf, x: Buf, expected: tuple, a_name: str, b_name: str):
    """``s`` has shape ``expected`` and walks its memory in the order ``x`` does (``x``'s layout,
    with a leading row dimension when ``expected`` has one more), or the error saying the fix."""
    if s.shape != expected:
        raise ValueError(f"{b_name} has shape {x.shape} so {a_name} must have shape {expected}, "
                         f"got {s.shape}")
    if not s.strides and not x.strides:               # both C order: (K, *shape) rows of C-order sources
        return
    rows = len(expected) - len(x.shape)              # 1 for a (K, *shape) shadow of K rows
    order = layout(expected, (x.numel,) + x.order) if rows else x.order
    if s.order != order:
        raise ValueError(
            f"{a_name} and {b_name} are laid out differently in memory ({a_name} strides "
            f"{s.strides or 'C order'}, {b_name} strides {x.strides or 'C order'}): fastema walks both in "
            f"storage order, so give {a_name} the layout of {b_name} (torch.empty_like(src) or "
            f".to(memory_format=...) keeps it)")
