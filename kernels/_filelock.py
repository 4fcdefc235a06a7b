"""One compile per node: a lock file beside a cache entry, and an entry written whole or not at all.

:func:`locked` holds an exclusive ``fcntl.flock`` on ``<path>.lock`` for as long as its ``with`` body
runs: N processes that miss the same entry at once queue there, the first compiles and writes it,
the others find it written when their turn comes and read it instead of compiling. The lock is
advisory and per open file, so a process that dies holding it releases it at once (no stale lock to
clean up), and the lock file itself is never removed (removing it would let two processes lock two
different files of one name). Where the folder cannot hold a lock (a read-only folder, a file
system without ``flock``), the body runs unlocked: a cache that cannot be locked can still be read,
and a compile in memory is always right. With a ``timeout``, a lock not had in time (a holder
stopped in a debugger) is given up the same way.

:func:`write_whole` writes through a temporary file in the same folder and ``os.replace``: a reader
sees the old entry, none, or the whole new one, never a part.
"""
from __future__ import annotations

import contextlib
import os
import time


@contextlib.contextmanager
def locked(path: str, timeout: float | None = None):
    """Hold the lock of the cache entry ``path`` (``<path>.lock``) while the body runs; yields True
    when it is held, False where the folder could not hold one (the body runs anyway). ``timeout``:
    seconds to wait for another holder before running the body unlocked (False), None: wait as long
    as it takes."""
    fd = -1
    try:
        import fcntl

        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _wait(fd, fcntl, time.monotonic() + timeout)
    except (OSError, ImportError):
        if fd >= 0:
            os.close(fd)
        fd = -1
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)                           # closing the file releases the flock


def _wait(fd: int, fcntl, deadline: float) -> None:
    """``flock(fd)`` polled until ``deadline`` (1 ms, then up to 20 ms between tries); TimeoutError after it."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the lock of {fd} was not had in time") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


def write_whole(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file of a unique name beside it, then ``os.replace``)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
