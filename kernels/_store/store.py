"""Where compiled entries (``._store.entry``) are kept, and the order they are looked up in.

- **The shipped store** (:class:`Shipped`), read-only: one folder per compiled set under the
  package's ``device/`` (``cu12``, ``cu13``), each an ``index.json`` (the set's sources, toolchain,
  the driver it needs, its images, where each variant's entry lies and its launch bounds) and one
  xz file per image
  holding that image's entries one after another (similar kernels compress together: 5x smaller
  than a file each), decompressed once per process and image. :func:`write_set` writes one (the
  build: ``python -m fastema warm --into``).
- **The node store** (:class:`Node`): one file per entry in a folder of the user's own
  (``._store.files``' trust rule), named by the digest of its key, image, identity and launch
  bounds, written whole, once per node under the entry's lock (``._store.files.hold``): N processes
  missing the same entry compile it once, the others wait and read it.
- **The order**: the shipped set and image :func:`choose` picks for the driver and the device, then
  the node store (the caller compiles into it on a miss).

An entry is current where its sources are these (``identity.cuda_sources``) and its launch bounds
are the ones ``kernels._bounds`` gives its set, image and kernel: an edit of the bounds table
makes only the entries it changes stale. Nothing here imports ``fastema``.
"""
from __future__ import annotations

import functools
import json
import lzma
import os
import re

from . import entry as E
from .files import hold, write_whole
from .identity import cuda_sources, digest

FORMAT = 2
SETS = ("cu13", "cu12")
"""The shipped sets, the preferred first: a CUDA 13 driver takes the CUDA 13 set's images and the
CUDA 12 set's where the 13 set has none for the device."""


def code_identity(toolchain: str, sources: str | None = None) -> str:
    """An entry's identity: the digest of the kernel sources (these, by default) and of the
    ``toolchain`` that compiled it (its versions)."""
    return digest(cuda_sources() if sources is None else sources, toolchain)


def folder() -> str:
    """The shipped store's folder: the kernels package's ``device/``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "device")


class Shipped:
    """One compiled set of the shipped store (see the module docstring)."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.at = os.path.join(root, name)

    @functools.cached_property
    def index(self) -> dict:
        """The set's index; OSError where it cannot be read, ValueError where it is not one of
        this format or not built from these kernel sources (stale)."""
        path = os.path.join(self.at, "index.json")
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("set") != self.name:
            raise ValueError(f"{path} is not a format {FORMAT} index of set {self.name}")
        images = data.get("images")
        bad = [i for i in images or ()
               if not (isinstance(i, str) and re.fullmatch(r"(sm|compute)_[0-9]{2,}", i)
                       and isinstance(images[i], dict))] if isinstance(images, dict) else [images]
        if bad or not isinstance(data.get("variants"), dict):
            raise ValueError(f"{path} cannot be read (image names {', '.join(map(repr, bad))} are not sm_XY "
                             f"cubins or compute_XY PTX, or no variants)")
        wrong = _wrong_types(data)
        if wrong:
            raise ValueError(f"{path} cannot be read ({wrong})")
        if data.get("sources") != cuda_sources():
            raise ValueError(f"the shipped {self.name} set was built from other kernel sources than "
                             f"these (an edited checkout: rebuild it, CONTRIBUTING.md)")
        return data

    @functools.cache
    def _blob(self, image: str) -> bytes:
        with open(os.path.join(self.at, f"{image}.xz"), "rb") as f:
            return lzma.decompress(f.read())

    def get(self, key: str, image: str) -> E.Entry | None:
        """Variant ``key``'s entry for ``image``, checked (``entry.loads``); None where the set
        does not hold it. ValueError (or ``lzma.LZMAError``, OSError) where it is damaged."""
        at = self.index["variants"].get(key, {}).get(image)
        if at is None:
            return None
        start, size = at[:2]
        return E.loads(self._blob(image)[start:start + size], key, image, self.index["identity"])


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _wrong_types(data: dict) -> str | None:
    """The first field of an index whose type ``get`` / ``choose`` cannot read, named, or None."""
    if not isinstance(data.get("identity"), str):
        return f"identity is {type(data.get('identity')).__name__}, not a string"
    drivers = [("driver", data)] + [(f"images.{i}.driver", v) for i, v in data["images"].items()]
    for name, holder in drivers:
        if "driver" in holder and not _count(holder["driver"]):
            return f"{name} is {holder['driver']!r}, not an int"
    for key, at in data["variants"].items():
        if not isinstance(at, dict):
            return f"variant {key!r} is a {type(at).__name__}, not a dict"
        for image, where in at.items():
            if not (isinstance(where, list) and len(where) >= 2 and all(map(_count, where[:2]))):
                return f"variant {key!r} image {image!r} is {where!r}, not [offset, size, ...]"
    return None


def write_set(root: str, name: str, entries: list, meta: dict) -> dict:
    """Write compiled set ``name`` under ``root`` from ``entries`` (every variant's for every
    image), each image's entries sorted by key, with the index ``meta`` (its toolchain, the driver
    each image needs, ...) completed; returns the index."""
    at = os.path.join(root, name)
    os.makedirs(at, exist_ok=True)
    by_image: dict = {}
    for e in sorted(entries, key=lambda e: (e.image, e.key)):
        by_image.setdefault(e.image, []).append(e)
    variants: dict = {}
    for image, group in by_image.items():
        blob = bytearray()
        for e in group:
            data = E.dumps(e)
            bounds = None if e.bounds is None else list(e.bounds)
            variants.setdefault(e.key, {})[image] = [len(blob), len(data), bounds]
            blob += data
        write_whole(os.path.join(at, f"{image}.xz"), lzma.compress(bytes(blob), preset=9 | lzma.PRESET_EXTREME))
    for stale in os.listdir(at):
        if stale.endswith(".xz") and stale[:-3] not in by_image:
            os.unlink(os.path.join(at, stale))
    index = {**meta, "format": FORMAT, "set": name, "sources": cuda_sources(),
             "variants": dict(sorted(variants.items()))}
    write_whole(os.path.join(at, "index.json"), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    return index


def _best(images: dict, version: int, cc: tuple) -> str | None:
    """The image of ``images`` (``name -> {"driver": ...}``) a device of ``cc`` under driver
    ``version`` takes: the cubin of its major architecture with the highest minor at most its own,
    else the PTX (a target at most its compute capability), else None."""
    usable = {i: v for i, v in images.items() if v.get("driver", 0) <= version}
    cubins = [i for i in usable if i.startswith("sm_")]
    mine = [(int(i[-1]), i) for i in cubins if int(i[3:-1]) == cc[0] and int(i[-1]) <= cc[1]]
    if mine:
        return max(mine)[1]
    ptx = [i for i in usable if i.startswith("compute_") and (int(i[8:-1]), int(i[-1])) <= tuple(cc)]
    return ptx[0] if ptx else None


def choose(sets: dict, version: int, cc: tuple) -> list:
    """``[(set, image)]`` in the order a device of compute capability ``cc`` under a driver of CUDA
    ``version`` (``cuDriverGetVersion``) tries them, from ``sets`` (``name -> index``): the sets
    the driver reads (its version at least the set's ``driver``) in :data:`SETS`' order, a cubin
    of the device's architecture from the first that has one, else the first set's PTX."""
    readable = [(n, sets[n]) for n in SETS if n in sets and sets[n].get("driver", 0) <= version]
    for name, index in readable:
        image = _best({i: v for i, v in index["images"].items() if i.startswith("sm_")}, version, cc)
        if image is not None:
            return [(name, image)]
    for name, index in readable:
        image = _best(index["images"], version, cc)
        if image is not None:
            return [(name, image)]
    return []


class Node:
    """The node store in ``root`` (see the module docstring)."""

    def __init__(self, root: str):
        self.root = root

    def path(self, key: str, image: str, identity: str, bounds) -> str:
        return os.path.join(self.root, digest(key, image, identity, bounds, size=40) + ".entry")

    def read(self, path: str, key: str, image: str, identity: str) -> E.Entry | None:
        """The entry at ``path``; None where there is none; ValueError where it is damaged or
        another's."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return E.loads(data, key, image, identity)

    def fetch(self, key: str, image: str, identity: str, bounds, make, damaged) -> tuple:
        """``(entry, why it was not saved or None)``: read, else made once per node (``make()``,
        under the entry's lock: another process's compile is waited for and read) and written
        whole. ``damaged(path, error)`` is told of an entry that cannot be used (compiled again)."""
        path = self.path(key, image, identity, bounds)
        with hold(path) as refused:
            try:
                found = self.read(path, key, image, identity)
            except (OSError, ValueError) as err:
                damaged(path, err)
                found = None
            if found is not None:
                return found, None
            made = make()
            if refused is not None:                       # the lock was not had: kept in memory
                return made, refused
            try:
                write_whole(path, E.dumps(made))
            except OSError as err:                        # a full, size-limited or read-only folder
                return made, str(err)
            return made, None
