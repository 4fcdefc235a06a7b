"""``fastema.torchtitan``: fastema as torchtitan's EMA.

torchtitan's main branch keeps online EMAs of the model's weights (``torchtitan.components.optim.ema``,
after pytorch/torchtitan#3985; the 0.3.0 release has none). :class:`EMA` takes the same configuration
(``EMA.Config``, :class:`~fastema.torchtitan.EMAConfig`: ``decays``, ``half_life_fractions``, ``start_step``,
``step_bias``, ``update_every_n_steps``, ``buffer_patterns``), fires on the same steps with the same
decays, and writes and reads the same checkpoint keys (``ema.state.<fqn>.ema_params.<key>`` under
``CheckpointManager``'s ``"ema"`` state), so a checkpoint of either resumes in the other. What it adds:
every copy from one read of the weights in one launch per (device, dtype) group, the tensors listed
once, an opt-in float32 average of bfloat16 weights, a step that can sit inside a captured CUDA
graph, and the copies offloaded to host memory through fastema's offload. Guide: ``docs/guides/torchtitan.md``.
"""
from ._ema import EMA, EMAConfig
from ._export import export_hf
from ._keys import (
    EMA_PARAMS,
    FIXED_DECAY_KEY_PREFIX,
    HALF_LIFE_KEY_PREFIX,
    STATE_KEY,
    canonical_fqn,
    ema_key,
    flat_key,
    parse_ema_key,
)
from ._state import Tracked

__all__ = ["EMA", "EMAConfig", "EMA_PARAMS", "FIXED_DECAY_KEY_PREFIX", "HALF_LIFE_KEY_PREFIX", "STATE_KEY", "Tracked",
           "canonical_fqn", "ema_key", "export_hf", "flat_key", "parse_ema_key"]
