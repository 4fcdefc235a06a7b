"""What every schedule shares: numbers kept as plain Python (:func:`as_python`) and the checks of
their arguments, one wording per rule."""
from __future__ import annotations

import numbers
from dataclasses import fields

import numpy as np


def as_python(value):
    """``value`` with each NumPy scalar (``np.float32(0.99)``, ``np.int64(100)``, ``np.bool_``) as the
    Python number of its value, in a list or tuple too; anything else as it is, for the caller's checks.

    NumPy scalars pass the checks as numbers (``numbers.Real`` / ``numbers.Integral``); kept as they
    are, they would reach the checkpoints, which must stay plain Python (``json.dumps``,
    ``torch.load(weights_only=True)``, ``tf.train.Checkpoint``). So the schedules (:func:`_plain_fields`),
    :class:`~fastema.average.EMAOptions` and :class:`~fastema.average.Cadence` take their numbers
    through this once, when they are made."""
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
        return value
    if type(value) in (list, tuple):
        return type(value)(as_python(v) for v in value)
    return value


def _plain_fields(schedule) -> None:
    """Every field of the (frozen) dataclass ``schedule`` through :func:`as_python`, before its checks."""
    for f in fields(schedule):
        value = getattr(schedule, f.name)
        plain = as_python(value)
        if plain is not value:
            object.__setattr__(schedule, f.name, plain)


def check_decay(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


def check_count(name, value, least=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        hint = "" if getattr(value, "ndim", None) != 0 else \
            " (a 0-d tensor or array: pass a Python int, e.g. a loop counter; fastema reads no device value here)"
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}{hint}")


def check_step(step) -> int:
    """A training step given to update(): an int >= 0."""
    check_count("step", step)
    return int(step)
