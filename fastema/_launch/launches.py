"""Launch groups and their launches: what an owner asks for (:meth:`Launches.launch`), what makes
one (:func:`prepare`, from the two targets' tables), and a launch made for one call
(:func:`launch`).

A launch group is anything with the fields of :class:`Group` and a :class:`Launches` of its own
(``_layout.LayoutGroup``, ``pairs.PairGroup``, a plain :class:`Group`). It keeps its launches, keyed
by op and fixed values (:data:`.op.OPS`); each reads the group's tables at every call, so an owner
whose sources moved replaces ``group.tables`` and keeps them (see :mod:`fastema._launch`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Protocol

import numpy as np

from ..kernels.kinds import F64, MAX_ROWS, PLAN_KEYS_MAX, wide
from .cpu import launch as cpu_launch
from .op import OPS, Kernel, Spec  # noqa: F401  (Kernel: the launches' base, for callers)


def default_stream() -> int:
    """The stream getter of sources without a current stream: the legacy default stream (0)."""
    return 0


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


class Launch(Protocol):
    """A prepared launch of one op over one group (:meth:`Launches.launch`, :func:`prepare`): the
    seam between the launches' owners and the two targets (:mod:`.cpu.launch`, :mod:`.cuda.launch`).
    Its fixed arguments are bound when it is made; the group's tables are the group's (a launch
    reads them at each call); ``run(*varying)`` takes the op's :data:`VARYING` arguments, in that
    order."""

    def __call__(self, *varying: Any) -> None:
        """Launch on the group's device (on CUDA, on the stream current for the group's framework
        now)."""

    def once(self, *varying: Any) -> None:
        """The same launch made for one call only (:func:`launch`): nothing kept from it for a next
        call."""


KEPT = 64
"""The most launches one group keeps (:class:`Launches`); the oldest goes first."""

SLOT_KEPT = 2
"""The most launches of one slot a group keeps (launches whose keys differ in their arrays alone: an
owner's two flags, alternated); a third made anew replaces the oldest of them."""


class Launches:
    """The launches a launch group keeps: ``run = group.launch(op, **fixed)`` (every group derives
    from this class: ``_layout.LayoutGroup``, ``pairs.PairGroup``, :class:`Group`).

    A launch is prepared (:func:`prepare`) at the first call with its op and fixed arguments, and
    kept, keyed by the op and the fixed values: numbers by value, an array by identity (its owner
    passes the same object each time: a flag's view made once), at most :data:`SLOT_KEPT` per op and
    numbers (two flags alternated keep a launch each; a third array made anew replaces the launch
    bound to the oldest), at most :data:`KEPT` a group. It reads the group's tables at each call, so
    an owner whose sources moved replaces ``group.tables`` and keeps its launches. An owner's
    per-step launch is asked for by its :func:`spec`, made once (``group.launch_of(spec)``: the key
    itself, no keyword arguments to sort out: a few hundred instructions, against a few thousand).

    ``pins``: the owner may drop the group, and with it the tables, while a CUDA graph that captured
    one of its launches still replays (the array functions' cache): its CUDA launches keep the
    tables for good when they launch on a stream being captured (as a one-off launch does)."""

    pins: bool = False
    _kept: dict                     # the launches kept: every group sets it to {} when it is made

    def launch(self, op: str, **fixed) -> Launch:
        """The group's launch of ``op`` with ``fixed`` (:data:`.op.OPS`), prepared at its first
        call."""
        key = (op, tuple(fixed.items()))                # equal to its Spec (a tuple): the same key
        try:
            return self._kept[key]
        except (KeyError, TypeError):                   # a first call; an array among fixed
            return self._prepared(Spec(*key))

    def launch_of(self, spec: Spec) -> Launch:
        """:meth:`launch` of a :func:`spec` made once (an owner's per-step launch: the key
        itself)."""
        try:
            return self._kept[spec]
        except KeyError:
            return self._prepared(spec)

    def prepared(self) -> list[tuple[str, Launch]]:
        """``(op, launch)`` of every launch this group keeps, oldest first."""
        return [(key.op, run) for key, run in self._kept.items()]

    def _prepared(self, key: Spec) -> Launch:
        kept = self._kept
        op = key.op
        fixed = {k: v.obj if type(v) is _Same else v for k, v in key.fixed}
        try:
            hash(key)
        except TypeError:
            key = Spec(op, tuple((k, _by_value_or_identity(v)) for k, v in fixed.items()))
        run = kept.get(key)
        if run is None:
            slot = _slot(key)                 # the launches of other arrays in the same places
            same = [k for k in kept if _slot(k) == slot]
            if len(same) >= SLOT_KEPT:
                del kept[same[0]]             # the oldest gives way
            run = kept[key] = prepare(op, self, **fixed)
            if len(kept) > KEPT:
                del kept[next(iter(kept))]
        return run


def spec(op: str, **fixed) -> Spec:
    """The key of ``op``'s launch with ``fixed`` (a :class:`.op.Spec`), made once by an owner for
    its per-step launch (asked for as ``group.launch_of(spec)``), checked against the op table where
    it is made. An array among ``fixed`` (a flag's or a plan's view, made once) is in it by
    identity; the spec keeps it."""
    o = OPS[op]
    unknown = set(fixed) - set(o.fixed)
    if unknown:
        raise TypeError(f"op {op!r} takes no fixed argument {sorted(unknown)} (its fixed arguments: "
                        f"{o.fixed})")
    return Spec(op, tuple((k, _by_value_or_identity(v)) for k, v in fixed.items()))


_VALUES = (type(None), bool, int, float, str, type)


def _slot(key: Spec) -> tuple:
    """A launch's key with each array (each fixed value that is not a number, a string or a type)
    left out but for its name: the launches of one slot differ in their arrays alone, and a group
    keeps :data:`SLOT_KEPT` of them (a flag or a plan made anew replaces the launch bound to the
    oldest array, which it no longer keeps)."""
    return (key.op, *(item if type(item[1]) in _VALUES else item[0] for item in key.fixed))


class _Same:
    """An array among a launch's fixed arguments, in its key: the very object (its launch keeps
    it)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return type(other) is _Same and other.obj is self.obj


def _by_value_or_identity(value):
    try:
        hash(value)
    except TypeError:
        return _Same(value)
    return value


class Group(Launches):
    """What one launch needs to know about its sources besides the op's own arguments, as a group
    of its own (the smoother's metric streams, a device plan, an offloaded window, an array
    function's pair) that keeps its launches (:class:`Launches`). ``tables`` may be replaced (moved
    sources): the launches follow."""

    __slots__ = ("device", "shadow_kind", "src_kind", "tables", "current_stream", "pins", "_kept")

    def __init__(self, device: str, shadow_kind: int | None, src_kind: int, tables: Any,
                 current_stream: Callable[[], int] = default_stream, pins: bool = False):
        self.device = device                          # "cpu" or "cuda:N"
        self.shadow_kind = shadow_kind                # storage kind of the shadow (None for metric streams)
        self.src_kind = src_kind                      # of the sources (the values, for metric streams)
        self.tables = tables                          # Tables; None for metric streams and a plan
        self.current_stream = current_stream          # the raw handle of the stream to launch on now
        self.pins = pins
        self._kept: dict = {}

    def __repr__(self) -> str:
        chunks = None if self.tables is None else self.tables.chunks
        return f"Group({self.device!r}, {self.shadow_kind}, {self.src_kind}, chunks={chunks})"


def prepare(op: str, group, **fixed) -> Launch:
    """Kernel family ``op``'s launch over ``group``, prepared once (an owner asks its group,
    :meth:`Launches.launch`, which keeps it): ``run = prepare(op, group, **fixed)`` binds the op's
    fixed arguments (:data:`.op.OPS`), and ``run(*varying)`` takes its :data:`VARYING` ones at each
    call (``run(weights, key=0)`` for ``"lerp"``, ``run()`` for ``"copy"``). The one launch form of
    both targets (:data:`.cpu.launch.PREPARE`, :data:`.cuda.launch.PREPARE`): on the CPU the
    compiled overload's entry point after the first call; on CUDA the variant's code and one
    argument block packed at C speed (:mod:`.cuda.abi`), an argument rewritten only where it is a
    new object. Reads the group's tables at each call, and runs on the stream that is current for
    the group's framework at each call. An empty group's launch launches nothing; ``"plan_lerp"``'s
    group must have elements."""
    t = group.tables
    if op == "plan_lerp":
        _check_carrier(group, fixed)
    elif t is not None and t.chunks == 0 and op != "plan":     # the plan step reads no table
        return _NOTHING
    if op == "lerp":                                 # host weights: the kernel's arithmetic type
        fixed["cast"] = np.float64 if wide(group.shadow_kind, group.src_kind) else np.float32
    run = _target(group.device).PREPARE[op](group, **fixed)
    if op == "bema":                                 # alpha: the shadow's arithmetic type
        return _CastFirst(run, np.float64 if group.shadow_kind == F64 else np.float32)
    return run


def _target(device: str):
    """The target module of ``device``: :mod:`.cpu.launch`, or :mod:`.cuda.launch` after the fork
    check (:func:`_cuda_target`: refused in a child forked after CUDA was used)."""
    if not is_cuda(device):
        return cpu_launch
    return _cuda_target()


@functools.cache
def _cuda():
    """The CUDA launch layer's tables (:mod:`.cuda.tables`), after the fork check of
    :func:`.cuda.forked._cuda` (cached: a C-level call once made; the cache is dropped in every
    forked child, which asks again). Nothing under :mod:`.cuda.tables` is imported before: ``import
    fastema`` loads none of it."""
    from .cuda import forked

    return forked._cuda()


@functools.cache
def _cuda_target():
    """The CUDA launches (:mod:`.cuda.launch`), after the fork check of :func:`_cuda` (cached as it
    is)."""
    _cuda()
    from .cuda import launch as target

    return target


os.register_at_fork(after_in_child=_cuda.cache_clear)
os.register_at_fork(after_in_child=_cuda_target.cache_clear)


def _check_carrier(group, fixed: dict) -> None:
    """A lerp launch carries a plan step only over a group with elements (an empty group launches
    nothing), and a plan it can copy per block."""
    if group.tables.chunks == 0:
        raise ValueError("an empty group cannot carry the plan step")
    keys, rows = fixed["keys"].size, fixed["decays"].size
    if keys > PLAN_KEYS_MAX or rows > MAX_ROWS:
        raise ValueError(f"a plan step carried by a lerp launch takes at most {PLAN_KEYS_MAX} groups and "
                         f"{MAX_ROWS} rows (its per-block copy), got {keys} and {rows}")


class _CastFirst:
    """A prepared launch whose first varying argument is cast to ``cast`` at each call."""

    __slots__ = ("run", "cast")

    def __init__(self, run, cast):
        self.run, self.cast = run, cast

    def __call__(self, first, *rest) -> None:
        self.run(self.cast(first), *rest)

    def once(self, first, *rest) -> None:
        self.run.once(self.cast(first), *rest)


def launch(op: str, group, **args) -> None:
    """Run kernel family ``op`` (:data:`.op.OPS`) over ``group`` on its device, once (a launch no
    owner keeps: a caller's flag viewed afresh, device weights of one call): ``prepare(op, group,
    **fixed).once(*varying)``.

    On CUDA the launch goes on the stream that is current for the group's framework *now*
    (``group.current_stream()``), never one remembered from an earlier call: an update inside
    ``with torch.cuda.stream(side)`` or a ``torch.cuda.graph`` capture is ordered (or
    captured) with the caller's other work; a captured one keeps the tables it reads for good."""
    t = group.tables
    if t is not None and t.chunks == 0:
        return
    o = OPS[op]
    run = prepare(op, group, **{k: v for k, v in args.items() if k not in o.varying})
    run.once(*[args[k] if k in args else o.defaults[k] for k in o.varying])


class _Nothing:
    """The launch of an empty group: nothing at all."""

    __slots__ = ()

    def __call__(self, *varying: Any) -> None:
        return None

    once = __call__


_NOTHING: Launch = _Nothing()
