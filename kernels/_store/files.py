"""The store's files: one lock, one trust rule, one atomic write, and how failures are reported.

- **A folder of the user's own** (:func:`problem`, the trust rule): the node-local folder
  ``<temp>/fastema-<uid>`` (:func:`node_root`: ``tempfile.gettempdir()``, so ``TMPDIR`` moves it;
  created ``0700``) and its lock folder are used only where they are folders of this user's, not
  symbolic links, that nobody else can write (as ssh refuses a loose ``~/.ssh``).
- **A lock per entry** (:func:`hold`, over :func:`locked`): an exclusive ``fcntl.flock`` on a lock
  file in ``<temp>/fastema-<uid>/locks`` (never on a network file system, never removed, never
  opened through a symbolic link), given up after :data:`LOCK_WAIT` seconds (a holder stopped in a
  debugger): N processes missing the same entry queue there, the first compiles and writes it, the
  others read it. Advisory and per open file: a process that dies holding it releases it at once.
  Where the system has no ``flock`` (Windows) the body runs unlocked.
- **Written whole** (:func:`write_whole`): a temporary file of a unique name beside it, then
  ``os.replace``: a reader sees the old entry, none, or the whole new one, never a part.
- **Never in the way of an update**: a lock not had, or an entry that cannot be written (a full,
  size-limited or read-only folder), leaves the code compiled in memory, with one report a process
  (:func:`unsaved`), through :data:`REPORT` (fastema's launch layer makes it a warning:
  :func:`set_report`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile
import time
from typing import Iterator

from .identity import digest

LOCK_WAIT = 300.0
"""Seconds a process waits for another's compile of the same entry before compiling it in memory."""

REPORT = None
"""How the store and the caches say what they found wrong: a function of one message, given by
fastema's launch layer (``fastema._launch.config``: a ``RuntimeWarning``) through
:func:`set_report` before any kernel is built; this package imports no ``warnings``. None:
nothing is said."""


def set_report(fn) -> None:
    """``fn(message)`` says from now on what the store and the caches found wrong (:data:`REPORT`;
    None: nothing is said)."""
    global REPORT
    REPORT = fn


def report(message: str) -> None:
    """``message`` said through :data:`REPORT` (where it is set)."""
    if REPORT is not None:
        REPORT(message)


UNSAVED: list = []
"""``(folder, why)`` of each compiled kernel this process could not save in its cache folder (the
CPU kernels' cache and the CUDA node store alike): each is used from memory; the first was
reported."""


@contextlib.contextmanager
def afresh(*, lock_wait: float | None = None) -> Iterator[None]:
    """For the ``with`` block, this process's record of unsaved kernels started again (the first
    one reported again) and, given, ``lock_wait`` seconds for :data:`LOCK_WAIT`; both put back
    after, however it ends (a test's own records; not thread-safe)."""
    global LOCK_WAIT
    if lock_wait is not None and (isinstance(lock_wait, bool) or not isinstance(lock_wait, (int, float))
                                  or not lock_wait >= 0):
        raise ValueError(f"afresh(lock_wait=) takes seconds >= 0, got {lock_wait!r}")
    saved, wait = list(UNSAVED), LOCK_WAIT
    UNSAVED.clear()
    LOCK_WAIT = wait if lock_wait is None else float(lock_wait)
    try:
        yield
    finally:
        UNSAVED[:] = saved
        LOCK_WAIT = wait


def unsaved(folder: str, why: str) -> None:
    """A compiled kernel could not be saved in the cache folder ``folder`` (``why``) and is used
    from memory: recorded, and reported when it is the first in this process."""
    UNSAVED.append((folder, why))
    if len(UNSAVED) == 1:
        report(f"a compiled kernel could not be cached in {folder} ({why}), so it is used from "
               f"memory and the update goes on; the next process that needs it compiles it again "
               f"(seconds). Free space there, or set NUMBA_CACHE_DIR to a folder of your own with "
               f"room (only you can write it; TMPDIR moves the node-local default). Other kernels "
               f"that cannot be cached are kept in memory without another warning.")


def problem(path: str) -> str | None:
    """Why ``path`` is not a folder of the user's own that nobody else can write, or None: looked at
    with ``lstat`` (a symbolic link is refused, never followed), it must be a folder of this user's,
    with no write bit for group or others. Owners and modes are not looked at where there are none
    (Windows)."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"it cannot be inspected ({err})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if not hasattr(os, "getuid"):
        return None
    if st.st_uid != os.getuid():
        return f"it belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"group or others can write it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


@functools.cache
def node_root() -> tuple[str, str | None]:
    """``(<temp>/fastema-<uid>, why it is not used)``, created ``0700`` where missing. ``why`` is
    None where it passes :func:`problem`, else says why not (someone else made it first, a
    symbolic link, loosened by hand, not creatable): never used then."""
    who = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    root = os.path.join(tempfile.gettempdir(), f"fastema-{who}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        return root, f"it cannot be created ({err})"
    return root, problem(root)


def node_folder() -> str | None:
    """:func:`node_root`'s folder where it may be used, else None."""
    root, why = node_root()
    return root if why is None else None


def subfolder(name: str) -> tuple[str, str | None]:
    """``(<temp>/fastema-<uid>/<name>, why it cannot be used)``, created ``0700`` where missing;
    ``why`` is None where it can be used."""
    root, why = node_root()
    path = os.path.join(root, name)
    if why is not None:
        return path, f"{root}: {why}"
    try:
        os.makedirs(path, 0o700, exist_ok=True)
    except OSError as err:
        return path, f"it cannot be created ({err})"
    return path, None


def lock_path(entry_path: str) -> str | None:
    """Where the lock of the entry ``entry_path`` lives (see the module docstring); None where
    there is no node-local folder (no lock is kept)."""
    root = node_folder()
    if root is None:
        return None
    name = f"{os.path.basename(entry_path)[:80]}.{digest(os.path.abspath(entry_path), size=32)}"
    return os.path.join(root, "locks", name)


@contextlib.contextmanager
def hold(entry_path: str):
    """The lock of the entry ``entry_path`` (a numba index, a node store entry), held while the
    body runs. Yields None where the entry may be written (the lock is held, or none is kept: no
    node-local folder, no ``flock``), else why not: the lock folder fails :func:`problem`, the lock
    file cannot be made (a full or read-only folder, a symbolic link in its place: never followed),
    or another process held the lock for :data:`LOCK_WAIT` seconds. The kernel is then compiled in
    memory and not written; the caller says so (:func:`unsaved`)."""
    path = lock_path(entry_path)
    if path is None:
        yield None
        return
    folder = os.path.dirname(path)
    with contextlib.ExitStack() as stack:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            why = problem(folder)
            if why is not None:
                why = f"the lock folder {folder} is not used: {why}"
            else:
                stack.enter_context(locked(path, timeout=LOCK_WAIT))
        except TimeoutError:
            why = (f"another process held its lock for over {LOCK_WAIT:g} s (compiling it too, or "
                   f"stopped in a debugger)")
        except OSError as err:
            why = f"its lock cannot be had: {err}"
        yield why


@contextlib.contextmanager
def locked(path: str, timeout: float | None = None):
    """Hold the lock ``<path>.lock`` (opened with ``O_NOFOLLOW``) while the body runs; yields True
    when it is held, False where the system has no ``flock`` (the body runs unlocked). ``OSError``
    where it cannot be had, ``TimeoutError`` where another holder keeps it over ``timeout`` seconds
    (None: wait as long as it takes); the body does not run then."""
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
    """Write ``data`` to ``path`` atomically (a temporary file of a unique name beside it, fsync'ed,
    then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
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
