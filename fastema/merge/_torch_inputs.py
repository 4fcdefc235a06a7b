"""torch inputs of a merge: ``.pt``/``.pth``/``.bin`` state dicts read with
``torch.load(weights_only=True, mmap=True)`` (torch's restricted unpickler: a pickle that asks
for anything but tensors and plain containers is refused, nothing of it runs; tensors stay in
the file's memory map), and DCP checkpoint folders (below). The one module of
:mod:`fastema.merge` that imports torch.

A torch file's pieces are copied out of torch's map into small buffers (``read="pread"``, the
default) by a copy that a page past the file's end fails with EFAULT (:func:`._source.copy_mapped`),
so a file that shrinks while it is merged is a MergeError naming it and the tensor, whenever it
shrinks (where the system refuses that copy, they are read from the map as with ``mmap``). With
``read="mmap"`` the kernel reads them in the map, each piece's pages mapped first
(:func:`._source.populate`): a file that shrinks after that call, while the piece waits for the
kernel or is summed, kills the process with SIGBUS. A tensor saved as a strided view is made
contiguous from a copy of its bytes (``pread``) or from the map (``mmap``).

A checkpoint that wraps the model's state (``{"model": {...}, "optimizer": {...}, "step": 5}``:
fairseq, Megatron, Lightning's ``state_dict``, DeepSpeed's ``module``) is read from that entry;
optimizer and scheduler state is left out unless asked for (then copied from the ``copy_from``
input, never averaged); other entries outside the model's state are left out. Nested dicts are
flattened with dots.
"""
from __future__ import annotations

import ctypes
import errno
import math
import pickle
import re
from typing import Any

import numpy as np

from .._io.safe_files import open_regular, os_problem, regular
from .._io.safetensors import ITEMSIZE
from ._source import (
    DONTNEED,
    OBJECT,
    Entry,
    MergeError,
    Source,
    WholeTensorSource,
    advise,
    copy_mapped,
    populate,
    read_problem,
    refused,
    step_from_name,
)

__all__ = ["DcpSource", "TorchFileSource"]

_ROOTS = ("state_dict", "model", "module", "model_state_dict")
_OPTIMIZER = re.compile(r"optim|scheduler|lr_sched|scaler", re.I)
_STEPS = ("global_step", "step", "iteration", "num_updates", "train_step")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchFileSource(Source):
    """A torch state dict file (see the module)."""

    format = "torch"

    def __init__(self, path: str, label: str, optimizer: bool = False, read: str = "pread"):
        import torch

        super().__init__(path, label)
        self._read = read
        with refused():
            regular(path, label)
        try:
            with refused(), open_regular(path, what=label) as f:
                magic = f.read(4)
        except OSError as err:
            raise MergeError(os_problem(path, label, err)) from None
        if magic != b"PK\x03\x04":
            legacy = magic[:1] == b"\x80"
            raise MergeError(f"{label} is " + ("a torch checkpoint in torch's legacy (pre-1.6) format, which cannot be "
                                              "memory-mapped: load and torch.save it again" if legacy else
                             "neither a safetensors file nor a torch checkpoint (torch.save's zip format): it is "
                             "damaged or of another kind"))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise MergeError(f"{label} holds a pickle that is not plain tensor data: torch.load(weights_only=True) "
                             f"refused it and nothing of it ran ({_first_line(err)[:200]}); merge only checkpoints "
                             f"of tensors") from None
        except (RuntimeError, EOFError, ValueError, OSError) as err:
            if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
                raise MergeError(os_problem(path, label, err)) from None
            legacy = "zipfile" in str(err) or "mmap" in str(err)
            raise MergeError(f"{label} is not a readable torch checkpoint ({_first_line(err)[:200]}): it is truncated "
                             f"or damaged" + ("; or saved in torch's legacy format: load and torch.save it again"
                                              if legacy else "")) from None
        if not isinstance(state, dict):
            raise MergeError(f"{label} holds a {type(state).__name__}, not a state dict (a dict of tensors)")
        root, outside = self._root(state)
        self._tensors: dict = {}
        self._values: dict = {}
        self._dense: dict = {}                 # name -> a C-order copy of a tensor saved as a strided view
        self._flatten(root, "")
        for key, value in outside.items():
            if _OPTIMIZER.search(str(key)):
                if optimizer and isinstance(value, dict):
                    before = set(self.entries)
                    self._flatten(value, f"{key}.")
                    self.copied.update(dict.fromkeys(set(self.entries) - before, "optimizer state"))
                else:
                    self.dropped.append(str(key))
            elif key not in _STEPS:
                self.dropped.append(str(key))
        self.step = self._step(state, root) if self._step(state, root) is not None else step_from_name(path)
        if not any(e.dtype != OBJECT for e in self.entries.values()):
            raise MergeError(f"{label} holds no tensors: not a state dict")

    @staticmethod
    def _root(state: dict) -> tuple:
        for key in _ROOTS:
            inner = state.get(key)
            if isinstance(inner, dict) and _has_tensor(inner):
                return inner, {k: v for k, v in state.items() if k != key}
        return state, {}

    def _flatten(self, tree: dict, prefix: str) -> None:
        import torch

        for key, value in tree.items():
            name = f"{prefix}{key}"
            if name in self.entries:                        # {"a.b": t, "a": {"b": u}}, {0: t, "0": u}
                raise MergeError(f"{self.label}: entry {name!r} is stored twice (under two keys that flatten to "
                                 f"one name); a merge would keep one of them: rename one in the checkpoint")
            if isinstance(value, dict):
                self._flatten(value, name + ".")
            elif isinstance(value, torch.Tensor):
                if value.is_sparse or value.layout != torch.strided:
                    raise MergeError(f"{self.label}: tensor {name!r} is {value.layout}; fastema merges dense tensors")
                dtype = dtype_name(value.dtype)
                if dtype not in ITEMSIZE:
                    raise MergeError(f"{self.label}: tensor {name!r} is {dtype}, a dtype fastema does not read "
                                     f"(safetensors has no code for it); convert it, or leave it out of the "
                                     f"checkpoint")
                storage = (value.data_ptr(), tuple(value.shape), value.stride(), dtype) if value.numel() else None
                self.entries[name] = Entry(name, dtype, tuple(value.shape), value.numel() * value.element_size(),
                                           storage)
                self._tensors[name] = value
            else:
                self.entries[name] = Entry(name, OBJECT, (), 0)
                self._values[name] = value

    def _step(self, state: dict, root: dict) -> int | None:
        for tree in (state, root):
            for key in _STEPS:
                v: Any = tree.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
                if hasattr(v, "numel") and v.numel() == 1 and not v.is_floating_point():
                    return int(self._contiguous(key, v))         # its bytes copied out of the map first
        return None

    def _address(self, name: str) -> int:
        t = self._tensors[name]
        if not t.is_contiguous():                      # a view saved as it was: a C-order copy until done()
            if name not in self._dense:
                self._dense[name] = self._contiguous(name, t)
            t = self._dense[name]
        return t.data_ptr()

    def _contiguous(self, name: str, t):
        """A C-order copy of the strided view ``t``; with ``pread``, made from a copy of the bytes it
        spans, never read in the map."""
        import torch

        if self._read == "mmap":
            return t.contiguous()
        span = (sum((n - 1) * step for n, step in zip(t.shape, t.stride())) + 1) * t.element_size()
        raw = torch.empty(span, dtype=torch.uint8)
        if not self._copied(name, raw.data_ptr(), t.data_ptr(), span):
            return t.contiguous()
        return raw.view(t.dtype).as_strided(t.shape, t.stride()).contiguous()

    def _copied(self, name: str, dst: int, src: int, nbytes: int) -> bool:
        """``nbytes`` at ``src`` (in the map) copied to ``dst`` with no risk of SIGBUS; False where the
        system refuses the copy (then read in the map)."""
        try:
            return copy_mapped(dst, src, nbytes)
        except OSError as err:
            raise read_problem(self.label, name, err) from None

    def piece(self, name: str, lo: int, count: int, scratch: np.ndarray) -> int:
        itemsize = ITEMSIZE[self.entries[name].dtype]
        address = self._address(name) + lo * itemsize
        if self._read == "pread" and name not in self._dense:
            if self._copied(name, scratch.ctypes.data, address, count * itemsize):
                return scratch.ctypes.data
        self._populate(name, address, count * itemsize)
        return address

    def raw(self, name: str, lo: int, nbytes: int, scratch: np.ndarray) -> memoryview:
        if nbytes == 0:
            return memoryview(b"")
        address = self._address(name) + lo
        if self._read == "pread" and name not in self._dense:
            if self._copied(name, scratch.ctypes.data, address, nbytes):
                return scratch.view(np.uint8).data[:nbytes]
        self._populate(name, address, nbytes)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address)).data

    def _populate(self, name: str, address: int, nbytes: int) -> None:
        """The pages of a piece mapped before they are read: MergeError where the file shrank (they
        lie past its end: reading them would be SIGBUS). Where the system cannot populate, they are
        read as they are (torch keeps the file's map; a file shrinking then is still SIGBUS)."""
        try:
            populate(address, nbytes)
        except OSError as err:
            raise read_problem(self.label, name, err) from None

    def value(self, name: str) -> Any:
        return self._values[name]

    def done(self, name: str) -> None:
        if self._dense.pop(name, None) is None and name in self._tensors:
            advise(self._tensors[name].data_ptr(), self.entries[name].nbytes, DONTNEED)

    def close(self) -> None:
        self._tensors, self._values, self._dense = {}, {}, {}


def _check_covered(label: str, key: str, shape: tuple, chunks, stored: int, itemsize: int) -> None:
    """MergeError unless ``chunks`` (a DCP tensor's ``ChunkStorageMetadata``) lie inside ``shape``, do not
    overlap and cover it, and the data files hold its bytes (``stored``): a DCP load leaves what no
    chunk covers as it was, so an uncovered value would be merged from uninitialised memory."""
    total = math.prod(shape)
    boxes = []
    for c in chunks:
        off, size = [int(v) for v in c.offsets], [int(v) for v in c.sizes]
        if len(off) != len(shape) or len(size) != len(shape) or any(
                o < 0 or n < 0 or o + n > d for o, n, d in zip(off, size, shape)):
            raise MergeError(f"{label}: tensor {key!r} has a chunk at {off} of size {size} outside its shape "
                             f"{list(shape)}; the checkpoint is damaged")
        boxes.append((off, size))
    volume = sum(math.prod(n) for _, n in boxes)
    overlap = len(boxes) <= 1024 and any(
        all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1]))
        for i, a in enumerate(boxes) for b in boxes[i + 1:] if math.prod(a[1]) and math.prod(b[1]))
    if volume != total or overlap:
        raise MergeError(f"{label}: tensor {key!r}: its chunks {'overlap' if overlap else f'hold {volume} values'} "
                         f"where its shape {list(shape)} has {total}; the checkpoint is damaged (a merge would read "
                         f"values no chunk holds)")
    if stored < total * itemsize:
        raise MergeError(f"{label}: tensor {key!r} needs {total * itemsize} bytes, but its data files hold "
                         f"{stored}; the checkpoint is truncated or damaged")


def _has_tensor(tree: dict) -> bool:
    import torch

    return any(isinstance(v, torch.Tensor) or (isinstance(v, dict) and _has_tensor(v)) for v in tree.values())


_SNAPSHOT_WORDS = (                 # fastema.posthoc's DCP checks speak of snapshots; here it is a checkpoint
    ("; move it (and its .json) out of the folder to synthesise from the others", ""),
    ("; move it (and its .json) out of the folder", ""),
    (" It is not a snapshot fastema wrote: remove this snapshot, or get an intact copy from its author",
     " Get an intact copy of the checkpoint"),
    ("DCP metadata a snapshot holds", "DCP metadata"), ("a snapshot's metadata", "a checkpoint's metadata"),
    ("the DCP snapshot", "the DCP checkpoint"), ("the snapshot is", "the checkpoint is"),
    ("synthesise on a machine", "merge on a machine"))


def _as_checkpoint(message: str) -> str:
    message = " ".join(message.split())
    for old, new in _SNAPSHOT_WORDS:
        message = message.replace(old, new)
    return message


class DcpSource(WholeTensorSource):
    """A torch DCP checkpoint folder (any number of shards, any sharding). Its ``.metadata`` (a pickle)
    is read only through fastema's allow-list unpickler (:mod:`fastema._io.dcp_unpickler`), and
    checked by exact types against the data files before anything is read
    (:func:`fastema._io.dcp.load_dcp_metadata`); each tensor is read whole through DCP's planner
    (``dcp.load`` of that one tensor, ``no_dist``), its shards assembled by DCP. Not readable in pieces
    (:attr:`mappable` False): a merge sums DCP inputs one at a time, one tensor in memory. Optimizer
    state (``optimizer.*``) is left out unless asked for; a ``model.`` prefix common to every other
    tensor is dropped from the names; non-tensor entries are not read."""

    format = "dcp"

    def __init__(self, path: str, label: str, optimizer: bool = False):
        import os

        from .._io.dcp import load_dcp_metadata

        super().__init__(path, label)
        try:
            self._md = load_dcp_metadata(os.path.join(path, ".metadata"))
        except (ValueError, MemoryError, OSError) as err:
            raise MergeError(f"{label}: {_as_checkpoint(str(err))}") from None
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entries = self._md.state_dict_metadata
        model = [k for k in entries if not _OPTIMIZER.match(k.split(".", 1)[0])]
        strip = "model." if model and all(k.startswith("model.") for k in model) else ""
        self._fqn: dict = {}
        stored: dict = {}                                # key -> bytes its data files hold of it
        for index, info in self._md.storage_data.items():
            stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        for key, meta in entries.items():
            if _OPTIMIZER.match(key.split(".", 1)[0]):
                if not optimizer:
                    self.dropped.append(key)
                    continue
            name = key[len(strip):] if key.startswith(strip) else key
            if isinstance(meta, TensorStorageMetadata):
                dtype = dtype_name(meta.properties.dtype)
                if dtype not in ITEMSIZE:
                    raise MergeError(f"{label}: tensor {key!r} is {dtype}, a dtype fastema does not read")
                shape = tuple(int(d) for d in meta.size)
                _check_covered(label, key, shape, meta.chunks, stored.get(key, 0), ITEMSIZE[dtype])
                self.entries[name] = Entry(name, dtype, shape, math.prod(shape) * ITEMSIZE[dtype])
            else:
                self.entries[name] = Entry(name, OBJECT, (), 0)
            self._fqn[name] = key
            if key.startswith("optimizer"):
                self.copied[name] = "optimizer state"
        self.step = step_from_name(path)

    def _tensor(self, name: str):
        t = self._loaded.get(name)
        if t is not None:
            return t
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        from .._io.dcp import safe_reader_type
        from .._io.safe_files import fits

        e = self.entries[name]
        try:
            fits(self.path, repr(name), e.nbytes, {})   # before a forged size is allocated
        except MemoryError as err:
            raise MergeError(f"{self.label}: {err}") from None
        try:
            out = {self._fqn[name]: torch.empty(e.shape, dtype=getattr(torch, e.dtype))}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=safe_reader_type()(self.path, metadata=self._md), no_dist=True)
        except (Exception, CheckpointException) as err:  # a shard truncated, missing or damaged
            cause = getattr(err, "failures", None)
            if isinstance(cause, dict) and cause:
                failure = next(iter(cause.values()))
                err = failure[0] if isinstance(failure, tuple) else failure
            refused = isinstance(err, pickle.UnpicklingError)
            raise MergeError(f"{self.label}: tensor {name!r} could not be read ("
                             + ("a data file holds a pickle that is not plain tensor data: torch.load(weights_only="
                                "True) refused it, nothing ran" if refused else _first_line(err)[:200])
                             + "); the checkpoint is truncated or damaged") from None
        self._loaded[name] = out[self._fqn[name]]           # until done(name): a piece may still be read
        return self._loaded[name]

