"""fastema's CUDA device code: shipped compiled, loaded with cuda.core, compiled at run time only
where not shipped.

Every kernel variant the launchers can ask for (:mod:`.variants`) is compiled when fastema is built
(``scripts/build_device_code.py``) and shipped in the package, under ``kernels/device/``: a cubin
per architecture of the manifest (sm_80, sm_90, sm_100, sm_120) and PTX for ``compute_80`` (one xz
file per architecture holds every variant's code), each checked by its SHA-256, with a manifest
stamped by the digest of the kernel sources (:func:`sources_digest`).
:func:`kernel` finds a variant's code for a device: the cubin of the device's major architecture
with the highest minor at most its own (an sm_80 cubin runs on sm_86 and sm_89), else the PTX, which
the driver compiles for the device (and keeps in its own cache); loaded with cuda.core
(``ObjectCode``, ``get_kernel``), no NVVM and no numba dispatcher.

Loading is the launch driver's (:meth:`.driver.Driver.load`); a driver's refusal
(:class:`.driver.Refused`: no image for this GPU, a PTX version or an image this driver cannot read)
is the only error that falls back, and anything else a driver raises propagates (a ``TypeError`` in
the call above all).

Compiled at run time instead, by the run-time compiler (:mod:`.compiler`: numba-cuda's NVVM and
nvJitLink today), with one warning that says why (once per process and reason):

- a variant not shipped (an array function's unusual storage kinds; a launcher newer than the
  build);
- shipped code that does not match this installation's kernel sources (an edited checkout: the
  manifest's stamp differs), or that the driver refuses (naming the driver's CUDA version and the
  code's architecture: a CUDA 12 driver and the PTX of a newer ISA), or that is damaged;
- a device older than sm_80.

Where the driver refuses what was compiled here too, numba's dispatcher launches the variant.

Run-time compiles go into a cache, once per node: an entry per (variant, kernel sources, the
compiler's versions, compute capability), named by their SHA-256 (never a file's date), written
whole (``os.replace``) under a node-local lock (``kernels._cache_node.hold``: lock files in
``<temp>/fastema-<uid>/locks``, never on a network file system, given up after ``LOCK_WAIT``
seconds), so N processes starting at once compile each variant once while the others wait and load
it; an entry whose checksum fails is compiled again, and one that cannot be written or locked (a
full or read-only folder, a lock not had) is used from memory (one warning a process,
``kernels._cache.unsaved``). The folder: ``$NUMBA_CACHE_DIR/fastema-device``, else
``<temp dir>/fastema-<uid>/fastema-device`` (node-local), used only where the kernel cache's trust
rules allow (``kernels._cache.TRUST``: nobody else can write it or a folder above it).
``FASTEMA_CUDA_CACHE=0`` compiles in memory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings

from . import compiler, config
from .driver import Loaded, Refused

FORMAT = 1
_MAGIC = b"fastema-device-code 1\n"
_WARNED: set = set()


def device_dir() -> str:
    """The folder of the shipped device code: ``device/`` in the kernels package."""
    from .. import kernels

    return os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "device")


@functools.cache
def sources_digest() -> str:
    """SHA-256 of the sources every CUDA kernel's device code is compiled from (the kernel modules and
    what they depend on: ``kernels._cuda_jit.DEPENDENCIES``, ``kernels.cuda``, ``kernels._cuda_scan``),
    by module name and bytes: the stamp the shipped manifest carries (an edited source never loads
    stale device code)."""
    from ..kernels import _cuda_jit, _cuda_scan
    from ..kernels import cuda as kernels_cuda

    modules = {m.__name__: m for m in (*_cuda_jit.DEPENDENCIES, kernels_cuda, _cuda_scan)}
    h = hashlib.sha256()
    for name in sorted(modules):
        with open(modules[name].__file__, "rb") as f:
            data = f.read()
        h.update(f"{name.rsplit('.', 1)[-1]}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def variant_key(kernel: str, types) -> str:
    """A variant's name: its kernel's (``lerp_kernel(0,1,0,0)``) and its arguments' numba types."""
    return f"{kernel}[{', '.join(map(str, types))}]"


def _warn(reason: str, message: str) -> None:
    """One RuntimeWarning per process and ``reason``."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fastema: {message}", RuntimeWarning, stacklevel=4)


def _read_manifest() -> tuple[dict | None, str | None]:
    path = os.path.join(device_dir(), "manifest.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"no shipped device code ({path} is missing)"
    except (OSError, ValueError) as err:
        return None, f"the shipped device code's manifest {path} cannot be read ({err})"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("variants"), dict):
        return None, f"the shipped device code's manifest {path} is not format {FORMAT}"
    bad = _bad_architectures(data)
    if bad:
        return None, (f"the shipped device code's manifest {path} cannot be read (architecture "
                      f"names {', '.join(map(repr, bad))} are not sm_XY cubins or compute_XY PTX)")
    if data.get("sources") != sources_digest():
        return None, ("the shipped device code was built from other kernel sources than these (an edited "
                      "checkout: run scripts/build_device_code.py)")
    return data, None


def _bad_architectures(data: dict) -> list:
    """The architecture names of manifest ``data`` that :func:`choose` cannot read: cubins not
    ``sm_XY`` (a list of them), a PTX not ``compute_XY``."""
    cubins, ptx = data.get("cubins", []), data.get("ptx", "compute_99")
    if not isinstance(cubins, list):
        return [cubins]
    bad = [name for name in cubins
           if not (isinstance(name, str) and re.fullmatch(r"sm_[0-9]{2,}", name))]
    return bad if isinstance(ptx, str) and re.fullmatch(r"compute_[0-9]{2,}", ptx) else [*bad, ptx]


@functools.cache
def manifest() -> dict | None:
    """The shipped manifest where it matches these kernel sources, else None (with one warning)."""
    data, problem = _read_manifest()
    if problem:
        _warn("manifest", f"{problem}, so CUDA kernels are compiled at their first use (once per node, cached)")
    return data


def stale(keys) -> str | None:
    """Why the shipped device code does not hold exactly the variants ``keys`` for these sources, or None."""
    data, problem = _read_manifest()
    if problem:
        return problem
    missing = sorted(set(keys) - set(data["variants"]))
    extra = sorted(set(data["variants"]) - set(keys))
    if missing or extra:
        return (f"the shipped device code lacks {len(missing)} variants the launchers ask for and holds {len(extra)} "
                f"they do not (first: {(missing or extra)[0]}): run scripts/build_device_code.py")
    return None


def choose(cc: tuple, data: dict | None = None) -> str | None:
    """Which shipped code a device of compute capability ``cc`` loads: ``"sm_XY"`` (a cubin of its major
    architecture, minor at most its own), ``"ptx"``, or None (nothing shipped runs there)."""
    data = manifest() if data is None else data
    if data is None:
        return None
    best = None
    for arch in data.get("cubins", ()):
        major, minor = int(arch[3:-1]), int(arch[-1])
        if major == cc[0] and minor <= cc[1] and (best is None or minor > best[1]):
            best = (arch, minor)
    if best is not None:
        return best[0]
    ptx = data.get("ptx", "compute_99")
    return "ptx" if tuple(cc) >= (int(ptx[8:-1]), int(ptx[-1])) else None


@functools.cache
def _blob(arch: str) -> bytes:
    """The shipped code of ``arch`` (``"ptx"`` or ``"sm_XY"``): every variant's, one after another
    (``kernels/device/<arch>.xz``), decompressed once per process."""
    import lzma

    with open(os.path.join(device_dir(), f"{arch}.xz"), "rb") as f:
        return lzma.decompress(f.read())


def member(arch: str, entry: dict) -> bytes:
    """Variant ``entry``'s (a manifest record) code for ``arch``, checked against its SHA-256
    (ValueError where it fails)."""
    at, size = entry["at"][arch]
    code = _blob(arch)[at:at + size]
    if len(code) != size or hashlib.sha256(code).hexdigest() != entry["sha256"][arch]:
        raise ValueError(f"its {arch} code fails its checksum")
    return code


def shipped(key: str, cc: tuple) -> tuple | None:
    """``(kind, bytes, entry, arch)`` of variant ``key``'s shipped code for compute capability ``cc``
    (kind ``"cubin"`` or ``"ptx"``), checked against the manifest's SHA-256; None where none is
    shipped for it (with one warning where the file is missing or damaged)."""
    data = manifest()
    entry = None if data is None else data["variants"].get(key)
    arch = choose(cc, data)
    if entry is None or arch is None:
        return None
    import lzma

    try:
        code = member(arch, entry)
    except (OSError, KeyError, ValueError, TypeError) as err:
        _warn("damaged", f"the shipped device code of {key} for {arch} cannot be read ({err}): compiled instead")
        return None
    except lzma.LZMAError as err:                         # a damaged xz stream
        _warn("damaged", f"the shipped device code for {arch} cannot be read ({err}): compiled instead")
        return None
    return "ptx" if arch == "ptx" else "cubin", code, entry["entry"], arch


# ---------------------------------------------------------------- the run-time compile

def _compile(dispatcher, types, cc: tuple) -> tuple:
    """``(kind, code, entry)`` for compute capability ``cc``, by the run-time compiler in use
    (:func:`.compiler.current`)."""
    return compiler.current().compile(dispatcher, types, cc)


def cache_folder() -> str | None:
    """The folder of run-time compiled device code (see the module docstring), created; None where the
    cache is off or the folder fails the kernel cache's trust rules (``docs/install.md``; one warning)."""
    from ..kernels import _cache, _cache_node

    if not config.CUDA_CACHE:
        return None
    base = os.environ.get("NUMBA_CACHE_DIR")
    root, why = (base, None) if base else _cache_node.node_root()
    folder = os.path.join(root, "fastema-device")
    if why is not None:
        why = f"{root}: {why}"
    else:
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            why = None if _cache.TRUST is None else _cache.TRUST(folder)
        except OSError as err:
            why = str(err)
    if why is None:
        return folder
    _warn("cache", f"CUDA kernels compiled at run time are not cached in {folder} ({why}); they are compiled in "
                   f"every process. Set NUMBA_CACHE_DIR to a folder only you can write")
    return None


def _entry_name(key: str, cc: tuple) -> str:
    text = "\0".join((key, sources_digest(), compiler.current().identity(), f"sm_{cc[0]}{cc[1]}"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _read_entry(path: str) -> tuple | None:
    """``(kind, code, entry)`` of a cache entry, or None where it is missing or damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(_MAGIC):
            raise ValueError("not a fastema device-code entry")
        header, code = data[len(_MAGIC):].split(b"\n", 1)
        meta = json.loads(header)
        if hashlib.sha256(code).hexdigest() != meta["sha256"] or meta["kind"] not in ("cubin", "ptx"):
            raise ValueError("its checksum fails")
        return meta["kind"], code, meta["entry"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        _warn("cache-damaged", f"a cached CUDA kernel {path} is damaged ({err}): compiled again")
        return None


COMPILES: list = []
"""Keys compiled in this process (tests and ``python -m fastema warm`` read it)."""


def compiled(dispatcher, types, key: str, cc: tuple) -> tuple:
    """``(kind, code, entry)`` of variant ``key`` for ``cc``: read from the cache, or compiled once per
    node (under the entry's lock) and written there; where the lock cannot be had or the entry
    cannot be written (a full or read-only folder), compiled and used from memory, with one warning
    a process (``kernels._cache.unsaved``, shared with the CPU kernels' cache)."""
    from ..kernels._cache import unsaved
    from ..kernels._cache_node import hold
    from ..kernels._filelock import write_whole

    folder = cache_folder()
    if folder is None:
        COMPILES.append(key)
        return _compile(dispatcher, types, cc)
    path = os.path.join(folder, _entry_name(key, cc) + ".code")
    with hold(path) as refused:               # node-local lock file, given up after LOCK_WAIT s
        found = _read_entry(path)
        if found is not None:
            return found
        COMPILES.append(key)
        kind, code, entry = _compile(dispatcher, types, cc)
        if refused is not None:                           # the lock was not had: used from memory
            unsaved(folder, refused)
            return kind, code, entry
        meta = json.dumps({"kind": kind, "entry": entry, "sha256": hashlib.sha256(code).hexdigest(), "key": key})
        try:
            write_whole(path, _MAGIC + meta.encode() + b"\n" + code)
        except OSError as err:                            # a full, size-limited or read-only folder
            unsaved(folder, str(err))
        return kind, code, entry


def _driver_named(driver) -> str:
    """``"the CUDA 12.4 driver (cuda.core)"``: the driver's CUDA version (``cuDriverGetVersion``)
    and which."""
    v = driver.version()
    if not v:
        return f"the driver ({driver.name})"
    return f"the CUDA {v // 1000}.{v % 1000 // 10} driver ({driver.name})"


def kernel(dispatcher, types, index: int, driver=None) -> Loaded | None:
    """Variant (``dispatcher``, ``types``) loaded for device ``index`` by ``driver`` (default: the
    current one, :func:`.drivers.current`): the shipped code, else compiled (see the module
    docstring); None where fastema does not know the kernel (not made by a
    ``kernels._cuda_jit.variant`` factory) or the driver refused what was compiled here too: the
    caller launches through the dispatcher. A driver's refusal (:class:`.driver.Refused`) falls back
    with one warning; anything else it raises propagates."""
    from ..kernels._cuda_jit import VARIANTS

    name = VARIANTS.get(dispatcher)
    if name is None:
        return None
    if driver is None:
        from .drivers import current

        driver = current()
    key = variant_key(name, types)
    cc = driver.compute_capability(index)
    found = shipped(key, cc)
    if found is not None:
        kind, code, entry, arch = found
        try:
            return _as(driver.load(kind, code, entry), arch)
        except Refused as err:
            built = (manifest() or {}).get("built_by", {}).get("nvidia-nvjitlink", "?")
            _warn("refused", f"{_driver_named(driver)} refused fastema's shipped {arch} code, "
                             f"built by CUDA {built} ({err.result}), so CUDA kernels are compiled "
                             f"at their first use (once per node)")
    elif manifest() is not None:
        why = "not shipped" if choose(cc) else f"no code is shipped for compute capability {cc[0]}.{cc[1]}"
        _warn("unshipped", f"CUDA kernel {key} is {why}: compiled at its first use (once per node, cached)")
    kind, code, entry = compiled(dispatcher, types, key, cc)
    try:
        return _as(driver.load(kind, code, entry), "compiled")
    except Refused as err:
        _warn("compiled-refused", f"{_driver_named(driver)} refused CUDA kernel {key} as compiled "
                                  f"here too ({err.result}), so it is launched through numba's "
                                  f"dispatcher. A CUDA 12 driver needs numba-cuda[cu12] (pip "
                                  f"install 'fastema[cuda12]') or a driver update to R580 or newer")
        return None


def _as(loaded: Loaded, source: str) -> Loaded:
    loaded.source = source
    return loaded
