"""fastema's in-place model-average operations as PyTorch custom operators, for ``torch.compile``.

Dynamo cannot trace numba's dispatcher (nor the address checks, which read ``data_ptr()``), so
inside a compiled function :meth:`EMA.update`, :meth:`EMA.swap` and :meth:`EMA.copy_to` call
these operators instead. Each takes the tensors the operation writes (``written``: the flat
shadows, the copied buffers, the device plan's arrays, and for a swap the model's tensors) and
the tensors it reads (``read``: the model's tensors), plus an integer handle of the average (a
graph constant: one compiled graph per average object). Its implementation runs the eager
operation, so at every call of the compiled code the checks, the schedule and the launches are
those of an eager call: a changing decay schedule needs no recompilation, and the generated code
hands the operator the shadow itself (it is declared mutated, so Inductor re-inplaces it: no copy).

Functionalization without re-inplacing, and ``torch.library.opcheck``, pass other tensors than
the average's own (clones, or a parameter's updated value computed earlier in the same graph).
The operators then work on the tensors they are handed: the average reads the given sources,
and the written tensors' values go through the average's own buffers and back, which are then
restored (a slow path, never the one the compiled training step takes).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

_OWNERS: dict[int, weakref.ref] = {}
_IDS = itertools.count(1)


def register(owner) -> int:
    """A handle for ``owner`` (an average), which the operators find it by."""
    handle = next(_IDS)
    _OWNERS[handle] = weakref.ref(owner, lambda _: _OWNERS.pop(handle, None))
    return handle


def _owner(handle: int):
    ref = _OWNERS.get(handle)
    owner = ref() if ref is not None else None
    if owner is None:
        raise RuntimeError(f"the average of this compiled code (handle {handle}) no longer exists; compile the "
                           f"function again for the new average")
    return owner


def _is(a, b) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and
                      a.stride() == b.stride())


@contextlib.contextmanager
def _through(owner, written: list, read: list, own_written: list, own_read: list, reads_sources: bool = True):
    """Run the eager operation of ``owner`` as if on ``written`` and ``read`` (see the module
    docstring): nothing to do for the tensors that are the average's own. ``reads_sources``: the
    read tensors are the model's (followed by a rebind), else the average's own (copied in)."""
    if len(written) != len(own_written) or len(read) != len(own_read):
        raise RuntimeError("fastema operator called with other tensors than its average has (the model or the "
                           "average changed since compilation); compile again")
    other = [(o, g) for o, g in zip(own_written, written) if not _is(o, g)]
    other_read = not all(map(_is, read, own_read))
    if not other and not other_read:
        yield
        return
    copied_in = other + ([] if reads_sources or not other_read else
                         [(o, g) for o, g in zip(own_read, read) if not _is(o, g)])
    with torch.no_grad():
        backup = [o.clone() for o, _ in copied_in]
        for o, g in copied_in:
            o.copy_(g)
        restore = owner._read_from(read) if other_read and reads_sources else None
        try:
            yield
            for o, g in other:
                g.copy_(o)
        finally:
            if restore is not None:
                restore()
            for (o, _), b in zip(copied_in, backup):
                o.copy_(b)


@torch.library.custom_op("fastema::update_", mutates_args=("written",))
def update_(written: list[torch.Tensor], read: list[torch.Tensor], handle: int, step: int) -> None:
    """One ``update()`` of the average ``handle`` (``step < 0``: no explicit step)."""
    owner = _owner(handle)
    own_written, own_read = owner._op_tensors("update")
    with _through(owner, written, read, own_written, own_read):
        owner._eager_update(None if step < 0 else step)


@update_.register_fake
def _(written, read, handle, step):
    return None


@torch.library.custom_op("fastema::swap_", mutates_args=("written",))
def swap_(written: list[torch.Tensor], handle: int, row: int) -> None:
    """``swap(row)`` of the average ``handle``: average ``row`` in, or the raw weights back."""
    owner = _owner(handle)
    own_written, _ = owner._op_tensors("swap")
    with _through(owner, written, [], own_written, []):
        owner._swap.swap(row)


@swap_.register_fake
def _(written, handle, row):
    return None


@torch.library.custom_op("fastema::copy_to_", mutates_args=("written",))
def copy_to_(written: list[torch.Tensor], read: list[torch.Tensor], handle: int, row: int) -> None:
    """``copy_to()`` of the average ``handle``: average ``row`` into the model it tracks."""
    owner = _owner(handle)
    own_written, own_read = owner._op_tensors("copy_to")
    with _through(owner, written, read, own_written, own_read, reads_sources=False):
        owner._eager_copy_to(row)


@copy_to_.register_fake
def _(written, read, handle, row):
    return None
