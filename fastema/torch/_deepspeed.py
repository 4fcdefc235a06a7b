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
  partitions stay as they are (:mod:`fastema.torch._sharded`), with the masters' values.
- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``: ``single_partition_of_fp32_groups``) and
  **BF16_Optimizer** (``fp32_groups_flat_partition``): each rank's masters are one equal slice of
  the flattened group, cutting parameters at arbitrary offsets, while the 16-bit parameters are
  whole on every rank. Not read yet: the average reads the parameters and says so once when they
  are 16-bit.

The masters are views of the optimizer's flat buffers; DeepSpeed may move a buffer
(``offload_states`` / ``reload_states`` set ``flat.data``), so the buffers' addresses are checked
with the parameters' at every update and the views are made again when one moved.
"""
from __future__ import annotations

import warnings

import torch

__all__: list[str] = []

PARAMETERS = "parameters"
ZERO3_MASTERS = "deepspeed-zero3-fp32-masters"

_FLAT_MASTERS = {                     # optimizers whose masters are flat slices across parameters (not read yet)
    "DeepSpeedZeroOptimizer": ("single_partition_of_fp32_groups", "ZeRO stage 1/2"),
    "BF16_Optimizer": ("fp32_groups_flat_partition", "BF16_Optimizer"),
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


def find(engine, averaged: dict, what: str = "EMA(engine)") -> Masters | None:
    """The masters standing for the averaged ZeRO-3 partitions of ``engine`` (``averaged``: name ->
    the local tensor the average would read), or None: no engine, no masters this module reads
    (then a warning when the averaged parameters are 16-bit and the optimizer keeps float32 masters
    that are not read), or masters not held in memory in the expected layout (said once)."""
    if engine is None:
        return None
    opt = getattr(engine, "optimizer", None)
    kind = type(opt).__name__
    if kind in _FLAT_MASTERS:
        attr, label = _FLAT_MASTERS[kind]
        if getattr(opt, attr, None) and any(t.dtype in (torch.bfloat16, torch.float16) for t in averaged.values()):
            warnings.warn(f"{what}: DeepSpeed {label} keeps float32 master weights, which fastema reads under "
                          f"ZeRO-3 only (yet): this average reads the {_dtypes(averaged)} parameters, so updates "
                          f"smaller than their rounding are lost. ZeRO stage 3 makes the masters the source "
                          f"(ema.source says which it reads).", RuntimeWarning, stacklevel=4)
        return None
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return None
    try:
        where = _zero3_offsets(opt)
    except ValueError as err:
        warnings.warn(f"{what}: {err}; this average reads the parameters' partitions instead "
                      f"(ema.source == 'parameters').", RuntimeWarning, stacklevel=4)
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
