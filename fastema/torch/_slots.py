"""Where a model's tensors are, and what fastema writes into them besides the kernels.

- Storage keys (``_storage_key``, ``_local_key``): equal keys mean the same memory in the same
  layout (a tied or aliased tensor); ``_DATA_PTR``, a tensor's address; ``_tensors_of``, every
  parameter and buffer of a model under every name it has.
- Writes: :data:`bump_versions` (autograd's version counters of tensors the kernels wrote),
  :func:`copy_unless_flagged_` (integer buffers, behind the non-finite flags), and the check
  that the averaged and copied groups share no memory (``_disjoint_groups``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..flat import FlatShadow
from . import _sharded

__all__ = ["bump_versions", "copy_unless_flagged_"]

_DATA_PTR = torch.Tensor.data_ptr                # a tensor's address (unsharded tensors)


def _storage_key(t: torch.Tensor):
    """Where a tensor's elements are: equal keys mean the same memory in the same layout (a tied
    or aliased tensor under another name). None for a tensor with no memory to compare."""
    if not t.numel() or t.device.type == "meta" or type(t) not in (torch.Tensor, nn.Parameter):
        return None
    return t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()


def _local_key(t: torch.Tensor):
    """:func:`_storage_key` of the memory a (possibly sharded) tensor's rank holds."""
    return _storage_key(_sharded.local_tensor(t) if _sharded.is_sharded(t) else t)


def _tensors_of(model: nn.Module) -> dict:
    """``name -> (kind, tensor, persistent)`` of every parameter and buffer of ``model``, under every
    name a shared tensor or module has (``named_parameters(remove_duplicate=False)``'s names)."""
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for k, p in m._parameters.items():
            if p is not None:
                out[pre + k] = ("parameter", p, True)
        for k, b in m._buffers.items():
            if b is not None:
                out[pre + k] = ("buffer", b, k not in m._non_persistent_buffers_set)
    return out


def _version_bump():
    """torch's version-counter bump of a list of tensors in one C call, or one tensor at a time
    where this torch's takes one (torch < 2.5)."""
    bump = torch.autograd.graph.increment_version
    try:
        bump([torch.empty(0)])
        return getattr(torch._C, "_increment_version", bump)
    except TypeError:
        return lambda tensors: [bump(t) for t in tensors]


bump_versions = _version_bump()
"""``bump_versions(tensors)``: tell autograd that fastema's kernels wrote ``tensors`` in place, as
torch's own in-place operations do (also under ``no_grad``): a backward through a graph that
saved their old values raises "modified by an inplace operation" instead of using the new ones.
No sync, no allocation (~0.03 us a tensor)."""


def copy_unless_flagged_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], flags: dict | None) -> None:
    """``dst <- src`` for every pair (integer buffers: BatchNorm counters), except on a device whose skip
    flag (``flags``: device name -> int32[1] tensor) is set, which keeps its old values: on the device,
    no host sync. One ``_foreach_copy_`` per device; behind a flag, one ``where`` per tensor against
    the flag read once per device (before: four operations per tensor)."""
    with torch.no_grad():
        if not flags:
            torch._foreach_copy_(list(dsts), list(srcs))
            return
        keep: dict = {}                          # device name -> 0-dim bool: the flag is set
        pairs: dict = {}                         # device name -> (dsts, what they receive)
        for d, s in zip(dsts, srcs):
            name = _device_name(d)
            flag = flags.get(name)
            ds, vs = pairs.setdefault(name, ([], []))
            ds.append(d)
            if flag is None:
                vs.append(s)
                continue
            k = keep.get(name)
            if k is None:
                k = keep[name] = flag[0] != 0
            vs.append(torch.where(k, d, s))
        for ds, vs in pairs.values():
            torch._foreach_copy_(ds, vs)


def _device_name(t: torch.Tensor) -> str:
    return "cpu" if t.device.type == "cpu" else f"{t.device.type}:{t.device.index}"


def _disjoint_groups(a: FlatShadow, b: FlatShadow) -> None:
    from .._backends import describe, disjoint

    bufs = [describe(t, n) for n, t in zip(a.names, a.sources)] + \
           [describe(t, n) for n, t in zip(b.names, b.sources)]
    disjoint(bufs, [repr(n) for n in a.names] + [repr(n) for n in b.names])
