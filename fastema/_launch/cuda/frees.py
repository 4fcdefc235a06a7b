"""Frees at a safe point: what fastema's own CUDA objects give back when they go (device memory,
pinned blocks, events: :mod:`.memory`), issued later, where it cannot break a CUDA-graph
capture or reach a forked child's copy of the driver.

Why: those objects go when Python's collector finds them (fastema's shadows are reference cycles:
``del ema`` frees nothing until a collection), on whatever thread set it off, at whatever moment,
inside a user's ``torch.cuda.graph`` capture too (torch 2.13 no longer collects before one). A free
is a call the driver does not permit during a capture: it fails and invalidates the capture, which
then fails at its end. In a forked child (a DataLoader worker, forked by default on Linux) the
objects are the parent's and the driver's state is not the child's to use. numba, which fastema's
device memory came from until round 8, queued its frees too.

- A finalizer calls :func:`defer`: the free is queued (:data:`PENDING`), no driver call; the queue's
  holder (:data:`FREES`) joins :data:`WAITING`, the holders every launch looks at (one truth test
  while it is empty).
- :func:`free_pending` issues them, each in the context the object was made in (pushed: the
  collector may run on a thread where none is current) and a pinned block only after the last copy
  from it has run (its event waited for: the driver's own wait there is not documented). The launch
  path calls it where no stream the launch driver asks is being captured
  (:meth:`.driver.Driver.any_capturing`): at a launch (:func:`.base.prune_retired`), where
  tables are made (an upload) and at ``fastema.clear_caches()``.
- Each free, and its wait, is issued with the thread's capture mode relaxed (:func:`relaxed`): a
  capture begun in global mode (torch's default) on another thread, on a stream no check here can
  name (current only there), is then left intact. The driver permits it: on a GPU's driver (580.159)
  a free, a pinned free and an event wait from a thread in relaxed mode left another thread's global
  capture valid, where the same calls in global mode were refused and invalidated it
  (``testkit/driver_rules.py``; its table of 504 cases in ``bench/results/``).
- In a child forked after CUDA (the fork rule is :mod:`.forked`'s: the parent had loaded the CUDA
  launch layer; its at-fork hook calls :func:`in_child_forked_after_cuda`) the queue is emptied and
  nothing is queued again: the child frees none of the parent's objects (the parent frees its own;
  the child's exit drops the rest). A child of a process that never used CUDA may use it: it frees
  its own objects as any process does.
"""
from __future__ import annotations

import collections
import contextlib

from .results import CudaDriverError, _gone, api_error, check

WAITING: list = []
"""The holders of objects waiting for a safe point, each with ``pending`` (truthy while it holds
some) and ``prune()`` (drop or free what may go now): the retired sources of
:class:`.tables.Retired` (events to pass) and :data:`FREES`. Every launch looks at it (empty: one
truth test) and, where it is not empty and no stream the launch driver asks captures, prunes them
(:func:`.base.prune_retired`)."""

PENDING: collections.deque = collections.deque()
"""``(bindings, context or None, call, handle, guard)`` of each deferred free, oldest first
(``guard``: a pinned block's one-item list holding the event recorded after the last copy from it,
or None)."""

_CHILD = False          # this process was forked after CUDA: it frees nothing of its parent's


def defer(d, context, call: str, handle, guard: list | None = None) -> None:
    """Queue ``call(handle)`` (``cuMemFree``, ``cuMemFreeHost``, ``cuEventDestroy``) of
    cuda-bindings ``d``, to be issued in ``context`` (None: as it is) at the next safe point: what a
    finalizer does."""
    if _CHILD:
        return
    PENDING.append((d, context, call, handle, guard))
    if FREES not in WAITING:
        WAITING.append(FREES)


class _Frees:
    """:data:`PENDING`'s holder among :data:`WAITING`."""

    __slots__ = ()

    @property
    def pending(self) -> bool:
        return bool(PENDING)

    def prune(self) -> None:
        free_pending()


FREES = _Frees()


def free_pending() -> None:
    """Issue every deferred free now (see the module docstring): only where no stream fastema asks
    is being captured. An error is raised once every free was tried (the driver's shutdown at the
    interpreter's exit is none: what it held went with it)."""
    first = None
    while True:
        try:
            item = PENDING.popleft()
        except IndexError:
            break
        try:
            _free(*item)
        except CudaDriverError as err:
            first = first or err
    if first is not None:
        raise first


@contextlib.contextmanager
def relaxed(d):
    """The calling thread's capture mode relaxed for a ``with`` block, restored after
    (``cuThreadExchangeStreamCaptureMode`` of cuda-bindings ``d``; None: nothing to do): the calls
    made inside do not invalidate another thread's capture (see the module docstring). What is made
    inside must never be captured: only frees, waits and queries of fastema's own objects are."""
    if d is None:
        yield
        return
    err, before = d.cuThreadExchangeStreamCaptureMode(d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
    if _gone(err):
        yield
        return
    if err:
        raise api_error("cuThreadExchangeStreamCaptureMode", err)
    try:
        yield
    finally:
        check("cuThreadExchangeStreamCaptureMode", d.cuThreadExchangeStreamCaptureMode(before))


def _free(d, context, call: str, handle, guard) -> None:
    if context is not None:
        err, = d.cuCtxPushCurrent(context)
        if _gone(err):
            return
        if err:
            raise api_error("cuCtxPushCurrent", err)
    try:
        with relaxed(d):
            if guard and guard[0] is not None:      # the last copy from this pinned block: run first
                err, = d.cuEventSynchronize(guard[0].event)
                if err and not _gone(err):
                    raise api_error("cuEventSynchronize", err)
            err, = getattr(d, call)(handle)
            if err and not _gone(err):
                raise api_error(call, err)
    finally:
        if guard:
            guard.clear()                       # its event goes (and is queued in turn)
        if context is not None:
            check("cuCtxPopCurrent", d.cuCtxPopCurrent())


def in_child_forked_after_cuda() -> None:
    """Drop the queue and queue nothing again: this process is a child forked from one that had used
    CUDA (called by :mod:`.forked`'s at-fork hook, which holds the rule)."""
    global _CHILD
    _CHILD = True
    PENDING.clear()
    if FREES in WAITING:
        WAITING.remove(FREES)
