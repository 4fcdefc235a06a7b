"""One compile per node: a lock file beside a cache entry, and an entry written whole or not at all.

:func:`locked` holds an exclusive ``fcntl.flock`` on ``<path>.lock`` for as long as its ``with`` body
runs: N processes that miss the same entry at once queue there, the first compiles and writes it,
the others find it written when their turn comes and read it instead of compiling. The lock is
advisory and per open file, so a process that dies holding it releases it at once (no stale lock to
clean up), and the lock file itself is never removed (removing it would let two processes lock two
different files of one name). A lock that cannot be had (a read-only or full folder, a file system
without ``flock``, a symbolic link where the lock file should be: never followed) raises ``OSError``
before the body runs, and with a ``timeout`` so does a lock not had in time (``TimeoutError``: a
holder stopped in a debugger): the caller then compiles in memory and writes nothing
(:func:`fastema.kernels._cache_node.hold`). Where the system has no ``flock`` at all (Windows) the
body runs unlocked.

:func:`write_whole` writes through a temporary file in the same folder and ``os.replace``: a reader
sees the old entry, none, or the whole new one, never a part.
"""
from __future__ import annotations

import contextlib
import os
import time


@contextlib.contextmanager
def locked(path: str, timeout: float | None = None):
    """Hold the lock of the cache entry ``path`` (``<path>.lock``, opened with ``O_NOFOLLOW``) while
    the body runs; yields True when it is held, False where the system has no ``flock`` (the body
    runs unlocked). ``OSError`` where it cannot be had, ``TimeoutError`` where another holder keeps
    it over ``timeout`` seconds (None: wait as long as it takes); the body does not run then."""
    try:
        import fcntl
    except ImportError:                            # no flock on this system (Windows): unlocked
        yield False
        return
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _wait(fd, fcntl, time.monotonic() + timeout)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield True
    finally:
        os.close(fd)                               # closing the file releases the flock


def _wait(fd: int, fcntl, deadline: float) -> None:
    """``flock(fd)`` polled until ``deadline`` (1 ms, then up to 20 ms between tries); TimeoutError after it."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("the lock was not had in time") from None
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
