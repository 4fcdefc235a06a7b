"""The safetensors format, once: its dtype codes (:data:`DTYPES`), its framing (:func:`frame`: a
little-endian u64 header length, then the JSON header of dtypes, shapes and byte offsets padded to 8
bytes, then the data in that order), its writers and the checked header reader.

The writers: :func:`stream_safetensors` and :func:`stream_torch_save` (``torch.save``'s format) stream
torch tensors one at a time (``save()``, the post-hoc snapshots, the transformers callback): peak host
memory is one tensor, where the safetensors library and ``torch.save`` serialise a whole dict held in
memory; :class:`SafetensorsWriter` writes a merge's output, a header then each tensor's bytes in pieces.

:func:`read_header` checks every field against the file as the safetensors library checks it (dtypes,
shapes, sizes; no name twice; the tensors' spans tile the data area from its first byte to the file's
end; dimensions and sizes below 2^63): a truncated or damaged file is refused (:class:`FileRefused`,
a ValueError naming the file and the tensor) before anything of it is used. Importing this module
imports the standard library only; torch when a torch writer runs."""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import zlib
from typing import TYPE_CHECKING, NamedTuple

from .safe_files import FileRefused, open_regular, os_problem, pread_into, regular

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "FROM_CODE", "ITEMSIZE", "MAX_HEADER", "SAFETENSORS_DTYPES", "TO_CODE", "Header",
           "SafetensorsWriter", "file_label", "frame", "header_of", "read_header", "stream_safetensors",
           "stream_torch_save"]

#: dtype name (torch's spelling) -> (safetensors code, bytes per element, read by every safetensors release)
DTYPES = {
    "float64": ("F64", 8, True), "float32": ("F32", 4, True), "bfloat16": ("BF16", 2, True),
    "float16": ("F16", 2, True), "int64": ("I64", 8, True), "int32": ("I32", 4, True), "int16": ("I16", 2, True),
    "int8": ("I8", 1, True), "uint8": ("U8", 1, True), "bool": ("BOOL", 1, True),
    "uint16": ("U16", 2, False), "uint32": ("U32", 4, False), "uint64": ("U64", 8, False),
    "float8_e4m3fn": ("F8_E4M3", 1, False), "float8_e5m2": ("F8_E5M2", 1, False),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1, False), "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1, False),
    "complex64": ("C64", 8, False),
}
#: dtype name -> safetensors code; what a reader takes is exactly what a writer can write, so any other
#: dtype (complex128: safetensors has no C128) is refused by name when an input is read
TO_CODE = {name: code for name, (code, _, _) in DTYPES.items()}
#: safetensors code -> dtype name
FROM_CODE = {code: name for name, code in TO_CODE.items()}
#: dtype name -> bytes per element
ITEMSIZE = {name: size for name, (_, size, _) in DTYPES.items()}
#: the dtypes every safetensors release reads (dtype name -> code); a snapshot stores others as their bytes
SAFETENSORS_DTYPES = {name: code for name, (code, _, every) in DTYPES.items() if every}

MAX_HEADER = 100_000_000             # safetensors' own limit on a header
_INT64 = 2**63                       # a shape's dimensions and bytes stay below (NumPy's and torch's index type)


def header_of(tensors, metadata: dict | None) -> dict:
    """The header of ``tensors`` (``(name, code, shape, nbytes)`` each, in the order of their data)
    and ``metadata`` (the ``str -> str`` ``__metadata__``; None: none written)."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, code, shape, nbytes in tensors:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header


def frame(header: dict) -> bytes:
    """The first bytes of a safetensors file: ``header``'s length (u64, little-endian), then its JSON,
    padded with spaces to a multiple of 8 bytes."""
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


# --------------------------------------------------------------------------- writing

_PLACEHOLDER = "00000000"          # a CRC-32 in 8 hex digits: the header keeps its length when it is filled in


def stream_safetensors(f, tensors: dict, meta: dict, *, checksums: str | None = None) -> None:
    """Write ``tensors`` (``name -> (tensor, dtype)``, on any device) to ``f`` in the safetensors
    format, converting and copying one tensor at a time to the host: peak memory is one tensor,
    not the snapshot. (The safetensors library serialises whole dicts held in memory; its format
    is a little-endian u64 header length, a JSON header of dtypes, shapes and byte offsets padded
    to 8 bytes, then the raw data in that order. The files are read back with the library.)

    Args:
        f: a binary file open for writing (seekable when ``checksums`` is given).
        tensors: ``name -> (tensor, dtype)``; each is stored in ``dtype`` (one of
            :data:`SAFETENSORS_DTYPES`, else ``TypeError`` before anything is written).
        meta: the ``str -> str`` metadata.
        checksums: a metadata key to fill with the CRC-32 (``zlib.crc32``, 8 hex digits) of every
            tensor's stored bytes, as JSON ``name -> crc``: computed while the data streams, then
            written into the header in place (it keeps its length).

    Raises:
        OverflowError: a floating tensor stored in a narrower floating dtype (float32 into
            float16) holds finite values beyond that dtype's range (they would be stored as inf);
            it names the tensor and the largest value. The file is then incomplete: write it through
            :func:`fastema._io.files.atomic_write`, which removes it.
    """
    import torch

    layout = []
    for name, (t, dtype) in tensors.items():
        kind = SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch.")) or _installed_names().get(dtype)
        if kind is None:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name (in the installed safetensors); "
                            f"save to a .pt path, or exclude= the tensor")
        layout.append((name, kind, t.shape, t.numel() * torch.empty((), dtype=dtype).element_size()))
    header = header_of(layout, dict(meta))
    if checksums is not None:
        header["__metadata__"][checksums] = json.dumps({name: _PLACEHOLDER for name in tensors},
                                                       separators=(",", ":"))
    start = f.tell() if checksums is not None else 0
    head = frame(header)
    f.write(head)
    crcs = {}
    for name, (t, dtype) in tensors.items():
        host = t.detach().to("cpu", dtype, copy=True).contiguous()     # C order, as safetensors stores it
        _check_range(name, t, host)
        data = memoryview(host.view(-1).view(torch.uint8).numpy()) if host.numel() else b""
        crcs[name] = f"{zlib.crc32(data):08x}"
        f.write(data)
        del host, data                          # one converted tensor alive at a time, not two
    if checksums is not None:
        header["__metadata__"][checksums] = json.dumps(crcs, separators=(",", ":"))
        filled = frame(header)
        assert len(filled) == len(head), "the checksums changed the header's length"
        end = f.tell()
        f.seek(start)
        f.write(filled)
        f.seek(end)


def stream_torch_save(f, tensors: dict) -> None:
    """Write ``tensors`` (``name -> (tensor, dtype)``, on any device; ``(object, None)``: an object
    pickled as it is, a module's extra state) to ``f`` as ``torch.save`` writes
    ``{name: tensor.to("cpu", dtype, copy=True).contiguous()}`` (the same records, byte for byte), but
    converting and copying one tensor at a time, when torch writes its record: peak memory is the
    largest tensor, not the dict. torch's own writer does it all: it pickles stand-ins (``torch.empty``
    host tensors of each shape and dtype, address space that is never touched: no memory), and each
    stand-in's record is written from one host buffer that the tensor it stands for is copied into
    (converted, in C order). A torch without these private writer functions gets ``torch.save`` of the
    host copies."""
    import torch

    ser = torch.serialization
    save, opener = getattr(ser, "_save", None), getattr(ser, "_open_zipfile_writer", None)
    if save is None or opener is None:
        torch.save({k: t if dtype is None else t.detach().to("cpu", dtype, copy=True).contiguous()
                    for k, (t, dtype) in tensors.items()}, f)
        return
    stand_ins, sources = {}, {}
    for name, (t, dtype) in tensors.items():
        if dtype is None:                  # not a tensor (a module's extra state): pickled as it is
            stand_ins[name] = t
            continue
        stand_ins[name] = s = torch.empty(tuple(t.shape), dtype=dtype)
        if s.numel():
            sources[s.data_ptr()] = (t, dtype)
    largest = max((s.numel() * s.element_size() for n, s in stand_ins.items()
                   if tensors[n][1] is not None), default=0)
    with opener(f) as writer:
        save(stand_ins, _FromSources(writer, sources, largest), pickle, ser.DEFAULT_PROTOCOL, False)


class _FromSources:
    """torch's zip writer, writing the record of each stand-in (found by its address: torch hands its
    storage, or its address in older releases) from the tensor it stands for, copied into one buffer."""

    def __init__(self, writer, sources: dict, largest: int):
        import torch

        self._writer, self._sources = writer, sources
        self._buffer = torch.empty(largest, dtype=torch.uint8)      # reused: one allocation, not one a tensor

    def write_record(self, name: str, data, nbytes: int) -> None:
        address = data if isinstance(data, int) else data.data_ptr() if hasattr(data, "data_ptr") else None
        source = self._sources.pop(address, None)
        if source is None:                                  # the pickle, the version records
            self._writer.write_record(name, data, nbytes)
            return
        t, dtype = source
        self._buffer[:nbytes].view(dtype).view(t.shape).copy_(t.detach())     # converted, C order
        buffer = self._buffer.data_ptr() if isinstance(data, int) else self._buffer.untyped_storage()
        self._writer.write_record(name, buffer, nbytes)    # its first nbytes, as torch would hand them

    def __getattr__(self, attr: str):
        return getattr(self._writer, attr)


def _installed_names() -> dict:
    """``torch dtype -> name`` of the dtypes the installed safetensors reads beyond
    :data:`SAFETENSORS_DTYPES` (newer releases: float8, complex64, uint16/32/64), as
    ``safetensors.torch.save`` would store them; empty when it does not say."""
    try:
        from safetensors.torch import _TYPES
    except ImportError:
        return {}
    return {dtype: name for name, dtype in _TYPES.items()}


def _check_range(name: str, src: torch.Tensor, host: torch.Tensor) -> None:
    """OverflowError when ``host`` (``src`` cast to a narrower floating dtype) turned finite values into inf."""
    import torch

    if not (src.is_floating_point() and host.is_floating_point()) or host.dtype == src.dtype:
        return
    if torch.finfo(host.dtype).max >= torch.finfo(src.dtype).max:
        return
    bad = ~torch.isfinite(host)
    if not bool(bad.any()):
        return
    was = src.detach().to("cpu", copy=True).contiguous()[bad]
    was = was[torch.isfinite(was)]
    if was.numel():
        largest = float(was.abs().max())
        raise OverflowError(f"{name} holds {was.numel()} finite value(s) beyond the range of "
                            f"{str(host.dtype).removeprefix('torch.')} (+-{torch.finfo(host.dtype).max:g}; the "
                            f"largest is {largest:g}), which would be stored as inf")


class SafetensorsWriter:
    """One safetensors file, written in order: the header from every tensor's ``(name, dtype,
    shape, nbytes)`` first, then each tensor's bytes through :meth:`write` (pieces in C order);
    :meth:`close` checks every byte arrived and syncs the file. ``crc``: keep a CRC-32 per tensor
    (for ``verify``). ``label``: what a failed write names (the output it is published as; default
    ``path``), with the free space."""

    def __init__(self, path: str, tensors: list, metadata: dict, crc: bool = False, label: str | None = None):
        head = frame(header_of([(name, TO_CODE[dtype], shape, nbytes) for name, dtype, shape, nbytes in tensors],
                               metadata or None))
        self.path, self.size = path, len(head) + sum(nbytes for _, _, _, nbytes in tensors)
        self.label = path if label is None else label
        self._left = [(name, nbytes) for name, _, _, nbytes in tensors][::-1]
        self._name, self._due = None, 0
        self.crcs: dict | None = {} if crc else None
        self._f = open(path, "xb", buffering=0)
        self._put(head)
        self._next()

    def _next(self) -> None:
        while self._left and self._due == 0:
            self._name, self._due = self._left.pop()
            if self.crcs is not None:
                self.crcs[self._name] = 0
            if self._due:
                break

    def write(self, data) -> None:
        """The next ``len(data)`` bytes of the tensor being written."""
        data = memoryview(data).cast("B")
        if len(data) > self._due:
            raise RuntimeError(f"{self.path}: {len(data)} bytes given for {self._name!r}, {self._due} left of it")
        self._put(data)
        if self.crcs is not None:
            self.crcs[self._name] = zlib.crc32(data, self.crcs[self._name])
        self._due -= len(data)
        self._next()

    def _put(self, data) -> None:
        view, done = memoryview(data), 0
        try:
            while done < len(view):
                done += self._f.write(view[done:])
        except OSError as err:
            raise self._failed(err) from None

    def close(self) -> None:
        left = self._due + sum(n for _, n in self._left)
        if left:
            raise RuntimeError(f"{self.path}: {left} bytes of {self._name!r} and later tensors were not written")
        from .files import system

        try:
            system().sync_file(self._f.fileno(), self.path)      # where a full disk may report a lost write
        except OSError as err:
            raise self._failed(err) from None
        self._f.close()

    def _failed(self, err: OSError) -> OSError:
        from .files import system

        try:
            free = f" ({system().free_bytes(os.path.dirname(os.path.abspath(self.path)))} bytes free on its disk)"
        except OSError:
            free = ""
        return OSError(err.errno, f"could not write {self.label!r}{free}: {err.strerror or err}")

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


# --------------------------------------------------------------------------- reading


class Header(NamedTuple):
    """A safetensors file's header, checked against the file (:func:`read_header`)."""
    tensors: dict        # name -> (dtype name, shape, nbytes, the file offset of its first byte), in the file's order
    metadata: dict       # the __metadata__ strings
    size: int            # the file's size when the header was read
    ident: tuple         # (st_dev, st_ino) of the file read


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


def file_label(label: str, path: str) -> str:
    """How messages name the file ``path`` of the input ``label`` (the path added unless the label holds it)."""
    return label if f"({path})" in label else f"{label}, file {path!r}"


def read_header(path: str, label: str, fd: int | None = None) -> Header:
    """The :class:`Header` of the safetensors file ``path`` (read for ``label``, the input messages
    name), every field checked against the file as the safetensors library checks it: a file that is
    not regular, cannot be read, is truncated or damaged is a :class:`FileRefused` naming it (and the
    tensor). ``fd``: a descriptor of ``path`` the caller holds (and checked to be a regular file),
    read with ``pread`` (:func:`~.safe_files.pread_into`): the header of the file the caller reads
    the tensors from; without it, ``path`` is opened for the header alone."""
    if fd is None:
        regular(path, label)
        try:
            with open_regular(path, what=label) as f:
                return read_header(path, label, f.fileno())
        except OSError as err:
            raise FileRefused(os_problem(path, label, err)) from None
    where = file_label(label, path)
    try:
        st = os.fstat(fd)
        size = st.st_size
        head = bytearray(8)
        if pread_into(fd, head, 0) < 8:
            raise FileRefused(f"{where} is not a safetensors file ({size} bytes, shorter than its "
                              f"header's length)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise FileRefused(f"{where} is not a safetensors file, or is truncated (a header of "
                              f"{n} bytes in a file of {size})")
        text = bytearray(n)
        if pread_into(fd, text, 8) < n:
            raise FileRefused(f"{where} was truncated while its header was read")
    except OSError as err:
        raise FileRefused(os_problem(path, label, err)) from None
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FileRefused(f"{where}: its header is not JSON ({type(err).__name__}); the file is damaged") from None
    if not isinstance(header, dict):
        raise FileRefused(f"{where}: its header is not a JSON object; the file is damaged")
    repeated = header.repeated if isinstance(header, _Object) else ()
    if repeated:                         # json.loads would keep the last: the others silently dropped
        key = repeated[0]
        what = repr(key) if key == "__metadata__" else f"tensor {key!r}"
        raise FileRefused(f"{where}: {what} is named twice in its header; the file is damaged")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FileRefused(f"{where}: its __metadata__ is not a table of strings; the file is damaged")
    start = 8 + n
    tensors, spans = {}, []
    for name, info in header.items():
        dtype, shape, span = _fields(info)
        if dtype is None:
            raise FileRefused(f"{where}: tensor {name!r} has a damaged entry in the header ({str(info)[:120]}); the "
                              f"file is damaged")
        if any(d >= _INT64 for d in shape) or math.prod(d for d in shape if d) * ITEMSIZE[dtype] >= _INT64:
            raise FileRefused(f"{where}: tensor {name!r} has the shape {list(shape)}, past what a reader takes (its "
                              f"dimensions and its bytes below 2^63, NumPy's and torch's limit); the file is damaged")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if span[1] - span[0] != nbytes or span[0] < 0:
            raise FileRefused(f"{where}: tensor {name!r} ({dtype}, shape {list(shape)}) should take {nbytes} bytes, "
                              f"its header gives {span[1] - span[0]}; the file is damaged")
        if start + span[1] > size:
            raise FileRefused(f"{where} is truncated: tensor {name!r} ends at byte {start + span[1]}, the file has "
                              f"{size}")
        tensors[name] = (dtype, shape, nbytes, start + span[0])
        spans.append((span, name))
    _tile(where, spans, size - start)
    order = sorted(tensors, key=lambda k: tensors[k][3])
    return Header({k: tensors[k] for k in order}, dict(meta), size, (st.st_dev, st.st_ino))


def _tile(where: str, spans: list, data: int) -> None:
    """FileRefused unless ``spans`` (``((first, end), name)``, bytes of the data area) follow one
    another from byte 0 to ``data``, the data area's size: no overlap, no gap, nothing after."""
    end, before = 0, None
    for (lo, hi), name in sorted(spans, key=lambda s: s[0]):
        if lo < end:
            raise FileRefused(f"{where}: tensor {name!r} overlaps tensor {before!r} (bytes {lo} to {min(hi, end)} "
                              f"of its data are both's); the file is damaged")
        if lo > end:
            raise FileRefused(f"{where}: bytes {end} to {lo} of its data belong to no tensor (before tensor "
                              f"{name!r}); the file is damaged")
        end, before = hi, name
    if end != data:
        raise FileRefused(f"{where}: {data - end} bytes after its last tensor belong to no tensor; the file is "
                          f"damaged")


def _fields(info) -> tuple:
    if not isinstance(info, dict) or (isinstance(info, _Object) and info.repeated):
        return None, None, None
    code, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = FROM_CODE.get(code) if isinstance(code, str) else None
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(span, list)
            and len(span) == 2 and all(type(v) is int for v in span) and span[0] <= span[1] and dtype):
        return None, None, None
    return dtype, tuple(shape), tuple(span)
