"""The writers that stream torch tensors one at a time (snapshots, ``save()``): safetensors, and
``torch.save``'s format. Peak host memory is one tensor, where the safetensors library and
``torch.save`` serialise a whole dict held in memory. Used by the torch face's ``save()``, the
post-hoc snapshots (:mod:`fastema.posthoc.snapshots`) and the transformers callback. Importing
this module imports no framework; torch when a writer runs."""
from __future__ import annotations

import json
import pickle
import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["SAFETENSORS_DTYPES", "stream_safetensors", "stream_torch_save"]


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}

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
            :func:`fastema._files.atomic_write`, which removes it.
    """
    import torch

    header: dict = {"__metadata__": dict(meta)}
    if checksums is not None:
        header["__metadata__"][checksums] = json.dumps({name: _PLACEHOLDER for name in tensors},
                                                       separators=(",", ":"))
    offset = 0
    for name, (t, dtype) in tensors.items():
        kind = SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch.")) or _installed_names().get(dtype)
        if kind is None:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name (in the installed safetensors); "
                            f"save to a .pt path, or exclude= the tensor")
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    start = f.tell() if checksums is not None else 0
    head = _header_bytes(header)
    f.write(struct.pack("<Q", len(head)))
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
        filled = _header_bytes(header)
        assert len(filled) == len(head), "the checksums changed the header's length"
        end = f.tell()
        f.seek(start + 8)
        f.write(filled)
        f.seek(end)


def stream_torch_save(f, tensors: dict) -> None:
    """Write ``tensors`` (``name -> (tensor, dtype)``, on any device) to ``f`` as ``torch.save`` writes
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
        torch.save({k: t.detach().to("cpu", dtype, copy=True).contiguous() for k, (t, dtype) in tensors.items()}, f)
        return
    stand_ins, sources = {}, {}
    for name, (t, dtype) in tensors.items():
        stand_ins[name] = s = torch.empty(tuple(t.shape), dtype=dtype)
        if s.numel():
            sources[s.data_ptr()] = (t, dtype)
    largest = max((s.numel() * s.element_size() for s in stand_ins.values()), default=0)
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


def _header_bytes(header: dict) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8)


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
