"""The CUDA pieces of dispatch: table upload and in-place update, retirement events, the capture
query. Every launch is prepared in :mod:`.launch` (the shipped device code, fastema's own
argument block: :data:`.launch.PREPARE`). Every call to the GPU is the launch driver's
(:mod:`.driver`): the one :func:`.drivers.current` gives when tables are made or a launch is bound.

Nothing on a per-step path allocates, frees or copies from pageable memory: tables are allocated
once, at construction, and copied there on a private stream that is waited for (so a first launch on
any stream reads them written, and nothing waits for other work); later address changes are written
into the same device table from pinned staging slots on the caller's stream (so a captured CUDA
graph keeps reading a live table that follows re-allocated sources); flags are zeroed by their
framework (:meth:`fastema._backends.Backend.zero_`).

Imported only when a CUDA buffer arrives (or under the Numba CUDA simulator). Imports nothing back
from the package: its tunables come from :mod:`.config`.
"""
from __future__ import annotations

import numpy as np

from .. import config
from .base import WAITING, _index, cuda_versions, prune_retired  # noqa: F401
from .drivers import current, simulator, using  # noqa: F401
from .frees import PENDING, free_pending

SIMULATOR = simulator()
"""The Numba CUDA simulator is on (fastema._launch's fork check reads it)."""


def capturing(device: str, raw: int) -> bool:
    """Whether work queued on the raw stream ``raw`` of ``device`` now would be captured into a CUDA
    graph rather than run (the current driver's query: :meth:`.driver.Driver.capturing`; the legacy
    stream is ``device``'s, asked in its context)."""
    return current().capturing(raw, _index(device))


def clear_caches() -> None:
    """Drop the stream objects the current driver keeps (``fastema.clear_caches()``) and issue the
    deferred frees (:mod:`.frees`) where no stream it asks captures; the zero flags stay (see
    :func:`_zero_flag`)."""
    d = current()
    d.clear()
    if PENDING and not d.any_capturing(0, None):
        free_pending()


def to_device(a: np.ndarray, device: str, driver=None):
    """A new device copy of ``a``, written when this returns (:meth:`.driver.Driver.upload`: copied
    on fastema's upload stream, which is then waited for, so the copy is ordered before every launch
    queued after it, on any stream: the caller's stream at construction and the stream of a first
    launch may be two non-blocking streams that nothing orders; issue 37, C1)."""
    return (driver or current()).upload(a, _index(device))


class Staging:
    """Pinned host slots through which one device table is rewritten in place, in stream
    order. A slot is reused only once the copy that read it has run (an event per slot);
    only ``config.CUDA_STAGING_SLOTS`` rewrites queued on the GPU at once make the host wait."""

    def __init__(self, size: int, dtype, device: str, driver=None):
        self.driver = d = driver or current()
        with d.activate(_index(device)):
            self.host = [d.pinned(size, dtype) for _ in range(config.CUDA_STAGING_SLOTS)]
        self.events: list = [None] * len(self.host)
        self.next = 0

    def write(self, device_array, values: np.ndarray, device: str, raw: int) -> None:
        """``values`` into ``device_array`` on the raw stream ``raw``, through the next slot."""
        i = self.next
        self.next = (i + 1) % len(self.host)
        d = self.driver
        with d.activate(_index(device)):
            event = self.events[i]
            if event is not None and not event.query():
                event.synchronize()           # rare: every slot still has a copy queued behind it
            slot = self.host[i][:len(values)]
            slot[:] = values
            d.copy(device_array, slot, raw)
            if event is None:
                event = self.events[i] = d.event()
            if event is not None:             # None: the copy has run (the simulator)
                event.record(raw)


class AddressTables:
    """The device tables of one group's source addresses, all made at construction (written when
    construction returns: :func:`to_device`).

    One table (torch, CuPy): rewritten in place, so a captured CUDA graph, which holds the
    table's address, follows re-allocated sources. Two (JAX, TensorFlow: new arrays every
    step, whose addresses alternate between two sets when the framework reuses its buffers):
    addresses seen in either table switch to it with no copy; new ones overwrite the other
    table, in stream order after the launches that read it."""

    def __init__(self, first, addresses: np.ndarray, slots: int, device: str, driver=None):
        driver = driver or current()
        self.arrays = [first] + [to_device(addresses, device, driver) for _ in range(slots - 1)]
        self.held = [addresses.copy() for _ in range(slots)]
        self.current = 0
        self.staging = Staging(len(addresses), np.int64, device, driver)

    def point(self, addresses: np.ndarray, device: str, raw: int):
        """The device table holding ``addresses`` (written now if none does)."""
        for i, held in enumerate(self.held):
            if np.array_equal(held, addresses):
                self.current = i
                return self.arrays[i]
        i = (self.current + 1) % len(self.arrays)
        self.staging.write(self.arrays[i], addresses, device, raw)
        self.held[i] = addresses.copy()
        self.current = i
        return self.arrays[i]


def upload(t, device: str, slots: int = 1):
    """The tables on ``device`` (allocated once, written when this returns: :func:`to_device`), with
    ``slots`` address tables for later address changes (0: the addresses never change); the
    default flag is made now, not at a first update inside a graph capture."""
    driver = current()

    def d(a):
        return to_device(a, device, driver)

    _zero_flag(device, driver)
    seg_addr = d(t.seg_addr)
    staging = AddressTables(seg_addr, t.seg_addr, slots, device, driver) if slots else None
    return t._replace(shadow_addr=d(t.shadow_addr), seg_addr=seg_addr, seg_offset=d(t.seg_offset),
                      chunk_seg=d(t.chunk_seg), chunk_begin=d(t.chunk_begin), staging=staging)


def update_addresses(t, addresses: np.ndarray, device: str, raw: int = 0):
    """``t`` pointing at a device table that holds ``addresses`` (see :class:`AddressTables`):
    written on the raw stream ``raw`` from pinned staging, nothing copied when a table holds them
    already."""
    return t._replace(seg_addr=t.staging.point(addresses, device, raw))


def _zero_flag(device: str, driver=None):
    """An int32[1] zero on ``device``, the flag of launches with no guard (never written), made once
    per driver and device (written when it returns: :func:`to_device`) and never freed: a captured
    CUDA graph may read it at every replay, so ``fastema.clear_caches()`` keeps it."""
    d = driver or current()
    flag = d.zero_flags.get(device)
    if flag is None:
        flag = d.zero_flags[device] = to_device(np.zeros(1, np.int32), device, d)
    return flag


class Retired:
    """Objects kept alive until fastema's launches issued before their release have run: each
    release records an event on the launch stream, and what sits behind a passed event is
    dropped, without waiting, at the next release or (``at_launches``: a torch storage, released
    rarely) at the first fastema launch after it has passed (:func:`prune_retired`), so a released
    storage is not kept longer than that. Only past ``config.CUDA_RETIRED_MAX`` pending releases
    (the GPU that far behind the host) does the host wait for the oldest.

    Why: a source replaced under fastema (``param.data = new``, a new JAX array every step) is
    freed by its framework's allocator on the stream it was allocated on, which knows nothing of
    fastema's launches on another stream (an update under ``torch.cuda.stream(side)``): its block
    could go to a new tensor while a queued kernel of fastema still reads it (issue 37, C2)."""

    def __init__(self, at_launches: bool = False, driver=None):
        self.driver = driver or current()
        self.pending: list = []               # (event, kept objects), oldest first
        self.spare: dict = {}                 # device -> passed events, recorded again (no event made a step)
        self.at_launches = at_launches        # pruned at launches too (torch: releases are rare); else only at
                                              # the next release (JAX, TensorFlow: a release every step)

    def release(self, kept, device: str, raw: int) -> None:
        """``kept`` held until the launches issued so far on the raw stream ``raw`` have run (pruned
        first; a torch holder, released rarely, not while a stream the driver asks captures: no
        event query is permitted then; its queries and wait in relaxed capture mode,
        :meth:`.driver.Driver.relaxed`; JAX's and TensorFlow's, at every step, in the thread's
        own)."""
        if self.at_launches:                  # torch: rare, in relaxed mode (a capture on another thread)
            with self.driver.relaxed():
                self._make_room(raw, device)
        else:
            self._make_room(raw, device)
        d = self.driver
        spare = self.spare.get(device)
        with d.activate(_index(device)):
            event = spare.pop() if spare else d.event()
            if event is None:                 # the simulator runs every launch to completion
                return
            event.record(raw)
        self.pending.append((event, kept, device))
        if self.at_launches and self not in WAITING:
            WAITING.append(self)

    def _make_room(self, raw: int, device: str) -> None:
        """Pruned (not while a stream the driver asks captures, for torch's holder), then the oldest
        waited for where :data:`config.CUDA_RETIRED_MAX` are pending."""
        if not (self.at_launches and self.pending and self.driver.any_capturing(raw, _index(device))):
            self.prune()
        if len(self.pending) >= config.CUDA_RETIRED_MAX:
            event, _, passed = self.pending.pop(0)
            event.synchronize()
            self.spare.setdefault(passed, []).append(event)

    def prune(self) -> None:
        """Drop what sits behind passed events (event queries: no wait)."""
        while self.pending and (self.pending[0][0] is None or self.pending[0][0].query()):
            event, _, device = self.pending.pop(0)
            if event is not None:
                self.spare.setdefault(device, []).append(event)
