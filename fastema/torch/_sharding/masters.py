"""What fastema knows of DeepSpeed's optimizers: the float32 master weights an ``EMA(engine)`` averages.

Under bfloat16 (or float16) training the optimizer keeps float32 masters and rounds them into the
16-bit parameters after every step; an average of the parameters inherits that rounding (updates
smaller than half a bfloat16 ulp are lost). Where the masters can be read shard-locally with the
parameters' own layout, the average reads them instead:

- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): sub-group ``i`` keeps its parameters' partitions
  (``p.ds_tensor``) one after another in ``fp16_partitioned_groups_flat[i]``, in the order of
  ``fp16_groups[i]``, and its masters in ``fp32_partitioned_groups_flat[i]`` in the same order
  (``stage3.py``: the masters are made as a float32 copy of the partitions' flat buffer; with
  float32 parameters on the masters' device they are that very buffer). A parameter's master is
  the view of ``partition_numel()`` elements at its partition's offset: the same shape, the same
  padding and the same ``Shard(0)`` layout as ``ds_tensor``, so checkpoints and exports of the
  partitions stay as they are (:mod:`fastema.torch._sharding.params`), with the masters' values.
- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``: ``single_partition_of_fp32_groups``) and
  **BF16_Optimizer** (``fp32_groups_flat_partition``): each rank's masters are one slice of each
  flattened group (``bit16_groups_flat`` / ``bf16_groups_flat``, whose rank slices are
  ``parallel_partitioned_bit16_groups`` / ``bf16_partitioned_groups``), cutting parameters at
  arbitrary offsets, while the 16-bit parameters are whole on every rank (views of the flat
  buffer). A parameter's master is its piece (maybe empty) of this rank's slice; the pieces'
  :class:`~fastema.torch._sharding.params.Spec` (``pieces``) makes exports and checkpoints gather them.
  Swap and copy-out write the masters, then do what the optimizer's step does: this rank's
  partition of the flat 16-bit buffer <- its masters (rounded), and an all-gather of the partitions.

Masters offloaded to host memory (ZeRO-Offload, ``offload_optimizer: {device: cpu}``) are read there:
the shadow is then a host shadow beside them, and with ``offload="cpu"`` it folds from them in place
on a worker thread (:mod:`fastema.torch._placement.host_masters`; ``ema.source`` ends in
``IN_HOST_MEMORY``). Masters swapped to NVMe and layouts not as expected are not read: the average
reads the parameters and a warning says so once when they are 16-bit.

The masters are views of the optimizer's flat buffers; DeepSpeed may move a buffer
(``offload_states`` / ``reload_states`` set ``flat.data``), so the buffers' addresses are checked
with the parameters' at every update and the views are made again when one moved.

Gradient accumulation (:class:`Steps`): DeepSpeed's loop calls ``engine.step()`` after every
micro-batch and steps the optimizer only at accumulation boundaries. An average of an engine folds
at an ``update()`` call only when the engine made an optimizer step since its last update, told by
``engine.global_steps`` (a Python int, no device read), as the HF Trainer callback updates at
optimizer steps only. ``engine.is_gradient_accumulation_boundary()`` cannot tell it: ``step()``
advances ``micro_steps`` before it returns, so after ``engine.step()`` it describes the next
micro-batch, not the one just stepped (and it is ``True`` only inside ``step()`` with
``managed_gradient_accumulation=False``).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

__all__: list[str] = []

PARAMETERS = "parameters"
ZERO3_MASTERS = "deepspeed-zero3-fp32-masters"
IN_HOST_MEMORY = "-in-host-memory"    # ema.source's suffix: offloaded, folded from host masters in place

_FLAT_MASTERS = {                     # optimizer -> (masters, 16-bit flats, their partitions, params, label, source)
    "DeepSpeedZeroOptimizer": ("single_partition_of_fp32_groups", "bit16_groups_flat",
                               "parallel_partitioned_bit16_groups", "bit16_groups", "ZeRO stage 1/2",
                               "deepspeed-zero2-fp32-masters"),
    "BF16_Optimizer": ("fp32_groups_flat_partition", "bf16_groups_flat", "bf16_partitioned_groups", "bf16_groups",
                       "BF16_Optimizer", "deepspeed-bf16-fp32-masters"),
}


class Masters:
    """The optimizer's float32 master partitions standing for ZeRO-3 parameters' partitions.

    ``views``: average name -> the master view the shadow reads; ``parts``: average name -> the
    16-bit partition (``ds_tensor``) that evaluation reads, for the names whose master is other
    memory (a float32 model's masters are its partitions). ``flats``: the optimizer's flat master
    buffers (their addresses are checked at every update)."""

    source = ZERO3_MASTERS

    def __init__(self, flats: list, views: dict, parts: dict):
        self.flats = flats
        self.views = views
        self.parts = parts
        self.specs: dict = {}                     # the partitions' own layouts stand (ZeRO-3)
        self._backup: list | None = None

    def addresses(self) -> list[int]:
        """Where the optimizer's flat master buffers are now (one ``data_ptr()`` each)."""
        return [f.data_ptr() for f in self.flats]

    def push(self) -> None:
        """The parameters' partitions <- their masters (rounded to the partitions' dtype, as the
        optimizer's step does): after the masters were written (a copy-out)."""
        with torch.no_grad():
            for n, part in self.parts.items():
                part.copy_(self.views[n])

    def exchanged(self, swapping_in: bool) -> None:
        """After the shadow and the masters were exchanged: swapping in, back the partitions up and
        round the averaged masters into them (where evaluation reads); swapping out, put the backed-up
        partitions back bit for bit (the masters already hold the raw weights again)."""
        if swapping_in:
            self._backup = [part.clone() for part in self.parts.values()]
            self.push()
        elif self._backup is not None:
            with torch.no_grad():
                for part, saved in zip(self.parts.values(), self._backup):
                    part.copy_(saved)
            self._backup = None


class Steps:
    """The optimizer steps of a DeepSpeed engine, as an average of it sees them: an ``update()`` call
    folds only when :meth:`new` (the engine stepped its optimizer since the last update folded, or
    since the average was made), and the caller records it with :meth:`done` once made, so a refused
    update changes nothing. Two attribute reads per call, Python ints: no device read."""

    __slots__ = ("engine", "folded")

    def __init__(self, engine):
        self.engine = engine
        self.folded = engine.global_steps       # what the average holds: the weights at construction

    def new(self) -> bool:
        """Whether the engine made an optimizer step (an accumulation boundary) since the last update:
        False at ``update()`` after a micro-step inside gradient accumulation."""
        return self.engine.global_steps != self.folded

    def done(self) -> None:
        """An update was made: the engine's steps so far are folded."""
        self.folded = self.engine.global_steps


def steps(engine) -> Steps | None:
    """The :class:`Steps` of ``engine`` (a ``DeepSpeedEngine``, or None for a plain model); None where
    there is no engine or it counts no ``global_steps`` (then every ``update()`` call folds)."""
    if engine is None or type(getattr(engine, "global_steps", None)) is not int:
        return None
    return Steps(engine)


def find(engine, averaged: dict, what: str = "EMA(engine)", stacklevel: int = 4) -> Masters | None:
    """The masters standing for the averaged ZeRO-3 partitions of ``engine`` (``averaged``: name ->
    the local tensor the average would read), or None: no engine, no masters this module reads
    (then a warning when the averaged parameters are 16-bit and the optimizer keeps float32 masters
    that are not read), or masters not held in memory in the expected layout (said once; ``stacklevel``:
    the warning's, the caller of the average's constructor)."""
    if engine is None:
        return None
    opt: Any = getattr(engine, "optimizer", None)
    kind = type(opt).__name__
    if kind in _FLAT_MASTERS:
        label = _FLAT_MASTERS[kind][4]
        try:
            return _flat_masters(opt, kind, averaged)
        except ValueError as err:
            if any(t.dtype in (torch.bfloat16, torch.float16) for t in averaged.values()):
                warnings.warn(f"{what}: DeepSpeed {label} keeps float32 master weights, but {err}: this average "
                              f"reads the {_dtypes(averaged)} parameters instead (ema.source == 'parameters'), so "
                              f"updates smaller than their rounding are lost.", RuntimeWarning, stacklevel=stacklevel)
            return None
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return None
    try:
        where = _zero3_offsets(opt)
    except ValueError as err:
        warnings.warn(f"{what}: {err}; this average reads the parameters' partitions instead "
                      f"(ema.source == 'parameters').", RuntimeWarning, stacklevel=stacklevel)
        return None
    flats = list(opt.fp32_partitioned_groups_flat)
    views, parts = {}, {}
    for name, t in averaged.items():
        hit = where.get(id(t))
        if hit is None:                           # not optimized (frozen), or a buffer: it is its own master
            continue
        i, offset = hit
        view = flats[i].detach().narrow(0, offset, t.numel())
        views[name] = view
        if not (view.data_ptr() == t.data_ptr() and view.dtype == t.dtype):
            parts[name] = t
    if not views:
        return None
    return Masters(flats, views, parts)


class FlatMasters(Masters):
    """The float32 masters of ZeRO-1/2 or BF16_Optimizer: each rank's masters are one slice of each
    flattened parameter group, so a parameter's master is a piece (possibly empty) of its elements,
    and ``specs`` describe the pieces (:class:`~fastema.torch._sharding.params.Spec` ``pieces``: exports and
    checkpoints gather them). The 16-bit parameters are whole on every rank, views of one flat
    buffer per group (``lows``) whose rank partitions are ``partitions``: :meth:`push` does what
    the optimizer does after a step (this rank's partition <- its masters, rounded; then an
    all-gather of the partitions into every rank's flat buffer: a collective)."""

    def __init__(self, source: str, flats: list, views: dict, specs: dict, lows: list, partitions: list,
                 groups: list):
        super().__init__(flats, views, {})
        self.source, self.specs, self.lows, self.partitions, self.groups = source, specs, lows, partitions, groups

    def push(self) -> None:
        import torch.distributed as dist

        from .params import gather_pieces

        with torch.no_grad():
            for master, low, parts, group in zip(self.flats, self.lows, self.partitions, self.groups):
                mine = parts[dist.get_rank(group)]
                mine.copy_(master)
                for part, got in zip(parts, gather_pieces(mine, [p.numel() for p in parts], group)):
                    part.copy_(got)

    def exchanged(self, swapping_in: bool) -> None:
        if swapping_in:
            self._backup = [low.clone() for low in self.lows]
            self.push()
        elif self._backup is not None:
            with torch.no_grad():
                for low, saved in zip(self.lows, self._backup):
                    low.copy_(saved)
            self._backup = None


def _flat_masters(opt, kind: str, averaged: dict) -> FlatMasters:
    """The pieces of ZeRO-1/2's or BF16_Optimizer's masters standing for the averaged parameters, or
    ValueError naming what is not as expected."""
    import torch.distributed as dist

    from .params import Spec, mesh_of

    masters_attr, lows_attr, parts_attr, params_attr, label, source = _FLAT_MASTERS[kind]
    masters, lows, parts, groups = (getattr(opt, a, None) for a in (masters_attr, lows_attr, parts_attr, params_attr))
    dp = getattr(opt, "real_dp_process_group", None)
    if not masters or not lows or not parts or not groups or dp is None or \
            not len(masters) == len(lows) == len(parts) == len(groups) == len(dp):
        raise ValueError(f"its {masters_attr} / {lows_attr} / {parts_attr} are not there as expected")
    if getattr(opt, "swap_optimizer", False):
        raise ValueError("its masters are swapped to NVMe (offload_optimizer: nvme): not read")
    where = {}                                    # id(param) -> (group, its offset in the flat buffer)
    for i, (params, low, pieces, master) in enumerate(zip(groups, lows, parts, masters)):
        rank = dist.get_rank(dp[i])
        if master.dtype != torch.float32 or master.dim() != 1 or master.numel() != pieces[rank].numel() or \
                low.dim() != 1 or not low.is_contiguous() or len(pieces) != dist.get_world_size(dp[i]):
            raise ValueError(f"the masters of group {i} are not this rank's float32 slice of its flat buffer")
        for p in params:
            offset, rest = divmod(p.data_ptr() - low.data_ptr(), p.element_size())
            if rest or p.dtype != low.dtype or not p.is_contiguous() or offset < 0 or offset + p.numel() > low.numel():
                raise ValueError(f"a parameter of group {i} is not a view of its flat buffer")
            where[id(p)] = (i, offset)
    views, specs = {}, {}
    for name, t in averaged.items():
        hit = where.get(id(t))
        if hit is None:
            continue                              # not optimized (frozen), or a buffer: it is its own master
        i, offset = hit
        bounds = [(part.data_ptr() - lows[i].data_ptr()) // lows[i].element_size() for part in parts[i]]
        cuts = [(max(offset, lo), min(offset + t.numel(), lo + part.numel())) for lo, part in zip(bounds, parts[i])]
        pieces = tuple((a - offset, max(0, b - a)) for a, b in cuts)
        if sum(n for _, n in pieces) != t.numel():
            raise ValueError(f"the partitions of group {i} do not cover {name!r} once")
        rank = dist.get_rank(dp[i])
        start = max(0, cuts[rank][0] - bounds[rank])
        views[name] = masters[i].detach().narrow(0, min(start, masters[i].numel()), pieces[rank][1])
        specs[name] = Spec(mesh_of(dp[i], masters[i].device.type), (), t.shape, tuple(t.stride()),
                           pieces=(tuple(t.shape), pieces))
    if not views:
        raise ValueError("no averaged parameter is one it optimizes")
    return FlatMasters(source, list(masters), views, specs, list(lows), [list(p) for p in parts[:len(masters)]],
                       list(dp))


def _zero3_offsets(opt) -> dict:
    """``id(p.ds_tensor) -> (sub-group, offset in its flat master buffer)`` for every optimized
    ZeRO-3 parameter, or ValueError naming what is not as expected (masters swapped to NVMe,
    sizes or dtypes that do not match, a partition outside its flat buffer)."""
    if getattr(opt, "swap_optimizer", False) or getattr(opt, "optimizer_swapper", None) is not None:
        raise ValueError("the ZeRO-3 float32 masters are swapped to NVMe (offload_optimizer: nvme)")
    groups, flats = opt.fp16_groups, opt.fp32_partitioned_groups_flat
    lows = getattr(opt, "fp16_partitioned_groups_flat", None) or [None] * len(groups)
    if len(groups) != len(flats):
        raise ValueError(f"the ZeRO-3 optimizer has {len(groups)} parameter sub-groups and {len(flats)} float32 "
                         f"master buffers")
    out = {}
    for i, (params, flat, low) in enumerate(zip(groups, flats, lows)):
        sizes = [p.partition_numel() for p in params]
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != sum(sizes) or \
                flat.dtype != torch.float32 or not flat.is_contiguous():
            raise ValueError(f"the ZeRO-3 float32 master buffer of sub-group {i} is not a contiguous float32 buffer of "
                             f"its {sum(sizes)} partition elements")
        offset = 0
        for p, size in zip(params, sizes):
            part = p.ds_tensor
            if part.numel() != size or part.dim() != 1:
                raise ValueError(f"a ZeRO-3 partition of sub-group {i} has {part.numel()} elements, not {size}")
            if low is not None and low.dtype == part.dtype and \
                    part.data_ptr() != low.data_ptr() + offset * part.element_size():
                raise ValueError(f"a ZeRO-3 partition of sub-group {i} is not at its place in the flat buffer of the "
                                 f"partitions")
            out[id(part)] = (i, offset)
            offset += size
    return out


def _dtypes(averaged: dict) -> str:
    return "/".join(sorted({str(t.dtype).replace("torch.", "") for t in averaged.values()}))
