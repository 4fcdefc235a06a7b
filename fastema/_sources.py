"""SourceTable: where a shadow's sources are, kept current and alive.

The tensors a shadow averages stay where their framework keeps them; the table records,
per layout group, their objects and addresses, keeps torch storages alive (a freed block
could come back at a recorded address under another tensor and pass the address check),
and follows sources that move (``param.data = new``) or are replaced by new objects,
refusing any that changed dtype, shape, layout or device. When addresses change it
rewrites the layout's segment tables; on CUDA it retires what it stops holding (a replaced torch
storage, JAX/TensorFlow arrays) only once fastema's launches that read them have passed, and it
refuses to follow anything while a CUDA graph is being captured on the launch stream.

The protocol (used by :mod:`fastema.flat`, :mod:`fastema.flat_window` and the framework
bridges): :meth:`SourceTable.refresh` (one ``data_ptr()`` per torch source; none inside
:meth:`SourceTable.checked_now`, after the caller's own check),
:meth:`SourceTable.check_sources` (full check), :meth:`SourceTable.rebind` (new objects, checked),
:meth:`SourceTable.adopt` (new objects the caller has checked), :attr:`SourceTable.sources`.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Mapping
from typing import Any, Iterator, Protocol, Sequence

from . import _launch
from ._backends import READ_ONLY_HINTS, Buf, describe, disjoint, dlpack
from .kernels.kinds import KIND_NAMES

_DEVICE = operator.attrgetter("device")


class SourceChanged(ValueError):
    """A source whose dtype, shape, strides or device differ from the shadow's making; ``change``
    says which and how, without the advice (the caller's may differ: a swap's way back)."""

    def __init__(self, change: str):
        self.change = change
        super().__init__(f"{change} (model.to(), a dtype cast, a reshape or another memory "
                         f"format?); make a new shadow after changing the model, or change it "
                         f"back. Nothing was updated.")


class SourceFollower(Protocol):
    """What follows a shadow's sources (a :class:`SourceTable`, or the shadow or chunked sources a
    shadow is built on): the :class:`~fastema._shadow.Shadow` protocol's four members."""

    def refresh(self) -> None: ...

    def rebind(self, sources: Any) -> None: ...

    def retarget(self, sources: Any) -> None: ...

    def check_sources(self) -> None: ...


class FollowsSources:
    """A shadow, or its chunked sources, that hands its sources' following to the one object that
    follows them (``follows``, a :class:`SourceFollower` a subclass names as a property): the four
    members written once, for every wrapper (offloaded, split)."""

    @property
    def follows(self) -> SourceFollower:
        raise TypeError(f"{type(self).__name__} names no object that follows its sources")

    def refresh(self) -> None:
        """Follow sources whose storage moved; raises, writing nothing, if one changed."""
        self.follows.refresh()

    def rebind(self, sources: Any) -> None:
        """Track new source objects (checked); refuses and keeps the old ones if any differs."""
        self.follows.rebind(sources)

    def retarget(self, sources: Any) -> None:
        """:meth:`rebind` for a compiled graph's buffers standing for the sources."""
        self.follows.retarget(sources)

    def check_sources(self) -> None:
        """Follow moved sources, then check every source's dtype, shape, layout and device."""
        self.follows.check_sources()


class _Tracked:
    """The sources of one layout group as they are now."""

    def __init__(self, group, bufs: list[Buf]):
        self.backend = group.backend
        self.track = self.backend.STORAGE_MOVES        # torch storage can be swapped under a Parameter
        # A framework frees a GPU source it no longer holds on the stream it was allocated on, which
        # knows nothing of fastema's launches (JAX/TensorFlow arrays every step; a torch storage
        # replaced under a Parameter, while fastema launches under torch.cuda.stream(side)): what the
        # table stops holding is released only once an event recorded after those launches has
        # passed (checked without blocking at later rebinds and launches; issue 37, C2).
        self.cuda = _launch.is_cuda(group.device)
        self.deferred = self.cuda and self.backend.HANDS_OVER
        self.retired = _launch.retired(at_launches=not self.deferred) if self.cuda and (self.deferred or self.track) \
            else None
        self.set(bufs)

    def set(self, bufs: list[Buf]) -> None:
        self.addresses = [b.address for b in bufs]
        self.tensors = [b.obj for b in bufs]             # the sources, for the per-step address check
        self.read_only = [(i, b.framework) for i, b in enumerate(bufs) if not b.writable]
        self.keep: list[Any] = self.backend.keep_alive(self.tensors) if self.track else []
        self.signatures = self.backend.signatures(self.tensors) if self.track else None


class SourceTable:
    """The sources of a :class:`~fastema._layout.FlatLayout`, by name, tracked per group."""

    def __init__(self, names: list[str], tensors: list, layout, bufs: list[Buf]):
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self._sources = tensors
        self._layout = layout
        self._tracked = [_Tracked(g, [bufs[i] for i in g.members]) for g in layout.groups]
        self._checked_now = False                        # inside checked_now(): refresh() reads nothing

    @property
    def sources(self) -> list:
        """The source objects, in order (the table's own list: read it, do not change it)."""
        return self._sources

    def __len__(self) -> int:
        return len(self._sources)

    def position(self, source: int | str) -> int:
        return self.index[source] if isinstance(source, str) else int(source)

    @contextlib.contextmanager
    def checked_now(self) -> Iterator[None]:
        """For the ``with`` block :meth:`refresh` reads no address: the caller has just found every
        source where this table has it (a model side's per-step check, which compares the model's
        tensors' addresses with those recorded when this table last followed them) and moves none
        in the block. A swap after that check then costs its kernels, not another pass over every
        source (issue 70 item 4)."""
        self._checked_now = True
        try:
            yield
        finally:
            self._checked_now = False

    def refresh(self) -> None:
        """Follow sources whose storage moved (one ``data_ptr()`` per torch source: the per-step
        price of never reading a stale address); raises, writing nothing, if one changed. Nothing
        inside :meth:`checked_now`."""
        if self._checked_now:
            return
        for g, t in zip(self._layout.groups, self._tracked):
            if t.track and t.backend.addresses(t.tensors) != t.addresses:
                self._follow(g, t)

    def check_sources(self) -> None:
        """:meth:`refresh`, then check that every source still has the dtype, shape, layout and
        device it had when the shadow was made (also a change that kept the address)."""
        self.refresh()
        for g, t in zip(self._layout.groups, self._tracked):
            # torch sources: (dtype, shape, strides) against the last full check (~0.4 us each);
            # anything else, or a difference, takes the full description (which names the source)
            if t.signatures is None or t.backend.signatures(t.tensors) != t.signatures:
                self._checked(g)
                if t.track:
                    t.signatures = t.backend.signatures(t.tensors)

    def check_writable(self, what: str) -> None:
        """Refuse ``what`` (a write into the sources: a swap, ``copy_to_sources()``) where a source
        is read-only (a read-only NumPy array; a JAX array or a TensorFlow tensor, which the
        array functions refuse to write alike; a NumPy array made read-only since it was last
        described too), naming it, before anything is written."""
        for g, t in zip(self._layout.groups, self._tracked):
            i, framework = t.read_only[0] if t.read_only else (t.backend.read_only_now(t.tensors), t.backend.NAME)
            if i is not None:
                hint = READ_ONLY_HINTS.get(framework, "pass writable arrays (they are written in place)")
                raise ValueError(f"{what} writes the sources, and source {self.names[g.members[i]]!r} is "
                                 f"read-only: {hint}")

    def rebind(self, sources: Sequence | Mapping) -> None:
        """Track new source objects (same names/order, dtypes, shapes, layouts, devices); refuses
        and keeps the old ones if any differs."""
        new = [sources[n] for n in self.names] if isinstance(sources, Mapping) else list(sources)
        if len(new) != len(self._sources):
            raise ValueError(f"sources has {len(new)} entries but the shadow was made for {len(self._sources)}")
        if all(a is b for a, b in zip(new, self._sources)):
            return
        self._refuse_during_capture()
        old = self._sources
        self._sources = new
        try:
            checked = [self._checked(g) for g in self._layout.groups]   # every group checked before any change
            disjoint([b for bufs in checked for b in bufs], [f"source {n!r}" for n in self.names])
        except Exception:
            self._sources = old
            raise
        for g, t, bufs in zip(self._layout.groups, self._tracked, checked):
            self._follow(g, t, bufs)

    def retarget(self, sources: list) -> None:
        """Follow new torch source objects with the very dtypes, shapes, strides and devices of the
        current ones (a compiled graph's buffers standing for them): their addresses only, checked
        for freed storage. Anything else goes through :meth:`rebind`'s full check."""
        new = list(sources)
        if len(new) != len(self._sources) or not all(t.track for t in self._tracked):
            return self.rebind(new)
        backend = self._tracked[0].backend                 # the one whose storage moves (torch)
        if backend.signatures(new) != backend.signatures(self._sources) or \
                list(map(_DEVICE, new)) != list(map(_DEVICE, self._sources)):
            return self.rebind(new)
        moves = []
        for g, t in zip(self._layout.groups, self._tracked):
            tensors = [new[i] for i in g.members]
            addresses = backend.addresses(tensors)
            for a, x, i in zip(addresses, tensors, g.members):
                if a == 0 and x.numel():
                    raise ValueError(f"the storage of source {self.names[i]!r} was freed (address 0); nothing "
                                     f"was updated")
            if t.cuda and addresses != t.addresses:
                _launch.refuse_during_capture("following moved or new sources", _launch.MOVED_SOURCES, g.device,
                                              g.current_stream)
            moves.append((g, t, tensors, addresses))
        for g, t, tensors, addresses in moves:              # every address checked before any change
            if t.retired is not None and addresses != t.addresses:
                t.retired.release(t.keep, g.device, _launch.stream_of(g))
            t.tensors, t.addresses = tensors, addresses
            t.keep = backend.keep_alive(tensors)
            self._layout.set_addresses(g, addresses)
        self._sources = new

    def adopt(self, sources: list, addresses: list) -> None:
        """Follow new sources that the caller has checked already (same dtypes, shapes and
        devices as at construction, C-contiguous, kept alive by the caller) at ``addresses``:
        for bridges with a cheaper way to an address than a DLPack export. CPU groups only.

        What can be checked without describing the sources is, before anything changes: one
        source and one integer address each, no address 0 for a source with elements, CPU groups."""
        if len(sources) != len(self._sources) or len(addresses) != len(self._sources):
            raise ValueError(f"adopt() needs {len(self._sources)} sources and as many addresses, got "
                             f"{len(sources)} and {len(addresses)}; nothing was changed")
        for g in self._layout.groups:
            if g.device != "cpu":
                raise ValueError(f"adopt() follows CPU sources only, this shadow has a group on {g.device}; "
                                 f"pass new sources with rebind() instead. Nothing was changed.")
            for slot, i in enumerate(g.members):
                a = addresses[i]
                if not isinstance(a, int) or isinstance(a, bool) or (g.counts[slot] and a <= 0):
                    raise ValueError(f"adopt(): source {self.names[i]!r} has {g.counts[slot]} elements but address "
                                     f"{a!r}; pass each source's own data address. Nothing was changed.")
        self._sources = sources
        for g, t in zip(self._layout.groups, self._tracked):
            t.addresses = [addresses[i] for i in g.members]
            t.tensors = [sources[i] for i in g.members]
            self._layout.set_addresses(g, t.addresses)

    def _checked(self, g) -> list[Buf]:
        """The group's sources described now; ValueError if any differs from construction."""
        bufs = []
        for slot, i in enumerate(g.members):
            dlpack.refuse_moving(self._sources[i], f"source {self.names[i]!r}")
            b = describe(self._sources[i], f"source {self.names[i]!r}")
            if (b.device, b.kind, b.shape, b.strides) != (g.device, g.src_kind, g.shapes[slot], g.orders[slot]):
                now = "" if b.strides == g.orders[slot] else f" with strides {b.strides or 'C order'}"
                raise SourceChanged(
                    f"source {self.names[i]!r} was {KIND_NAMES[g.src_kind]} {g.shapes[slot]} on {g.device} "
                    f"when the shadow was made and is now {b.dtype_name} {b.shape} on {b.device}{now}")
            bufs.append(b)
        disjoint(bufs, [f"source {self.names[i]!r}" for i in g.members])
        return bufs

    def _refuse_during_capture(self) -> None:
        """RuntimeError, before anything changes, while a CUDA graph is being captured on a CUDA group's
        launch stream: following a source writes its table (issue 37, C3)."""
        for g, t in zip(self._layout.groups, self._tracked):
            if t.cuda:
                _launch.refuse_during_capture("following moved or new sources", _launch.MOVED_SOURCES, g.device,
                                              g.current_stream)

    def _follow(self, g, t: _Tracked, bufs: list[Buf] | None = None) -> None:
        if bufs is None:
            if t.cuda:
                _launch.refuse_during_capture("following moved or new sources", _launch.MOVED_SOURCES, g.device,
                                              g.current_stream)
            bufs = self._checked(g)
        if t.retired is not None:                        # what the table held, alive until fastema's launches passed
            t.retired.release(t.tensors if t.deferred else t.keep, g.device, _launch.stream_of(g))
        t.set(bufs)
        self._layout.set_addresses(g, t.addresses)
