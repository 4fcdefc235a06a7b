"""A model EMA's update written in the compiled graph itself (``torch.compile``'s plain case),
so that Inductor fuses it with the parameter update: no operator call, no kernel of fastema's.

The plain case: an :class:`~fastema.torch.EMA` (not a subclass that adds to the update) with the
plan on the device (``device_step``), every shadow in its source's dtype, float32 or float64,
nearest rounding, no ``skip_nonfinite``, ``update_every=1``, a schedule whose
:meth:`fastema.average.DevicePlan.formula` is not None (a constant decay, ``NumUpdates``,
``PowerWarmup``, ``PowerFunction``, ``HalfLife``; ``debias`` too; the last two over training time:
not once given a ``step=``, whose time a plain call's is checked against, ``DevicePlan.stepped``), a
whole shadow on the sources' devices (no offload, split, masters or sharded parameters), no
``step=``, the model as the average last followed it (no swap in, one traced before included: the
state as the traced swap leaves it, :func:`~fastema.torch._face.compiled.compiled_swap`; no restart
or registration pending). :meth:`Lowered.trace` then writes, in the traced function, the plan
kernel's step (``kernels._stats.plan_step``) in float64 tensor operations on the device plan's
counters (the decay, the debiased weight), and the lerp of each row's shadow views to the sources as
Dynamo writes ``torch._foreach_lerp_`` from torch 2.12 on (:func:`_lerp_`, on every supported
torch), the weight a 0-d tensor of the graph (a constant decay: a constant of the graph, filled in
by ``full_like``; never a Python number read at each call: no recompilation as it changes, no host
sync), then copies the copied buffers. Every tensor it writes is a constant of the graph of its own,
guarded by identity (:class:`Lowered`: an alias of a view of the shadow's flat buffer, the views not
overlapping one another), so Inductor writes them in place: no copy, no allocation, and on the CPU
no kernel of its own (the whole step is one C++ kernel, as the same step with ``_foreach_lerp_``).

Anything else goes through the ``fastema::update_`` operator, which runs the eager update: the
special cases (stochastic rounding, ``skip_nonfinite``, mixed dtypes, ``update_every``, momentum
and merge schedules, BEMA, a placement) and a model changed since its lists were made (a tensor
cast, reshaped or restrided in place: eager's refusal; the registration hooks mark it stale; with
them removed, ``fastema.torch.registration_hooks(False)``, a tensor registered on the model after
the last eager update is seen at the next eager one). The
host plan is not advanced in the graph: once a graph advances it (set while tracing), every read of
the counters (``ema.updates``, ``calls``, ``decay``, ``plan``, ``state_dict()``, an eager update)
reads the device's first (:meth:`fastema.average.Average.plan_now`: on a GPU a sync).

Rounding: the lerp is ``addcmul`` of the difference, ``coeff * (end - start) + base``; a graph run
as it is (no Inductor: torch's ``addcmul`` kernels; on CUDA from torch 2.11) and Inductor's CUDA
code make that one FMA, as torch's eager ``lerp_`` and fastema's kernels do: the same bits;
Inductor's C++ rounds the product first: within one rounding of the eager update. The decay's
float64 formulas are the plan kernel's; ``pow`` may differ from the kernel's in the last bit of
the float64 (a warm-up's decay).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from ...average import DevicePlan, ModelSwap
from .._tensors.model import TorchModel, static

__all__ = ["Lowered"]

_WIDTHS = (torch.float32, torch.float64)         # the dtypes whose lerp takes a weight of their own
_TIMED = ("power_function", "half_life")         # the kinds over training time: a plain call's time is checked
_HALF = {torch.float32: 0.5 - 2.0 ** -26, torch.float64: 0.5}    # the least weight each takes as 0.5 or more


class Lowered:
    """A model EMA's update as the graph writes it (:meth:`trace`), one per face
    (``face.compiled.lowered``), its lists made again (:meth:`refresh`) with the operators' lists
    (construction, a followed model), never while tracing. Flat lists, each tensor one graph input
    reached by one short path (a tensor reached by two costs Dynamo an aliasing guard in Python at
    every call):

    - ``sources``: the averaged tensors, then the copied and integer buffers (the model's);
    - ``views``: every shadow view, row by row; ``runs``: ``(half, device, row, start, stop)``,
      the views ``[row * n + start, row * n + stop)`` of the sources ``[start, stop)`` (one dtype,
      one device; ``half``: that dtype's :data:`_HALF`);
    - ``copies``: the copied and integer buffers' destinations (the sources after the ``n``
      averaged);
    - ``plans``: per device, views of the plan's counters ``(calls and updates, last, norms)``:
      calls and updates one view, both advanced by one.

    The views, the copies' destinations and the counters are this object's own tensors (made here,
    held nowhere else in fastema), marked as ``torch._dynamo.mark_static_address(t, guard=True)``
    marks them and as torch's compiled optimizers mark their state: Dynamo guards each by identity
    and the graph holds it (a graph attribute, not a tensor input with its metadata guard: -36k of
    the compiled step's instructions at 32 tensors, the gates' figure). So a refresh that finds the
    same memory and layout keeps the same objects (nothing recompiles: the shadow's buffer never
    moves), and when this object goes, every tensor it handed out is emptied (``set_()``): a
    compiled graph that outlives the average keeps none of its memory alive.

    ``ready`` is False where the average is not the plain case (see the module docstring; what may
    change between calls, the options and the schedule, is read while tracing)."""

    def __init__(self, side: TorchModel, engine: Any, swap: ModelSwap):
        self.side, self.engine, self.swap = side, engine, swap
        self.device_plan: DevicePlan = engine.device_plan
        self.in_graph = _marker(self.device_plan)
        self.plans = {}
        for device, d in self.device_plan.devices.items():
            state = d.arrays["state"]
            at = DevicePlan.STATE
            assert at["updates"] == at["calls"] + 1, "calls and updates read as one view"
            counters = [state[at["calls"]:at["updates"] + 1], state[at["last"]:at["last"] + 1]]
            self.plans[device] = _own(counters + [state[at["norms"]:]])
        self.ready, self.n = False, 0
        self.sources: list = []
        self.views: list = []
        self.runs: list = []
        self.copies: list = []
        self.owned = [t for counters in self.plans.values() for t in counters]
        weakref.finalize(self, _release, self.owned).atexit = False

    def refresh(self) -> None:
        """Make the lists again from the side's current tensors (see the class)."""
        side, shadow, plan = self.side, self.side.avg, self.device_plan
        self.ready = False
        placed = shadow.folds_later or shadow.host_plan_only or shadow.in_place \
            or shadow.group is not None or shadow.layout.split is not None
        sharded = side.local_shards or side.masters is not None or side.fsdp or side.zero3
        if placed or sharded or side.steps is not None or self.engine.options.is_bema:
            return
        sources = list(shadow.sources)
        devices = [_plan_device(plan, s.device) for s in sources]
        if None in devices or any(s.dtype not in _WIDTHS for s in sources):
            return
        views, runs = [], []
        for row in range(shadow.rows):
            start = 0
            for i, src in enumerate(sources):
                view = shadow.view(i, row)
                if (view.dtype, view.shape, view.stride()) != (src.dtype, src.shape, src.stride()):
                    return
                views.append(view)
                key = (src.dtype, devices[i])
                if i + 1 == len(sources) or (sources[i + 1].dtype, devices[i + 1]) != key:
                    runs.append((_HALF[src.dtype], devices[i], row, start, i + 1))
                    start = i + 1
        copy, ints = side.copy, list(side.int_buffers.values())
        dsts = [copy.view(i) for i in range(len(copy.sources))] if copy is not None else []
        self.n, self.views, self.runs = len(sources), _kept(self.views, _own(views)), runs
        copied = list(copy.sources) if copy is not None else []
        self.sources = sources + copied + [s for s, _ in ints]
        self.copies = _kept(self.copies, _own(dsts + [d for _, d in ints]))
        self._hold(self.views + self.copies)
        self.ready = True

    def _hold(self, made: list) -> None:
        """Hold the tensors of ``made`` not held yet to the end (:func:`_release`)."""
        held = {id(t) for t in self.owned}
        self.owned.extend(t for t in made if id(t) not in held)

    def took_step(self) -> None:
        """In a traced function, before an ``update(step=)``'s operator: a schedule over training time's
        plain updates later in this trace go through the operator too (:attr:`DevicePlan.stepped`, which
        the operator sets when it runs; Dynamo stores it after the graph as well)."""
        recipe = self.device_plan.recipe
        if recipe is not None and recipe[0] in _TIMED:
            self.device_plan.stepped = True

    def trace(self) -> bool:
        """In a traced function: the update written into the graph (True), or nothing (False: the
        caller puts the operator in instead). What it reads is the compiled code's guards."""
        engine, side = self.engine, self.side
        if not self.ready or engine.skip_nonfinite or engine.rounding != "nearest" or side.resync \
                or side.stale or self.swap.row is not None:    # swapped (its property: more guards)
            return False
        recipe = self.device_plan.recipe             # one tuple of numbers: the schedule's guards
        if recipe is None:
            return False
        kind, rows, debias = recipe
        if kind in _TIMED and self.device_plan.stepped:     # its time checked against the last (the operator)
            return False
        tensor_weights = debias or kind != "constant"
        sources, views, n = self.sources, self.views, self.n
        i = 0
        for src in sources:     # a model cast or reshaped in place (model.to(), .data =): eager's refusal
            view = views[i] if i < n else self.copies[i - n]    # (no zip: a builtin read is a guard)
            if src.dtype != view.dtype or src.shape != view.shape or src.device != view.device \
                    or (i < n and src.stride() != view.stride()):
                return False
            i += 1
        with torch.no_grad():                   # as the eager update: the weights may require grad
            weights = {device: _advance(counters, kind, rows, debias)
                       for device, counters in self.plans.items()}
            for half, device, row, start, stop in self.runs:
                w = weights[device][row]
                _lerp_(views[row * n + start:row * n + stop], sources[start:stop], w, half, tensor_weights)
            if self.copies:
                torch._foreach_copy_(self.copies, sources[n:])
        return self.in_graph()                      # run while tracing, not at every call


def _lerp_(views: list, sources: list, weight, half: float, tensor: bool) -> None:
    """``torch._foreach_lerp_(views, sources, weight)`` as Dynamo writes it from torch 2.12 on (its
    polyfill ``foreach_lerp_inplace``): the difference, then one ``addcmul_`` (one FMA where the
    compiler makes one), from the view below a weight of 0.5 and from the source above it, eager
    ``lerp_``'s formula (a tensor weight: both, selected). Written here, so that every supported
    torch writes the same graph: 2.10 and 2.11 wrote it as sub, mul, add, two roundings (a graph
    run as it is, without Inductor, was not eager's update). A Python weight is judged as eager
    judges it, in the views' dtype: from ``half`` (:data:`_HALF`) up, as a float32 one from
    ``0.5 - 2**-26`` up rounds to 0.5 (the polyfill judges the float64). ``tensor``: whether
    ``weight`` is a (float64) tensor, known while tracing: said, not asked (a builtin read in a
    traced function is a guard at every call, as ``torch.float64`` is)."""
    diff = torch._foreach_sub(sources, views)
    if tensor:
        weight = weight.to(views[0].dtype)
        high = weight.abs() >= 0.5
        w = torch.where(high, -(1.0 - weight), weight)
        bases = [torch.where(high, src, view) for view, src in zip(views, sources)]
        torch._foreach_addcmul_(bases, [w for _ in diff], diff)
        torch._foreach_copy_(views, bases)
        return
    if weight >= half or weight <= -half:
        first = views[0]
        w = -(1.0 - torch.tensor(weight, dtype=first.dtype, device=first.device))
        torch._foreach_copy_(views, sources)
        torch._foreach_addcmul_(views, [w for _ in diff], diff)
    else:
        torch._foreach_addcmul_(views, [torch.full_like(d, weight) for d in diff], diff)


def _own(tensors: list) -> list:
    """Aliases of ``tensors`` that this object alone holds (``detach()``: the same memory, not a
    view of it, whose base ``set_()`` would not let go), marked static and guarded
    (:func:`~fastema.torch._tensors.model.static`)."""
    return static([t.detach() for t in tensors], guard=True)


def _kept(held: list, made: list) -> list:
    """``held`` where ``made`` is the same memory and layout tensor for tensor (the objects the
    compiled graphs guard by identity: nothing recompiles), else ``made``."""
    if len(held) == len(made) and all(_alike(a, b) for a, b in zip(held, made)):
        return held
    return made


def _alike(a, b) -> bool:
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _release(tensors: list) -> None:
    """Empty ``tensors`` (a dead :class:`Lowered`'s own): a compiled graph that holds them holds no
    memory of the average's (the graph's guards fail on them: its average is gone). Run by the
    garbage collector wherever a collection lands, inside a compile too: past the Python dispatch
    modes (a fake-tensor mode would refuse a real tensor) and torch function modes, with the fake
    tensors' meta flag off for the while (a real tensor's ``set_()`` would go to the meta
    kernel). Where torch moved one of those switches, without it (``fastema._privates``)."""
    from ... import _privates

    get_meta = _privates.find("torch._C:_meta_in_tls_dispatch_include")
    set_meta = _privates.find("torch._C:_set_meta_in_tls_dispatch_include")
    no_dispatch = _privates.find("torch._C:_DisableTorchDispatch") or contextlib.nullcontext
    no_function = _privates.find("torch._C:DisableTorchFunction") or contextlib.nullcontext
    switch = set_meta if get_meta is not None and set_meta is not None and get_meta() else None
    if switch is not None:
        switch(False)
    try:
        with no_dispatch(), no_function():
            for t in tensors:
                t.set_()
    finally:
        if switch is not None:
            switch(True)


def _marker(device_plan: DevicePlan):
    """A function of no arguments that marks ``device_plan`` advanced in a graph from now on
    (:attr:`DevicePlan.in_graph`) and returns True, marked as ``torch.compiler.assume_constant_result``
    marks (without importing ``torch._dynamo``; a ``fastema._privates`` row): Dynamo calls it for
    real while tracing, once (a Python side effect would be replayed after every call, about 20 us on
    the CPU). No arguments: Dynamo before torch 2.12 calls such a function with Python constants
    alone (an object raised ``AsPythonConstantNotImplementedError``), and 2.13 refuses an attribute
    it has not read yet (a lazy constant)."""
    def in_graph() -> bool:
        device_plan.in_graph = True
        return True

    in_graph._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return in_graph


def _advance(counters: list, kind: str, rows: list, debias: bool) -> list:
    """The plan kernel's step (``kernels._stats.plan_step``, a due call with no ``step=``) on one
    device's counters, in the graph, advanced in place; returns each row's weight: a Python float
    where it is one (a constant decay, not debiased: the lerp's constant), else a float64 tensor."""
    calls_updates, last, norms = counters
    t = calls_updates[0] + 1.0
    n = calls_updates[1] + 1.0
    out, new_norms, i = [], [], 0
    for row in rows:                            # (no enumerate: a builtin read is a guard)
        d = row if kind == "constant" else _decay(kind, row, n, last[0], t)     # (nor a function's)
        if debias:
            c = d * norms[i] + (1.0 - d)
            i += 1
            out.append(torch.where(c == 0.0, 1.0, (1.0 - d) / c))
            new_norms.append(c)
        else:
            out.append(1.0 - d)
    if debias:
        norms.copy_(torch.stack(new_norms))
    calls_updates.add_(1.0)
    last.copy_(t)
    return out


def _decay(kind: str, row: tuple, n, last, t):
    """``kernels._stats.schedule_decay`` of one row of a schedule that is not a constant, in float64
    tensor operations."""
    decay = row[0]
    if kind == "num_updates":
        return torch.clamp((1.0 + n) / (10.0 + n), max=decay)
    if kind == "power_function":
        return torch.where((last <= 0.0) | (t <= 0.0), 0.0, torch.pow(last / t, decay + 1.0))
    if kind == "half_life":
        return torch.pow(2.0, -(t - last) / decay)
    _, min_decay, inv_gamma, power, after, warmup = row                  # power_warmup
    s = torch.clamp(n - after - 1.0, min=0.0)
    value = 1.0 - torch.pow(1.0 + s / inv_gamma, -power) if warmup else torch.full_like(s, decay)
    value = torch.clamp(torch.clamp(value, max=decay), min=min_decay) if warmup else value
    return torch.where(s <= 0.0, 0.0, value)


def _plan_device(device_plan: DevicePlan, device: torch.device) -> str | None:
    """The device plan's name of the torch device ``device`` (None: no plan there)."""
    for name, d in device_plan.devices.items():
        if d.arrays["state"].device == device:
            return name
    return None
