"""One compile per node for the kernels compiled at run time (:mod:`._cache`'s CPU cache).

- **A node-local default folder.** numba caches a kernel in ``NUMBA_CACHE_DIR`` when it is set,
  else in ``__pycache__`` beside the package when that is writable, else in the user's cache
  folder (``~/.cache/numba``), which on most clusters is a home folder on a network file system
  shared by every node. fastema puts its own folder before that last one: ``<temp>/fastema-<uid>/numba``
  (:func:`node_folder`: ``tempfile.gettempdir()``, so ``TMPDIR`` moves it; created ``0700``, used
  only when it is the user's own). ``NUMBA_CACHE_DIR`` always wins.
- **A content stamp.** numba-cuda, and numba before its stamps became content hashes, stamp an index
  with its source file's ``(st_mtime, st_size)``: a reinstall of the same file invalidates it, and an
  edit of the same size within the clock's resolution does not. :func:`source_stamp` is a digest of
  the file's bytes, whatever the numba version.
- **A lock per index file** (:func:`hold`): a process that misses a kernel takes the lock of that
  kernel's index, looks again (another process may have saved it meanwhile) and compiles and saves
  it only if it is still missing; N processes started at once on an empty cache compile each kernel
  once, the others wait and load it. The lock files live in the node-local folder
  (``<temp>/fastema-<uid>/locks``, one per index path, never removed), not in the cache folder: a
  cache on a network file system is then locked per node, by a local lock that cannot hang on the
  network file system's lock service; processes of several nodes may compile a kernel once each,
  and numba's atomic replace plus :mod:`._cache`'s checked entries keep that correct. A lock not
  had within :data:`LOCK_WAIT` seconds (a holder stopped in a debugger) is given up: the kernel is
  compiled anyway.
"""
from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile

from . import _filelock

LOCK_WAIT = 300.0
"""Seconds a process waits for another's compile of the same kernel before compiling it itself."""


@functools.cache
def node_folder() -> str | None:
    """``<temp>/fastema-<uid>``, created ``0700`` where missing; None where it cannot be created or is
    not a folder of the user's own (someone else made it first: never used)."""
    who = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    root = os.path.join(tempfile.gettempdir(), f"fastema-{who}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return None
    return root


def _subfolder(name: str) -> str | None:
    root = node_folder()
    if root is None:
        return None
    path = os.path.join(root, name)
    try:
        os.makedirs(path, 0o700, exist_ok=True)
    except OSError:
        return None
    return path


@functools.cache
def source_stamp(path: str):
    """A content stamp of the source file ``path``: ``("content", digest of its bytes)``, read once per
    process (the code compiled is the code imported). None where it cannot be read."""
    from ._cache import digest

    try:
        with open(path, "rb") as f:
            return ("content", digest(f.read()))
    except OSError:
        return None


def node_locators(classes: list) -> list:
    """numba's cache locator classes with :class:`NodeLocalLocator` (built over numba's user-wide
    locator) before the user-wide one; unchanged where numba has none of that name."""
    for i, cls in enumerate(classes):
        if cls.__name__.lstrip("_") == "UserWideCacheLocator":
            return [*classes[:i], _node_locator(cls), *classes[i:]]
    return list(classes)


@functools.cache
def _node_locator(user_wide):
    class NodeLocalLocator(user_wide):
        """Caches in ``<temp>/fastema-<uid>/numba`` (see the module's docstring)."""

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(_subfolder("numba"), self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            if _subfolder("numba") is None:
                return None
            return super().from_function(py_func, py_file)

    return NodeLocalLocator


def lock_path(index_path: str) -> str | None:
    """Where the lock of the cache index ``index_path`` lives (see the module's docstring); None where
    there is no node-local folder (no lock is taken)."""
    from ._cache import digest

    folder = _subfolder("locks")
    if folder is None:
        return None
    return os.path.join(folder, f"{os.path.basename(index_path)[:80]}.{digest(os.path.abspath(index_path).encode())}")


def hold(index_path: str) -> contextlib.ExitStack:
    """The lock of the cache index ``index_path``, held until the returned stack is closed (nothing is
    held where it cannot be had: see :func:`fastema.kernels._filelock.locked`)."""
    stack = contextlib.ExitStack()
    path = lock_path(index_path)
    if path is not None:
        stack.enter_context(_filelock.locked(path, timeout=LOCK_WAIT))
    return stack


def locking(cache_class):
    """``cache_class`` (a :func:`._cache._keyed` class) whose miss takes the index's lock (:func:`hold`)
    and looks again; the lock is held until the kernel is saved, or until :func:`released_after`'s
    compile returns (a compile that failed)."""

    def load_overload(self, sig, target_context):
        got = cache_class.load_overload(self, sig, target_context)
        if got is not None or getattr(self, "_held", None) is not None or not self._enabled:
            return got
        self._held = hold(self._cache_file._index_path)
        got = cache_class.load_overload(self, sig, target_context)    # saved by another process meanwhile?
        if got is not None:
            self.release()
        return got

    def save_overload(self, sig, data):
        try:
            cache_class.save_overload(self, sig, data)
        finally:
            self.release()

    def release(self):
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            held.close()

    return type(cache_class.__name__, (cache_class,), {"load_overload": load_overload, "save_overload": save_overload,
                                                       "release": release, "__doc__": cache_class.__doc__})


def released_after(dispatcher, cache) -> None:
    """Make ``dispatcher.compile`` give back ``cache``'s lock when it returns or raises (a compile that
    failed saves nothing), under numba's compiler lock so another thread's compile cannot take it over."""
    from numba.core.compiler_lock import global_compiler_lock

    compile_ = dispatcher.compile

    @functools.wraps(compile_)
    def compile(sig):
        with global_compiler_lock:
            outer = getattr(cache, "_held", None) is None        # not a compile nested in its own
            try:
                return compile_(sig)
            finally:
                if outer:
                    cache.release()

    dispatcher.compile = compile
