"""A checkpoint entry's torch forms: the host copies a ``state_dict()`` hands out (:func:`staged`),
a shadow view as the checkpoint holds it (:func:`global_view`: a DTensor for a sharded tensor), its
shape with no collective (:func:`global_shape`), and what this rank keeps of a loaded entry
(:func:`local_part`). Used by :mod:`.checkpoint` and by the faces with a checkpoint of their own
(``WindowAverage``'s ring).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..._interrupts import ctrl_c_held
from .._sharding import params as _sharded
from .slices import SplitEntry, piece_of_slices, slices

if TYPE_CHECKING:
    from .._tensors.model import TorchModel

__all__ = ["global_shape", "global_view", "load_into", "local_part", "refuse_extra_state", "staged"]


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of ``t`` with a storage of its own (what a checkpoint entry should be:
    ``safetensors.torch.save_file`` takes it, ``torch.save`` of it writes it alone, holding it keeps
    nothing else alive). Synchronous: the values are there on return."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t)


def staged(side: TorchModel, views: dict[str, torch.Tensor], stacked: bool = False) -> dict:
    """Host copies of shadow views (``name -> view``) as the checkpoint holds them (see
    :func:`global_view`): what ``state_dict()`` hands out, so that ``dcp.load`` writes into them and
    not into the shadow. One contiguous copy a tensor, each with a storage of its own, in
    pageable host memory (no GPU memory, and nothing left in torch's pinned-memory cache). A
    sharded tensor stays a DTensor of its mesh with a host local tensor (as DCP's own CPU
    staging makes them)."""
    out = {}
    for n, v in views.items():
        spec = side.specs.get(n)
        if stacked and spec is not None and spec.slices:     # split: this rank's pieces only
            out[n] = slices(v, _sharded.rows_spec(spec, v.shape[0]))
        else:
            out[n] = global_view(side, n, _host_copy(v), stacked)
    return out


def global_view(side: TorchModel, name: str, view: torch.Tensor, stacked: bool = False):
    """A shadow view as the checkpoint holds it: as it is, or a DTensor for a sharded tensor
    (``stacked``: the view is a ``(rows, *shape)`` stack of the tensor's averages)."""
    spec = side.specs.get(name)
    if spec is None:
        return view
    return _sharded.wrap(view, _sharded.rows_spec(spec, view.shape[0]) if stacked else spec)


def global_shape(side: TorchModel, name: str, dst: torch.Tensor, stacked: bool) -> tuple:
    """The shape a checkpoint entry of ``dst`` has (:func:`global_view`'s), with no collective: a
    tensor cut into pieces over the ranks (split over replicas, ZeRO-1/2 masters) is not gathered.
    """
    spec = side.specs.get(name)
    if spec is not None and spec.pieces is not None:
        whole = spec.shape if spec.replica_dim is not None else spec.pieces[0]   # HSDP: global
        return ((dst.shape[0],) if stacked else ()) + tuple(whole)
    return tuple(global_view(side, name, dst, stacked).shape)


def local_part(side: TorchModel, name: str, value: torch.Tensor, dst: torch.Tensor,
               stacked: bool) -> torch.Tensor:
    """What this rank keeps of a checkpoint tensor: its shard of a sharded tensor (from a full
    tensor, or a DTensor of any layout: a collective when the layouts differ); a full plain tensor
    from a DTensor for an unsharded one (a collective)."""
    spec = side.specs.get(name)
    if isinstance(value, SplitEntry) and (spec is None or not spec.slices):
        raise ValueError("this entry holds one rank's pieces of an average split over replicas "
                         "(shard_replicas): load it with torch.distributed.checkpoint "
                         "(dcp.load({'ema': ema})), which reads every rank's pieces, or save a "
                         "full checkpoint with ema.full_state_dict()")
    if spec is None:
        return _sharded.full(value).reshape(dst.shape)     # a flat ZeRO-3 entry takes the shape
    spec = _sharded.rows_spec(spec, dst.shape[0]) if stacked else spec
    if spec.slices and isinstance(value, SplitEntry):  # a split average's own checkpoint entry
        return piece_of_slices(value, spec)
    return _sharded.piece_of(value, spec)


def lands_finite(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``value`` is finite as it lands in the average (``dtype``: a float64 1e300 lands in a
    float32 average as inf, a float32 1e5 in a float16 one). A load: one host read an entry."""
    if value.dtype != dtype and value.is_floating_point():
        value = value.to(dtype)
    return bool(torch.isfinite(value).all())


def lands_as_saved(what: str, value: torch.Tensor, dtype: torch.dtype) -> str | None:
    """A problem where a copied or integer buffer ``value`` does not land in ``dtype`` as it was saved
    (torch's ``copy_`` would convert it without a word): an integer outside ``dtype``'s range (it would
    wrap: 2**40 + 7 lands in int32 as 7), a finite float beyond it (it would land as inf); else None.
    A load: one host read an entry."""
    if value.numel() == 0 or value.dtype == dtype or dtype == torch.bool or dtype.is_complex:
        return None
    if not dtype.is_floating_point:
        info, lo, hi = torch.iinfo(dtype), int(value.min()), int(value.max())
        if lo < info.min or hi > info.max:
            held = lo if lo == hi else f"{lo}..{hi}"
            return f"{what} holds {held}, outside {str(dtype).replace('torch.', '')}'s range (it would wrap)"
    elif not lands_finite(value[torch.isfinite(value)], dtype):   # (its own inf and NaN land as they are)
        return f"{what} holds values beyond {str(dtype).replace('torch.', '')}'s range (they would load as inf)"
    return None


def refuse_extra_state(tensors: dict, path: str) -> None:
    """Refuse, naming it, a module's extra state (not a tensor) among ``tensors`` (``name ->
    (value, dtype)``, dtype None for one) for a safetensors file, which holds tensors only; nothing
    is written."""
    extra = [n for n, (_, dtype) in tensors.items() if dtype is None]
    if extra:
        what = type(tensors[extra[0]][0]).__name__
        raise TypeError(f"{extra[0]!r} is a module's extra state (get_extra_state(): {what}), "
                        f"which a safetensors file ({path!r}) cannot hold: save to a .pt path "
                        "(torch.save's format holds it), or write the tensors yourself "
                        "(averaged_state_dict() without it). Nothing was written.")


def load_into(target: nn.Module, state: dict) -> None:
    """``copy_to(other)``'s load: every key, shape and dtype of ``state`` (an average's state dict)
    checked against ``target``'s (a module's extra state that is not a tensor is its
    ``set_extra_state()``'s to take), then loaded strictly, a Ctrl-C held until all of it is in; a
    mismatch raises before a tensor is written."""
    theirs = target.state_dict(keep_vars=True)
    missing = [k for k in theirs if k not in state]
    extra = [k for k in state if k not in theirs]
    wrong = [f"{k}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}" for k, a in state.items()
             if k in theirs and isinstance(a, torch.Tensor)
             and isinstance(b := theirs[k], torch.Tensor)
             and (b.shape, b.dtype) != (a.shape, a.dtype)]   # (load: a cast)
    if missing or extra or wrong:
        raise ValueError(f"copy_to: the model does not match the averaged one (missing "
                         f"{missing[:5]}, unexpected {extra[:5]}, dtypes and shapes {wrong[:5]}); "
                         "nothing was copied. Copy into a model like it (to cast: "
                         "model.load_state_dict(average.averaged_state_dict()))")
    with ctrl_c_held():
        target.load_state_dict(state, strict=True)
