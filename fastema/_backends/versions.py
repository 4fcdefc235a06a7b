"""torch's version counters: what tells autograd that fastema's kernels wrote a tensor in place (the
torch backend's :meth:`~fastema._backends.torch.Torch.version_bump`)."""
from __future__ import annotations

import functools


@functools.cache
def bump_versions():
    """``bump(tensors)``: tell autograd that fastema's kernels wrote ``tensors`` in place, as torch's own
    in-place operations do (also under ``no_grad``): a backward through a graph that saved their old
    values raises "modified by an inplace operation" instead of using the new ones. One C call for a
    list where this torch has it, else one tensor at a time (torch < 2.5). No sync, no allocation
    (~0.03 us a tensor)."""
    import torch

    from .. import _privates

    bump = torch.autograd.graph.increment_version
    try:
        bump([torch.empty(0)])
        return _privates.find("torch._C:_increment_version") or bump
    except TypeError:
        return lambda tensors: [bump(t) for t in tensors]
