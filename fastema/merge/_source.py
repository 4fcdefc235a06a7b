"""What every input of a merge is (:class:`Source`, its :class:`Entry` list) and how one fails
(:class:`MergeError`): the pieces the input readers share."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from typing import Any, NamedTuple

import numpy as np

from ._dtypes import ITEMSIZE

__all__ = ["Entry", "MergeError", "Source", "advise", "os_problem", "regular", "step_from_name"]

POPULATE_READ, DONTNEED = 22, 4          # Linux madvise: map a range's pages now (5.14+) / drop them from this process
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: list = []

_STEP_NAME = re.compile(r"(?:checkpoint|step|iter|iteration|global_step|ckpt)[-_]?0*(\d+)$", re.I)


class MergeError(ValueError):
    """A merge refused before (or instead of) writing anything: the message names the input and
    the tensor, and the fix. Nothing was written and no input was changed."""


class Entry(NamedTuple):
    """One named entry of an input."""
    name: str
    dtype: str               # torch's name ("float32", "bfloat16", "int64", ...), or "object"
    shape: tuple
    nbytes: int
    storage: Any = None      # tensors of one input with equal non-None storage are tied (share memory)


def regular(path: str, what: str) -> os.stat_result:
    """``os.stat(path)`` of a regular file (links followed), else MergeError naming ``what``."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise MergeError(os_problem(path, what, err)) from None
    if not stat.S_ISREG(st.st_mode):
        raise MergeError(f"{what}: {path!r} is not a regular file (a FIFO, device or socket could block or never "
                         f"end); give the checkpoint file itself")
    return st


def os_problem(path: str, what: str, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return f"{what}: {path!r} is a loop of symbolic links; point it at the checkpoint itself"
    if err.errno == errno.ENOENT:
        return f"{what}: {path!r} does not exist"
    return f"{what}: {path!r} cannot be read ({err.strerror or err})"


def advise(address: int, nbytes: int, advice: int) -> None:
    """``madvise`` the pages of ``[address, address + nbytes)`` of a read-only file mapping (no-op where
    the system does not take it): ``POPULATE_READ`` maps them in one call before a kernel reads them (a
    page fault each, else), ``DONTNEED`` drops them from this process once read (they stay in the page
    cache; the resident size stays small)."""
    if not _libc:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _libc.append(libc)
        except (OSError, AttributeError):
            _libc.append(None)
    libc = _libc[0]
    if libc is None or nbytes <= 0:
        return
    lo = address // _PAGE * _PAGE
    hi = -(-(address + nbytes) // _PAGE) * _PAGE
    if advice == DONTNEED:                    # only whole pages inside the range: never a neighbour's
        lo, hi = -(-address // _PAGE) * _PAGE, (address + nbytes) // _PAGE * _PAGE
    if hi > lo and libc.madvise(lo, hi - lo, advice) != 0 and advice == POPULATE_READ:
        if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
            _libc[0] = None if advice == POPULATE_READ else libc     # an older kernel: plain page faults


def step_from_name(path: str) -> int | None:
    """The step a checkpoint's name says (``checkpoint-500``, ``step_1000``, ``iter_0002000``,
    ``model-step300.safetensors``; for a file in a folder so named, the folder's), or None."""
    path = os.path.abspath(path)
    for part in (os.path.basename(path), os.path.basename(os.path.dirname(path))):
        stem = re.sub(r"\.(safetensors|pt|pth|bin|ckpt)$", "", part)
        m = _STEP_NAME.search(stem)
        if m:
            return int(m.group(1))
    return None


class Source:
    """One input of a merge. ``entries`` (name -> :class:`Entry`, in the file's order), ``step``
    (None when it records none), ``profile`` (``(time, gamma)`` of a post-hoc snapshot's row),
    ``folder`` (the HF folder whose small files a merged folder copies), ``layout`` (tensor ->
    shard file name, for an HF folder)."""

    format = "?"
    mappable = True          # piece() reads any part of a tensor without reading all of it

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self.display = path              # how reports name it
        self.entries: dict = {}
        self.step: int | None = None
        self.profile: tuple | None = None
        self.folder: str | None = None
        self.layout: dict | None = None
        self.dropped: list = []          # names of entries left out when reading (optimizer state)
        self.copied: set = set()         # names copied, never averaged, whatever their dtype (optimizer state kept)

    def piece(self, name: str, lo: int, count: int, scratch: np.ndarray) -> int:
        """The address of elements ``[lo, lo + count)`` of tensor ``name`` (C order), valid until the
        next call; ``scratch`` (``count`` elements' bytes at least) holds them where they are not
        mapped."""
        raise NotImplementedError

    def raw(self, name: str, lo: int, nbytes: int, scratch: np.ndarray) -> memoryview:
        """Bytes ``[lo, lo + nbytes)`` of entry ``name`` as stored (a copied tensor), valid until the
        next call; ``scratch`` (``nbytes`` at least) holds them where they are not mapped."""
        raise NotImplementedError

    def value(self, name: str) -> Any:
        """A non-tensor entry's value (objects of torch files)."""
        raise MergeError(f"{self.label}: {name!r} is not an object entry")

    def done(self, name: str) -> None:
        """Tensor ``name`` is read: its pages may leave this process (they stay in the page cache)."""

    def close(self) -> None:
        """Release files and mappings."""


class WholeTensorSource(Source):
    """An input whose tensors are read whole, each a torch tensor in memory from its first piece until
    :meth:`done` (DCP folders, post-hoc snapshots): a subclass gives ``_tensor(name)``, which loads it
    into ``self._loaded`` once; the pieces are read from its memory."""

    mappable = False

    def __init__(self, path: str, label: str):
        super().__init__(path, label)
        self._loaded: dict = {}

    def _tensor(self, name: str):
        raise NotImplementedError

    def piece(self, name: str, lo: int, count: int, scratch: np.ndarray) -> int:
        return self._tensor(name).data_ptr() + lo * ITEMSIZE[self.entries[name].dtype]

    def raw(self, name: str, lo: int, nbytes: int, scratch: np.ndarray) -> memoryview:
        if nbytes == 0:
            return memoryview(b"")
        address = self._tensor(name).data_ptr() + lo      # kept alive in _loaded until done(name)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address)).data

    def done(self, name: str) -> None:
        self._loaded.pop(name, None)

    def close(self) -> None:
        self._loaded = {}
