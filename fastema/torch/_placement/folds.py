"""The worker thread an offloaded average folds on, and what a lost fold costs.

An offloaded shadow (:mod:`fastema.torch._placement.offload`, :mod:`fastema.torch._placement.host_masters`) queues each
update's work on one worker thread (numba's kernels run without the GIL) and returns. A
:class:`FoldQueue` runs those jobs in order and keeps, per update, a :class:`Record`: its jobs, the
way back to the plan before it (handed over by the engine: ``queued(undo)``), and whether a job
has written the shadow yet. Every read waits (:meth:`FoldQueue.join`) and re-raises the first
error of a job, once:

- a job that failed before writing anything (and every job queued after it: each first waits for
  the one before, and an error stops it) is *lost*: not counted, the plan goes back to before the
  first one lost, and the average is the one the last good update left;
- a job that failed after it had written part of the shadow (a window of an update folded, the
  next not) leaves an average that mixes two updates: the queue is *broken*, and every later read
  or update raises, naming the way out (a new average, loaded from the last checkpoint).

After ``os.fork()``: the parent first waits for every queued job (the child then copies a settled
shadow; an error stays for the next read), and the child gets a new worker thread (the parent's
is not in the child); a job still running during the fork (another thread queued it) breaks the
child's copy.

Each stage of a host-folded update (``"pack"``, ``"fold"``, ``"fold window"``, ``"from slot"``)
runs through :func:`stage`; a :func:`watched` block hands them to a hook instead, which runs them
(or raises, waits, counts): how the tests inject a fold's failure or a Ctrl-C at a given window.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["Aborted", "FoldQueue", "Record", "stage", "watched"]

_HOOKS: list[Callable[..., Any]] = []      # the open watched() blocks' hooks, innermost last

FORKED = ("this process was forked while an offloaded EMA was folding an update on its worker thread (another "
          "thread called update() during the fork), so its copy here may be half-updated; make a new EMA in this "
          "process (load_state_dict() of a checkpoint does not help), or fork only between updates")


def stage(name: str, run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)``, one stage of a host-folded update named ``name``: through the hooks of the
    open :func:`watched` blocks, when there are any (on any thread)."""
    for hook in list(_HOOKS):               # the innermost block's hook outermost: it runs first
        run = _through(hook, name, run)
    return run(*args)


def _through(hook: Callable[..., Any], name: str, run: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: hook(name, run, *args)


@contextlib.contextmanager
def watched(hook: Callable[..., Any]) -> Iterator[None]:
    """For the ``with`` block, every stage of the host-folded updates (see the module) is
    ``hook(name, run, *args)`` instead of ``run(*args)``: the hook runs it (``run(*args)``) or not,
    before or after what it does; in nested blocks the innermost hook first, its ``run`` the next
    one's. Process-wide (the worker threads' stages too); put back after, however the block ends."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)


class Aborted(Exception):
    """The training thread stopped staging an update (its own error was raised there)."""


class Record:
    """One update's work on the worker (see the module)."""

    __slots__ = ("futures", "undo", "written", "error", "aborted", "staged", "in_place")

    def __init__(self) -> None:
        self.futures: list[Future] = []
        self.undo: Callable[[], None] | None = None   # the plan as it was before this update
        self.written = False                          # a job of it wrote part of the shadow
        self.error: BaseException | None = None       # set (under the queue's lock) before its job ends
        self.aborted = False                          # the training thread gave up staging it
        self.staged: list = []                        # what the training thread staged for its jobs
        self.in_place = 0                             # windows folded from the weights in place (offload)

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def failed(self) -> bool:
        return any(f.done() and f.exception() is not None for f in self.futures)


class FoldQueue:
    """In-order jobs on one worker thread, their errors and the plan's way back (see the module).

    ``cv``: the lock and condition the owner's staging and the jobs share; a job that fails sets
    its record's ``error`` and notifies it."""

    def __init__(self, name: str = "fastema-offload"):
        self.name = name
        self.cv = threading.Condition()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.pending: Future | None = None            # the last job queued
        self.records: list[Record] = []               # the updates not known to have landed
        self.broken: str | None = None
        _LIVE.add(self)

    def open(self) -> Record:
        """A new update's record (the ones known to have landed are forgotten)."""
        self.records = [r for r in self.records if not r.done() or r.failed()]
        record = Record()
        self.records.append(record)
        return record

    def submit(self, record: Record, fn: Callable[..., None], *args: Any) -> Future:
        """Queue ``fn(*args)`` for ``record``, after every job queued before (an error of one stops it)."""
        job = self._pool.submit(self._run, record, self.pending, fn, args)
        record.futures.append(job)
        self.pending = job
        return job

    def _run(self, record: Record, prev: Future | None, fn: Callable[..., None], args: tuple) -> None:
        try:
            if prev is not None:
                try:
                    prev.result()                     # in order; an earlier error stops this one
                except Aborted:
                    pass                              # that update's error was raised where it was staged
            fn(*args)
        except BaseException as err:
            with self.cv:
                record.error = err
                self.cv.notify_all()
            raise

    def queued(self, undo: Callable[[], None]) -> None:
        """``undo`` puts the plan back as it was before the update just queued."""
        self.records[-1].undo = undo

    def settled(self) -> bool:
        pending = self.pending
        return pending is None or pending.done()

    def raise_failed(self) -> None:
        """Raise a finished job's error now (before anything more is staged), or the broken state."""
        if self.broken is not None:
            raise RuntimeError(self.broken)
        pending = self.pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.join()

    def join(self) -> None:
        """Wait for every queued job; re-raise the first error of one (see the module)."""
        if self.broken is not None:
            raise RuntimeError(self.broken)
        pending = self.pending
        if pending is None:
            return
        try:
            pending.result()
        except BaseException as err:
            if not pending.done():                    # interrupted while waiting: the jobs go on
                raise
            lost = self._lost()
            if isinstance(err, Aborted) and lost is None:
                return                                # raised where it was staged; nothing was written
            if self.broken is not None:
                raise RuntimeError(self.broken) from err
            raise
        self.records = []

    def _lost(self) -> Record | None:
        """After a job failed (so did every one queued after it): forget them, and put the plan back
        as it was before the first update lost, or break the queue if that update had written."""
        first = next((r for r in self.records if r.failed()), None)
        self.pending, self.records = None, []
        if first is None:
            return None
        if first.written:
            self.broken = (f"an offloaded EMA's fold failed halfway through an update ({first.error!r}): part "
                           f"of its shadow holds that update and part does not, so this average cannot be read "
                           f"or updated any more. Make a new EMA and load the last checkpoint into it")
        elif isinstance(first.error, Aborted):
            return None
        elif first.undo is not None:
            first.undo()
        return first

    def settle(self) -> None:
        """Wait for the queued jobs, raising nothing (an error stays for the next read)."""
        pending = self.pending
        if pending is not None:
            pending.exception()

    # ------------------------------------------------------------ fork

    def _forked(self) -> None:
        self.cv = threading.Condition()               # a lock held by another thread at the fork stays held
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        if any(not r.done() for r in self.records):   # every update not known to have landed is listed
            self.pending, self.records = None, []
            self.broken = FORKED


_LIVE: "weakref.WeakSet[FoldQueue]" = weakref.WeakSet()


def _before_fork() -> None:
    for queue in list(_LIVE):
        try:
            queue.settle()
        except BaseException:                         # never raise out of a fork hook
            pass


def _after_fork_in_child() -> None:
    for queue in list(_LIVE):
        queue._forked()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
