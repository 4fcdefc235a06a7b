"""The inputs of a merge, detected from what is on disk, never by unpickling a file the user did
not write:

- a safetensors file (its JSON header parsed and checked here: sizes, offsets, dtypes);
- a Hugging Face model folder: ``model.safetensors``, or shards listed by
  ``model.safetensors.index.json`` (a ``pytorch_model.bin`` folder is read as a torch file);
- a torch ``.pt``/``.pth``/``.bin`` state dict (``torch.load(weights_only=True, mmap=True)``:
  :mod:`._torch_inputs`);
- a torch DCP checkpoint folder (``.metadata`` read through fastema's allow-list unpickler,
  :mod:`fastema._io.dcp_unpickler`; tensors through DCP's planner, one at a time:
  :mod:`._torch_inputs`);
- a post-hoc snapshot folder of :class:`fastema.torch.PostHocEMA` (:mod:`._snapshots`).

Each is a :class:`Source`: its entries (name, dtype, shape), its training step when it records
one, and reads of a tensor's elements. ``read`` says how safetensors and torch files are read: copied
in pieces into small buffers (``"pread"``, the default: a file that shrinks during the merge is a
MergeError naming it), or read in place, memory-mapped (``"mmap"``: a file another program shrinks
during the merge can kill the process with SIGBUS). DCP folders and post-hoc snapshots are read
whole, one tensor at a time, by their own readers, whatever ``read`` says (a safetensors snapshot
through the safetensors library, which maps it). Only regular files are opened; a symbolic-link
loop, a FIFO, a truncated or damaged file is a :class:`MergeError` naming the input (and the
tensor).
"""
from __future__ import annotations

import os
import stat

from .._io.safe_files import open_regular, os_problem, regular
from ._safetensors_input import INDEX, SafetensorsSource, hf_folder, meta_step, trainer_step
from ._source import Entry, MergeError, Source, refused, step_from_name

__all__ = ["Entry", "MergeError", "Source", "open_input", "step_from_name"]


def open_input(path, index: int, *, read: str = "pread", optimizer: bool = False) -> list:
    """The :class:`Source` (a list: a snapshot folder gives one per stored profile) of input
    ``index`` at ``path``, detected from what is there."""
    path = os.fspath(path)
    label = f"input {index} ({path})"
    try:
        st = os.stat(path)
    except OSError as err:
        raise MergeError(os_problem(path, f"input {index}", err)) from None
    if stat.S_ISDIR(st.st_mode):
        return _folder(path, label, index, read, optimizer)
    if not stat.S_ISREG(st.st_mode):
        with refused():
            regular(path, label)
    try:
        with refused(), open_regular(path, what=label) as f:
            magic = f.read(9)
    except OSError as err:
        raise MergeError(os_problem(path, label, err)) from None
    if path.lower().endswith(".safetensors") or _looks_like_safetensors(magic, st.st_size):
        src = SafetensorsSource(path, label, [path], read)
        from ._snapshots import snapshot_file
        snaps = snapshot_file(src, read)
        if snaps:
            src.close()
            return snaps
        step = meta_step(src.meta)
        src.step = step if step is not None else step_from_name(path)
        return [src]
    from ._torch_inputs import TorchFileSource
    return [TorchFileSource(path, label, optimizer, read)]


def _looks_like_safetensors(magic: bytes, size: int) -> bool:
    """A u64 header length that fits the file, then ``{``: a safetensors file whatever its name
    (a zip torch file starts with ``PK``, a legacy pickle with ``\\x80``)."""
    return len(magic) == 9 and 2 <= int.from_bytes(magic[:8], "little") <= size - 8 and magic[8:] == b"{"


def _folder(path: str, label: str, index: int, read: str, optimizer: bool) -> list:
    src = hf_folder(path, label, read)
    if src is not None:
        return [src]
    if os.path.lexists(os.path.join(path, ".metadata")):
        from ._torch_inputs import DcpSource
        return [DcpSource(path, label, optimizer)]
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if os.path.lexists(os.path.join(path, name)):
            from ._torch_inputs import TorchFileSource
            src = TorchFileSource(os.path.join(path, name), label, optimizer, read)
            src.folder, src.step = path, src.step if src.step is not None else trainer_step(path, label)
            return [src]
    from ._snapshots import snapshot_folder
    snaps = snapshot_folder(path, label, read)
    if snaps:
        return snaps
    raise MergeError(f"{label}: a folder with no checkpoint fastema reads (model.safetensors, {INDEX}, a DCP "
                     f".metadata, pytorch_model.bin, or post-hoc snapshots)")
