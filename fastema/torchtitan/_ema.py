"""``fastema.torchtitan.EMA``: torchtitan's EMA (main's ``EMA``: its config, its firing rule, its
checkpoint keys) over fastema's flat shadow: every copy of every tracked tensor in one launch per
(device, dtype) group, from one read of the parameters, the tensors listed once at construction."""
from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .._interrupts import ctrl_c_held
from ..flat import FlatShadow
from ..torch import Offload
from . import _nonfinite, _state
from ._config import ConfigFields
from ._held import Held
from ._keys import canonical_fqn
from ._layouts import given_layout
from ._state import Tracked

__all__ = ["EMA", "EMAConfig", "Tracked"]

logger = logging.getLogger(__name__)

_WIDE = (torch.float32, torch.float64)


@dataclass(kw_only=True, slots=True)
class EMAConfig(ConfigFields):
    """torchtitan main's ``EMA.Config`` (``fastema.torchtitan.EMA.Config`` is this class), built
    into an :class:`EMA` with :meth:`build`.

    Attributes:
        decays: fixed-decay copies, each finite and in ``[0, 1)`` (key ``decay_<value>``).
        half_life_fractions: copies of decay ``2 ** (-1 / (fraction * n))`` at the ``n``-th firing,
            each finite and > 0 (key ``half_life_<value>``); at least one copy in all, at most 8.
        start_step: the last step before tracking: the first firing is at ``start_step +
            update_every_n_steps``.
        step_bias: added to the firing count ``n``.
        update_every_n_steps: fire every N-th step.
        offload_to_cpu: keep the copies in host memory, fed through fastema's offload
            (``fastema.torch.EMA(offload="cpu")``'s shadow: two staging chunks per device, the fold
            on a host thread).
        buffer_patterns: ``re.search`` patterns of the floating buffers averaged too.
        shadow_dtype: ``"same"`` (main's: each copy in its tensor's dtype) or ``"float32"`` (opt-in:
            a float32 average of bfloat16 parameters, under the same keys).
    """

    def build(self, *, model_parts: Sequence[nn.Module],
              layouts: Mapping[str, tuple] | None = None) -> EMA:
        """The EMA of ``model_parts`` (see :class:`EMA`); the fields are checked again here."""
        return EMA(self, model_parts=model_parts, layouts=layouts)


class EMA:
    """Online EMAs of a torchtitan model's weights, one copy per entry of ``Config.decays`` and
    ``Config.half_life_fractions``, as torchtitan's own ``EMA`` keeps them, with fastema's update.

    Build it with ``EMA.Config(...).build(model_parts=...)`` after the model is parallelised, step
    it with :meth:`step` after the optimizer step and the LR schedulers
    (``ema.step(current_step)``), and hand it to ``CheckpointManager(..., states={"ema": ema})``: it
    is a DCP ``Stateful`` whose :meth:`state_dict` holds main's keys,
    ``state.<fqn>.ema_params.<key>`` (DCP adds ``ema.``).

    What it tracks: every trainable parameter of every model part, and the floating buffers
    ``buffer_patterns`` match (``re.search`` on their names); each is a source of one
    :class:`fastema.FlatShadow` of ``len(keys)`` rows (``offload_to_cpu``: the host shadow of
    :meth:`fastema.torch.Offload.shadow`), the tensors listed once, here. The sources are the
    model's own tensors (the parameters and buffers themselves; a DTensor's own local tensor), so
    ``p.data = ...`` is followed by the shadow's address check, and a DTensor's new local tensor
    (FSDP2 re-pads it) at the next firing. A tracked name that holds another object later (a new
    ``nn.Parameter``, a re-assigned buffer), another dtype (``model.to(torch.float64)``) or nothing
    is refused by name at the next :meth:`step` (and by a cold-start load), writing nothing: build
    a new EMA of the changed model.

    The firing rule is main's: at ``current_step``, ``elapsed = current_step - start_step``; nothing
    happens when ``elapsed <= 0`` or ``elapsed % update_every_n_steps``; else ``n = elapsed //
    update_every_n_steps + step_bias`` and copy ``k`` moves by ``avg <- avg + (1 - decay_k) (param -
    avg)`` (torch's ``lerp``), ``decay_k = decays[k]`` or ``2 ** (-1 / (fraction * n))``. Main runs
    one ``_foreach_lerp_`` pass per copy; here all copies move in one pass.

    ``current_step`` may be a one-element integer tensor on the parameters' device instead of an
    int: the rule is then worked out on the device (no host read) and a step that does not fire
    writes nothing (a device-side flag), so the call can sit inside a captured CUDA graph
    (torchtitan's ``Optim(enable_cuda_graph=True)``) with a step counter the graph advances.

    Args:
        config: an ``EMA.Config`` (:class:`~fastema.torchtitan.EMAConfig`).
        model_parts: the model parts (pipeline stages), as torchtitan's ``Optim`` gets them.
        layouts: for parameters held as plain local shards (torchtitan's ``spmd_types`` backend):
            ``fqn -> (mesh, placements)`` or ``(mesh, placements, global_shape)``, so the checkpoint
            holds them as DTensors of that layout (DCP reshards them on load); refused, by name, when
            the local tensor is not the shard the placements (``Shard(dim)``, ``Replicate()``, one
            per mesh dim) and the global shape give this rank. DTensor parameters (FSDP2, TP) carry
            their own.
    """

    Config = EMAConfig

    def __init__(self, config: EMAConfig, *, model_parts: Sequence[nn.Module],
                 layouts: Mapping[str, tuple] | None = None):
        if not isinstance(config, EMAConfig):
            raise TypeError(f"config must be a fastema.torchtitan.EMA.Config, "
                            f"got {type(config).__name__}")
        parts: list[nn.Module] = ([model_parts] if isinstance(model_parts, nn.Module)
                                  else list(model_parts))
        if not parts or not all(isinstance(m, nn.Module) for m in parts):
            raise TypeError(f"model_parts must be a non-empty list of nn.Module, "
                            f"got {model_parts!r}")
        config.__post_init__()              # a config changed since it was made is checked again
        self.config = config
        self.model_parts = parts
        self.keys: list[str] = config.keys()
        self.decays = [float(d) for d in config.decays]
        self.half_life_fractions = [float(f) for f in config.half_life_fractions]
        self.start_step, self.step_bias = int(config.start_step), int(config.step_bias)
        self.update_every_n_steps = int(config.update_every_n_steps)
        self.tracked: tuple[Tracked, ...] = tuple(
            _select(parts, config.buffer_patterns, dict(layouts or {})))
        if not self.tracked:
            raise ValueError("the model parts have no trainable parameter and buffer_patterns "
                             "matched no buffer: there is nothing to average")
        sources = {t.fqn: t.local for t in self.tracked}
        self.offloaded = config.offload_to_cpu
        self.shadow: Any = (
            Offload().shadow(sources, rows=len(self.keys), dtype=config.shadow_dtype)
            if self.offloaded else
            FlatShadow(sources, rows=len(self.keys), dtype=config.shadow_dtype))
        self.held = Held(parts, self.tracked)     # where the model holds them (checked at firings)
        # the offloaded update's weights, keyed as the shadow reads them: by its layout's groups (an
        # offloaded shadow's are host groups, "cpu"; its ``groups`` report the weights' devices)
        self._devices = sorted({g.device for g in self.shadow.layout.groups})
        self.padded = _state.padded_params(parts)
        # main's weight 1.0 - decay, as Python floats
        self._fixed = [1.0 - d for d in self.decays]
        self._on_device: dict = {}          # device step: its buffers (see _device_step)
        self.allow_nonfinite = False        # loads and exports of copies holding inf or NaN refused
        self.nonfinite_flags: dict = {}     # the scan of the copies' flags, by device (_nonfinite)
        narrow = sorted({str(t.local.dtype) for t in self.tracked if t.local.dtype not in _WIDE})
        if narrow and config.shadow_dtype == "same":
            logger.warning("EMA is tracking %s tensors in their own dtype (shadow_dtype='same', "
                           "main's): once the average and the live value are close, the increment "
                           "rounds away. EMA.Config(shadow_dtype='float32') keeps a float32 "
                           "average of them.", ", ".join(narrow))

    # ------------------------------------------------------------ the update

    def decays_at(self, num_updates: int) -> list[float]:
        """The decay of every copy at the ``num_updates``-th firing, in :attr:`keys` order."""
        return self.decays + [2.0 ** (-1.0 / (f * num_updates)) for f in self.half_life_fractions]

    @torch.no_grad()
    def step(self, current_step: int | torch.Tensor) -> None:
        """Fire the update if ``current_step`` is a firing step (see the class). Call it with the
        trainer's step after the optimizer step and the LR schedulers, as torchtitan's
        ``Optim.step`` does; or with a one-element int64 tensor on the parameters' device (inside a
        captured CUDA graph)."""
        if isinstance(current_step, torch.Tensor):
            self._device_step(current_step)
            return
        if isinstance(current_step, bool) or not isinstance(current_step, int):
            raise TypeError(f"current_step must be an int (the trainer's step) or a one-element "
                            f"integer tensor, got {current_step!r}")
        elapsed = current_step - self.start_step
        if elapsed <= 0 or elapsed % self.update_every_n_steps:
            return
        n = elapsed // self.update_every_n_steps + self.step_bias
        self._follow("step()")
        weights = self._fixed + [1.0 - 2.0 ** (-1.0 / (f * n)) for f in self.half_life_fractions]
        if not self.offloaded:
            self.shadow.update(weight=weights)
            return
        self.shadow.refresh()           # the addresses checked (a moved parameter followed)
        with ctrl_c_held():             # every window staged, or none (a Ctrl-C waits)
            self.shadow.update_checked({d: tuple(weights) for d in self._devices},
                                       "nearest", 0, 0, None)

    def _device_step(self, step: torch.Tensor) -> None:
        """:meth:`step` worked out on the device: the buffers made at the first call, then only
        in-place and ``out=`` operations (nothing allocated, nothing read by the host)."""
        if self.offloaded:
            raise ValueError("step(tensor) (a captured CUDA graph's) does not go with "
                             "EMA.Config.offload_to_cpu=True: the offloaded copies are folded on a "
                             "host thread, which a graph replay would not run; step with the "
                             "trainer's int step, outside the graph")
        self._follow("step()")
        bufs = self._on_device.get(step.device)
        if bufs is None:
            bufs = self._on_device[step.device] = _DeviceRule(self, step.device)
        bufs.run(step)
        self.shadow.update(weight=bufs.w32, skip_if=bufs.skip)

    def _follow(self, what: str) -> None:
        """Before the model is read: refuse, by name, a tracked tensor the model no longer holds
        (see the class); follow DTensors' new local tensors."""
        problem = self._model_problem()
        if problem is not None:
            raise ValueError(f"EMA.{what}: {problem}. Nothing was updated.")

    def _model_problem(self) -> str | None:
        """What the model no longer holds of the tracked tensors (None: it holds them all; the
        DTensors' new local tensors followed): one lookup and a few identities per tensor while
        nothing changed (:meth:`Held.unchanged <fastema.torchtitan._held.Held.unchanged>`)."""
        held = self.held
        if held.unchanged():
            return None
        held.reshard()                      # FSDP2 modules left unsharded: their slots hold copies
        if held.unchanged():
            return None
        problems, tracked = held.changes(self.model_parts, self.tracked)
        if problems:
            listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                                if len(problems) > 3 else "")
            return (f"{listed}. Build a new EMA of the model as it is (EMA.Config(...).build("
                    f"model_parts=...)), or keep the tracked tensors (write into them: "
                    f"p.data = ..., p.copy_(...))")
        self.shadow.rebind({t.fqn: t.local for t in tracked})   # checked: dtype, shape, device
        self.tracked = tuple(tracked)
        self.held = Held(self.model_parts, self.tracked)
        return None

    # ------------------------------------------------------------ checkpoints and reads

    def state_dict(self) -> dict[str, Any]:
        """Main's layout: ``state.<fqn>.ema_params.<key>`` -> the copy, each a view of the shadow
        (its dtype: the tensor's, or float32 with ``shadow_dtype="float32"``), a DTensor of the
        parameter's layout on a sharded model, with the padding of padded parameters hidden.
        ``dcp.load`` fills these views in place, then calls :meth:`load_state_dict`. Copies
        holding inf or NaN are named in a warning and listed under ``"nonfinite"`` (information,
        never loaded; no such entry for a finite EMA, nor in the template ``dcp.load`` fills)."""
        out = _state.flat_state_dict(self.tracked, self.shadow, self.keys, self.padded)
        poisoned = _nonfinite.record(self)
        if poisoned:
            out[_nonfinite.RECORD] = poisoned
        return out

    def repair_nonfinite(self) -> list[str]:
        """Reset every copy of every tracked tensor holding inf or NaN from the tensor's live
        weights (rounded to the copy's dtype; the model checked first, as at a firing), in place
        where the copies live; every other copy and tensor left bit for bit. Returns the names
        reset. On a sharded model a collective: every rank calls it, the ranks agree on the
        tensors, each resets its local shard of them and returns the same names."""
        return _nonfinite.repair(self, lambda: self._follow("repair_nonfinite()"))

    def load_state_dict(self, state_dict: Mapping[str, Any], *,
                        allow_nonfinite: bool | None = None) -> None:
        """Load main's layout (what :meth:`state_dict` or torchtitan's own EMA wrote; keys of other
        copies are ignored, as main ignores them); every entry checked first (there, a floating
        tensor of its copy's shape and layout, finite in the copy's dtype), nothing written if one
        is off; on a sharded model the verdict is agreed over the mesh: a rank that refuses makes
        every rank raise the same error, naming it (a ``ValueError``), never a rank left waiting in
        its next collective. ``dcp.load`` writes into the views :meth:`state_dict` gave before it
        calls this: those entries are checked too, but they are written already, so an inf or NaN
        among them is refused by name with the copies holding the checkpoint's values, inf and NaN
        included (load a checkpoint whose EMA is finite, or ``load_state_dict({})``). An empty dict
        (a checkpoint without the EMA) cold-starts every copy from the current weights, as main
        does (the model checked first, as at a firing); anything but a dict (None) is refused.
        ``allow_nonfinite=True`` (None: ``ema.allow_nonfinite``, which ``dcp.load`` reads) loads
        copies holding inf or NaN, with a warning naming them: :meth:`repair_nonfinite` resets them."""
        if not isinstance(state_dict, Mapping):          # (None, a list: no cold start), refused on every rank
            _state.agreed_load(self.tracked, f"load_state_dict takes the dict state_dict() gave (an empty one: a "
                                             f"checkpoint without the EMA), got {type(state_dict).__name__}", True)
        if not state_dict:
            _state.agreed_load(self.tracked, self._model_problem(), False)
            self.shadow.copy_from_sources()
            logger.warning("EMA state was not restored; cold-starting every EMA copy (%s) from the "
                           "loaded model weights, which discards all EMA history",
                           ", ".join(self.keys))
            return
        allow = self.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
        if not isinstance(allow, bool):                  # refused on every rank alike
            _state.agreed_load(self.tracked, f"allow_nonfinite must be True, False or None, got "
                                             f"{allow_nonfinite!r}", True)
        poisoned = _state.load_flat_state_dict(
            self.tracked, self.shadow, self.keys, self.padded, state_dict,
            lambda problem: _state.agreed_load(self.tracked, problem, True), allow)
        if poisoned:
            logger.warning("EMA state loaded with %s holding inf or NaN (allow_nonfinite): "
                           "export_hf() refuses them until ema.repair_nonfinite() resets those "
                           "tensors from the live weights", _nonfinite.named(poisoned))

    def averaged_state_dict(self, key: str | None = None, *,
                            allow_nonfinite: bool | None = None) -> dict[str, torch.Tensor]:
        """One copy (``key``; default: the only one) as ``fqn -> tensor`` in the tensors' dtypes and
        layouts (DTensors on a sharded model): what ``model.load_state_dict`` takes for the tracked
        names. A copy holding inf or NaN is refused by name unless ``allow_nonfinite`` (None:
        ``ema.allow_nonfinite``); on a sharded model the ranks agree on it (a collective)."""
        row = self.row_of(key)
        _nonfinite.refuse(self, "EMA.averaged_state_dict()", row, allow_nonfinite)
        return {t.fqn: _state.as_global(
                    t, self.shadow.view(t.fqn, row).to(t.local.dtype, copy=True))
                for t in self.tracked}

    def row_of(self, key: str | None) -> int:
        """The shadow row of copy ``key`` (None: the only copy)."""
        if key is None:
            if len(self.keys) != 1:
                raise ValueError(f"this EMA holds {len(self.keys)} copies {self.keys}: "
                                 f"name the one to read")
            return 0
        if key not in self.keys:
            raise ValueError(f"this EMA holds no copy {key!r}; it holds {self.keys}")
        return self.keys.index(key)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        """Nothing (main's EMA takes it too, for code that treats it as an optimizer)."""

    def __repr__(self) -> str:
        return (f"fastema.torchtitan.EMA(keys={self.keys}, tensors={len(self.tracked)}, "
                f"shadow={self.shadow!r})")


class _DeviceRule:
    """Main's firing rule on the device, into preallocated buffers: ``w32`` (the copies' weights,
    float32) and ``skip`` (``device -> int32[1]``, non-zero where the step does not fire)."""

    def __init__(self, ema: EMA, device: torch.device):
        k, h = len(ema.keys), len(ema.half_life_fractions)
        self.start, self.every, self.bias, self.h = (ema.start_step, ema.update_every_n_steps,
                                                     ema.step_bias, h)
        self.elapsed = torch.zeros(1, dtype=torch.int64, device=device)
        self.rest = torch.zeros(1, dtype=torch.int64, device=device)
        self.off = torch.zeros(1, dtype=torch.bool, device=device)
        self.late = torch.zeros(1, dtype=torch.bool, device=device)
        self.n = torch.zeros(1, dtype=torch.float64, device=device)
        self.decay = torch.tensor(ema.decays + [0.0] * h, dtype=torch.float64, device=device)
        self.fractions = torch.tensor(ema.half_life_fractions, dtype=torch.float64, device=device)
        self.w64 = torch.zeros(k, dtype=torch.float64, device=device)
        self.w32 = torch.zeros(k, dtype=torch.float32, device=device)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.flag = flag
        self.skip = {g["device"]: flag for g in ema.shadow.groups}

    def run(self, step: torch.Tensor) -> None:
        if step.numel() != 1 or step.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"a device current_step must be a one-element int64 tensor, "
                            f"got {step.dtype} of shape {tuple(step.shape)}")
        torch.sub(step.reshape(1), self.start, out=self.elapsed)
        torch.remainder(self.elapsed, self.every, out=self.rest)
        torch.le(self.elapsed, 0, out=self.off)
        torch.ne(self.rest, 0, out=self.late)
        torch.logical_or(self.off, self.late, out=self.off)
        self.flag.copy_(self.off)                       # 1: this step does not fire
        if self.h:                                      # n = elapsed // every + bias, in float64
            torch.div(self.elapsed, self.every, rounding_mode="floor", out=self.rest)
            self.n.copy_(self.rest).add_(self.bias)
            half = self.decay[len(self.decay) - self.h:]
            torch.mul(self.fractions, self.n, out=half)
            half.reciprocal_().neg_()
            torch.pow(2.0, half, out=half)              # 2 ** (-1 / (f * n))
        self.w64.copy_(self.decay).neg_().add_(1.0)     # 1 - decay, rounded once as main's
        self.w32.copy_(self.w64)


def _select(parts: list[nn.Module], patterns: Sequence[str], layouts: dict) -> list[Tracked]:
    """Every trainable parameter, then every buffer a pattern matches, of every part
    (main's order)."""
    compiled = [re.compile(p) for p in patterns]
    out: list[Tracked] = []
    buffers = 0
    for model in parts:
        named: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad]
        for name, b in model.named_buffers():
            if compiled and any(p.search(name) for p in compiled):
                if not b.is_floating_point():
                    raise ValueError(f"EMA.Config.buffer_patterns matched buffer {name!r} of "
                                     f"dtype {b.dtype}: only floating buffers are averaged (an "
                                     f"integer average rounded back into the buffer freezes); "
                                     f"narrow the pattern")
                named.append((name, b))
                buffers += 1
        for name, t in named:
            fqn = canonical_fqn(name)
            out.append(_tracked(fqn, t, layouts.pop(fqn, None)))
    if compiled and not buffers:
        logger.warning("EMA.Config.buffer_patterns=%s matched no buffer of any model part: "
                       "check the patterns", list(patterns))
    twice = sorted(n for n, c in collections.Counter(t.fqn for t in out).items() if c > 1)
    if twice:
        raise ValueError(f"the model parts share the names {twice[:5]}: each tracked tensor "
                         f"needs its own name (the checkpoint key state.<name>.ema_params.<key>)")
    if layouts:
        raise ValueError(f"layouts= names {sorted(layouts)[:5]}, which this EMA does not track "
                         f"(trainable parameters and the buffers buffer_patterns match, by "
                         f"canonical name)")
    return out


def _tracked(fqn: str, t: torch.Tensor, given: tuple | None) -> Tracked:
    """``t`` described (see :class:`Tracked`)."""
    from torch.distributed.tensor import DTensor

    if t.is_complex():
        raise ValueError(f"{fqn!r} is complex ({t.dtype}): fastema averages real floating tensors")
    if isinstance(t, DTensor):
        if given is not None:
            raise ValueError(f"layouts= gives a layout for {fqn!r}, a DTensor, which has its own: "
                             f"drop it")
        # the DTensor's own local tensor (to_local() makes a view of it), followed at every firing
        return Tracked(fqn, t, t._local_tensor,
                       (t.device_mesh, tuple(t.placements), tuple(t.shape), tuple(t.stride())))
    # the parameter or buffer itself: the shadow follows its .data
    return Tracked(fqn, t, t, None if given is None else given_layout(fqn, t, given))
