"""One compile per node for the kernels compiled at run time (:mod:`._cache`'s CPU cache).

- **A node-local default folder.** numba caches a kernel in ``NUMBA_CACHE_DIR`` when it is set,
  else in ``__pycache__`` beside the package when that is writable, else in the user's cache
  folder (``~/.cache/numba``), which on most clusters is a home folder on a network file system
  shared by every node. fastema puts its own folder before that last one: ``<temp>/fastema-<uid>/numba``
  (:func:`node_folder`: ``tempfile.gettempdir()``, so ``TMPDIR`` moves it; created ``0700``, used
  only when it is a folder of the user's own that nobody else can write, never a symbolic link;
  where it is not, one warning says which folder and why). ``NUMBA_CACHE_DIR`` always wins.
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
  and numba's atomic replace plus :mod:`._cache`'s checked entries keep that correct. The lock
  folder is held to the node folder's rule, and a lock file is never opened through a symbolic link.
- **Never in the way of an update.** A lock that cannot be had (not had within :data:`LOCK_WAIT`
  seconds: a holder stopped in a debugger; a lock folder that fails the rule; a full folder) and a
  cache entry that cannot be written (a full, size-limited or read-only folder) leave the kernel
  compiled in memory, not saved, with one warning per process (:func:`._cache.unsaved`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile

from . import _filelock

LOCK_WAIT = 300.0
"""Seconds a process waits for another's compile of the same kernel before compiling it in memory."""


def _problem(path: str) -> str | None:
    """Why ``path`` is not a folder of the user's own that nobody else can write, or None: looked at
    with ``lstat`` (a symbolic link is refused, never followed), it must be a folder of this user's,
    with no write bit for group or others (as ssh refuses a loose ``~/.ssh``). Owners and modes are
    not looked at where there are none (Windows)."""
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
    None where it is a folder of the user's own that nobody else can write (:func:`_problem`), else
    says why not (someone else made it first, a symbolic link, loosened by hand, not creatable):
    never used then."""
    who = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    root = os.path.join(tempfile.gettempdir(), f"fastema-{who}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        return root, f"it cannot be created ({err})"
    return root, _problem(root)


def node_folder() -> str | None:
    """:func:`node_root`'s folder where it may be used, else None."""
    root, why = node_root()
    return root if why is None else None


def _subfolder(name: str) -> tuple[str, str | None]:
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


NOT_NODE_LOCAL: list = []
"""``(folder, why)`` where the CPU kernels' node-local folder could not be used in this process
(said once)."""


def _not_node_local(folder: str, why: str) -> None:
    """The CPU kernels cannot be cached in the node-local ``folder`` (``why``): numba's next folder
    is used; said once (:data:`._cache.REPORT`)."""
    if NOT_NODE_LOCAL:
        return
    NOT_NODE_LOCAL.append((folder, why))
    from . import _cache

    if _cache.REPORT is not None:
        _cache.REPORT(f"the node-local kernel cache folder {folder} is not used ({why}), so the "
                      f"CPU kernels are cached in numba's user-wide folder (~/.cache/numba: on a "
                      f"cluster often a network file system every node shares, with no lock per "
                      f"node) where numba can write it, else compiled in every process. Set "
                      f"TMPDIR, or NUMBA_CACHE_DIR, to a folder only you can write (or chmod 700 "
                      f"the folder, where it is your own).")


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
            subpath = self.get_suitable_cache_subpath(py_file)
            self._cache_path = os.path.join(_subfolder("numba")[0], subpath)

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            folder, why = _subfolder("numba")
            if why is None:
                got = super().from_function(py_func, py_file)
                if got is not None or not os.path.exists(py_file):
                    return got
                why = "it cannot be written"
            _not_node_local(folder, why)
            return None

    return NodeLocalLocator


def lock_path(index_path: str) -> str | None:
    """Where the lock of the cache entry ``index_path`` lives (see the module's docstring); None
    where there is no node-local folder (no lock is kept)."""
    from ._cache import digest

    root = node_folder()
    if root is None:
        return None
    name = f"{os.path.basename(index_path)[:80]}.{digest(os.path.abspath(index_path).encode())}"
    return os.path.join(root, "locks", name)


@contextlib.contextmanager
def hold(index_path: str):
    """The lock of the cache entry ``index_path`` (a numba index, a device-code entry), held while
    the body runs. Yields None where the entry may be written (the lock is held, or none is kept: no
    node-local folder, no ``flock``), else why not: the lock folder fails the node folder's rule
    (:func:`_problem`), the lock file cannot be made (a full or read-only folder, a symbolic link in
    its place: never followed), or another process held the lock for :data:`LOCK_WAIT` seconds. The
    kernel is then compiled in memory and not written; the caller says so
    (:func:`._cache.unsaved`)."""
    path = lock_path(index_path)
    if path is None:
        yield None
        return
    folder = os.path.dirname(path)
    with contextlib.ExitStack() as stack:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            why = _problem(folder)
            if why is not None:
                why = f"the lock folder {folder} is not used: {why}"
            else:
                stack.enter_context(_filelock.locked(path, timeout=LOCK_WAIT))
        except TimeoutError:
            why = (f"another process held its lock for over {LOCK_WAIT:g} s (compiling it too, or "
                   f"stopped in a debugger)")
        except OSError as err:
            why = f"its lock cannot be had: {err}"
        yield why


def locking(cache_class):
    """``cache_class`` (a :func:`._cache._keyed` class) whose miss takes the index's lock (:func:`hold`)
    and looks again; the lock is held until the kernel is saved, or until :func:`released_after`'s
    compile returns (a compile that failed). Where the lock could not be had, the kernel compiled
    is not saved (:func:`._cache.unsaved`)."""

    def load_overload(self, sig, target_context):
        got = cache_class.load_overload(self, sig, target_context)
        if got is not None or getattr(self, "_held", None) is not None or not self._enabled:
            return got
        self._held = contextlib.ExitStack()
        self._refused = self._held.enter_context(hold(self._cache_file._index_path))
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
                from ._cache import unsaved

                unsaved(self._cache_path, refused)
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
