"""After ``os.fork()`` (docs/guides/processes.md): a child of a process that had launched on a GPU is
refused every CUDA launch, with the way out (the ``spawn`` start method); CUDA does not survive a fork.

:func:`_cuda` imports the CUDA launch layer (:mod:`.cuda`) behind that check, :func:`_cuda_bound` the
CUDA launches (:mod:`.cuda_bound`), and :func:`refuse_cuda_after_fork` is the check alone, for an owner
whose kept launches would launch without asking (a smoother's). Each is cached (a C-level call once
made), and the at-fork hook drops the caches in a child, which asks again.

The rule, in one place: a child is forked after CUDA where its parent had loaded the CUDA launch
layer (not under the simulator). There the hook also leaves the parent's CUDA objects to the parent
(:func:`.cuda_frees.in_child_forked_after_cuda`: their deferred frees dropped, none queued again). A
child of a process that never loaded it may use CUDA itself, and frees its own objects.
"""
from __future__ import annotations

import functools
import os

from . import cuda_frees

_FORKED_AFTER_CUDA = False      # this process was forked from one that had launched on a GPU


@functools.cache
def refuse_cuda_after_fork() -> None:
    """RuntimeError, naming the way out, where this process was forked from one that had launched
    on a GPU (a launch kept from before the fork would launch into a CUDA that did not survive it);
    nothing otherwise (a cached call: its cache is dropped in a forked child, which asks again)."""
    _cuda()


@functools.cache
def _cuda():
    if _FORKED_AFTER_CUDA:
        raise RuntimeError("fastema cannot launch a CUDA kernel in this process: it was forked (os.fork(), "
                           "multiprocessing's or a DataLoader's default 'fork' start method) from a process that "
                           "had already used CUDA, and CUDA does not survive a fork. Start the worker processes "
                           "with the 'spawn' start method instead (multiprocessing.get_context('spawn'), "
                           "DataLoader(multiprocessing_context='spawn')); see docs/guides/processes.md")
    from . import cuda

    return cuda


@functools.cache
def _cuda_bound():
    """The bound CUDA launches (:mod:`.cuda_bound`), after :func:`_cuda`'s fork check."""
    _cuda()
    from . import cuda_bound

    return cuda_bound


def _after_fork_in_child() -> None:
    global _FORKED_AFTER_CUDA
    if _cuda.cache_info().currsize and not _cuda().SIMULATOR:    # the parent loaded the CUDA launchers
        _FORKED_AFTER_CUDA = True
        _cuda.cache_clear()                                       # the next CUDA launch asks again, and is refused
        _cuda_bound.cache_clear()
        refuse_cuda_after_fork.cache_clear()
        cuda_frees.in_child_forked_after_cuda()                   # the parent's objects are the parent's to free


os.register_at_fork(after_in_child=_after_fork_in_child)
