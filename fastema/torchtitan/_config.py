"""The fields of ``EMA.Config``: torchtitan's EMA configuration, field for field (main's
``EMA.Config``), checked at construction and again when an ``EMA`` is built of it (a field changed
in between), plus fastema's ``shadow_dtype`` (``EMA.Config`` adds ``build``, beside ``EMA``)."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .._checks import MAX_DECAYS
from ._keys import FIXED_DECAY_KEY_PREFIX, HALF_LIFE_KEY_PREFIX, ema_key

__all__ = ["ConfigFields"]

SHADOW_DTYPES = ("same", "float32")


def _int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"EMA.Config.{name} must be an int >= {least}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ConfigFields:
    """What torchtitan's ``Optim.Config.ema`` holds (main's fields and rules); ``EMA.Config`` is
    this with ``build``.

    Attributes:
        decays: fixed-decay copies, one per entry, each finite and in ``[0, 1)``:
            ``avg <- decay * avg + (1 - decay) * param`` at every firing. Checkpointed under
            ``decay_<value>``.
        half_life_fractions: half-life copies, one per entry, each finite and > 0: at the ``n``-th
            firing ``decay = 2 ** (-1 / (fraction * n))``. Checkpointed under ``half_life_<value>``.
            At least one copy in all (at most 8: they are kept in one pass).
        start_step: the last trainer step before tracking begins: the first firing is at
            ``start_step + update_every_n_steps``.
        step_bias: added to the firing count ``n`` (firings, not steps), to renumber a new phase.
        update_every_n_steps: fire every N-th trainer step.
        offload_to_cpu: keep the copies in host memory (main's GH200 path), through fastema's
            offload (``fastema.torch.EMA(offload="cpu")``'s host shadow, fed through two staging
            chunks).
        buffer_patterns: regular expressions (``re.search`` on the buffers' names) of the floating
            buffers averaged beside the trainable parameters.
        shadow_dtype: ``"same"`` (main's: each copy in its tensor's dtype, a bfloat16 parameter's in
            bfloat16) or ``"float32"`` (fastema's opt-in: a float32 average of bfloat16 parameters,
            which keeps moving where a bfloat16 copy rounds the increment away). Same checkpoint
            keys either way.
    """

    decays: list[float] = field(default_factory=list)
    half_life_fractions: list[float] = field(default_factory=list)
    start_step: int = 0
    step_bias: int = 0
    update_every_n_steps: int = 1
    offload_to_cpu: bool = False
    buffer_patterns: list[str] = field(default_factory=list)
    shadow_dtype: str = "same"

    def __post_init__(self) -> None:
        for name in ("decays", "half_life_fractions", "buffer_patterns"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise TypeError(f"EMA.Config.{name} must be a list, got {getattr(self, name)!r}")
        _int("update_every_n_steps", self.update_every_n_steps, 1)
        _int("step_bias", self.step_bias, 0)
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, numbers.Integral):
            raise ValueError(f"EMA.Config.start_step must be an int, got {self.start_step!r}")
        if not self.decays and not self.half_life_fractions:
            raise ValueError("EMA.Config.decays and EMA.Config.half_life_fractions are both empty, "
                             "so the EMA would track nothing: set at least one, "
                             "or leave the EMA out")
        for d in self.decays:
            if (isinstance(d, bool) or not isinstance(d, numbers.Real)
                    or not (math.isfinite(d) and 0 <= d < 1)):
                raise ValueError(f"EMA.Config.decays entry {d!r} must be finite and in [0, 1); "
                                 f"decay=1 never updates the EMA")
        for f in self.half_life_fractions:
            if (isinstance(f, bool) or not isinstance(f, numbers.Real)
                    or not (math.isfinite(f) and f > 0)):
                raise ValueError(f"EMA.Config.half_life_fractions entry {f!r} must be finite and "
                                 f"greater than 0")
        keys = self.keys()
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"EMA.Config has duplicate copies {duplicates}: each entry of decays "
                             f"and half_life_fractions must be unique")
        if len(keys) > MAX_DECAYS:
            raise ValueError(f"EMA.Config asks for {len(keys)} copies; fastema keeps at most "
                             f"{MAX_DECAYS} in one pass: split them over two EMAs")
        if not isinstance(self.offload_to_cpu, bool):
            raise TypeError(f"EMA.Config.offload_to_cpu must be True or False, "
                            f"got {self.offload_to_cpu!r}")
        for p in self.buffer_patterns:
            try:
                re.compile(p)
            except (re.error, TypeError) as err:
                raise ValueError(f"EMA.Config.buffer_patterns entry {p!r} is not a regular "
                                 f"expression: {err}")
        if self.shadow_dtype not in SHADOW_DTYPES:
            raise ValueError(f"EMA.Config.shadow_dtype must be one of {SHADOW_DTYPES}, "
                             f"got {self.shadow_dtype!r}")

    def keys(self) -> list[str]:
        """The checkpoint key of every copy, decays first (main's order)."""
        return ([ema_key(FIXED_DECAY_KEY_PREFIX, d) for d in self.decays]
                + [ema_key(HALF_LIFE_KEY_PREFIX, f) for f in self.half_life_fractions])
