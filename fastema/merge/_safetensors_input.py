"""Safetensors inputs of a merge: a safetensors file, or a Hugging Face model folder
(``model.safetensors``, or the shards ``model.safetensors.index.json`` lists). The JSON header is
parsed and checked against the file as the safetensors library checks it
(:func:`fastema._io.safetensors.read_header`: dtypes, shapes, sizes; no name twice; the tensors'
spans tile the data area from its first byte to the file's end): a truncated or damaged file is
refused before anything is written. A file replaced (renamed over) after its header was read is
refused before it is mapped or opened.

Tensors are read with ``pread`` into small buffers (``read="pread"``, the default): a file that
shrinks while it is read is a MergeError naming it and the tensor (a short read, or its size
checked before each tensor), whenever it shrinks. ``read="mmap"`` reads them in place, memory-mapped,
each piece's pages mapped in one call before the kernel reads it (``MADV_POPULATE_READ``, which
fails on pages past the file's end; where the system has no such call, the input is read with
``pread``): a file that shrank before that call is a MergeError, but one that shrinks after it, while
the piece waits for the kernel (up to a whole piece's sum: the next piece is fetched while the
current one is summed) or is summed, takes the mapped pages away and the process dies of SIGBUS.
``mmap`` is for inputs nothing else writes during the merge.

Descriptors stay few whatever the number of files: a map holds none (:class:`._source.FileMap`),
a ``pread`` descriptor is opened when its file is first read and closed once its tensors are
read, and a file's map goes then too."""
from __future__ import annotations

import json
import os
import threading

import numpy as np

from .._io.safe_files import open_regular, os_problem, pread_into, regular, regular_fd
from .._io.safetensors import ITEMSIZE, file_label, read_header
from ._source import (
    DONTNEED,
    Entry,
    FileMap,
    MergeError,
    Source,
    advise,
    populate,
    read_problem,
    refused,
    step_from_name,
)

__all__ = ["SafetensorsSource", "hf_folder", "meta_step", "read_safetensors_header", "trainer_step"]

INDEX = "model.safetensors.index.json"
_STEP_KEYS = ("global_step", "step", "iteration", "num_updates", "train_step")


def read_safetensors_header(path: str, label: str) -> tuple:
    """``(entries, metadata, offsets, size)`` of a safetensors file, every field checked against the
    file as the safetensors library checks it (:func:`fastema._io.safetensors.read_header`: a truncated
    or damaged file is a MergeError naming it and the tensor); ``offsets``: each tensor's first byte in
    the file."""
    return _read_header(path, label)[:4]


def _read_header(path: str, label: str) -> tuple:
    """:func:`read_safetensors_header`'s, and ``(st_dev, st_ino)`` of the file it read."""
    with refused():
        header = read_header(path, label)
    entries = {name: Entry(name, dtype, shape, nbytes) for name, (dtype, shape, nbytes, _) in header.tensors.items()}
    offsets = {name: t[3] for name, t in header.tensors.items()}
    return entries, header.metadata, offsets, header.size, header.ident


class _File:
    """One file of an input as its header was read (``size``, ``ident``: device and inode), its map
    or ``pread`` descriptor while its tensors are read, and the names not yet read (``left``)."""

    def __init__(self, path: str, label: str, size: int, ident: tuple, names):
        self.path, self.label, self.where = path, label, file_label(label, path)
        self.size, self.ident, self.left = size, ident, set(names)
        self.map: FileMap | None = None
        self.fd: int | None = None

    def changed(self, st: os.stat_result, name: str) -> None:
        """MergeError when ``st`` (of this file now) is not what its header was read from."""
        said = f"{st.st_size} bytes now, {self.size} when its header was read (before tensor {name!r})"
        if (st.st_dev, st.st_ino) != self.ident:
            raise MergeError(f"{self.where} was replaced during the merge (before tensor {name!r}): another file is "
                             f"at its path now; merge again once the checkpoint is written")
        if st.st_size != self.size:
            how = "truncated" if st.st_size < self.size else "rewritten"
            raise MergeError(f"{self.where} was {how} during the merge: {said}; let nothing rewrite a checkpoint "
                             f"while it is merged")

    def open(self, name: str) -> int:
        """A new descriptor of this file, checked to be the one its header was read from."""
        try:
            with refused():
                fd = regular_fd(self.path, what=self.label)
        except OSError as err:
            raise MergeError(os_problem(self.path, self.label, err)) from None
        try:
            self.changed(os.fstat(fd), name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mapped(self, name: str) -> FileMap:
        if self.map is None:
            fd = self.open(name)
            try:
                self.map = FileMap(fd, self.size)
            except OSError as err:
                raise MergeError(f"{self.where} cannot be memory-mapped ({err.strerror or err}): too many maps "
                                 f"(vm.max_map_count) or too little address space; merge with read='pread' "
                                 f"(--read pread)") from None
            finally:
                os.close(fd)                # the map keeps the file
        return self.map

    def check(self, name: str) -> None:
        """Before each mapped tensor: MergeError when the file at its path is the one mapped and
        changed size (a file replaced by another is no matter: the map keeps the one it mapped)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.ident:
            self.changed(st, name)

    def release(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class SafetensorsSource(Source):
    """One safetensors file, or the shards of a Hugging Face folder (``files``: their paths), read with
    ``pread`` or memory-mapped (``read``: see the module)."""

    format = "safetensors"

    def __init__(self, path: str, label: str, files: list, read: str = "pread"):
        super().__init__(path, label)
        self._read = read
        self._files: dict = {}
        self._where: dict = {}             # name -> (file, byte offset)
        self._lock = threading.Lock()      # the reading thread maps and opens, the merging one releases
        self.meta: dict = {}
        for file in files:
            entries, meta, offsets, size, ident = _read_header(file, label)
            for name, e in entries.items():
                if name in self.entries:
                    raise MergeError(f"{label}: tensor {name!r} is stored twice ({self._where[name][0]!r} and "
                                     f"{file!r}); the folder is damaged")
                self.entries[name] = e
                self._where[name] = (file, offsets[name])
            self.meta.update(meta)
            self._files[file] = _File(file, label, size, ident, entries)

    def _mapped(self, name: str, first: bool) -> tuple:
        """``(file, its map, the address of tensor name)``; before its first piece (``first``), the file
        checked against its header."""
        file, offset = self._where[name]
        f = self._files[file]
        with self._lock:
            m = f.mapped(name)
            if first:
                f.check(name)
        return f, m, m.base + offset

    def _populated(self, f: _File, name: str, address: int, nbytes: int) -> bool:
        try:
            if populate(address, nbytes):
                return True
        except OSError as err:
            raise read_problem(f.where, name, err) from None
        self._read = "pread"               # no populate: a page past a shrunk file's end would be SIGBUS
        return False

    def piece(self, name: str, lo: int, count: int, scratch: np.ndarray) -> int:
        itemsize = ITEMSIZE[self.entries[name].dtype]
        nbytes = count * itemsize
        if self._read == "mmap":
            f, _, address = self._mapped(name, lo == 0)
            address += lo * itemsize
            if self._populated(f, name, address, nbytes):
                return address
        self._pread(name, lo * itemsize, scratch.view(np.uint8).data[:nbytes], lo == 0)
        return scratch.ctypes.data

    def raw(self, name: str, lo: int, nbytes: int, scratch: np.ndarray) -> memoryview:
        if self._read == "mmap":
            f, m, address = self._mapped(name, lo == 0)
            if self._populated(f, name, address + lo, nbytes):
                at = address - m.base + lo
                return m.view[at:at + nbytes].data
        out = scratch.view(np.uint8).data[:nbytes]
        self._pread(name, lo, out, lo == 0)
        return out

    def _pread(self, name: str, lo: int, out: memoryview, first: bool) -> None:
        file, offset = self._where[name]
        f = self._files[file]
        with self._lock:
            if f.fd is None:
                f.fd = f.open(name)
            fd = f.fd
            if first:
                f.changed(os.fstat(fd), name)
        try:
            got = pread_into(fd, out, offset + lo)
        except OSError as err:
            raise read_problem(f.where, name, err) from None
        if got < len(out):
            raise MergeError(f"{f.where} was truncated during the merge: it ended while tensor "
                             f"{name!r} was read; let nothing rewrite a checkpoint while it is "
                             f"merged")

    def done(self, name: str) -> None:
        file, offset = self._where[name]
        f = self._files[file]
        with self._lock:
            if f.map is not None:
                advise(f.map.base + offset, self.entries[name].nbytes, DONTNEED)
            f.left.discard(name)
            if not f.left:                  # every tensor of the file read: its map and descriptor go
                f.release()

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.release()


def hf_folder(path: str, label: str, read: str) -> Source | None:
    index = os.path.join(path, INDEX)
    single = os.path.join(path, "model.safetensors")
    if os.path.lexists(index):
        with refused():
            regular(index, label)
        try:
            with refused(), open_regular(index, what=label) as f:
                text = f.read(64 << 20)
        except OSError as err:
            raise MergeError(os_problem(index, label, err)) from None
        try:
            data = json.loads(text.decode("utf-8"))
            weight_map = data["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in weight_map.items())
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError, RecursionError):
            raise MergeError(f"{label}: {index!r} is not a readable safetensors index (JSON with a weight_map of "
                             f"tensor -> shard file); the folder is damaged") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise MergeError(f"{label}: {index!r} names the shard {shard!r} outside its folder; the index is "
                                 f"damaged")
        src = SafetensorsSource(path, label, [os.path.join(path, s) for s in shards], read)
        missing = sorted(set(weight_map) - set(src.entries))
        if missing:
            raise MergeError(f"{label}: tensor {missing[0]!r} is in {INDEX} but in none of its shards"
                             + (f" ({len(missing)} such tensors)" if len(missing) > 1 else "")
                             + "; the folder is incomplete")
        src.layout = {name: os.path.basename(src._where[name][0]) for name in src.entries}
    elif os.path.lexists(single):
        src = SafetensorsSource(path, label, [single], read)
        src.layout = {name: "model.safetensors" for name in src.entries}
    else:
        return None
    src.folder = path
    src.format = "huggingface"
    src.step = trainer_step(path, label)
    return src


def trainer_step(folder: str, label: str) -> int | None:
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        return step_from_name(folder)
    try:
        with open_regular(path) as f:           # a FIFO swapped in since isfile(): refused (ValueError)
            step = json.loads(f.read(256 << 20).decode("utf-8")).get("global_step")
        return int(step) if isinstance(step, int) and not isinstance(step, bool) else step_from_name(folder)
    except (OSError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return step_from_name(folder)


def meta_step(meta: dict) -> int | None:
    for key in _STEP_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.strip().isdecimal():
            return int(value)
    return None
