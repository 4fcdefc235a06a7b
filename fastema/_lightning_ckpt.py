"""Lightning's weight-averaging ``.ckpt`` layout, read for :class:`fastema.lightning.WeightEMA`.

Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``; ``WeightAveraging()``, SWA by
default, or with ``avg_fn=`` / ``multi_avg_fn=``; all over torch's ``AveragedModel``) write, during
``fit``::

    checkpoint["state_dict"]            the AVERAGE (the AveragedModel's module, "module." stripped)
    checkpoint["current_model_state"]   the model's own (raw) weights
    checkpoint["averaging_state"]       {"n_averaged": tensor}: the updates made
    checkpoint["callbacks"][<its class name>] = {"latest_update_step": global step of its last update}

and Lightning's loader puts ``state_dict`` (the average) into the model before any callback's
``on_load_checkpoint`` runs. :func:`read_peer` finds that layout (:class:`PeerAverage`), or refuses
a checkpoint whose average ``WeightEMA`` cannot read (:class:`PeerRefused`, naming what it found
and what to do): half of the layout, a weight-averaging state without the raw weights, the
average saved as the raw weights after ``fit`` ended, an unknown callback holding a copy of the
weights. :func:`peer_state` turns a :class:`PeerAverage` into a ``fastema.torch.EMA`` state dict
with the EMA's own settings. Imports no Lightning: a checkpoint is dicts, numbers and tensors.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

__all__ = ["PeerAverage", "PeerRefused", "peer_state", "read_peer"]

LAYOUT = ("current_model_state", "averaging_state")
FIX = ("Resume it with the Lightning callback that wrote it, or load the weights you mean to train "
       "on into the model and call fit() without ckpt_path.")
# kinds of fastema schedule that need a history Lightning's average does not keep
HISTORY = {"bema": "the weights at its first update",
           "wsm": "the total weight of the samples averaged",
           "ema_decay_sqrt": "the total weight of the samples averaged"}


class PeerRefused(ValueError):
    """A Lightning checkpoint holds an average that ``WeightEMA`` cannot read;
    nothing was loaded."""


class PeerAverage(NamedTuple):
    """What a checkpoint of Lightning's ``WeightAveraging`` holds, as ``WeightEMA`` takes it."""
    callback: str       # the state key of the callback that wrote it ("EMAWeightAveraging", ...)
    average: dict       # its average: model state-dict names -> tensors
    raw: dict           # the model's own weights (current_model_state)
    updates: int        # AveragedModel.n_averaged: the updates made (per step and per epoch)
    calls: int          # optimizer steps so far (the checkpoint's global_step)
    last_step: int      # the global step of its last update


RAW = "the model holds its raw weights, 'current_model_state'"
LOADED = "the model holds the checkpoint's 'state_dict', as Lightning loaded it"


def _refuse(found: str, why: str, model: str = LOADED) -> PeerRefused:
    return PeerRefused(f"WeightEMA cannot resume this checkpoint: {found}; {why}. {FIX} "
                       f"Nothing was loaded into the average ({model}).")


def _count(value, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _refuse(f"{name} is {value!r}", "expected an int >= 0")
    return value


def _copies_of(state, model_keys: set, path: str, depth: int = 0) -> list[str]:
    """Where in ``state`` (a callback's state) a dict holds tensors under the model's names: a copy
    of the weights (an average), named by its path."""
    if not isinstance(state, dict) or depth > 3:
        return []
    if any(isinstance(v, torch.Tensor) and _model_name(k, model_keys) for k, v in state.items()):
        return [path]
    return [p for k, v in state.items()
            for p in _copies_of(v, model_keys, f"{path}[{k!r}]", depth + 1)]


def _model_name(key, model_keys: set) -> bool:
    if not isinstance(key, str):
        return False
    parts = key.split(".")
    # "module." prefixes too
    return any(".".join(parts[i:]) in model_keys for i in range(len(parts)))


def read_peer(checkpoint: dict, own_key: str, present: Iterable[str],
              model_keys: Iterable[str]) -> PeerAverage | None:
    """Lightning's weight-averaging layout in ``checkpoint``, or None when it holds no average for
    ``WeightEMA`` to read (a fresh run's checkpoint, or one holding ``WeightEMA``'s own state under
    ``own_key``, which wins). Raises :class:`PeerRefused` for an average it cannot read, unless
    the callback that wrote it is in ``present`` (the trainer's callbacks' state keys: it reads
    its own)."""
    callbacks = checkpoint.get("callbacks")
    callbacks = callbacks if isinstance(callbacks, dict) else {}
    if callbacks.get(own_key):
        return None
    averaging = sorted(k for k, v in callbacks.items()
                       if isinstance(v, dict) and set(v) == {"latest_update_step"})
    held = [k for k in LAYOUT if k in checkpoint]
    if len(held) == 1:
        lacks = next(k for k in LAYOUT if k not in checkpoint)
        raise _refuse(f"it holds {held[0]!r} but not {lacks!r}",
                      "that is half of the layout Lightning's WeightAveraging writes (the average "
                      "under 'state_dict', the raw weights under 'current_model_state', n_averaged "
                      "under 'averaging_state'), so the raw weights and the average cannot be told "
                      "apart")
    if not held:
        if [k for k in averaging if k not in present]:
            raise _refuse(f"it holds the state of {averaging} (Lightning's weight averaging) but "
                          f"not 'current_model_state'",
                          "it was written outside fit() (after training, when WeightAveraging has "
                          "copied its average into the model), so its 'state_dict' may be the "
                          "average, and the raw weights are not in it")
        keys = set(model_keys)
        unknown = [p for k, v in callbacks.items() if k not in present and k != own_key
                   for p in _copies_of(v, keys, f"callbacks[{k!r}]")]
        if unknown:
            raise _refuse(f"{', '.join(unknown)} holds a copy of the model's weights (an average "
                          f"WeightEMA does not know how to read)",
                          "WeightEMA would start a new average and drop it")
        return None
    if len(averaging) != 1:
        raise _refuse(f"it holds 'current_model_state' and 'averaging_state' with the state of "
                      f"{averaging or 'no'} weight-averaging callback(s)",
                      "WeightEMA reads the checkpoint of one WeightAveraging callback (with two, "
                      "'current_model_state' holds the first one's average)")
    average, raw, extra = (checkpoint.get("state_dict"), checkpoint["current_model_state"],
                           checkpoint["averaging_state"])
    for name, d in (("state_dict", average), ("current_model_state", raw),
                    ("averaging_state", extra)):
        if not isinstance(d, dict):
            raise _refuse(f"its {name!r} is a {type(d).__name__}", "expected a dict of tensors")
    if "n_averaged" not in extra:
        raise _refuse(f"its 'averaging_state' holds {sorted(extra)}",
                      "expected AveragedModel's 'n_averaged'")
    peer = PeerAverage(averaging[0], average, raw,
                       _count(extra["n_averaged"], "averaging_state['n_averaged']"),
                       _count(checkpoint.get("global_step"), "global_step"),
                       _count(callbacks[averaging[0]]["latest_update_step"], "latest_update_step"))
    floats = [n for n, t in raw.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if peer.updates >= 2 and floats and all(
            isinstance(average.get(n), torch.Tensor) and torch.equal(average[n], raw[n])
            for n in floats):
        raise _refuse(f"its 'current_model_state' equals its average after {peer.updates} updates",
                      "it was written after fit() ended (trainer.save_checkpoint() after fit: "
                      "WeightAveraging copies its average into the model at train end), so the raw "
                      "weights are not in it")
    return peer


def peer_state(peer: PeerAverage, template: dict) -> dict:
    """A ``fastema.torch.EMA`` state dict holding ``peer``: ``template`` (the EMA's own
    ``state_dict()``: its settings and schedules) with Lightning's average in every row of
    ``averaged``, the raw weights in ``copied`` and ``int_buffers`` (what fastema copies), and the
    counters carried: ``updates`` = ``n_averaged``, ``calls`` = ``global_step`` (so ``update_every``
    keeps its phase), the last update's time = ``latest_update_step`` (timed schedules), the
    average's total weight 1 (``debias=True`` continues it unbiased). Saved before its first update
    (``n_averaged`` 0: a start after a warm-up), the peer holds no average yet: its ``state_dict`` is
    the weights the run started from (``AveragedModel``'s untouched copy, which Lightning's callback
    overwrites at its first update), so the average starts at the raw weights, as a fresh
    ``WeightEMA`` starts at the weights it is given."""
    kinds = [s.get("kind") for s in template["schedules"]]
    for kind in kinds:
        if kind in HISTORY:
            raise _refuse(f"this WeightEMA's decay is a {kind!r} schedule",
                          f"it needs {HISTORY[kind]}, which {peer.callback}'s average does not "
                          f"keep; continue it with a decay of another kind (a number, PowerWarmup, "
                          f"NumUpdates, HalfLife, PowerFunction)", RAW)
    state = dict(template)
    problems = []
    average = peer.average if peer.updates else peer.raw
    for key, source, stacked in (("averaged", average, True), ("copied", peer.raw, False),
                                 ("int_buffers", peer.raw, False)):
        wanted = template.get(key) or {}
        out = {}
        for name, mine in wanted.items():               # both are the LightningModule's own names
            value = source.get(name)
            shape = tuple(mine.shape[1:] if stacked else mine.shape)
            if not isinstance(value, torch.Tensor):
                problems.append(f"{name!r} is not in its "
                                f"{'state_dict' if source is peer.average else 'current_model_state'}")
            elif tuple(value.shape) != shape:
                problems.append(f"{name!r} has shape {tuple(value.shape)} there, "
                                f"this model {shape}")
            else:
                value = value.detach().to(dtype=mine.dtype)
                out[name] = value.unsqueeze(0).expand(mine.shape) if stacked else value
        state[key] = out
    if problems:
        raise _refuse(f"{peer.callback}'s checkpoint does not match this model: "
                      f"{'; '.join(problems[:5])}", "it is the checkpoint of another model", RAW)
    n = peer.updates
    # updates at epoch ends too (update_starting_at_epoch) outnumber the steps: each counts as a call
    # updates made at epoch ends only leave latest_update_step at 0: at or before global_step
    last = float(peer.last_step or peer.calls) if n else 0.0
    state.update(calls=max(peer.calls, n), updates=n, norms=[1.0 if n else 0.0] * len(kinds),
                 # Lightning keeps no time of the first update; only BEMA reads it (refused above)
                 first_time=None if n == 0 else min(1.0, last), last_time=last)
    return state
