"""Safetensors inputs of a merge: a safetensors file, or a Hugging Face model folder
(``model.safetensors``, or the shards ``model.safetensors.index.json`` lists). The JSON header is
parsed and checked here against the file (dtypes, shapes, sizes, offsets: a truncated or damaged
file is refused before anything is written); tensors are read memory-mapped, or with ``pread``
into small buffers."""
from __future__ import annotations

import json
import math
import mmap
import os

import numpy as np

from ._dtypes import FROM_CODE, ITEMSIZE
from ._source import DONTNEED, POPULATE_READ, Entry, MergeError, Source, advise, os_problem, regular, step_from_name

__all__ = ["SafetensorsSource", "hf_folder", "meta_step", "read_safetensors_header", "trainer_step"]

_MAX_HEADER = 100_000_000            # safetensors' own limit on a header
INDEX = "model.safetensors.index.json"
_STEP_KEYS = ("global_step", "step", "iteration", "num_updates", "train_step")


class _Mapped:
    """A read-only memory map of one file, with its base address."""

    def __init__(self, path: str, label: str, size: int):
        self.path, self.size = path, size
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.fd = fd
            self.map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError) as err:
            os.close(fd)
            raise MergeError(f"{label}: {path!r} cannot be memory-mapped ({err})") from None
        self.view = np.frombuffer(self.map, np.uint8) if self.map is not None else np.zeros(0, np.uint8)
        self.base = self.view.ctypes.data
        if self.map is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
            self.map.madvise(mmap.MADV_SEQUENTIAL)

    def close(self) -> None:
        self.view = np.zeros(0, np.uint8)
        os.close(self.fd)
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:             # a piece still viewed (an exception's traceback holds it): unmapped
                pass                        # when that view goes


def read_safetensors_header(path: str, label: str) -> tuple:
    """``(entries, metadata, data_start, size)`` of a safetensors file, every field checked
    against the file (a truncated or damaged file is a MergeError naming it and the tensor)."""
    st = regular(path, label)
    size = st.st_size
    where = label if f"({path})" in label else f"{label}, file {path!r}"
    try:
        with open(path, "rb") as f:
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
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MergeError(f"{where}: its header is not JSON ({type(err).__name__}); the file is damaged") from None
    if not isinstance(header, dict):
        raise MergeError(f"{where}: its header is not a JSON object; the file is damaged")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MergeError(f"{where}: its __metadata__ is not a table of strings; the file is damaged")
    start = 8 + n
    entries, offsets = {}, {}
    for name, info in header.items():
        dtype, shape, span = _fields(info)
        if dtype is None:
            raise MergeError(f"{where}: tensor {name!r} has a damaged entry in the header ({str(info)[:120]})")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if span[1] - span[0] != nbytes or span[0] < 0:
            raise MergeError(f"{where}: tensor {name!r} ({dtype}, shape {list(shape)}) should take {nbytes} bytes, "
                             f"its header gives {span[1] - span[0]}; the file is damaged")
        if start + span[1] > size:
            raise MergeError(f"{where} is truncated: tensor {name!r} ends at byte {start + span[1]}, the file has "
                             f"{size}")
        entries[name] = Entry(name, dtype, shape, nbytes)
        offsets[name] = start + span[0]
    order = sorted(entries, key=lambda k: offsets[k])
    return {k: entries[k] for k in order}, meta, offsets, size


def _fields(info) -> tuple:
    if not isinstance(info, dict):
        return None, None, None
    code, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = FROM_CODE.get(code) if isinstance(code, str) else None
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(span, list)
            and len(span) == 2 and all(type(v) is int for v in span) and span[0] <= span[1] and dtype):
        return None, None, None
    return dtype, tuple(shape), tuple(span)


class SafetensorsSource(Source):
    """One safetensors file, or the shards of a Hugging Face folder (``files``: shard -> names)."""

    format = "safetensors"

    def __init__(self, path: str, label: str, files: list, read: str = "mmap"):
        super().__init__(path, label)
        self._read = read
        self._maps: dict = {}
        self._where: dict = {}             # name -> (file, byte offset)
        self.meta: dict = {}
        for file in files:
            entries, meta, offsets, size = read_safetensors_header(file, label)
            for name, e in entries.items():
                if name in self.entries:
                    raise MergeError(f"{label}: tensor {name!r} is stored twice ({self._where[name][0]!r} and "
                                     f"{file!r}); the folder is damaged")
                self.entries[name] = e
                self._where[name] = (file, offsets[name])
            self.meta.update(meta)
            self._maps[file] = size

    def _map(self, file: str) -> _Mapped:
        m = self._maps[file]
        if not isinstance(m, _Mapped):
            m = self._maps[file] = _Mapped(file, self.label, m)
        return m

    def piece(self, name: str, lo: int, count: int, scratch: np.ndarray) -> int:
        file, offset = self._where[name]
        itemsize = ITEMSIZE[self.entries[name].dtype]
        nbytes = count * itemsize
        if self._read == "mmap":
            address = self._map(file).base + offset + lo * itemsize
            advise(address, nbytes, POPULATE_READ)
            return address
        self._pread(file, offset + lo * itemsize, scratch.view(np.uint8).data[:nbytes], name)
        return scratch.ctypes.data

    def raw(self, name: str, lo: int, nbytes: int, scratch: np.ndarray) -> memoryview:
        file, offset = self._where[name]
        if self._read == "mmap":
            m = self._map(file)
            return m.view[offset + lo:offset + lo + nbytes].data
        out = scratch.view(np.uint8).data[:nbytes]
        self._pread(file, offset + lo, out, name)
        return out

    def _pread(self, file: str, offset: int, out: memoryview, name: str) -> None:
        fd = self._fds()[file]
        done = 0
        while done < len(out):
            got = os.preadv(fd, [out[done:]], offset + done)
            if got <= 0:
                raise MergeError(f"{self.label}: {file!r} ended while reading {name!r}: it was truncated during the "
                                 f"merge")
            done += got

    def _fds(self) -> dict:
        if not hasattr(self, "_fd_table"):
            self._fd_table = {f: os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) for f in self._maps}
        return self._fd_table

    def done(self, name: str) -> None:
        file, offset = self._where[name]
        m = self._maps.get(file)
        if isinstance(m, _Mapped):
            advise(m.base + offset, self.entries[name].nbytes, DONTNEED)

    def close(self) -> None:
        for file, m in list(self._maps.items()):
            if isinstance(m, _Mapped):
                m.close()
                self._maps[file] = m.size
        for fd in getattr(self, "_fd_table", {}).values():
            os.close(fd)
        self._fd_table = {}


def hf_folder(path: str, label: str, read: str) -> Source | None:
    index = os.path.join(path, INDEX)
    single = os.path.join(path, "model.safetensors")
    if os.path.lexists(index):
        regular(index, label)
        try:
            with open(index, "rb") as f:
                data = json.loads(f.read(64 << 20).decode("utf-8"))
            weight_map = data["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in weight_map.items())
        except (OSError, ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
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
