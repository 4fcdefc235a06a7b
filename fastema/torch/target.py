"""``fastema.torch.TargetNetwork``: a target network (RL) or a momentum teacher (self-supervised
learning) kept as the moving average of an online network, in the target module's own tensors:
the engine (:class:`~fastema.average.Average`) over a :class:`~fastema.pairs.PairShadow` of
the two networks, paired and followed by :class:`~fastema.torch._tensors.pairs.TorchPairs`."""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import _backends
from .._checks import check_rounding, stochastic_rounding
from ..average import Average, EMAOptions, Face
from ..pairs import PairShadow
from ..schedules import BEMA, HalfLife, PowerFunction
from ._face import compiled as _compile
from ._face.contract import FaceParts, TorchFace
from ._state.agree import Disagreement, Read, Stamp, agree
from ._state.agree import Sequence as Agreements
from ._state.stream import DEFAULT_BUCKET, Ranks, Stream, WeightMeta, target_meta, target_stream
from ._state.target_state import FORMAT, TargetState
from ._tensors.hooks import patterns, unwrap
from ._tensors.pairs import TorchPairs

__all__ = ["REFUSALS", "SCHEDULE_REFUSALS", "TargetNetwork"]

#: The schedules a target network does not take as ``momentum=``, and why.
SCHEDULE_REFUSALS = {
    PowerFunction: "a target network keeps one average in the target's tensors; post-hoc profiles need the "
                   "shadow rows of fastema.torch.EMA or PostHocEMA",
    HalfLife: "give the momentum per update (momentum=, or a momentum schedule: fastema.schedules.Cosine...)",
    BEMA: "BEMA keeps three rows (the output, the EMA, theta_0) in a shadow of its own: use fastema.torch.EMA",
}

#: What a target network does not take of :class:`~fastema.average.EMAOptions`, and why: the
#: average is the target's own tensors, used where and as they are.
REFUSALS = {
    "debias": "a target network starts as a copy of the online network, not from zero",
    "shadow_dtype": "the average is the target network's own tensors, in their dtypes: make the target in the "
                    "dtype you want (target.to(torch.bfloat16))",
    "offload": "the target network is used in forward passes where it is; move it with target.to('cpu') if "
               "that is what you want",
}


class TargetNetwork(Face, TorchFace):
    """A target network kept as the moving average of an online network, in its own tensors.

    ``target <- tau * online + (1 - tau) * target`` at every ``update()``, for every floating
    parameter (and floating buffer, with ``buffers="average"``) of the target: the target
    module's own tensors are the average, so it is used in forward passes as it is and this
    object holds no copy of the weights. In the glossary's words ``momentum = decay = 1 - tau``;
    SB3 and TorchRL say ``tau``, DINO, BYOL and MoCo say ``momentum``: give either. One kernel
    launch per (device, dtype) group of (target, online) pairs, on torch's current stream, with
    no host sync; computed as ``target.lerp_(online, tau)`` in float32 (float64 for float64
    tensors), so a float32 target equals ``torch._foreach_lerp_`` bit for bit on the CPU (the
    weight is ``1 - momentum``: with ``tau`` given, ``1 - (1 - tau)``, which a float64 target
    can tell from ``tau`` in its last bits).

    It differs from :class:`EMA` only in where the average lives: an :class:`EMA` owns its
    shadow (flat buffers that it swaps into the model, exports, offloads, keeps several decays
    or BEMA's rows in); here the average is a module that the user owns, runs and checkpoints.
    So it is the same engine (:class:`fastema.average.Average`: :class:`~fastema.average.EMAOptions`,
    the plan, the one update driver, the device plan) over a :class:`fastema.pairs.PairShadow` of
    the two networks' tensors, found by name in both and followed in both
    (:class:`fastema.torch._tensors.pairs.TorchPairs`); what an :class:`EMA` option means for a shadow
    it owns is refused here by name (:data:`REFUSALS`).

    The pairs are matched by normalised name (``module.`` and ``_orig_mod.`` prefixes stripped):
    a target made by ``copy.deepcopy(online)`` matches. Shapes and devices must match; dtypes may
    differ among float32, bfloat16, float16 and float64 (a float32 target of a bfloat16 online
    network). The target's ``requires_grad`` is left as it is; the kernels write its memory
    directly (no autograd, as under ``torch.no_grad()``) and bump its version counters, as torch's
    in-place operations do (a backward that saved the old target raises).

    Every ``update()`` checks that both modules still hold the tensors it paired (a dict lookup,
    one ``data_ptr()`` and a layout check a tensor, with torch's registration hooks watching the
    modules; see :meth:`fastema.torch._tensors.pairs.TorchPairs.follow`): a tensor whose storage moved
    (``p.data = new``) is followed; a tensor or module replaced, added or removed is looked up
    again by name and followed if it still fits, or refused by name, before anything is written.

    Sharded networks (FSDP2, tensor parallel, HSDP: DTensor parameters), sharded alike: each rank
    averages its own local shards in place, with no collective; a forward that left unsharded
    copies on the modules is resharded first.

    DeepSpeed ZeRO-3, partitioned alike (the policy's engine and a reference engine made with the
    same stage-3 config, ``deepspeed.initialize(model=ref, config=cfg)``, as TRL's
    ``prepare_deepspeed`` does; pass the engines or their modules): each rank lerps the elements of
    its own partitions (``p.ds_tensor`` of the target towards the online's), in place, with no
    gather, no collective and no full parameter allocated; the partitions' padding is never read or
    written. The target's gathered copies (DeepSpeed keeps the parameters under
    ``stage3_param_persistence_threshold`` gathered after a forward, and a forward reads that copy)
    are released before each update and :meth:`hard_update`, as DeepSpeed's own
    ``GatheredParameters`` releases them, so that the target's next forward gathers the averaged
    partitions; an update while they are in use (inside the target's forward or a
    ``GatheredParameters`` block) is refused. Parameters partitioned in one network and not in the
    other, or over other ranks, are refused by name.

    Sharded or partitioned, ``update()`` and :meth:`hard_update` are rank-local: call them on every
    rank. One that raises on one rank (a network changed there, a bad argument) wrote and counted
    nothing there, while the others went on; make it again on that rank before the target is read.
    Until then the ranks' pieces are of different updates, and under ZeRO-3 the other ranks have
    released the target's gathered copies and that rank has not, so DeepSpeed's next gathers of the
    target (its forward) go out of step. :meth:`iter_weights` refuses on every rank while the ranks'
    counts of ``update()`` and :meth:`hard_update` calls differ. ``skip_nonfinite=True`` looks at
    each rank's own pieces: an inf/NaN in one rank's piece skips that rank's fold alone.

    Args:
        online: the network being trained (bare, DDP- or torch.compile-wrapped).
        target: its copy, updated in place (typically ``copy.deepcopy(online)`` with
            ``requires_grad_(False)``).
        tau: the weight of the online network, in ``[0, 1]`` (default 0.005, SB3's, when
            ``momentum`` is not given).
        momentum: instead of ``tau``: the weight kept from the target (``1 - tau``), a float or a
            schedule :class:`fastema.torch.EMA` takes as ``decay=`` (DINO's cosine from 0.996 to 1;
            a warm-up, ``PowerWarmup(0.999, ...)``); not the schedules over training time
            (``PowerFunction``, ``HalfLife``, ``BEMA``: :data:`SCHEDULE_REFUSALS`).
        update_every: update on every k-th call of ``update()`` (the first call updates);
            ``compensate=True`` uses ``momentum ** k``.
        buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default: the online
            network's, as SB3 does with ``tau=1`` for them), ``"average"`` or ``"ignore"`` (the
            target's buffers, integer ones included, are left alone). Integer buffers are copied.
        exclude: name patterns (fnmatch, normalised names) left alone in the target.
        rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 targets).
        seed: stochastic-rounding seed.
        skip_nonfinite: skip an update (decided on the device, no sync) when an online tensor
            holds inf/NaN: the target keeps its values.
        device_step: keep the update count, the momentum schedule, ``update_every``'s skips and
            the rounding key in device memory, advanced by a one-thread kernel at every call, so
            ``update()`` captured in a CUDA graph replays the schedule exactly. ``None`` (default):
            on when the networks are on a GPU.
        **options: any other :class:`~fastema.average.EMAOptions` name (``debias``,
            ``shadow_dtype``, ``offload``) is refused by name
            with the reason (:data:`REFUSALS`); an unknown name is a ``TypeError`` with the list.

    Inside a ``torch.compile``-d function ``update()`` is one custom operator (see :meth:`update`).
    """

    _side: TorchPairs                   # the parts, of the types target_parts makes
    _avg: PairShadow
    _core: Average
    _checkpoint: TargetState

    def __init__(self, online: nn.Module, target: nn.Module, tau: float | None = None, *,
                 momentum: Any = None, update_every: int = 1, compensate: bool = False,
                 buffers: str = "copy", exclude: Sequence[str] = (), rounding: str = "nearest", seed: int = 0,
                 skip_nonfinite: bool = False, device_step: bool | None = None, **options):
        for what, m in (("online", online), ("target", target)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
        if unwrap(online) is unwrap(target):
            raise ValueError("target is the online network itself; pass a copy: TargetNetwork(online, "
                             "copy.deepcopy(online))")
        if tau is not None and momentum is not None:
            raise ValueError(f"give tau or momentum (= 1 - tau), not both; got tau={tau!r}, momentum={momentum!r}")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
            raise ValueError(f"tau must be a float in [0, 1], got {tau!r} (a schedule goes to momentum=)")
        unknown = sorted(set(options) - set(REFUSALS))
        if unknown:
            raise TypeError(f"TargetNetwork() got unknown option(s) {unknown}; it takes tau or momentum, "
                            f"{', '.join(n for n in EMAOptions.names() if n not in REFUSALS and n != 'decay')}, "
                            f"buffers and exclude")
        EMAOptions(**options).refuse("TargetNetwork", REFUSALS)    # by name, before anything else is read
        if momentum is None:
            momentum = 1.0 - (0.005 if tau is None else float(tau))
        for m in momentum if isinstance(momentum, (list, tuple)) else [momentum]:
            if type(m) in SCHEDULE_REFUSALS:
                raise ValueError(f"TargetNetwork does not take momentum={type(m).__name__}(...): "
                                 f"{SCHEDULE_REFUSALS[type(m)]}")
        check_rounding(rounding, "bfloat16")           # the value; each target dtype is checked below
        # The rounding is per target dtype (a bfloat16 target may round stochastically), so the
        # options are checked with the nearest one and the engine is given the one asked for.
        opts = EMAOptions(momentum, update_every=update_every, compensate=compensate,
                          seed=seed, skip_nonfinite=skip_nonfinite, device_step=device_step)
        if opts.shadow_rows != 1:
            raise ValueError(f"TargetNetwork does not take several decays (momentum={momentum!r}): a target "
                             f"network keeps one average; give one momentum")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.online, self.target = online, target
        self.buffers, self.exclude = buffers, patterns("exclude", exclude)
        self._copies = 0                        # hard updates made: a stream of the target checks them too
        self._reads = Agreements()                # its streams' agreements (the same on every rank)
        parts = target_parts(online, target, opts, self.exclude, buffers, rounding, device_step)
        assert isinstance(parts.side, TorchPairs)  # target_parts pairs the two networks
        assert parts.engine is not None
        # a host plan's update on a GPU refuses a capture (the adapter's query: the fake GPU's too)
        gpus = [d for d in parts.side.devices if d != "cpu"]
        self._refuses_capture: str | None = gpus[0] if gpus and parts.engine.device_plan is None else None
        super().__init__(parts)

    # ------------------------------------------------------------ what it is

    @property
    def momentum(self) -> float:
        """The momentum (``1 - tau``) the next update uses."""
        return float(self.plan.decay)          # type: ignore[arg-type]  # one row

    @property
    def tau(self) -> float:
        """The weight of the online network in the next update (``1 - momentum``)."""
        return 1.0 - self.momentum

    @property
    def device_step(self) -> bool:
        """True when the plan lives on the device (see the ``device_step`` argument)."""
        return self._core.device_plan is not None

    def memory(self) -> dict[str, int]:
        """Bytes this target network holds besides the target (the caller's tensors, which are the
        average), by device: the launch tables, the non-finite flags, the device plan. Sums to
        :attr:`nbytes`."""
        from ._placement.memory import pairs_memory

        return pairs_memory(self._side, self._core.device_plan)

    @property
    def nbytes(self) -> int:
        """Bytes this target network holds besides the target (see :meth:`memory`)."""
        return sum(self.memory().values())

    @property
    def names(self) -> dict[str, list[str]]:
        """The target's tensors by what ``update()`` does to them: ``averaged``, ``copied``
        (floating buffers) and ``integer`` (copied)."""
        return self._checkpoint.names

    @property
    def skipped(self) -> dict[str, torch.Tensor]:
        """``device -> int32[1]`` flags of the last update with ``skip_nonfinite=True`` (nonzero: that
        call wrote nothing: an inf/NaN in the online network, or, with the plan on the device, a
        call ``update_every`` skips). Read them when you need them: a read waits for the device."""
        if not self.skip_nonfinite:
            return {}
        plan = self._core.device_plan
        return dict(self._side.flags if plan is None else plan.flags)

    def __repr__(self) -> str:
        a, c, i = self._side.sel.names
        return (f"TargetNetwork(tau={self.tau:.6g}, {len(a)} averaged, {len(c)} copied, {len(i)} integer, "
                f"updates={self.updates}, device_step={self.device_step})")

    # ------------------------------------------------------------ the per-step path

    def update(self, step: int | None = None) -> None:
        """Move the target towards the online network (call after ``optimizer.step()``).

        Inside a function compiled with ``torch.compile`` the call is one custom operator
        (``fastema::update_``, as :meth:`fastema.torch.EMA.update`), which runs this eager update
        at every call of the compiled code: the schedule advances without recompiling.

        Args:
            step: the training step for the momentum schedule; defaults to the number of
                updates made.
        """
        if torch.compiler.is_compiling():
            _compile.compiled_update(self.compiled, step)
            return
        if self._refuses_capture is not None:
            _refuse_capture(self._refuses_capture)
        self._core.update(step)

    def _eager_update(self, step: int | None) -> None:
        if self._refuses_capture is not None:
            _refuse_capture(self._refuses_capture)
        self._core.update(step)                          # the engine's driver: plan, follow, kernels, carry

    def hard_update(self) -> None:
        """``target <- online`` exactly (every averaged and copied tensor; DQN's periodic copy,
        TorchRL's ``HardUpdate``). Not counted as an update; the schedule is not advanced. A
        refused call (a changed network) copies and counts nothing."""
        self._side.follow()                 # refused here: a rank that retries counts its copy once
        self._copies += 1                   # counted before the copy: a stream sees one that fails
        self._side.copy_all()

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The counters and the schedule (plain Python values). The averaged weights are the
        target's own: save ``target.state_dict()`` beside this."""
        return self._checkpoint.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s counters and schedule; everything is checked before anything
        changes (load the target's weights with ``target.load_state_dict``)."""
        self._checkpoint.load_state_dict(state)

    # ------------------------------------------------------------ the target streamed out

    def iter_weights(self, row: int = 0, *, dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET,
                     to: Ranks = "all") -> Stream:
        """The target's weights streamed out as ``(name, tensor)`` in its ``state_dict()`` order
        (see :meth:`fastema.torch.EMA.iter_weights`): fresh full tensors (never views of the target,
        which the next ``update()`` writes), floating ones cast to ``dtype``, each tied tensor once
        (its first name); tensors only (a module's extra state that is not a tensor,
        ``get_extra_state()``'s dict, is left out, here and in :meth:`weights_metadata`). A sharded
        target (FSDP2, tensor parallel, HSDP) is gathered one ``full_tensor()`` a parameter: a
        collective, which every rank calls and iterates (the ranks not in ``to`` get nothing; one
        closed early reads the rest), after the ranks agree (a rank that skipped an ``update()`` or
        a :meth:`hard_update`, or refuses, makes every rank raise). ``row`` must be 0 (one average);
        ``bucket_bytes`` is checked and kept for symmetry with the other averages (nothing here is
        bucketed)."""
        def calls(replayed: bool | None = False) -> int:     # as the EMA's (contract.model_parts)
            return self._core.plan_now(replayed).calls
        return target_stream(self.target, calls, row, dtype, bucket_bytes, to, self._reads,
                             version=lambda replayed=False: (calls(replayed), self._copies))

    def weights_metadata(self, row: int = 0, *, dtype: torch.dtype | None = None) -> list[WeightMeta]:
        """``WeightMeta(name, dtype, shape)`` of what :meth:`iter_weights` yields, from the target alone
        (no gather, no collective)."""
        return target_meta(self.target, row, dtype)


def target_parts(online: nn.Module, target: nn.Module, opts: EMAOptions, exclude: tuple,
                 buffers: str, rounding: str, device_step: bool | None) -> FaceParts:
    """The builder of a :class:`TargetNetwork`, its arguments checked: its side (the two networks
    paired: :class:`~fastema.torch._tensors.pairs.TorchPairs`), whose pair shadow is the engine's
    shadow, the engine over both (the plan on the device where ``device_step`` says, or by default
    on a GPU: every kernel compiled and loaded now), its checkpoint side (:class:`TargetState`) and
    the compiled operator's lists. A target network writes no model of its own: no swap."""
    pairs = TorchPairs(online, target, exclude, buffers)
    for g in pairs.avg.groups:
        stochastic_rounding(rounding, g.shadow_kind)   # float32 targets: stochastic refused
    engine = Average(opts, FORMAT, pairs.avg, adapter=pairs)
    engine.rounding = rounding
    if device_step is None:
        device_step = any(d != "cpu" for d in pairs.devices)
    plan: list = []
    if device_step:
        engine.plan_on_device(also=pairs.behind_flags())   # every kernel compiled and loaded now
        assert engine.device_plan is not None
        plan = [t for t in engine.device_plan.tensors() if isinstance(t, torch.Tensor)]
    pairs.op_lists(engine.skip_nonfinite, plan)        # made now, not in a traced first call
    return FaceParts(pairs, pairs.avg, engine, TargetState(engine, pairs), None,
                     engine.plan.cadence, lambda: pairs.op_lists(engine.skip_nonfinite, plan))


def made_on_every_rank(make: Callable[[], tuple[TargetNetwork, str]], what: str) -> TargetNetwork:
    """``make()`` (a :class:`TargetNetwork`, and a text of the settings every rank must share: a
    callback's period...), then, where ``torch.distributed`` runs more than one rank, the ranks of
    the world agree, once (one or two exchanges of 512 bytes; never per step): a rank whose
    ``make()`` raised makes every rank raise (its own error there, a ``Disagreement`` with its
    reason on the others), and ranks whose networks (tau, the names they sync), counts of updates or
    settings differ refuse alike. Every rank must call it; ``what`` names it in the errors. For a
    training loop's start (``fastema.trl.RefSyncCallback.on_train_begin``), where the other ranks
    would otherwise go on into the first step's collectives and wait there for the rank that
    raised. (fastema's callbacks' helper: not in ``__all__``.)"""
    import torch.distributed as dist

    groups: list = []
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ._placement.gather import mesh_device

        groups = [(dist.group.WORLD, mesh_device(dist.group.WORLD))]
    read = Read("start()", owner="TargetNetwork")
    seq = Agreements()                                  # a sequence of its own: made once
    try:
        network, shared = make()
    except BaseException as err:                        # a Ctrl-C too: the others must not wait
        if groups:
            try:
                agree(groups, read, Stamp(0), seq, err)
            except Disagreement:
                pass                                    # every rank raises: this one its own error
        raise
    if not groups:
        return network
    agree(groups, read, Stamp(network.calls), seq)      # a refusal; updates made before (a 2nd run)
    digest = zlib.crc32(repr((network.tau, network.names, shared)).encode())
    try:
        agree(groups, Read("start()", "settings", owner="TargetNetwork"), Stamp(network.calls, 0, digest),
              seq)
    except Disagreement:
        raise Disagreement(f"{what}: the ranks' target networks differ in their tau, the names "
                           f"they sync or their settings (on global rank {dist.get_rank()}: "
                           f"tau={network.tau:.6g}, {shared}): each rank averages its own part of "
                           f"the target, so give every rank the same arguments and models. Nothing "
                           f"was written.") from None
    return network


def _refuse_capture(device: str) -> None:
    if _backends.capturing("torch", device):
        raise RuntimeError("TargetNetwork.update() is being captured in a CUDA graph, but this one keeps "
                           "its schedule on the host (device_step=False): every replay would repeat this "
                           "call's tau. Make it with device_step=True (the default on a GPU).")
