"""The safetensors writer that streams torch tensors one at a time (snapshots, ``save()``): peak
host memory is one tensor, where the safetensors library serialises a whole dict held in memory."""
from __future__ import annotations

import json
import struct

import torch

__all__ = ["SAFETENSORS_DTYPES", "stream_safetensors"]


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def stream_safetensors(f, tensors: dict, meta: dict) -> None:
    """Write ``tensors`` (``name -> (tensor, dtype)``, on any device) to ``f`` in the safetensors
    format, converting and copying one tensor at a time to the host: peak memory is one tensor,
    not the snapshot. (The safetensors library serialises whole dicts held in memory; its format
    is a little-endian u64 header length, a JSON header of dtypes, shapes and byte offsets padded
    to 8 bytes, then the raw data in that order. The files are read back with the library.)"""
    header, offset = {"__metadata__": meta}, 0
    for name, (t, dtype) in tensors.items():
        kind = SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
        if kind is None:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name; exclude it from the average")
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for name, (t, dtype) in tensors.items():
        host = t.detach().to("cpu", dtype, copy=True).contiguous()     # C order, as safetensors stores it
        f.write(host.view(-1).view(torch.uint8).numpy().tobytes() if host.numel() else b"")
