"""torchtitan's EMA checkpoint keys, as torchtitan's main branch writes them.

Upstream: ``torchtitan/components/optim/ema.py`` (pytorch/torchtitan after #3985; read at
commit ``2d4176c2``): the EMA container sits under the ``CheckpointManager`` state key ``"ema"``,
and DCP flattens its per-tensor state to ``ema.state.<fqn>.ema_params.<key>``, one entry per
configured copy, ``<key>`` being :func:`ema_key` of the copy's setting (``decay_0p999``,
``half_life_0p05``). The FQNs are canonical: activation checkpointing's
``_checkpoint_wrapped_module`` segments removed (torchtitan's ``canonical_fqn``).
"""
from __future__ import annotations

__all__ = ["EMA_PARAMS", "FIXED_DECAY_KEY_PREFIX", "HALF_LIFE_KEY_PREFIX", "STATE_KEY", "canonical_fqn",
           "ema_key", "flat_key", "parse_ema_key"]

#: The EMA's key among ``CheckpointManager``'s states: ``states={STATE_KEY: ema}``.
STATE_KEY = "ema"
#: The per-tensor state entry holding one copy per key (``state.<fqn>.ema_params.<key>``).
EMA_PARAMS = "ema_params"
#: The key prefix of a ``decays`` copy (``decay_0p999``).
FIXED_DECAY_KEY_PREFIX = "decay_"
#: The key prefix of a ``half_life_fractions`` copy (``half_life_0p05``).
HALF_LIFE_KEY_PREFIX = "half_life_"
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module",)


def ema_key(prefix: str, value: float) -> str:
    """The key of one copy: ``prefix`` and ``repr(float(value))`` with ``+`` dropped, ``.`` as ``p``
    and ``-`` as ``m`` (``ema_key("decay_", 0.999) == "decay_0p999"``; ``1e-05`` gives
    ``half_life_1em05``)."""
    encoded = repr(float(value)).replace("+", "").replace(".", "p").replace("-", "m")
    return f"{prefix}{encoded}"


def parse_ema_key(key: str) -> tuple[bool, float]:
    """The inverse of :func:`ema_key`: ``(is_decay, value)``, ``is_decay`` True for a ``decays`` entry and
    False for a ``half_life_fractions`` one (``parse_ema_key("decay_0p999") == (True, 0.999)``)."""
    for prefix, is_decay in ((FIXED_DECAY_KEY_PREFIX, True), (HALF_LIFE_KEY_PREFIX, False)):
        if isinstance(key, str) and key.startswith(prefix):
            encoded = key[len(prefix):]
            try:
                return is_decay, float(encoded.replace("p", ".").replace("m", "-"))
            except ValueError:
                break
    raise ValueError(f"EMA key {key!r} is neither {FIXED_DECAY_KEY_PREFIX}<value> nor {HALF_LIFE_KEY_PREFIX}<value> "
                     f"(e.g. 'decay_0p999', 'half_life_0p05')")


def canonical_fqn(name: str) -> str:
    """``name`` without activation checkpointing's wrapper segments, at any depth
    (``layers.0._checkpoint_wrapped_module.attention.wq.weight`` -> ``layers.0.attention.wq.weight``)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def flat_key(fqn: str, key: str) -> str:
    """The EMA container's state-dict key of one copy of one tensor (DCP adds ``ema.`` in front)."""
    return f"state.{fqn}.{EMA_PARAMS}.{key}"
