"""Launch tunables, all host side: the launchers read them at every call and pass them to
the kernels as arguments (numba freezes globals at compile time), so tests and ``python -m
fastema warm`` can shrink them for a ``with`` block (:func:`tuned`); and the launch driver chosen
(:data:`DRIVERS`), for a ``with`` block too.

Also what the kernels' disk cache (:mod:`fastema.kernels._cache`) trusts and how it reports what
it found: set here, when fastema's launch layer is imported, before any kernel is built."""
from __future__ import annotations

import contextlib
import functools
import os
import stat
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._switch import Switch
from ..kernels import _cache as _kernel_cache
from ..kernels._store import files as _store_files

if TYPE_CHECKING:
    from .cuda.driver import Driver

CPU_CHUNK = 1 << 14          # elements per CPU work item (64 KiB of float32: the source stays in L2 across rows)
CPU_SERIAL_BELOW = 1 << 18   # total elements below which the serial kernel runs: 2 threads pay off from about
                             # 256k on a quiet 2-core machine (bench/scripts/threads.py), and a small update stays
                             # serial when the cores the user asked for are busy
CPU_MERGE_SERIAL_BELOW = 1 << 18     # a merge piece's elements below which its kernel runs serially (8 x 32k, as
                                     # measured for the merge; its reader thread shares the cores)
CPU_STREAMS_SERIAL_BELOW = 1 << 16   # metric streams below which the smoother kernels run serially
CUDA_CHUNK = 1 << 12         # elements per CUDA block iteration
CUDA_THREADS = 256
CUDA_MAX_BLOCKS = 1 << 15    # grid-stride over chunks beyond this
CUDA_PLAN_LERP_BLOCKS_PER_SM = 12   # the fused plan + lerp's grid cap per multiprocessor: 3 waves of the 4 blocks per
                                    # SM its launch bounds allow on sm_90 (kernels.cuda.PLAN_LERP_BOUNDS and, with
                                    # stochastic rounding, SR_LERP_BOUNDS: <= 64 registers); each block pays the
                                    # plan step once.
                                    # bench/tests/test_sass.py checks the figures against the linked machine code
CUDA_STREAM_MAX_BLOCKS = 4096   # metric streams: grid-stride beyond this many blocks
CUDA_STAGING_SLOTS = 4       # pinned slots per device table for in-place address rewrites
CUDA_RETIRED_MAX = 64        # replaced sources (torch storages, JAX/TF arrays) held for fastema's queued launches
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _switch(name: str, default: str) -> bool | None:
    """The environment variable ``name`` as on (True: 1, true, on, yes, any case) or off (False:
    0, false, off, no); None where it is unset or empty, and, named in one warning that says the
    ``default`` holds, anything else."""
    value = os.environ.get(name, "").strip()
    if value.lower() in _ON + _OFF:
        return value.lower() in _ON
    if value:
        warnings.warn(f"fastema: {name}={value!r} is neither on ({', '.join(_ON)}) nor off "
                      f"({', '.join(_OFF)}), so it is ignored and the default holds ({default}); "
                      f"set one of those", RuntimeWarning, stacklevel=2)
    return None


_CUDA_CACHE_SET = _switch("FASTEMA_CUDA_CACHE",
                          "CUDA kernels compiled at run time are cached, the dispatcher's are not")
CUDA_CACHE = _CUDA_CACHE_SET is not False   # CUDA kernels compiled at run time cached (the default)
CUDA_DISPATCHER_CACHE = _CUDA_CACHE_SET is True   # and, asked for, numba's cache of the dispatcher
                                                  # path (no lock: opt-in)


def thread_count(name: str, value: str, instead: str) -> int | None:
    """``value`` of the environment variable ``name`` as a positive thread count, or None where it
    is empty; anything else (not a whole number in decimal digits: ``'²'`` is a digit, not a
    decimal one) is named in one warning that says what is used ``instead``, and ignored."""
    value = value.strip()
    if not value:
        return None
    try:
        count = int(value) if value.isdecimal() else 0
    except ValueError:                  # more digits than int() reads (sys.get_int_max_str_digits)
        count = 0
    if count > 0:
        return count
    warnings.warn(f"fastema: {name}={value!r} is not a positive whole number, so it is ignored and "
                  f"{instead}; set it to one, e.g. {name}=4", RuntimeWarning, stacklevel=2)
    return None


CPU_THREADS = thread_count("FASTEMA_NUM_THREADS", os.environ.get("FASTEMA_NUM_THREADS", ""),
                           "the CPU kernels follow torch's thread count (else OMP_NUM_THREADS)")
"""Threads of every parallel CPU kernel; None: follow torch's count, else OMP_NUM_THREADS, else
numba's (:func:`fastema._launch.cpu.pool.team`)."""


def _cache_warning(message: str) -> None:
    """What the kernel cache found wrong, as a RuntimeWarning
    (:func:`fastema.kernels._store.files.set_report`)."""
    warnings.warn(f"fastema: {message}", RuntimeWarning, stacklevel=2)


@functools.lru_cache(maxsize=64)
def cache_folder_problem(path: str) -> str | None:
    """Why fastema does not load kernels from the cache folder ``path``, or None when it may.

    numba's cache files are pickles: whoever can write them runs code in every process that reads
    them. So the folder (symbolic links resolved) and each folder above it must belong to this user
    or to root; the folder itself must be writable by nobody else, and a folder above it only with
    the sticky bit (as ``/tmp``: nobody can then rename or replace another's entries). A group whose
    only member is this user (a user private group, which a umask of 002 leaves folders writable by)
    is nobody else. Not checked where there are no POSIX owners (Windows: the default folders are
    the user's own)."""
    if not hasattr(os, "geteuid"):
        return None
    me = os.geteuid()
    folder = here = os.path.realpath(path)
    while True:
        try:
            st = os.stat(here)
        except OSError as err:
            return f"{here} cannot be inspected ({err})"
        if st.st_uid not in (me, 0):
            return f"{here} belongs to another user (uid {st.st_uid})"
        who = "everyone" if st.st_mode & stat.S_IWOTH else \
            f"group {st.st_gid}" if st.st_mode & stat.S_IWGRP and not _own_group(st.st_gid) else None
        if who is not None and (here == folder or not st.st_mode & stat.S_ISVTX):
            return f"{here} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


@functools.cache
def _own_group(gid: int) -> bool:
    """Whether group ``gid`` has no member but this user: its primary group, named as the user."""
    try:
        import grp
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}


_TUNABLE = {
    **dict.fromkeys(("CPU_CHUNK", "CUDA_CHUNK", "CUDA_THREADS", "CUDA_MAX_BLOCKS",
                     "CUDA_PLAN_LERP_BLOCKS_PER_SM", "CUDA_STREAM_MAX_BLOCKS", "CUDA_STAGING_SLOTS",
                     "CUDA_RETIRED_MAX"), "a positive whole number"),
    **dict.fromkeys(("CPU_SERIAL_BELOW", "CPU_MERGE_SERIAL_BELOW", "CPU_STREAMS_SERIAL_BELOW"),
                    "a whole number, 0 or more"),
    "CPU_THREADS": "a positive whole number, or None (follow torch's count)",
    "CUDA_CACHE": "True or False"}
"""The tunables :func:`tuned` sets and what each takes. Most are read at every launch; the chunk
sizes (``CPU_CHUNK``, ``CUDA_CHUNK``) where a launch table is built and ``CUDA_STAGING_SLOTS``
where staging is, so an object built inside the block keeps those after it."""


def _fits(name: str, value) -> bool:
    if name == "CUDA_CACHE":
        return isinstance(value, bool)
    if value is None:
        return name == "CPU_THREADS"
    least = 0 if name.endswith("_BELOW") else 1
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@contextlib.contextmanager
def tuned(**values) -> Iterator[None]:
    """The launch tunables named (``tuned(CUDA_CHUNK=16, CUDA_MAX_BLOCKS=3)``) set to ``values``
    for the ``with`` block, and put back after, however it ends: small launches in the tests,
    the parallel kernels on tiny inputs in ``python -m fastema warm``. A name that is not a
    tunable (:data:`_TUNABLE`: when each is read), or a value it cannot take, raises ValueError
    before anything is set. Not thread-safe: the values are process-wide."""
    bad = [f"{name}={value!r} (not a launch tunable: {', '.join(_TUNABLE)})"
           if name not in _TUNABLE else f"{name}={value!r} (takes {_TUNABLE[name]})"
           for name, value in values.items() if name not in _TUNABLE or not _fits(name, value)]
    if bad:
        raise ValueError(f"fastema: config.tuned cannot set {'; '.join(bad)}; nothing was changed")
    own = globals()
    saved = {name: own[name] for name in values}
    own.update(values)
    EPOCH[0] += 1
    try:
        yield
    finally:
        own.update(saved)
        EPOCH[0] += 1


EPOCH = [0]
"""Counts the changes of the tunables (:func:`tuned`, entering and leaving its block): a launch that
keeps what it read of them (a kept CUDA launch's grid and block size) reads them again where this
moved (one read of a list kept by identity, bound where it is imported)."""


DRIVERS: Switch[Driver] = Switch()
"""The launch driver the launch path takes: the innermost given to ``DRIVERS.using`` (the tests'
fake GPU, the variant enumeration's recorder, a benchmark; :func:`.cuda.drivers.using`), else the
process's own (:func:`.cuda.drivers.default`, this switch's default, set where the CUDA launch layer
is loaded: nothing asks for a driver before). It sits here, below the CUDA modules, so that caches
of what a driver made read ``DRIVERS.chosen`` without loading them (``fastema._backends.kept``)."""


_store_files.set_report(_cache_warning)
_kernel_cache.set_trust(cache_folder_problem)
