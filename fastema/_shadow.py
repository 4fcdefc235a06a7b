"""What a shadow is: the protocols (:class:`Shadow`, what the faces read; :class:`Updatable`,
what the engine's update driver calls; :class:`AveragingShadow`, both; :class:`WindowingShadow`,
a window's ring) and :class:`Capabilities`, the one small base that declares the optional members
with their defaults.

A shadow keeps the averages of a list of sources: :class:`fastema.FlatShadow` (flat buffers),
:class:`fastema.WindowShadow` (a window mean and its ring), :class:`fastema.pairs.PairShadow`
(the caller's own tensors), and the torch face's placements, composed
(:mod:`fastema.torch._placement`): a *storage* (device rows: those two; staged host rows: an
offloaded shadow; an optimizer's host masters read in place), optionally wrapped by a *split*
over replicas (each rank keeps a slice; reads gather). What one of them can or cannot do is an
attribute declared here, never a ``getattr`` probe, and never read off its class name:

- ``folds_later``: ``update_checked()`` queues its fold (on a worker thread); the engine then
  hands it, after each call, the way back to the plan before it (``queued(undo)``), and every
  read waits for the folds first (``join()``).
- ``host_plan_only``: its updates run on the host's plan (no device plan, no skip flags: they
  fold on a host thread); the engine refuses ``device_step`` and ``skip_nonfinite`` for it, and a
  face refuses a CUDA graph capture of its update. ``placement`` names it in those refusals.
- ``holds_interrupts``: a Ctrl-C during ``update()`` is held until the update is queued whole
  (every window staged), so a worker never folds half an update.
- ``gather_bucket``: the bytes one gather of a split shadow's reads carries (None: a whole shadow).
- ``exact_swap``: ``swap()`` exchanges the average and the sources without rounding either, so
  a face needs no backup of the raw weights (equal dtypes, a float32 shadow of bfloat16
  sources, or a shadow that keeps the raw weights itself).
- ``in_place``: the folds read the sources where they are (host masters): the face says so.
- ``group`` / ``split_id``: the process group of a shadow split over replicas (its reads are
  collectives over it) and the split's run id; None for a whole shadow.
- ``scan_rows(flags)``: the non-finite scan of the averages themselves, every row, one kept launch
  a group (an average that inf or NaN reached: found at a save, swap or export); False where the
  shadow keeps none (a face then scans its views);
- ``parts()``: every allocation the shadow holds, ``(part, array)``, for a face's ``memory()``;
  ``written()``: the buffers an update writes (what ``torch.compile``'s functionalization must
  see); ``backup()``: a backup of the sources for a swap that would round; ``reserve()`` /
  ``release()``: what a swap or a copy-out allocates, allocated first (a split shadow's reads).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence, runtime_checkable

from ._launch import Launch, Spec

__all__ = ["AveragingShadow", "Capabilities", "LaunchGroup", "LaunchLayout", "Layout", "Shadow", "ShadowGroup",
           "Updatable", "WindowingShadow", "table_parts"]


def table_parts(*tables) -> list[tuple[str, Any]]:
    """``("tables", array)`` of every array of these launch tables (:class:`fastema._launch.Tables`)."""
    return [("tables", a) for t in tables for a in t.arrays()]


class ShadowGroup(Protocol):
    """One (device, source dtype, shadow dtype) group of a shadow's layout, as the engine reads it
    (its device plan, its weights per device, its memory)."""

    device: str
    shadow_kind: int
    src_kind: int
    framework: str
    tables: Any                    # fastema._launch.Tables (replaced when the sources move)
    buffer: Any                    # its shadow rows (None: the caller's tensors, a pair group)

    @property
    def scan(self) -> "ShadowGroup":
        """What the non-finite scan walks: the group itself, or its sources whole (a split group)."""


class LaunchGroup(ShadowGroup, Protocol):
    """A group the per-step launches (:class:`fastema._steps.StepLaunches`) launch over: a launch
    group (:class:`fastema._launch.Launches`) that keeps its launches, which follow its tables."""

    current_stream: Callable[[], int]  # the raw handle of the stream a launch goes on now

    @property
    def scan(self) -> "LaunchGroup":
        """What the non-finite scan walks: the group itself, or its sources whole (a split group)."""

    def launch(self, op: str, **fixed: Any) -> Launch: ...

    def launch_of(self, spec: Spec) -> Launch: ...


class Layout(Protocol):
    """Where a shadow's averages live, as the engine and a face see it: its groups
    (``fastema._layout.FlatLayout``, a pair shadow's groups, an offloaded shadow's host layout)."""

    @property
    def groups(self) -> Sequence[ShadowGroup]: ...

    def swap_exact(self) -> bool:
        """True when a swap would round neither side in any group."""


class LaunchLayout(Protocol):
    """A layout whose groups are launch groups (:class:`fastema._steps.StepLaunches`')."""

    @property
    def groups(self) -> Sequence[LaunchGroup]: ...


class Capabilities:
    """The optional members of a shadow, declared once with their defaults (see the module)."""

    folds_later: bool = False
    host_plan_only: bool = False
    holds_interrupts: bool = False
    placement: str = ""
    in_place: bool = False
    group: Any = None
    split_id: int | None = None
    gather_bucket: int | None = None
    layout: Layout

    @property
    def exact_swap(self) -> bool:
        """True when ``swap()`` rounds neither side (by default: every group's shadow and source
        dtypes allow it, see :meth:`fastema._layout.FlatLayout.swap_exact`)."""
        return self.layout.swap_exact()

    @property
    def swapped(self) -> bool:
        """True while a row is in the sources (a shadow that swaps in place says so)."""
        return False

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Exchange row ``row`` and the sources in place (a shadow with no in-place swap: refused;
        a face copies the average out after a :meth:`backup` instead, as ``exact_swap`` is False)."""
        raise TypeError(f"{type(self).__name__} has no in-place swap: back the sources up (backup()) and "
                        f"copy the average out (copy_to_sources())")

    def swap_modes(self, lossy: bool = False) -> list:
        """The swap kernel of each group (see :meth:`swap`)."""
        raise TypeError(f"{type(self).__name__} has no in-place swap (see swap())")

    def sources_checked(self) -> ContextManager[None]:
        """A ``with`` block in which the shadow reads none of its sources' addresses, where the caller
        has just found every source where the shadow last followed it (a model side's per-step check:
        a swap after it then costs its kernels). By default the shadow checks them as always."""
        return contextlib.nullcontext()

    def reserve(self, row: int, swap: bool) -> None:
        """Allocate now what the next ``swap()`` (``swap``) or ``copy_to_sources()`` of ``row``
        needs beyond the shadow (a split shadow: its gather buckets, a swap's raw window), so that a
        failure is raised before anything is read or written; nothing by default."""

    def release(self) -> None:
        """Free what :meth:`reserve` allocated for a read not made; nothing by default."""

    def scan_rows(self, flags: dict) -> bool:
        """Set ``flags[device]`` (an int32[1] flag fastema made, zeroed by the caller) where a row
        of this shadow holds inf or NaN, on the device, no host read: one kept launch a group over
        its whole buffer. False, nothing launched, where the shadow keeps no such scan (default)."""
        return False

    def bias_correct(self, alpha: float, *, skip_if: Mapping | None = None) -> None:
        """BEMA's correction of row 0 (a shadow of one row: refused)."""
        raise TypeError(f"{type(self).__name__} keeps no BEMA rows")

    def join(self) -> None:
        """Wait for the updates still running and raise the error of one (a no-op where every
        update writes before it returns)."""

    def queued(self, undo: Callable[[], None]) -> None:
        """Take the way back to the plan before the update just queued (``folds_later`` only)."""
        raise TypeError(f"{type(self).__name__} folds every update before it returns: nothing is queued")

    def parts(self, what: str = "shadow") -> list[tuple[str, Any]]:
        """``(part, array)`` of every allocation this shadow holds: its buffers (named ``what``) and
        its launch tables (a split group's whole-source scan tables too)."""
        out: list[tuple[str, Any]] = []
        for g in self.layout.groups:
            out.append((what, g.buffer))
            out += table_parts(g.tables, *([g.scan.tables] if g.scan is not g else []))
        return out

    def written(self) -> list:
        """The buffers an update writes (the shadow rows of every group)."""
        return [g.buffer for g in self.layout.groups]


@runtime_checkable
class Updatable(Protocol):
    """What the engine's update driver (:class:`fastema.average.Average`) calls: every shadow
    an :class:`~fastema.average.Average` holds (a target network's
    :class:`~fastema.pairs.PairShadow` too)."""

    names: list
    rows: int
    skipped: dict
    folds_later: bool
    host_plan_only: bool
    placement: str

    @property
    def layout(self) -> Layout: ...

    def update(self, decay: float | Sequence[float] | None = None, *, weight: Any = None,
               rounding: str = "nearest", seed: int = 0, step: int = 0, skip_nonfinite: bool = False,
               sources: Any = None) -> None: ...

    def update_checked(self, weights_by_device: dict | None, rounding: str, seed: int, step: int, skip_if,
                       plan=None, given: int | None = None) -> None: ...

    def view(self, source: int | str, row: int | None = 0) -> Any: ...

    def scan_groups(self, flags: dict | None = None) -> dict: ...

    def bias_correct(self, alpha: float, *, skip_if: Mapping | None = None) -> None: ...

    def copy_from_sources_checked(self, skip_if: Mapping | None = None) -> None: ...

    def queued(self, undo: Callable[[], None]) -> None: ...

    def join(self) -> None: ...

    def parts(self, what: str = "shadow") -> list[tuple[str, Any]]: ...


@runtime_checkable
class Shadow(Protocol):
    """What a face reads of a model's shadow (an EMA's, a window average's): its sources and views,
    swap and copy-out, following moved sources, memory. The optional members have their defaults
    in :class:`Capabilities`; ``tests/array/test_shadow_protocol.py`` holds every shadow class to
    these protocols."""

    names: list
    rows: int
    in_place: bool
    host_plan_only: bool
    holds_interrupts: bool
    group: Any
    split_id: int | None
    gather_bucket: int | None

    @property
    def layout(self) -> Layout: ...

    @property
    def sources(self) -> list: ...

    @property
    def groups(self) -> list[dict]: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def swapped(self) -> bool: ...

    @property
    def exact_swap(self) -> bool: ...

    def __len__(self) -> int: ...

    def view(self, source: int | str, row: int | None = 0) -> Any: ...

    def state_view(self, source: int | str) -> Any: ...

    def copy_to_sources(self, row: int = 0) -> None: ...

    def swap(self, row: int = 0, *, lossy: bool = False) -> None: ...

    def swap_modes(self, lossy: bool = False) -> list: ...

    def reserve(self, row: int, swap: bool) -> None: ...

    def release(self) -> None: ...

    def scan_rows(self, flags: dict) -> bool: ...

    def check_row(self, row: int) -> None: ...

    def check_sources(self) -> None: ...

    def refresh(self) -> None: ...

    def rebind(self, sources) -> None: ...

    def retarget(self, sources) -> None: ...

    def join(self) -> None: ...

    def parts(self, what: str = "shadow") -> list[tuple[str, Any]]: ...

    def written(self) -> list: ...

    def backup(self) -> Any: ...


@runtime_checkable
class AveragingShadow(Shadow, Updatable, Protocol):
    """An EMA's shadow: read by the face, updated by the engine (every placement the torch face's
    picker makes for :class:`fastema.torch.EMA`)."""

    def copy_from_sources(self, *, skip_if: Mapping | None = None) -> None: ...


@runtime_checkable
class WindowingShadow(Shadow, Protocol):
    """A window average's shadow (:class:`fastema.WindowShadow`, or one split over replicas):
    read by the face as any shadow, fed by :meth:`push` (one snapshot) and checkpointed with its
    ring."""

    pushes: int

    def push(self) -> None: ...

    def restart(self) -> None: ...

    def ring_view(self, source: int | str) -> Any: ...
