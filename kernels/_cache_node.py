"""One compile per node for the kernels compiled at run time (:mod:`._cache`'s CPU cache).

- **A node-local default folder.** numba caches a kernel in ``NUMBA_CACHE_DIR`` when it is set,
  else in ``__pycache__`` beside the package when that is writable, else in the user's cache
  folder (``~/.cache/numba``), which on most clusters is a home folder on a network file system
  shared by every node. fastema puts its own folder before that last one: ``<temp>/fastema-<uid>/numba``
  (``._store.files.node_folder``: ``tempfile.gettempdir()``, so ``TMPDIR`` moves it; created ``0700``, used
  only when it is a folder of the user's own that nobody else can write, never a symbolic link;
  where it is not, one warning says which folder and why). ``NUMBA_CACHE_DIR`` always wins.
- **A content stamp.** numba-cuda, and numba before its stamps became content hashes, stamp an index
  with its source file's ``(st_mtime, st_size)``: a reinstall of the same file invalidates it, and an
  edit of the same size within the clock's resolution does not. ``._cache`` stamps it with the
  digest of the file's bytes (``._store.identity.of_file``), whatever the numba version.
- **A lock per index file** (``._store.files.hold``, the node store's): a process that misses a
  kernel takes the lock of that kernel's index, looks again (another process may have saved it
  meanwhile) and compiles and saves it only if it is still missing; N processes started at once on
  an empty cache compile each kernel once, the others wait and load it. The lock files live in the node-local folder
  (``<temp>/fastema-<uid>/locks``, one per index path, never removed), not in the cache folder: a
  cache on a network file system is then locked per node, by a local lock that cannot hang on the
  network file system's lock service; processes of several nodes may compile a kernel once each,
  and numba's atomic replace plus :mod:`._cache`'s checked entries keep that correct. The lock
  folder is held to the node folder's rule, and a lock file is never opened through a symbolic link.
- **Never in the way of an update.** A lock that cannot be had (not had within ``files.LOCK_WAIT``
  seconds: a holder stopped in a debugger; a lock folder that fails the rule; a full folder) and a
  cache entry that cannot be written (a full, size-limited or read-only folder) leave the kernel
  compiled in memory, not saved, with one warning per process (``._store.files.unsaved``).

The node-local folder, its rule, the lock and the reports are the store's (``._store.files``); this
module fits them to numba's cache classes.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

from ._store import files

NOT_NODE_LOCAL: list = []
"""``(folder, why)`` where the CPU kernels' node-local folder could not be used in this process
(said once)."""


@contextlib.contextmanager
def afresh() -> Iterator[None]:
    """For the ``with`` block, this process's record of :data:`NOT_NODE_LOCAL` started again (said
    again) and the node folder looked up again (``files.node_root``); put back after."""
    saved = list(NOT_NODE_LOCAL)
    NOT_NODE_LOCAL.clear()
    files.node_root.cache_clear()
    try:
        yield
    finally:
        NOT_NODE_LOCAL[:] = saved
        files.node_root.cache_clear()


def _not_node_local(folder: str, why: str) -> None:
    """The CPU kernels cannot be cached in the node-local ``folder`` (``why``): numba's next folder
    is used; said once (``._store.files.report``)."""
    if NOT_NODE_LOCAL:
        return
    NOT_NODE_LOCAL.append((folder, why))
    files.report(f"the node-local kernel cache folder {folder} is not used ({why}), so the "
                 f"CPU kernels are cached in numba's user-wide folder (~/.cache/numba: on a "
                 f"cluster often a network file system every node shares, with no lock per "
                 f"node) where numba can write it, else compiled in every process. Set "
                 f"TMPDIR, or NUMBA_CACHE_DIR, to a folder only you can write (or chmod 700 "
                 f"the folder, where it is your own).")


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
            subpath = self.get_suitable_cache_subpath(py_file)
            self._cache_path = os.path.join(files.subfolder("numba")[0], subpath)

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            folder, why = files.subfolder("numba")
            if why is None:
                got = super().from_function(py_func, py_file)
                if got is not None or not os.path.exists(py_file):
                    return got
                why = "it cannot be written"
            _not_node_local(folder, why)
            return None

    return NodeLocalLocator


def locking(cache_class):
    """``cache_class`` (a :func:`._cache._keyed` class) whose miss takes the index's lock
    (``._store.files.hold``) and looks again; the lock is held until the kernel is saved, or until
    :func:`released_after`'s compile returns (a compile that failed). Where the lock could not be
    had, the kernel compiled is not saved (``._store.files.unsaved``)."""

    def load_overload(self, sig, target_context):
        got = cache_class.load_overload(self, sig, target_context)
        if got is not None or getattr(self, "_held", None) is not None or not self._enabled:
            return got
        self._held = contextlib.ExitStack()
        self._refused = self._held.enter_context(files.hold(self._cache_file._index_path))
        got = cache_class.load_overload(self, sig, target_context)    # saved by another process meanwhile?
        if got is not None:
            self.release()
        return got

    def save_overload(self, sig, data):
        try:
            refused = getattr(self, "_refused", None)
            if refused is None:
                cache_class.save_overload(self, sig, data)
            else:                           # the lock was not had: compiled in memory, not saved
                files.unsaved(self._cache_path, refused)
        finally:
            self.release()

    def release(self):
        held, self._held, self._refused = getattr(self, "_held", None), None, None
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
