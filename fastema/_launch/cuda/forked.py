"""After ``os.fork()`` (docs/guides/processes.md): a child of a process that had launched on a GPU
is refused every CUDA launch, with the way out (the ``spawn`` start method); CUDA does not survive
a fork.

The rule, in one place: a child was *forked after CUDA* (:data:`FORKED_AFTER_CUDA`) where its
parent had loaded the CUDA launch layer (:mod:`.tables`, not under the simulator); a grandchild
inherits the flag. This module is loaded with that layer (``fastema._launch.launches._cuda``
imports it), so a process that never loaded it has no hook. There, at the fork (the at-fork hook):

- every CUDA launch is refused (:func:`refuse_cuda_after_fork`): :func:`_cuda` (which imports the
  launch layer; ``launches._cuda`` and ``launches._cuda_target``, whose caches are dropped in the
  child too, ask it) asks again and is refused, and a launch kept from before the fork reads the
  flag at each launch (:data:`FORKED`, read by :class:`.launch.CudaKernel`: one module-level read,
  no call);
- the parent's CUDA objects are left to the parent (:func:`.frees.in_child_forked_after_cuda`:
  their deferred frees dropped, none queued again).

A child of a process that never loaded the launch layer is none of that: it may use CUDA itself
(its own objects are freed as in any process).
"""
from __future__ import annotations

import functools
import os

from . import frees

FORKED_AFTER_CUDA = False
"""This process was forked from one that had launched on a GPU (set by the at-fork hook, in the
child)."""

FORKED: list = []
"""Not empty where :data:`FORKED_AFTER_CUDA` is set (the same hook fills it): the flag a kept
launch reads, one module-level read of its own (:class:`.launch.CudaKernel`), bound where it is
imported."""


def refuse_cuda_after_fork() -> None:
    """RuntimeError, naming the way out, where this process was forked from one that had launched
    on a GPU (:data:`FORKED_AFTER_CUDA`: a launch would go to a CUDA that did not survive the fork);
    nothing otherwise."""
    if FORKED_AFTER_CUDA:
        raise RuntimeError("fastema cannot launch a CUDA kernel in this process: it was forked "
                           "(os.fork(), multiprocessing's or a DataLoader's default 'fork' start "
                           "method) from a process that had already used CUDA, and CUDA does not "
                           "survive a fork. Start the worker processes with the 'spawn' start method "
                           "instead (multiprocessing.get_context('spawn'), "
                           "DataLoader(multiprocessing_context='spawn')); see docs/guides/processes.md")


@functools.cache
def _cuda():
    """The CUDA launch layer (:mod:`.tables`), after the fork check (cached: a C-level call once
    made)."""
    refuse_cuda_after_fork()
    from . import tables

    return tables


def _after_fork_in_child() -> None:
    global FORKED_AFTER_CUDA
    if _cuda.cache_info().currsize and not _cuda().SIMULATOR:   # the parent loaded the launchers
        FORKED_AFTER_CUDA = True
        FORKED.append(True)                      # (a kept launch's flag, the same list everywhere)
        _cuda.cache_clear()                      # the next CUDA launch asks again, and is refused
        frees.in_child_forked_after_cuda()       # the parent's objects are the parent's to free


os.register_at_fork(after_in_child=_after_fork_in_child)
