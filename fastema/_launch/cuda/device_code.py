"""fastema's CUDA device code: shipped compiled, loaded by the launch driver, compiled at run time
only where nothing shipped runs.

The store (``kernels._store``) holds the code: two compiled sets are shipped under
``kernels/device/`` (``cu13``: built by NVVM and nvJitLink 13.5, cubins for sm_80, sm_90, sm_100,
sm_120 and PTX for compute_80 at ISA 9.0; ``cu12``: built by NVVM 12.0 and ptxas 12.0, cubins for
sm_70 to sm_90, sm_100 and sm_120 by ptxas 12.8, and PTX for compute_70 at ISA 8.0:
``fastema._launch.shipped.store``), then the node store holds what was compiled here. :func:`kernel`
finds a variant's code for a device in that order:

- the shipped set and image ``kernels._store.store.choose`` picks for the driver's CUDA version
  (``Driver.version()``) and the device's compute capability: a CUDA 12 driver reads only the
  CUDA 12 set; a CUDA 13 driver prefers the CUDA 13 set and takes the CUDA 12 cubins where the 13
  set has none for the device (sm_70, sm_75); a cubin of the device's major architecture with the
  highest minor at most its own, else the PTX, which the driver compiles (and keeps in its own
  cache). Loaded by the launch driver (:meth:`.driver.Driver.load`), no NVVM and no numba
  dispatcher;
- else the run-time compiler (:mod:`.compiler`) compiles it for the device, once per node, into the
  node store (``$NUMBA_CACHE_DIR/fastema-device``, else ``<temp>/fastema-<uid>/fastema-device``;
  used only where nobody else can write it, ``config.cache_folder_problem``;
  ``FASTEMA_CUDA_CACHE=0`` compiles in memory), with one warning that says why (once per process
  and reason): a variant not shipped (an array function's unusual storage kinds), shipped code
  that is stale (an edited checkout) or damaged, no image for this device and driver, or code the
  driver refuses.

A driver's refusal (:class:`.driver.Refused`: no image for this GPU, a PTX version or an image this
driver cannot read) is the only error that falls back; anything else a driver raises propagates
(a ``TypeError`` in the call above all). Where the driver refuses what was compiled here too,
numba's dispatcher launches the variant.
"""
from __future__ import annotations

import contextlib
import functools
import lzma
import os
import warnings
from collections.abc import Iterator

from ...kernels import _bounds
from ...kernels._store import entry as E
from ...kernels._store import files
from ...kernels._store import store as S
from ...kernels._store.identity import VARIANTS, variant_key
from .. import config
from . import argtypes, compiler, kernel_refs
from .driver import Loaded, Refused

_WARNED: set = set()
COMPILES: list = []
"""Keys compiled in this process (tests and ``python -m fastema warm`` read it)."""


def _warn(reason: str, message: str) -> None:
    """One RuntimeWarning per process and ``reason``."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fastema: {message}", RuntimeWarning, stacklevel=4)


_FOLDERS: list = []     # afresh(folder)'s, innermost last


def device_dir() -> str:
    """The folder of the shipped store: ``device/`` in the kernels package (in an
    :func:`afresh` block given a folder, that folder)."""
    return _FOLDERS[-1] if _FOLDERS else S.folder()


@contextlib.contextmanager
def afresh(folder: str | None = None) -> Iterator[None]:
    """For the ``with`` block, this process's records started again (the warnings said once per
    reason, the shipped sets read: :func:`sets`) and, given ``folder``, the shipped store read
    from there (a copy a test damages); both put back after, however it ends."""
    global _WARNED
    saved, _WARNED = _WARNED, set()
    _FOLDERS.append(folder or device_dir())
    sets.cache_clear()
    try:
        yield
    finally:
        _FOLDERS.pop()
        _WARNED = saved
        sets.cache_clear()


def problem(name: str) -> str | None:
    """Why shipped set ``name`` cannot be used (missing, unreadable, stale, an index JSON cannot
    read: one nested too deeply raises RecursionError), or None."""
    try:
        S.Shipped(device_dir(), name).index
    except FileNotFoundError as err:
        return f"no shipped {name} device code ({err.filename} is missing)"
    except (OSError, ValueError) as err:
        return f"the shipped {name} device code cannot be used ({err})"
    except RecursionError:
        return f"the shipped {name} device code cannot be used (its index.json is nested too deeply to read)"
    return None


@functools.cache
def sets() -> dict:
    """``{name: kernels._store.store.Shipped}`` of the shipped sets that can be used (one warning
    for those that cannot)."""
    out = {}
    for name in S.SETS:
        why = problem(name)
        if why is None:
            out[name] = S.Shipped(device_dir(), name)
        else:
            _warn(f"set-{name}", f"{why}, so CUDA kernels it would have given are compiled at their "
                                 f"first use (once per node, cached)")
    return out


def choose(version: int, cc: tuple) -> list:
    """``[(set, image)]`` a device of compute capability ``cc`` under a driver of CUDA ``version``
    loads (``kernels._store.store.choose``)."""
    return S.choose({n: s.index for n, s in sets().items()}, version, tuple(cc))


def entry(name: str, key: str, image: str, dispatcher=None) -> E.Entry | None:
    """Variant ``key``'s entry for ``image`` in shipped set ``name``, checked whole and, given its
    ``dispatcher``, against the launch bounds ``kernels._bounds`` gives it now; None where it is
    not shipped or stale (one warning where it is damaged)."""
    found = sets().get(name)
    if found is None:
        return None
    try:
        got = found.get(key, image)
    except (OSError, ValueError, lzma.LZMAError) as err:
        _warn("damaged", f"the shipped {name} {image} code of {key} cannot be read ({err}): compiled instead")
        return None
    if got is not None and dispatcher is not None and got.bounds != _bounds_now(name, image, dispatcher):
        _warn("bounds", f"the shipped {name} {image} code of {key} was built with other launch bounds "
                        f"than kernels/_bounds.py gives it now (an edited checkout: rebuild it, "
                        f"CONTRIBUTING.md): compiled instead")
        return None
    return got


def _bounds_now(name: str, image: str, dispatcher):
    if isinstance(dispatcher, kernel_refs.KernelRef):       # by name: its own bounds without its dispatcher
        b = _bounds.launch_bounds(name, image, dispatcher.name, dispatcher.own_bounds)
    else:
        b = _bounds.launch_bounds(name, image, VARIANTS[dispatcher], dispatcher.targetoptions.get("launch_bounds"))
    return None if b is None else tuple(b)


def incomplete(keys) -> str | None:
    """Why the shipped sets do not hold every image of their set for exactly the variants ``keys``
    of these sources, or None."""
    for name in S.SETS:
        why = problem(name)
        if why is not None:
            return why
        index = S.Shipped(device_dir(), name).index
        missing = sorted(set(keys) - set(index["variants"]))
        extra = sorted(set(index["variants"]) - set(keys))
        partial = sorted(k for k, images in index["variants"].items() if set(images) != set(index["images"]))
        if missing or extra or partial:
            return (f"the shipped {name} set lacks {len(missing)} variants the launchers ask for, holds "
                    f"{len(extra)} they do not and {len(partial)} without every image (first: "
                    f"{(missing or extra or partial)[0]}): rebuild it (CONTRIBUTING.md)")
    return None


# ---------------------------------------------------------------- the node store

def cache_folder() -> str | None:
    """The node store's folder (see the module docstring), created; None where the cache is off or
    the folder fails the trust rule (``docs/install.md``; one warning)."""
    if not config.CUDA_CACHE:
        return None
    base = os.environ.get("NUMBA_CACHE_DIR")
    root, why = (base, None) if base else files.node_root()
    folder = os.path.join(root, "fastema-device")
    if why is not None:
        why = f"{root}: {why}"
    else:
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            why = config.cache_folder_problem(os.path.realpath(folder))
        except OSError as err:
            why = str(err)
    if why is None:
        return folder
    _warn("cache", f"CUDA kernels compiled at run time are not cached in {folder} ({why}); they are compiled in "
                   f"every process. Set NUMBA_CACHE_DIR to a folder only you can write")
    return None


def _damaged(path: str, err: BaseException) -> None:
    _warn("cache-damaged", f"a cached CUDA kernel {path} is damaged ({err}): compiled again")


def compiled(dispatcher, types, key: str, cc: tuple) -> E.Entry:
    """Variant ``key``'s entry for ``sm_<cc>`` from the node store, else compiled by the run-time
    compiler (:func:`.compiler.current`) once per node and written there; where it cannot be
    written or locked, used from memory, with one warning a process
    (``kernels._store.files.unsaved``, shared with the CPU kernels' cache)."""
    c = compiler.current()
    image = "sm_%d%d" % tuple(cc)
    identity = S.code_identity(c.identity())
    own = getattr(dispatcher, "targetoptions", {}).get("launch_bounds")
    bounds = _bounds.launch_bounds(c.set, image, VARIANTS.get(dispatcher, ""), own)

    def make() -> E.Entry:
        COMPILES.append(key)
        kind, code, name, figures = c.compile(dispatcher, tuple(map(argtypes.as_numba, types)), (image,))[image]
        return E.Entry(key, image, kind, name, code, figures, identity, bounds)

    folder = cache_folder()
    if folder is None:
        return make()
    got, unsaved = S.Node(folder).fetch(key, image, identity, bounds, make, _damaged)
    if unsaved is not None:
        files.unsaved(folder, unsaved)
    return got


# ---------------------------------------------------------------- loading

def _driver_named(driver) -> str:
    """``"the CUDA 12.4 driver (cuda.core)"``: the driver's CUDA version (``cuDriverGetVersion``)
    and which."""
    v = driver.version()
    if not v:
        return f"the driver ({driver.name})"
    return f"the CUDA {v // 1000}.{v % 1000 // 10} driver ({driver.name})"


def _built_by(name: str) -> str:
    found = sets().get(name)
    return found.index.get("toolchain", "?").replace("\0", "; ") if found is not None else "?"


def kernel(dispatcher, types, index: int, driver=None) -> Loaded | None:
    """Variant (``dispatcher``, ``types``) loaded for device ``index`` by ``driver`` (default: the
    current one, :func:`.drivers.current`): the shipped code, else compiled (see the module
    docstring); None where fastema does not know the kernel (not made by a
    ``kernels._store.identity.variant`` factory) or the driver refused what was compiled here too:
    the caller launches through the dispatcher. A driver's refusal (:class:`.driver.Refused`)
    falls back with one warning; anything else it raises propagates."""
    name = dispatcher.name if isinstance(dispatcher, kernel_refs.KernelRef) else VARIANTS.get(dispatcher)
    if name is None:
        return None
    if driver is None:
        from .drivers import current

        driver = current()
    key = variant_key(name, types)
    cc = driver.compute_capability(index)
    chosen = choose(driver.version(), cc)
    for set_name, image in chosen:
        found = entry(set_name, key, image, dispatcher)
        if found is None:
            _warn("unshipped", f"CUDA kernel {key} is not shipped: compiled at its first use (once per "
                               f"node, cached)")
            continue
        try:
            return _as(driver.load(found.kind, found.code, found.name), f"{set_name}/{image}")
        except Refused as err:
            _warn("refused", f"{_driver_named(driver)} refused fastema's shipped {set_name} {image} code, "
                             f"built by {_built_by(set_name)} ({err.result}), so CUDA kernels are compiled "
                             f"at their first use (once per node)")
    if not chosen and sets():
        _warn("no-image", f"no CUDA code is shipped for compute capability {cc[0]}.{cc[1]} under "
                          f"{_driver_named(driver)}: kernels are compiled at their first use (once per node, "
                          f"cached)")
    got = compiled(kernel_refs.dispatcher(dispatcher), types, key, cc)
    try:
        return _as(driver.load(got.kind, got.code, got.name), "compiled")
    except Refused as err:
        _warn("compiled-refused", f"{_driver_named(driver)} refused CUDA kernel {key} as compiled "
                                  f"here too ({err.result}), so it is launched through numba's "
                                  f"dispatcher. A CUDA 12 driver needs numba-cuda[cu12] (pip "
                                  f"install 'fastema[cuda12]') or a driver update to R580 or newer")
        return None


def _as(loaded: Loaded, source: str) -> Loaded:
    loaded.source = source
    return loaded
