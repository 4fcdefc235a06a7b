"""Safetensors inputs of a merge: a safetensors file, or a Hugging Face model folder
(``model.safetensors``, or the shards ``model.safetensors.index.json`` lists). The JSON header is
parsed and checked here against the file as the safetensors library checks it (dtypes, shapes,
sizes; no name twice; the tensors' spans tile the data area from its first byte to the file's
end): a truncated or damaged file is refused before anything is written. Tensors are read
memory-mapped, or with ``pread`` into small buffers. A file that shrinks while it is read is a
MergeError naming it and the tensor, not a SIGBUS: its size is checked before each tensor, and each
piece's pages are mapped in one call that fails on pages past the file's end (where the system has
no such call, the input is read with ``pread``). Only a shrink in the milliseconds between that
call and the kernel's read of the piece can still be fatal; ``read="pread"`` has no such window.
A file replaced (renamed over) after its header was read is refused before it is mapped or opened.

Descriptors stay few whatever the number of files: a map holds none (:class:`._source.FileMap`),
a ``pread`` descriptor is opened when its file is first read and closed once its tensors are
read, and a file's map goes then too."""
from __future__ import annotations

import json
import math
import os
import threading

import numpy as np

from ._dtypes import FROM_CODE, ITEMSIZE
from ._source import (
    DONTNEED,
    Entry,
    FileMap,
    MergeError,
    Source,
    advise,
    os_problem,
    populate,
    read_problem,
    regular,
    step_from_name,
)

__all__ = ["SafetensorsSource", "hf_folder", "meta_step", "read_safetensors_header", "trainer_step"]

_MAX_HEADER = 100_000_000            # safetensors' own limit on a header
_INT64 = 2**63                       # a shape's dimensions and bytes stay below (NumPy's and torch's index type)
INDEX = "model.safetensors.index.json"
_STEP_KEYS = ("global_step", "step", "iteration", "num_updates", "train_step")


class _Object(dict):
    """A JSON object of a header, with the keys it names more than once (``json`` keeps the last)."""

    repeated: tuple = ()


def _pairs(pairs: list) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        twice = []
        for key, _ in pairs:
            if key in seen:
                twice.append(key)
            seen.add(key)
        obj.repeated = tuple(twice)
    return obj


def _where(label: str, path: str) -> str:
    return label if f"({path})" in label else f"{label}, file {path!r}"


def read_safetensors_header(path: str, label: str) -> tuple:
    """``(entries, metadata, offsets, size)`` of a safetensors file, every field checked against the
    file as the safetensors library checks it (a truncated or damaged file is a MergeError naming it
    and the tensor); ``offsets``: each tensor's first byte in the file."""
    return _read_header(path, label)[:4]


def _read_header(path: str, label: str) -> tuple:
    """:func:`read_safetensors_header`'s, and ``(st_dev, st_ino)`` of the file it read."""
    regular(path, label)
    where = _where(label, path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{where} is not a safetensors file ({size} bytes, shorter than its header's length)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise MergeError(f"{where} is not a safetensors file, or is truncated (a header of {n} bytes in a file "
                                 f"of {size})")
            text = f.read(n)
    except OSError as err:
        raise MergeError(os_problem(path, label, err)) from None
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MergeError(f"{where}: its header is not JSON ({type(err).__name__}); the file is damaged") from None
    if not isinstance(header, dict):
        raise MergeError(f"{where}: its header is not a JSON object; the file is damaged")
    repeated = header.repeated if isinstance(header, _Object) else ()
    if repeated:                         # json.loads would keep the last: the others silently dropped
        key = repeated[0]
        what = repr(key) if key == "__metadata__" else f"tensor {key!r}"
        raise MergeError(f"{where}: {what} is named twice in its header; the file is damaged")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MergeError(f"{where}: its __metadata__ is not a table of strings; the file is damaged")
    start = 8 + n
    entries, offsets, spans = {}, {}, []
    for name, info in header.items():
        dtype, shape, span = _fields(info)
        if dtype is None:
            raise MergeError(f"{where}: tensor {name!r} has a damaged entry in the header ({str(info)[:120]}); the "
                             f"file is damaged")
        if any(d >= _INT64 for d in shape) or math.prod(d for d in shape if d) * ITEMSIZE[dtype] >= _INT64:
            raise MergeError(f"{where}: tensor {name!r} has the shape {list(shape)}, past what a reader takes (its "
                             f"dimensions and its bytes below 2^63, NumPy's and torch's limit); the file is damaged")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if span[1] - span[0] != nbytes or span[0] < 0:
            raise MergeError(f"{where}: tensor {name!r} ({dtype}, shape {list(shape)}) should take {nbytes} bytes, "
                             f"its header gives {span[1] - span[0]}; the file is damaged")
        if start + span[1] > size:
            raise MergeError(f"{where} is truncated: tensor {name!r} ends at byte {start + span[1]}, the file has "
                             f"{size}")
        entries[name] = Entry(name, dtype, shape, nbytes)
        offsets[name] = start + span[0]
        spans.append((span, name))
    _tile(where, spans, size - start)
    order = sorted(entries, key=lambda k: offsets[k])
    return {k: entries[k] for k in order}, dict(meta), offsets, size, (st.st_dev, st.st_ino)


def _tile(where: str, spans: list, data: int) -> None:
    """MergeError unless ``spans`` (``((first, end), name)``, bytes of the data area) follow one
    another from byte 0 to ``data``, the data area's size: no overlap, no gap, nothing after."""
    end, before = 0, None
    for (lo, hi), name in sorted(spans, key=lambda s: s[0]):
        if lo < end:
            raise MergeError(f"{where}: tensor {name!r} overlaps tensor {before!r} (bytes {lo} to {min(hi, end)} of "
                             f"its data are both's); the file is damaged")
        if lo > end:
            raise MergeError(f"{where}: bytes {end} to {lo} of its data belong to no tensor (before tensor {name!r}); "
                             f"the file is damaged")
        end, before = hi, name
    if end != data:
        raise MergeError(f"{where}: {data - end} bytes after its last tensor belong to no tensor; the file is damaged")


def _fields(info) -> tuple:
    if not isinstance(info, dict) or (isinstance(info, _Object) and info.repeated):
        return None, None, None
    code, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = FROM_CODE.get(code) if isinstance(code, str) else None
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(span, list)
            and len(span) == 2 and all(type(v) is int for v in span) and span[0] <= span[1] and dtype):
        return None, None, None
    return dtype, tuple(shape), tuple(span)


class _File:
    """One file of an input as its header was read (``size``, ``ident``: device and inode), its map
    or ``pread`` descriptor while its tensors are read, and the names not yet read (``left``)."""

    def __init__(self, path: str, label: str, size: int, ident: tuple, names):
        self.path, self.label, self.where = path, label, _where(label, path)
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
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
    """One safetensors file, or the shards of a Hugging Face folder (``files``: shard -> names)."""

    format = "safetensors"

    def __init__(self, path: str, label: str, files: list, read: str = "mmap"):
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
        done = 0
        while done < len(out):
            got = os.preadv(fd, [out[done:]], offset + lo + done)
            if got <= 0:
                raise MergeError(f"{self.label}: {file!r} ended while reading {name!r}: it was truncated during the "
                                 f"merge")
            done += got

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
        regular(index, label)
        try:
            with open(index, "rb") as f:
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
        with open(path, "rb") as f:
            step = json.loads(f.read(256 << 20).decode("utf-8")).get("global_step")
        return int(step) if isinstance(step, int) and not isinstance(step, bool) else step_from_name(folder)
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return step_from_name(folder)


def meta_step(meta: dict) -> int | None:
    for key in _STEP_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    return None
