"""torchtitan's own EMA, re-implemented for the tests as the upstream to hold fastema.torchtitan to.

The torchtitan release on PyPI (0.3.0) has no EMA; its main branch does (pytorch/torchtitan after
#3985: ``torchtitan/components/optim/ema.py``, read at commit ``2d4176c2``; the trainer's
``Optim.step`` in ``torchtitan/components/optim/optim.py``; padding in ``optim/utils.py``). This module
rebuilds that class's behaviour on 0.3.0's real pieces: the EMA copies live in a never-stepped
``torch.optim.Optimizer``'s per-tensor state (``state[t]["ema_params"][key]``, built with
``param_names``), flattened and read back by 0.3.0's own ``get_flat_optim_state_dict`` /
``load_flat_optim_state_dict`` (so the keys are what torchtitan's flattening makes of that state:
``state.<fqn>.ema_params.<key>``); each firing updates copy after copy with one
``torch._foreach_lerp_(copies, tensors, 1.0 - decay)`` each; parameters padded by a module's
``padded_params`` have their padding narrowed away at save and zero-filled back at load; an empty
state dict cold-starts every copy from the current weights. Written from that source, not copied.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torchtitan.components.optimizer.utils import get_flat_optim_state_dict, load_flat_optim_state_dict

from fastema.torchtitan import FIXED_DECAY_KEY_PREFIX, HALF_LIFE_KEY_PREFIX, canonical_fqn, ema_key


class _Holder(torch.optim.Optimizer):
    """Holds the copies of one model part's tensors; never stepped."""

    def __init__(self, named, keys):
        tensors = [t for _, t in named]
        super().__init__([{"params": tensors, "param_names": [canonical_fqn(n) for n, _ in named]}], {})
        for t in tensors:
            self.state[t]["ema_params"] = {k: t.detach().clone() for k in keys}

    def step(self, closure=None):                       # noqa: D102
        raise RuntimeError("never stepped")


class MainEMA:
    """torchtitan main's ``EMA`` (see the module): ``MainEMA(model_parts, decays=..., ...)``, ``step(current_step)``,
    ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, model_parts, *, decays=(), half_life_fractions=(), start_step=0, step_bias=0,
                 update_every_n_steps=1, buffer_patterns=()):
        self.model_parts = list(model_parts)
        self.decays, self.fractions = list(decays), list(half_life_fractions)
        self.keys = ([ema_key(FIXED_DECAY_KEY_PREFIX, d) for d in self.decays]
                     + [ema_key(HALF_LIFE_KEY_PREFIX, f) for f in self.fractions])
        self.start, self.bias, self.every = start_step, step_bias, update_every_n_steps
        self.patterns = [re.compile(p) for p in buffer_patterns]
        self.params = [_Holder([(n, p) for n, p in m.named_parameters() if p.requires_grad], self.keys)
                       for m in self.model_parts]
        self.buffers = [_Holder(self._buffers_of(m), self.keys) for m in self.model_parts] if self.patterns else []
        self.holders = self.params + self.buffers

    def _buffers_of(self, model):
        return [(n, b) for n, b in model.named_buffers() if any(p.search(n) for p in self.patterns)]

    @torch.no_grad()
    def step(self, current_step: int) -> None:
        elapsed = current_step - self.start
        if elapsed <= 0 or elapsed % self.every != 0:
            return
        n = elapsed // self.every + self.bias
        decays = self.decays + [2.0 ** (-1.0 / (f * n)) for f in self.fractions]
        groups = [(h, [p for p in m.parameters() if p.requires_grad]) for h, m in zip(self.params, self.model_parts)]
        groups += [(h, [b for _, b in self._buffers_of(m)]) for h, m in zip(self.buffers, self.model_parts)]
        for holder, tensors in groups:
            if not tensors:
                continue
            for key, decay in zip(self.keys, decays):     # one pass per copy
                torch._foreach_lerp_([holder.state[t]["ema_params"][key] for t in tensors], tensors, 1.0 - decay)

    def _padded(self):
        out = {}
        for m in self.model_parts:
            for mod_fqn, mod in m.named_modules():
                for name, spec in getattr(mod, "padded_params", {}).items():
                    out[canonical_fqn(f"{mod_fqn}.{name}" if mod_fqn else name)] = spec
        return out

    def _map_padded(self, flat, size, convert):
        padded, out = self._padded(), dict(flat)
        for key, value in flat.items():
            if not key.startswith("state.") or not isinstance(value, torch.Tensor):
                continue
            fqn, spec = key[len("state."):], None
            while spec is None and "." in fqn:             # the longest dotted prefix that is a padded name
                fqn = fqn.rpartition(".")[0]
                spec = padded.get(fqn)
            if spec is not None and value.ndim > spec.dim and value.shape[spec.dim] == size(spec):
                out[key] = convert(spec, value)
        return out

    def state_dict(self) -> dict:
        flat = {}
        for h in self.holders:
            flat.update(get_flat_optim_state_dict(h))
        return self._map_padded(flat, lambda s: s.num_padded, lambda s, v: s.strip(v))

    def load_state_dict(self, state: dict) -> None:
        if not state:                                      # cold start from the loaded weights
            for h in self.holders:
                for t, s in h.state.items():
                    for copy in s["ema_params"].values():
                        copy.copy_(t.detach())
            return
        state = self._map_padded(state, lambda s: s.num_real, lambda s, v: s.restore(v))
        for h in self.holders:
            load_flat_optim_state_dict(h, state)

    def copy(self, key: str) -> dict:
        """``fqn -> copy`` of one key."""
        return {n: h.state[t]["ema_params"][key] for h in self.holders
                for g in h.param_groups for n, t in zip(g["param_names"], g["params"])}


class PaddedDim:
    """A padded-dim spec as main's ``PaddedQKVLinear.PaddedDim``: ``num_real`` rows of ``num_padded`` real."""

    def __init__(self, dim: int, num_real: int, num_padded: int):
        self.dim, self.num_real, self.num_padded = dim, num_real, num_padded

    def strip(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, 0, self.num_real)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        pad = list(t.shape)
        pad[self.dim] = self.num_padded - self.num_real
        return torch.cat([t, t.new_zeros(pad)], dim=self.dim)


class PaddedLinear(nn.Linear):
    """A Linear whose weight's output rows past ``num_real`` are padding (never trained: zero)."""

    def __init__(self, i: int, num_real: int, num_padded: int):
        super().__init__(i, num_padded, bias=False)
        with torch.no_grad():
            self.weight[num_real:] = 0
        self.padded_params = {"weight": PaddedDim(0, num_real, num_padded)}
