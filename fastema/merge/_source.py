"""What every input of a merge is (:class:`Source`, its :class:`Entry` list) and how one fails
(:class:`MergeError`, which :func:`refused` makes of :mod:`fastema._io`'s refusals): the pieces the
input readers share, memory maps that hold no descriptor (:class:`FileMap`), mapping a piece's pages
before it is read (:func:`populate`) and copying it out of a map with no risk of SIGBUS
(:func:`copy_mapped`) among them."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
from typing import Any, Iterator, NamedTuple

import numpy as np

from .._io.safe_files import FileRefused
from .._io.safetensors import ITEMSIZE

__all__ = ["OBJECT", "Entry", "FileMap", "MergeError", "Source", "advise", "copy_mapped", "populate", "read_problem",
           "refused", "step_from_name"]

POPULATE_READ, DONTNEED, _SEQUENTIAL = 22, 4, 2   # Linux madvise: map a range's pages now (5.14+) / drop them
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: list = []
POPULATE_READ_WORKS = [True]    # False once the system refused MADV_POPULATE_READ (Linux < 5.14, not Linux)
COPY_MAPPED_WORKS = [True]      # False once the system refused process_vm_readv (not Linux, a seccomp filter)
_UNREADABLE = (errno.EFAULT, errno.EIO, getattr(errno, "EHWPOISON", 133))   # populate: a page past the end, bad



@contextlib.contextmanager
def populating_refused() -> Iterator[None]:
    """For the ``with`` block, mapped pages are read as where the system refuses
    ``MADV_POPULATE_READ`` (Linux older than 5.14: :data:`POPULATE_READ_WORKS`). Put back after."""
    saved = POPULATE_READ_WORKS[0]
    POPULATE_READ_WORKS[0] = False
    try:
        yield
    finally:
        POPULATE_READ_WORKS[0] = saved


@contextlib.contextmanager
def copying_refused() -> Iterator[None]:
    """For the ``with`` block, pieces are read as where the system refuses ``process_vm_readv`` (not
    Linux, a seccomp filter: :data:`COPY_MAPPED_WORKS`): in the map. Put back after."""
    saved = COPY_MAPPED_WORKS[0]
    COPY_MAPPED_WORKS[0] = False
    try:
        yield
    finally:
        COPY_MAPPED_WORKS[0] = saved


OBJECT = "object"                     # an entry that is not a tensor (a step counter, a string, bytes)
_STEP_NAME = re.compile(r"(?:checkpoint|step|iter|iteration|global_step|ckpt)[-_]?0*(\d+)$", re.I)


class MergeError(ValueError):
    """A merge refused before (or instead of) writing anything: the message names the input and
    the tensor, and the fix. Nothing was written and no input was changed."""


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """:mod:`fastema._io`'s refusal of a file in the block (:class:`~fastema._io.safe_files.FileRefused`:
    not a regular file, not readable, a damaged safetensors header) raised as a MergeError, its
    message kept."""
    try:
        yield
    except FileRefused as err:
        raise MergeError(str(err)) from None


class Entry(NamedTuple):
    """One named entry of an input."""
    name: str
    dtype: str               # torch's name ("float32", "bfloat16", "int64", ...), or "object"
    shape: tuple
    nbytes: int
    storage: Any = None      # tensors of one input with equal non-None storage are tied (share memory)


def read_problem(where: str, name: str, err: OSError) -> MergeError:
    """The MergeError of a memory-mapped read of tensor ``name`` of ``where`` that :func:`populate`
    refused (``err``)."""
    if err.errno == errno.EFAULT:
        return MergeError(f"{where} was truncated during the merge: tensor {name!r} lies past its end now; let "
                          f"nothing rewrite a checkpoint while it is merged")
    return MergeError(f"{where}: tensor {name!r} cannot be read ({err.strerror or err}): the disk failed, or the file "
                      f"was truncated during the merge")


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _c():
    """libc with ``madvise``, ``mmap`` and ``munmap`` typed (and ``process_vm_readv`` where it has
    one), or None where there is none."""
    if not _libc:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int64)
            libc.mmap.restype = ctypes.c_void_p
            libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
            _libc.append(libc)
        except (OSError, AttributeError):
            _libc.append(None)
        else:
            try:
                vec = ctypes.POINTER(_IoVec)
                libc.process_vm_readv.argtypes = (ctypes.c_int, vec, ctypes.c_ulong, vec, ctypes.c_ulong,
                                                  ctypes.c_ulong)
                libc.process_vm_readv.restype = ctypes.c_ssize_t
            except AttributeError:          # not Linux
                COPY_MAPPED_WORKS[0] = False
    return _libc[0]


def advise(address: int, nbytes: int, advice: int) -> None:
    """``madvise`` the whole pages inside ``[address, address + nbytes)`` of a read-only file mapping
    (no-op where the system does not take it); ``DONTNEED`` drops them from this process once read
    (they stay in the page cache; the resident size stays small). Never a neighbour's page."""
    libc = _c()
    lo, hi = -(-address // _PAGE) * _PAGE, (address + nbytes) // _PAGE * _PAGE
    if libc is not None and hi > lo:
        libc.madvise(lo, hi - lo, advice)


def populate(address: int, nbytes: int) -> bool:
    """Map the pages of ``[address, address + nbytes)`` of a read-only file mapping in one call
    (``MADV_POPULATE_READ``) before a kernel reads them (a page fault each, else). True when done;
    False where the system cannot (Linux < 5.14): then a page past the file's end, should the file
    shrink, kills the process with SIGBUS when touched, so read it otherwise (``pread``). OSError
    (EFAULT, EIO, EHWPOISON) when a page lies past the file's end (it shrank: touching it would be
    SIGBUS) or cannot be read: :func:`read_problem` words it."""
    libc = _c()
    if libc is None or not POPULATE_READ_WORKS[0]:
        return False
    if nbytes <= 0:
        return True
    lo = address // _PAGE * _PAGE
    hi = -(-(address + nbytes) // _PAGE) * _PAGE
    for _ in range(3):                           # EINTR, EAGAIN: again
        if libc.madvise(lo, hi - lo, POPULATE_READ) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            POPULATE_READ_WORKS[0] = False       # an older kernel: read otherwise from now on
            return False
        if err in _UNREADABLE:
            raise OSError(err, os.strerror(err))
        if err not in (errno.EINTR, errno.EAGAIN):
            break
    return True                                  # ENOMEM and the like: plain page faults, as before 5.14


def copy_mapped(dst: int, src: int, nbytes: int) -> bool:
    """Copy ``nbytes`` from ``src``, in a file mapping, to ``dst`` (this process's memory) the way the
    kernel copies for a system call (``process_vm_readv`` of this process): a page past the file's end
    (it shrank since it was mapped) is EFAULT, never SIGBUS. True when done; False where the system
    cannot (not Linux, a seccomp filter): then nothing was copied. OSError (EFAULT, EIO) when a page
    lies past the file's end or cannot be read: :func:`read_problem` words it."""
    libc = _c()
    if libc is None or not COPY_MAPPED_WORKS[0]:
        return False
    done, pid = 0, os.getpid()
    while done < nbytes:
        local, remote = _IoVec(dst + done, nbytes - done), _IoVec(src + done, nbytes - done)
        got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got > 0:
            done += got
            continue
        err = ctypes.get_errno() if got < 0 else errno.EFAULT   # 0 bytes: the first page is unreadable
        if err == errno.EINTR:
            continue
        if done == 0 and err in (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL):
            COPY_MAPPED_WORKS[0] = False    # refused (a seccomp filter): never tried again
            return False
        raise OSError(err, os.strerror(err))
    return True


class _Mapping:
    """``[address, address + size)`` of ``mmap``, unmapped when the last array viewing it goes."""

    def __init__(self, address: int, size: int):
        self.address, self.size = address, size
        self.__array_interface__ = {"data": (address, True), "shape": (size,), "typestr": "|u1", "version": 3}

    def __del__(self) -> None:
        libc = _libc[0] if _libc else None
        if libc is not None:
            libc.munmap(self.address, self.size)


class FileMap:
    """The first ``size`` bytes of the file open at ``fd``, mapped read-only: ``view`` (a uint8
    array over them) and ``base`` (their address). Holds no descriptor: the caller closes ``fd``
    right after (a mapping keeps the file itself), so any number of files stay mapped within the
    limit on open files (Python's ``mmap.mmap`` keeps a duplicate of ``fd`` until it is closed; it
    is used only where libc's ``mmap`` cannot be called). :meth:`close` drops this object's view:
    the pages are unmapped when no view of them is left (a view an exception's traceback holds
    keeps them mapped until it goes, never a dangling address). OSError when it cannot map."""

    def __init__(self, fd: int, size: int):
        self.size = size
        libc = _c()
        if size == 0:
            view = np.zeros(0, np.uint8)
        elif libc is None or not hasattr(mmap, "PROT_READ"):
            view = np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), np.uint8)
        else:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address is None or address == ctypes.c_void_p(-1).value:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            view = np.asarray(_Mapping(address, size))
            libc.madvise(address, size, _SEQUENTIAL)
        self.view = view
        self.base = view.ctypes.data

    def close(self) -> None:
        self.view = np.zeros(0, np.uint8)


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
        self.copied: dict = {}           # name -> why: copied, never averaged, whatever its dtype (optimizer state)

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
        """Tensor ``name`` is read: its pages may leave this process (they stay in the page cache), and
        a file whose tensors are all read is unmapped and its descriptor closed."""

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
