"""fastema's in-place model-average operations as PyTorch operators (``torch.library.Library``),
for ``torch.compile``, and the compiled-step contract of a torch face (``face.compiled``).

Dynamo cannot trace numba's dispatcher (nor the address checks, which read ``data_ptr()``), so
inside a compiled function :meth:`EMA.update`, :meth:`EMA.swap` and :meth:`EMA.copy_to` call
these operators instead. Each takes the tensors the operation writes (``written``: the flat
shadows, the copied buffers, the device plan's arrays, and for a swap the model's tensors) and
the tensors it reads (``read``: the model's tensors), plus an integer handle of the face's
:class:`Compiled` (a graph constant: one compiled graph per average object). Its implementation runs
the eager operation, so at every call of the compiled code the checks, the schedule and the
launches are those of an eager call: a changing decay schedule needs no recompilation, and the
generated code hands the operator the shadow itself (it is declared mutated, so Inductor
re-inplaces it: no copy).

Functionalization without re-inplacing, and ``torch.library.opcheck``, pass other tensors than
the average's own (clones, or a parameter's updated value computed earlier in the same graph).
The operators then work on the tensors they are handed: the average reads the given sources,
and the written tensors' values go through the average's own buffers and back, which are then
restored (a slow path, never the one the compiled training step takes).

``average_parameters()`` cannot be an operator (its block runs user code between the swaps): inside
compiled code it is ``eager_block``, entered and exited eagerly behind ``torch.compiler.disable``
(one graph break, refused with ``fullgraph=True``). The wrappers are made at the first use inside a
traced function, never at import: ``torch.compiler.disable`` imports ``torch._dynamo`` (0.8 s on every
rank, worker and command line that imports ``fastema.torch``).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, Callable, Iterator

import torch

__all__ = ["Compiled", "after_steps", "compiled_step", "compiled_swap", "compiled_update", "operator"]

_OWNERS: dict[int, weakref.ref] = {}
_IDS = itertools.count(1)


class Compiled:
    """A torch face's compiled-step contract (``face.compiled``): everything the custom operators
    of this module ask of the face they run, and nothing else is reached. Made by the face from its
    parts (:class:`fastema.torch._face.contract.FaceParts`) once it is complete; registered under
    :attr:`handle`, which the operators find it by (held weakly: a graph of an average that is
    gone raises, naming it).

    Args:
        ops: ``() -> {op: (tensors it writes, tensors it reads)}`` for ``"update"`` (and, for a
            model average, ``"swap"`` and ``"copy_to"``): every tensor an eager call touches, so
            functionalization sees each write; made again when the tensors change, never while
            tracing.
        eager_update: the eager ``update(step)`` (checks, schedule, launches; ``None``: no step).
        read_from: ``read_from(tensors) -> restore``: read the sources from ``tensors`` (in the
            ``"update"`` list's order) until ``restore()`` is called (an operator handed other
            tensors than the face's own: a slow path).
        eager_copy_to: the eager ``copy_to(row)`` into the tracked model (None: the face writes no
            model: a target network).
        swap: the swap state (:class:`fastema.average.ModelSwap`: ``swap.swap(row)``), or None.
        lowered: the update written in the graph where it is the plain case
            (:class:`fastema.torch._face.lowered.Lowered`: ``lowered.trace()``), or None.
    """

    def __init__(self, ops: Callable[[], dict], eager_update: Callable[[int | None], None],
                 read_from: Callable[[list], Callable[[], None]], *,
                 eager_copy_to: Callable[[int], None] | None = None, swap: Any = None,
                 lowered: Any = None):
        self._ops = ops
        self.eager_update, self.read_from = eager_update, read_from
        self.eager_copy_to, self.swap, self.lowered = eager_copy_to, swap, lowered
        self.handle = next(_IDS)
        handle = self.handle
        _OWNERS[handle] = weakref.ref(self, lambda _: _OWNERS.pop(handle, None))

    @property
    def ops(self) -> dict:
        """``op -> (tensors it writes, tensors it reads)`` (see the class)."""
        return self._ops()


def _owner(handle: int) -> Compiled:
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
def _through(owner: Compiled, written: list, read: list, own_written: list, own_read: list,
             reads_sources: bool = True):
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
        restore = owner.read_from(read) if other_read and reads_sources else None
        try:
            yield
            for o, g in other:
                g.copy_(o)
        finally:
            if restore is not None:
                restore()
            for (o, _), b in zip(copied_in, backup):
                o.copy_(b)


# ---------------------------------------------------------------- the operators' registration
# Library define + impl, not custom_op, whose Python layers boxed both tensor lists again at every
# call (issue 86). One kernel for every backend, a fake for tracing; each kernel bumps the autograd
# versions of what it writes, as custom_op's did (a tensor saved for backward then written raises).

_LIB = torch.library.Library("fastema", "FRAGMENT")
_bump = bump = torch.autograd.graph.increment_version


def operator(schema: str) -> Callable[[Callable], Callable]:
    """Define ``fastema::<schema>`` with the decorated function as its kernel and a fake that
    returns nothing (every operator writes in place and returns nothing)."""
    def register(kernel: Callable) -> Callable:
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fastema::{name}", lambda *args: None, lib=_LIB)
        return kernel
    return register


@operator("update_(Tensor(a0!)[] written, Tensor[] read, SymInt handle, SymInt step) -> ()")
def update_(written: list[torch.Tensor], read: list[torch.Tensor], handle: int, step: int) -> None:
    """One ``update()`` of the average ``handle`` (``step < 0``: no explicit step)."""
    owner = _owner(handle)
    own_written, own_read = owner.ops["update"]
    with _through(owner, written, read, own_written, own_read):
        owner.eager_update(None if step < 0 else step)
    _bump(written)


@operator("refuse_update_(Tensor(a0!)[] written, str message, Tensor? tensor, float? number) "
           "-> ()")
def refuse_update_(written: list[torch.Tensor], message: str, tensor: torch.Tensor | None,
                   number: float | None) -> None:
    """A bad ``step`` given to ``update()`` in compiled code, refused when the graph runs with the
    ValueError an eager call raises (a refusal while tracing would be a graph break, and under
    ``fullgraph=True`` dynamo's "Observed exception" instead of the reason). ``message``: the
    refusal of a Python value, made while tracing; ``tensor`` / ``number``: a step dynamo traces as
    a value (a tensor, a float), refused by the eager check here. ``written`` is the update's: the
    operator stays in the graph (it is declared to write them; it writes nothing)."""
    from ...schedules import check_step

    if tensor is not None or number is not None:
        check_step(tensor if tensor is not None else number)           # refuses: neither is an int
    raise ValueError(message or "step must be an int >= 0")


def compiled_update(owner: Compiled, step) -> None:
    """A face's ``update(step)`` inside a traced function (``owner``: its :class:`Compiled`): an
    EMA's plain case written in the graph (:mod:`.lowered`), else one :func:`update_` operator, or,
    for a ``step`` eager refuses, one :func:`refuse_update_` that raises eager's error when the
    graph runs (nothing updated or counted). A tensor step is refused, compiled as in eager: its
    value is on its device, and the schedule would read it on the host at every call."""
    from ...schedules import check_step

    lowered = owner.lowered
    if step is None and lowered is not None and lowered.trace():     # the plain case: in the graph
        return
    written, read = owner.ops["update"]
    if isinstance(step, (torch.Tensor, float)):          # traced values: their repr is known only at run time
        tensor = step if isinstance(step, torch.Tensor) else None
        torch.ops.fastema.refuse_update_(written, "", tensor, None if tensor is not None else step)
        return
    if step is not None:                                 # as eager (the operator would take True as 1 and -1 as
        if isinstance(step, int) and not isinstance(step, bool) and step < 0:     # no step)
            step = int(step)                             # a traced int: its value, for the message
        try:
            check_step(step)
        except ValueError as err:
            torch.ops.fastema.refuse_update_(written, str(err), None, None)
            return
        if lowered is not None:                          # a timed schedule's later plain updates: checked
            lowered.took_step()
    torch.ops.fastema.update_(written, read, owner.handle, -1 if step is None else step)


class _AfterSteps:
    """The eager post-step bodies of attached averages (``Attachment.after_step``, held weakly),
    by handle: what a traced optimizer step's :func:`attached_step_` runs at each call."""

    def __init__(self) -> None:
        self._bodies: dict[int, weakref.WeakMethod] = {}

    def add(self, body: Callable[[], None]) -> int:
        handle = next(_IDS)
        self._bodies[handle] = weakref.WeakMethod(body)      # type: ignore[arg-type]
        return handle

    def drop(self, handle: int) -> None:
        self._bodies.pop(handle, None)

    def get(self, handle: int) -> Callable[[], None] | None:
        ref = self._bodies.get(handle)
        return None if ref is None else ref()


after_steps = _AfterSteps()


def compiled_step(owner: Compiled, handle: int) -> None:
    """An attached average's step post-hook inside a traced optimizer step (``owner``: the
    average's :class:`Compiled`; ``handle``: its :data:`after_steps` body): one
    :func:`attached_step_` operator in the graph, which decides and updates eagerly at each call
    (DCP's dummy step is told when the step runs, never baked into the trace)."""
    written, read = owner.ops["update"]
    torch.ops.fastema.attached_step_(written, read, owner.handle, handle)


@operator("attached_step_(Tensor(a0!)[] written, Tensor[] read, SymInt handle, SymInt body) -> ()")
def attached_step_(written: list[torch.Tensor], read: list[torch.Tensor], handle: int,
                   body: int) -> None:
    """The post-step body ``body`` of :data:`after_steps` on the average ``handle``: its update,
    or nothing (DCP's dummy step; an average detached since the step was compiled)."""
    owner = _owner(handle)
    run = after_steps.get(body)
    if run is None:
        return
    own_written, own_read = owner.ops["update"]
    with _through(owner, written, read, own_written, own_read):
        run()
    _bump(written)


@operator("swap_(Tensor(a0!)[] written, SymInt handle, SymInt row) -> ()")
def swap_(written: list[torch.Tensor], handle: int, row: int) -> None:
    """``swap(row)`` of the average ``handle``: average ``row`` in, or the raw weights back."""
    owner = _owner(handle)
    own_written, _ = owner.ops["swap"]
    with _through(owner, written, [], own_written, []):
        owner.swap.swap(row)
    _bump(written)


def compiled_swap(owner: Compiled, row) -> None:
    """A face's ``swap(row)`` inside a traced function: one :func:`swap_` operator, and the swap state
    as the swap leaves it (where it is not refused), for the rest of the trace: an EMA's ``update()``
    traced after it is the operator, which refuses it as eager does (the update written in the graph
    read the state before the swap). Dynamo stores that state after the graph too, as the operator
    left it."""
    torch.ops.fastema.swap_(owner.ops["swap"][0], owner.handle, row)
    state = owner.swap
    if state.row is None:
        state.row = row
    elif state.row == row:
        state.row = None


@operator("copy_to_(Tensor(a0!)[] written, Tensor[] read, SymInt handle, SymInt row) -> ()")
def copy_to_(written: list[torch.Tensor], read: list[torch.Tensor], handle: int, row: int) -> None:
    """``copy_to()`` of the average ``handle``: average ``row`` into the model it tracks."""
    owner = _owner(handle)
    own_written, own_read = owner.ops["copy_to"]
    assert owner.eager_copy_to is not None          # "copy_to" is listed by a face that has it
    with _through(owner, written, read, own_written, own_read, reads_sources=False):
        owner.eager_copy_to(row)
    _bump(written)


# ------------------------------------------------------------ average_parameters() in compiled code

_EAGER_BLOCK = ("fastema: average_parameters() swaps the weights in Python and swaps them back when the block exits, "
                "also on an error, which compiled code cannot promise: call it outside the compiled function "
                "(with ema.average_parameters(): compiled_eval(x)), or use ema.swap() twice inside it")


def _make_eager_block() -> Callable:
    """``eager_block(swap, row, model)``: ``swap.block(row, model)``, made, entered and exited eagerly
    under ``torch.compile`` (a graph break; refused with ``fullgraph=True``, naming the reason)."""
    class _EagerBlock:
        __slots__ = ("_block",)

        def __init__(self, block):
            self._block = block

        @torch.compiler.disable(reason=_EAGER_BLOCK)
        def __enter__(self):
            return self._block.__enter__()

        @torch.compiler.disable(reason=_EAGER_BLOCK)
        def __exit__(self, *exc):
            return self._block.__exit__(*exc)

    @torch.compiler.disable(reason=_EAGER_BLOCK)
    def eager_block(swap, row: int, model):
        return _EagerBlock(swap.block(row, model))

    return eager_block


@contextlib.contextmanager
def afresh() -> Iterator[None]:
    """For the ``with`` block, as in a fresh process: ``eager_block`` not made yet (made again at
    its first use in the block, inside a traced function); the one made before is put back after,
    and one made in the block dropped."""
    made = globals().pop("eager_block", None)
    try:
        yield
    finally:
        globals().pop("eager_block", None)
        if made is not None:
            globals()["eager_block"] = made


def __getattr__(name: str):
    # ``eager_block`` is made at its first use, which is inside a traced function (average_parameters()
    # asks for it only while compiling; Dynamo reads a module attribute missing from its __dict__ with
    # getattr, so this runs for real). torch.compiler.disable imports torch._dynamo (about 0.8 s): never
    # at import, nor in eager code.
    if name == "eager_block":
        made = globals()["eager_block"] = _make_eager_block()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
