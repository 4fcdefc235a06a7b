"""Numba's on-disk cache for the kernels, shared by every process on a machine.

The kernels are closures (``lerp_kernel(...)`` builds one per storage kinds and mode), and
numba's own ``cache=True`` keys a closure by its pickled cell contents. Ours hold compiled
functions, whose pickles carry a random per-process id (``Dispatcher._uuid``), so every
process computed a new key, missed, compiled again and added one more ``.nbc`` file
(``lerp_kernel.locals.kernel`` 185 times after one test run).

:func:`cached` gives a dispatcher a cache keyed instead by a stable description of what the
closure captures (:func:`describe`: constants by value, compiled functions by name, options
and their own captures, intrinsics by name):

- one index file per variant (``<qualname>.v<variant digest>-<line>.pyXY.nbi``), in numba's usual
  place: ``__pycache__`` next to the source, or ``NUMBA_CACHE_DIR``, or, where the package
  is read-only (an installed ``site-packages``), a node-local folder (below);
- the index is stamped with a digest of the kernel's file's content (never its mtime: a touched or
  reinstalled file that is unchanged keeps its kernels, an edit always drops them) *and* a digest of
  the kernels' other sources (:data:`DEPENDENCIES`): numba alone would not see an edit of the
  element bodies in ``_elementwise.py``; a stale index is replaced, not added to;
- one compile per node (:mod:`._cache_node`): the CPU kernels' default folder, where the package is
  read-only and ``NUMBA_CACHE_DIR`` unset, is node-local (``<temp>/fastema-<uid>/numba``), and a
  process that misses a kernel takes that kernel's lock, looks again and compiles only if it is
  still missing: N processes started at once compile it once, the others wait and load it;
- each data file holds its own key and is used only when the key matches: two processes
  that compile at once may number their files alike (numba's index update is not atomic),
  and must then recompile, never run another variant's code;
- an index or data file that cannot be read (truncated, emptied or overwritten: a crash or a
  full disk while numba wrote it, as numba does not ``fsync``) is a miss too: the kernel is
  compiled again and the file rewritten, and the first such file is reported (``._store.files.report``);
- the files are pickles, so whoever can write the cache folder runs code in every process that
  reads it: a folder others can write (:data:`TRUST` says why) is neither read nor written,
  and the kernels are compiled in memory, with one warning naming the folder;
- a kernel that cannot be saved (a full, size-limited or read-only folder: ENOSPC, EFBIG, EROFS,
  EACCES; or its lock not had) is used from memory: the update goes on, with one warning per
  process naming the folder and the fix (``._store.files.unsaved``; the node store reports the same).

Every digest is the store's one (``._store.identity.digest``, SHA-256); the lock, the node-local
folder and the reports are the store's too (``._store.files``).
"""
import contextlib
import functools
from types import ModuleType
from typing import Iterator

import numpy as np
from numba.core.dispatcher import Dispatcher
from numba.core.extending import _Intrinsic
from numba.core.types import Type

from . import _bits, _cache_node, _cpu_hw, _elementwise, _intrinsics, _stats, _target, kinds
from ._store import files
from ._store.identity import digest, of_file, of_files

DEPENDENCIES = (_bits, _stats, _elementwise, _intrinsics, _target, _cpu_hw, kinds)
"""The modules every CPU kernel's code depends on besides its own file (``._store.identity.CPU_SOURCES``)."""


def sources(modules: tuple = DEPENDENCIES) -> str:
    """The digest of the sources of ``modules`` (``._store.identity.of_files``; read once per process)."""
    return of_files(tuple(m.__file__ for m in modules))


def describe(value) -> str:
    """A description of a closure cell's value that is the same in every process and differs
    wherever the compiled code may differ. Raises ``TypeError`` for a value it cannot describe."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, np.generic):                                        # a NumPy scalar
        return f"{value.dtype}:{value!r}"
    if isinstance(value, Dispatcher) or _is_cuda(value, "CUDADispatcher"):
        options = sorted((k, repr(v)) for k, v in value.targetoptions.items())
        return f"jit:{describe_function(value.py_func)}{options}"
    if isinstance(value, _Intrinsic) or _is_cuda(value, "_Intrinsic"):
        return f"intrinsic:{value._name}:{_describe_intrinsic(value._defn)}"
    if isinstance(value, Type):                                              # a numba type (CUDA local arrays)
        return f"type:{value}"
    raise TypeError(f"cannot key a cached kernel on a captured {type(value).__name__} ({value!r}); capture "
                    "constants, compiled functions or intrinsics only, or pass it as an argument")


def _describe_intrinsic(fn) -> str:
    """An intrinsic's typing function and what it captures (the pointer's element type, a vector's
    lanes...), so intrinsics of one name built for different types differ: modules by name,
    types and constants by value, and anything else by its type's name."""
    parts = []
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        value = cell.cell_contents
        if isinstance(value, ModuleType):
            parts.append(f"{name}=module:{value.__name__}")
            continue
        try:
            parts.append(f"{name}={describe(value)}")
        except TypeError:
            parts.append(f"{name}={type(value).__name__}:{value}")
    return f"{fn.__module__}.{fn.__qualname__}({', '.join(parts)})"


def _is_cuda(value, name: str) -> bool:
    """``value`` is numba-cuda's class ``name`` (numba-cuda not imported for it)."""
    cls = type(value)
    return cls.__name__ == name and cls.__module__.startswith("numba.cuda.")


def describe_function(fn) -> str:
    """``module.qualname(captures)`` of a plain Python function (see :func:`describe`)."""
    cells = fn.__closure__ or ()
    captured = ", ".join(f"{name}={describe(cell.cell_contents)}" for name, cell in zip(fn.__code__.co_freevars, cells))
    return f"{fn.__module__}.{fn.__qualname__}({captured})"


DAMAGED: list = []
"""The cache files found unreadable in this process (each read as a miss, compiled again and
rewritten); the first one was reported."""


TRUST = None
"""A function of a cache folder: why kernels must not be read from it (someone else can write it
or a folder above it), or None when they may. Given by :mod:`fastema._launch.config` through
:func:`set_trust` before any kernel is built; this package looks at no file permissions itself.
None: every folder numba chooses is used."""


def set_trust(fn) -> None:
    """``fn(folder)`` decides from now on which cache folders kernels are read from
    (:data:`TRUST`)."""
    global TRUST
    TRUST = fn

UNTRUSTED: list = []
"""``(folder, why)`` of each cache folder refused in this process (each said once)."""


def _trusted(cache) -> bool:
    """Whether kernels may be loaded from (and saved to) ``cache``'s folder (:data:`TRUST`); a refused
    folder is reported once."""
    folder = getattr(cache, "_cache_path", None)
    if TRUST is None or folder is None:
        return True
    why = TRUST(folder)
    if why is None:
        return True
    if all(f != folder for f, _ in UNTRUSTED):
        UNTRUSTED.append((folder, why))
        files.report(f"the kernel cache folder {folder} is not used: {why}. numba's cache files are pickles, so a "
                   f"file someone else put there would run as code in this process; the kernels are compiled in "
                   f"memory instead, in every process (seconds at the first update). Set NUMBA_CACHE_DIR to a "
                   f"folder only you can write (chmod go-w), or leave it unset for fastema's default (beside "
                   f"fastema's package, or a node-local folder of your own: <temp>/fastema-<uid>/numba).")
    return False


def _damaged(path: str, err: BaseException) -> None:
    """``path`` could not be read: recorded, and reported when it is the first in this process."""
    DAMAGED.append(path)
    if len(DAMAGED) == 1:
        files.report(f"the kernel cache file {path} could not be read ({type(err).__name__}: {err}), so the kernel is "
               f"compiled again and the file rewritten. A file damaged by a crash or a full disk while numba wrote "
               f"it does this once; other damaged files are repaired the same way without another warning.")


def _checked(index_file_class):
    """``index_file_class`` storing each entry with its key: an entry found under another key (two
    processes that numbered their files alike) reads as a miss, and so does an index or an entry
    that cannot be read (:func:`_damaged`): the next save rewrites it."""

    class CheckedFile(index_file_class):
        def save(self, key, data):
            super().save(key, (key, data))

        def load(self, key):
            got = super().load(key)
            if isinstance(got, tuple) and len(got) == 2 and got[0] == key:
                return got[1]
            return None

        def _load_index(self):
            try:
                overloads = super()._load_index()
                if not isinstance(overloads, dict):
                    raise TypeError(f"the index holds a {type(overloads).__name__}, not a dict")
                return overloads
            except Exception as err:            # truncated, emptied, garbage: empty, so the next save rewrites it
                _damaged(self._index_path, err)
                return {}

        def _load_data(self, name):
            try:
                return super()._load_data(name)
            except OSError:                     # gone meanwhile: numba's load reads it as a miss
                raise
            except Exception as err:            # a miss; the save after the compile overwrites the file
                _damaged(self._data_path(name), err)
                return None

    return CheckedFile


def _keyed(cache_class, index_file_class, name: str, extra=None):
    """``cache_class`` (numba's ``FunctionCache`` or numba-cuda's ``CUDACache``) keyed by the variant's
    :func:`describe_function` instead of pickled cells, its index stamped with the content of its own
    file and the sources of the kernels' other modules, each entry checked against its key
    (:func:`_checked`), a save that fails used from memory (``._store.files.unsaved``). ``extra``: a function
    whose result every key also holds (the CUDA cache: :data:`CUDA_VERSIONS`)."""
    CheckedFile = _checked(index_file_class)

    def __init__(self, py_func, variant: str, dependencies: tuple = DEPENDENCIES):
        cache_class.__init__(self, py_func)
        self._variant = variant
        own = of_file(py_func.__code__.co_filename)
        own = ("content", own) if own is not None else self._impl.locator.get_source_stamp()
        stamp = (own, sources(dependencies))
        self._cache_file = CheckedFile(cache_path=self._cache_path, filename_base=self._impl.filename_base,
                                       source_stamp=stamp)

    def save_overload(self, sig, data):
        try:
            cache_class.save_overload(self, sig, data)
        except OSError as err:          # a full, size-limited or read-only folder: used from memory
            files.unsaved(self._cache_path, str(err))

    def _index_key(self, sig, codegen):
        key = (sig, codegen.magic_tuple(), (digest(self._py_func.__code__.co_code, size=32), self._variant))
        if extra is not None:
            key += (("built_by", extra()),)
        launch_config = getattr(self, "_launch_config_key", None)    # numba-cuda: launch-config-sensitive kernels
        return key if launch_config is None else key + (("launch_config", launch_config),)

    return type(name, (cache_class,), {"__init__": __init__, "save_overload": save_overload,
                                       "_index_key": _index_key, "__doc__": _keyed.__doc__})


def _internals_known(cache_class, base) -> bool:
    """Whether ``cache_class`` (and ``base``, where its ``__init__`` lives) have the internals
    :func:`_keyed` replaces."""
    needed = {"_cache_file", "_impl", "_cache_path", "filename_base", "get_source_stamp"}
    return hasattr(cache_class, "_index_key") and needed <= set(base.__init__.__code__.co_names)


def _cache_class():
    """The CPU cache class (:func:`_numba_cache_class`; in a :func:`using` block given one, that)."""
    return _CACHE_CLASS[-1] if _CACHE_CLASS else _numba_cache_class()


_CACHE_CLASS: list = []            # the open using() blocks' cache classes, innermost last


@functools.cache
def _numba_cache_class():
    """The CPU cache class, built on numba's internals at first use: the node-local default folder and
    the lock of :mod:`._cache_node`; None where numba's internals moved."""
    try:
        from numba.core.caching import CompileResultCacheImpl, FunctionCache, IndexDataCacheFile
    except ImportError:
        return None
    if not _internals_known(FunctionCache, FunctionCache) or not hasattr(CompileResultCacheImpl, "_locator_classes"):
        return None
    impl = type("NodeLocalImpl", (CompileResultCacheImpl,),
                {"_locator_classes": _cache_node.node_locators(CompileResultCacheImpl._locator_classes)})
    node_local = type("NodeLocalFunctionCache", (FunctionCache,), {"_impl_class": impl})
    return _cache_node.locking(_keyed(node_local, IndexDataCacheFile, "VariantCache"))


SHARED = _cache_class() is not None
"""True where :func:`cached` shares compiled kernels between processes (numba's internals are
the ones this module knows); else every process compiles its kernels again."""

NOT_CACHED: list = []
"""Why kernels built so far are not cached on disk, if any are (numba found no writable
location: the package read-only and no writable user cache directory); the launchers warn."""


_UNSET = object()


@contextlib.contextmanager
def using(*, cache_class=_UNSET, shared: bool | None = None, cuda_versions=_UNSET) -> Iterator[None]:
    """For the ``with`` block, each one given: ``cache_class`` makes the disk cache of the CPU
    kernels built in it instead of the class made over numba's internals (None: numba's own
    ``cache=True``, as where those internals moved; a class whose construction raises numba's
    RuntimeError, as where numba finds no writable location); :data:`SHARED` is ``shared``;
    ``cuda_versions()`` gives the versions every CUDA kernel's cache key holds
    (:data:`CUDA_VERSIONS`). Put back after, however it ends; not thread-safe (process-wide)."""
    global SHARED, CUDA_VERSIONS
    if shared is not None and not isinstance(shared, bool):
        raise TypeError(f"using(shared=) takes True or False, got {shared!r}")
    if cuda_versions is not _UNSET and cuda_versions is not None and not callable(cuda_versions):
        raise TypeError(f"using(cuda_versions=) takes a function giving (name, version) pairs, got {cuda_versions!r}")
    saved = SHARED, CUDA_VERSIONS
    if cache_class is not _UNSET:
        _CACHE_CLASS.append(cache_class)
    SHARED = saved[0] if shared is None else shared
    CUDA_VERSIONS = saved[1] if cuda_versions is _UNSET else cuda_versions
    try:
        yield
    finally:
        SHARED, CUDA_VERSIONS = saved
        if cache_class is not _UNSET:
            _CACHE_CLASS.pop()


@contextlib.contextmanager
def afresh(*, lock_wait: float | None = None) -> Iterator[None]:
    """For the ``with`` block, this process's records of the caches started again, each said again
    when first found: :data:`NOT_CACHED`, :data:`DAMAGED`, :data:`UNTRUSTED`, the node-local folder's
    (:func:`._cache_node.afresh`) and the unsaved kernels' (:func:`._store.files.afresh`, which
    also takes ``lock_wait``); put back after, however it ends."""
    saved = [(record, list(record)) for record in (NOT_CACHED, DAMAGED, UNTRUSTED)]
    with _cache_node.afresh(), files.afresh(lock_wait=lock_wait):
        for record, _ in saved:
            record.clear()
        try:
            yield
        finally:
            for record, kept in saved:
                record[:] = kept


def cached(dispatcher: Dispatcher) -> Dispatcher:
    """Give a CPU ``dispatcher`` (made without ``cache=True``, not compiled yet) the cache
    described above; returns it.

    The function's ``__qualname__`` gains the variant's digest: the cache files are named after it,
    and so are the compiled symbols. numba numbers the symbols of one name per process, so without
    it a variant loaded from the cache could carry the very symbol name another variant of the same
    closure was compiled under in this process, and call that one's code.

    Where numba's internals are not the ones this was written for (:data:`SHARED` False), numba's
    own ``cache=True`` instead: correct, but compiled again in every process. Where numba finds no
    writable cache location, no disk cache (the reason goes to :data:`NOT_CACHED`), nor where others
    can write it (:data:`TRUST`)."""
    cls = _cache_class()
    try:
        if cls is None or not hasattr(dispatcher, "_cache"):
            before = getattr(dispatcher, "_cache", None)
            dispatcher.enable_caching()
            if not _trusted(dispatcher._cache):         # a folder others can write: compiled in memory
                if before is None:
                    del dispatcher._cache
                else:
                    dispatcher._cache = before
        else:
            _attach(dispatcher, cls)
    except RuntimeError as e:                           # no locator: nowhere to write; compile per process
        if not NOT_CACHED:
            NOT_CACHED.append(str(e))
    return dispatcher


def _attach(dispatcher, cls, *dependencies: tuple) -> None:
    """Give ``dispatcher`` a ``cls`` cache keyed by its description (its own options included), its
    function's qualname suffixed by the description's digest (see :func:`cached`); none where the
    cache's folder is not trusted (:func:`_trusted`)."""
    variant = describe(dispatcher)
    fn = dispatcher.py_func
    fn.__qualname__ = f"{fn.__qualname__}.v{digest(variant, size=32)}"
    cache = cls(fn, variant, *dependencies)
    if _trusted(cache):
        dispatcher._cache = cache
        if hasattr(cache, "release"):                   # a locking cache (:func:`._cache_node.locking`)
            _cache_node.released_after(dispatcher, cache)


# ---------------------------------------------------------------- CUDA kernels (issue #23 item 4)
#
# numba-cuda's own cache (``CUDACache``, the same index and data files as numba's) keys a kernel by
# its pickled closure cells too; fastema's CUDA kernels capture device functions and intrinsics, so
# :func:`cached_cuda` keys them as :func:`cached` does the CPU ones, by :func:`describe`, with numba-cuda's
# ``codegen.magic_tuple()`` (CUDA runtime version and the GPU's compute capability) in the key, and
# the versions of numba-cuda, cuda-core, NVVM and the driver (:data:`CUDA_VERSIONS`): numba versions
# its index by numba's own version only, so an upgraded numba-cuda or NVVM would load the old code.
# It is not switched on by default yet: it has not run on a GPU (set FASTEMA_CUDA_CACHE=1 to use it;
# the GPU plan's tests/kernels/test_cuda_cache.py checks it on a GPU).

CUDA_VERSIONS = None
"""A function giving ``(name, version)`` pairs every CUDA kernel's cache key holds besides numba-cuda's
magic tuple (numba-cuda, cuda-core, NVVM and the driver: :func:`fastema._launch.cuda.tables.cuda_versions`);
given by fastema's launch layer through :func:`set_cuda_versions` before any kernel is built (this
package reads no package metadata). None: a key of ``("unknown",)``, so nothing compiled by a known
set of versions is loaded."""


def set_cuda_versions(fn) -> None:
    """``fn()`` gives from now on the versions every CUDA kernel's cache key holds
    (:data:`CUDA_VERSIONS`)."""
    global CUDA_VERSIONS
    CUDA_VERSIONS = fn


def _cuda_built_by() -> tuple:
    return CUDA_VERSIONS() if CUDA_VERSIONS is not None else ("unknown",)


@functools.cache
def _cuda_cache_class():
    """The CUDA cache class over numba-cuda's internals; None where they moved."""
    try:
        from numba.cuda.core.caching import Cache, IndexDataCacheFile
        from numba.cuda.dispatcher import CUDACache
    except ImportError:
        return None
    if not _internals_known(CUDACache, Cache) or not hasattr(CUDACache, "set_launch_config_key"):
        return None
    return _keyed(CUDACache, IndexDataCacheFile, "CUDAVariantCache", _cuda_built_by)


def cached_cuda(dispatcher, dependencies: tuple):
    """Give a CUDA kernel ``dispatcher`` (``cuda.jit(fn)``, not compiled yet) a disk cache keyed by
    :func:`describe` and the sources of ``dependencies`` (besides its own file): see the section
    comment. Returns it unchanged where numba-cuda's internals are not the ones known, or where numba
    finds no writable cache location (the reason goes to :data:`NOT_CACHED`)."""
    cls = _cuda_cache_class()
    if cls is None:
        return dispatcher
    try:
        _attach(dispatcher, cls, dependencies)
    except RuntimeError as e:
        if not NOT_CACHED:
            NOT_CACHED.append(str(e))
    return dispatcher
