"""DCP snapshots (a sharded model's: a torch.distributed.checkpoint directory, with a ``.json`` of
its metadata beside it): :func:`save_dcp`, a collective of every rank, and the reading side. A
snapshot's ``.metadata``, the one pickle a snapshot folder holds, is parsed by the allow-list
unpickler (:mod:`.dcp_unpickler`, the security boundary), then checked whole by exact types
(:func:`check_dcp_metadata`) before anything reads it; its ``.distcp`` data goes through
``torch.load(weights_only=True)``. Tensors are read one at a time (:func:`dcp_reader`, with
``no_dist``: one rank alone may read), each bounded before it is allocated. Importing this module
imports the standard library only; torch when used.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import warnings
from typing import Any, Callable

from .dcp_unpickler import MAX_METADATA, PATHS, DcpMetadataUnpickler, named
from .files import atomic_write, renamed_in
from .safe_files import first_line, fits, not_regular, open_regular, out_of_memory, regular, root_error

__all__ = ["STALE_TMP_AGE", "check_dcp_metadata", "dcp_reader", "load_dcp_metadata", "remove_stale_tmps",
           "safe_reader_type", "save_dcp"]


# A DCP snapshot is written into ``.snapshot-<time>.tmp`` beside it, then renamed. A failed save removes
# its own (rank 0, once DCP has raised: see save_dcp); one left by a process that died mid-save is
# removed by a later save of this folder once it is STALE_TMP_AGE old: nothing in it written for that
# long. A live writer's folder changes while it writes (DCP writes every rank's file, then the
# metadata), and a writer stalled longer than that has outlived the process group's timeout (30 min
# by default) and failed; the save of the same time removes it at once (as a killed save's).
STALE_TMP_AGE = 3600.0
_TMP_NAME = re.compile(r"\.snapshot-(-?[0-9]+(\.[0-9]{6})?)\.tmp")     # .snapshot-<stamp>.tmp, fastema's only


def save_dcp(base: str, tensors: dict, meta: dict, decide: Callable[[str | None], None]) -> str:
    """The DCP snapshot ``base`` (see ``fastema.posthoc.write_snapshot``), a collective: every rank
    writes its shards into a temporary directory, renamed; rank 0 then writes ``meta`` beside it.

    A save that fails leaves nothing: DCP raises on every rank once all have stopped writing, and
    rank 0 then removes the temporary directory. Before writing, rank 0 removes the temporary
    directories of earlier saves to this folder that a dead process left: this time's at once,
    another time's once nothing in it has been written for :data:`STALE_TMP_AGE` seconds (a live
    writer's is never that old). Only fastema's names (``.snapshot-<time>.tmp``), only directories
    holding DCP's files and nothing else. ``decide(error)``: every rank joins with its error (None:
    none) and every rank raises an ``OSError`` when one has one (the ranks' agreement, injected:
    :func:`fastema.torch._state.decisions.decided`; this module makes no collective of its own)."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank = dist.get_rank()
    tmp = f"{os.path.dirname(base)}/.{os.path.basename(base)}.tmp"
    aside = tmp[:-len(".tmp")] + ".old"              # the snapshot of this time being replaced
    error = None
    if rank == 0:
        try:
            if os.path.lexists(aside):               # a save of this time killed between its renames:
                if os.path.lexists(base):            # after (the new one in) or before (the old one back)
                    shutil.rmtree(aside)
                else:
                    os.rename(aside, base)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)                   # left by a snapshot that was killed
        except OSError as err:
            error = f"could not clear {tmp!r} / {aside!r}, left by an earlier snapshot: {err}"
        remove_stale_tmps(os.path.dirname(base) or ".", keep=os.path.basename(tmp))
    decide(error)
    try:
        dcp.save(tensors, checkpoint_id=tmp)         # DCP raises on every rank when one could not write
    except CheckpointException as err:
        # Raised by DCP's last collective of the step that failed (gathered on rank 0, then broadcast),
        # which every rank enters only once its own writes have returned (DCP's default writer, one
        # thread): no rank writes into tmp any more, so no barrier is needed before removing it.
        left = ""
        if rank == 0:                                # DCP's coordinator: rank 0 of the default group
            try:
                shutil.rmtree(tmp)
            except FileNotFoundError:
                pass
            except OSError as removing:
                left = (f"; its temporary folder {tmp!r} could not be removed ({removing}): a later snapshot "
                        f"removes it")
        raise OSError(_errno_of(err), f"could not write the DCP snapshot {base!r}: {first_line(err)}{left}") \
            from None
    if rank == 0:
        error = _publish(tmp, base, aside, json.dumps({**meta, "kind": "dcp"}).encode())
    decide(error)
    return base


def _publish(tmp: str, base: str, aside: str, data: bytes) -> str | None:
    """The written ``tmp`` at ``base`` with its metadata ``data`` beside it (None), or why not (the
    folder as it was: a snapshot of this time already there, renamed ``aside`` first, is put back,
    its metadata untouched; a new one without metadata is never read and is removed)."""
    import shutil

    try:
        with renamed_in(tmp, base, aside):
            atomic_write(base + ".json", lambda f: f.write(data))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)        # (the rename failed)
        return str(err)
    return None


def remove_stale_tmps(directory: str, keep: str = "", *, age: float = STALE_TMP_AGE, now: float | None = None) -> list:
    """Remove the temporary directories of DCP snapshots that dead processes left in ``directory``:
    those named ``.snapshot-<time>.tmp`` (fastema's), but ``keep``, that are directories (not links)
    holding only DCP's files (``__<rank>_<n>.distcp``, ``.metadata``...: regular files), in which nothing
    was written for ``age`` seconds. Returns the paths removed; one that cannot be removed is
    warned about and left (a later save tries again)."""
    import shutil
    import time

    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name == keep or not _TMP_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            newest = st.st_mtime
            with os.scandir(path) as entries:
                for entry in entries:
                    est = entry.stat(follow_symlinks=False)
                    if not (stat.S_ISREG(est.st_mode) and entry.name.startswith(("__", ".metadata"))):
                        newest = math.inf            # not DCP's files alone: not ours to remove
                        break
                    newest = max(newest, est.st_mtime)
        except OSError:
            continue
        if now - newest < age:
            continue                                 # a live writer's, or too recent to tell
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            warnings.warn(f"could not remove {path!r}, the temporary folder of a DCP snapshot that was not "
                          f"finished: {err}", stacklevel=2)
            continue
        removed.append(path)
    return removed


def _errno_of(err: BaseException) -> int:
    import errno

    for failure in getattr(err, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
    return errno.EIO


# --------------------------------------------------------------------------- reading


def load_dcp_metadata(path: str):
    """DCP's ``Metadata`` from ``path`` (a regular file of at most :data:`MAX_METADATA` bytes that
    the memory free here holds) through :class:`DcpMetadataUnpickler`, then checked whole by
    exact types (:func:`check_dcp_metadata`) before anything reads it."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        if st.st_size > MAX_METADATA:
            raise ValueError(f"{path!r} is {st.st_size} bytes, more than the {MAX_METADATA} fastema reads as a DCP "
                             f"snapshot's metadata (a snapshot's holds about 100 bytes a tensor and shard): it is not "
                             f"one; move the snapshot (and its .json) out of the folder")
        fits(path, "its DCP metadata", st.st_size, {os.path.basename(path): st})
        try:
            md = DcpMetadataUnpickler(f, st.st_size).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path!r} was not loaded: {err}. Nothing of it ran: fastema builds DCP's metadata "
                             f"classes from it and nothing else. It is not a snapshot fastema wrote: remove this "
                             f"snapshot, or get an intact copy from its author") from None
        except MemoryError as err:
            raise MemoryError(f"{path!r}: {err or 'out of memory'}: synthesise on a machine with more memory, or, "
                              f"if the snapshot was not this large, move it (and its .json) out of the folder") \
                from None
        except Exception as err:                      # EOFError, a truncated or garbled pickle
            raise ValueError(f"{path!r} is not readable DCP metadata ({first_line(err)}); the snapshot is "
                             f"truncated or corrupt: move it (and its .json) out of the folder") from None
    check_dcp_metadata(path, md)
    return md


def check_dcp_metadata(path: str, md) -> None:
    """Every object of ``md`` by its exact type (no subclass, no other object of the process), the
    tensors' sizes and dtypes, data files inside the snapshot directory, regular files holding
    what it describes. ValueError naming ``path``."""
    import collections
    import pathlib

    import torch
    from torch.distributed.checkpoint import metadata as M

    from .. import _privates

    _StorageInfo = _privates.get("torch.distributed.checkpoint.filesystem:_StorageInfo")

    def bad(what: str):
        return ValueError(f"{path!r} is not DCP metadata a snapshot holds ({what}); the snapshot is corrupt: move "
                          f"it (and its .json) out of the folder")

    def field(obj, name: str):                        # an instance's field (its class default if not set)
        try:
            return getattr(obj, name)                 # exact DCP classes: no __getattr__ of theirs runs
        except AttributeError:
            raise bad(f"a {type(obj).__name__} without its {name!r}") from None

    none, size, dicts = type(None), torch.Size, (dict, collections.OrderedDict)
    paths = tuple(getattr(pathlib, n) for n in PATHS)

    def sizes(*values) -> bool:
        return all(type(v) is size and all(d >= 0 for d in v) for v in values)

    if type(md) is not M.Metadata:
        raise bad(named(md))
    entries = field(md, "state_dict_metadata")
    if type(entries) not in dicts:
        raise bad("no tensor table")
    for key, entry in entries.items():
        if type(key) is not str:
            raise bad(f"a key that is {named(key)}")
        if type(entry) is M.BytesStorageMetadata:
            continue
        if type(entry) is not M.TensorStorageMetadata:
            raise bad(f"{named(entry)} for {key[:80]!r}")
        props, shape, chunks = field(entry, "properties"), field(entry, "size"), field(entry, "chunks")
        if not (type(props) is M.TensorProperties and type(field(props, "dtype")) is torch.dtype and
                type(field(props, "layout")) is type(torch.strided) and
                type(field(props, "requires_grad")) is bool and type(field(props, "pin_memory")) is bool and
                type(field(props, "memory_format")) is type(torch.contiguous_format) and
                sizes(shape) and type(chunks) is list and
                all(type(c) is M.ChunkStorageMetadata and sizes(field(c, "offsets"), field(c, "sizes")) and
                    len(c.offsets) == len(c.sizes) == len(shape) for c in chunks)):
            raise bad(f"the entry of {key[:80]!r}")
    planner = field(md, "planner_data")
    if not (planner is None or type(planner) in dicts and all(
            type(k) is str and type(v) in (tuple, list) and all(type(p) in (str, int) for p in v)
            for k, v in planner.items())):
        raise bad("its planner data")
    storage = field(md, "storage_data")
    if type(storage) not in dicts:
        raise bad("no storage table")
    meta = field(md, "storage_meta")
    if not (meta is None or type(meta) is M.StorageMeta and type(field(meta, "checkpoint_id")) in (none, str, *paths)
            and type(field(meta, "save_id")) in (none, str) and type(field(meta, "load_id")) in (none, str) and
            type(field(meta, "modules")) is list and all(type(m) is str for m in meta.modules)):
        raise bad(f"its storage_meta, {named(meta)}")
    if type(field(md, "version")) not in (none, str):
        raise bad("its version")
    found: dict = {}
    for index, info in storage.items():
        if not (type(index) is M.MetadataIndex and type(field(index, "fqn")) is str and
                (field(index, "offset") is None or sizes(index.offset)) and
                type(field(index, "index")) in (none, int) and type(info) is _StorageInfo and
                type(field(info, "relative_path")) is str and
                os.path.basename(info.relative_path) == info.relative_path and
                info.relative_path not in ("", ".", "..") and "\\" not in info.relative_path and
                type(field(info, "offset")) is int and type(field(info, "length")) is int and info.offset >= 0 and
                info.length >= 0 and type(field(info, "transform_descriptors")) in (none, list, tuple)):
            raise bad(f"a storage entry {named(info)}")
        if info.transform_descriptors:                # compression: the stored sizes would not bound a read
            raise bad("a storage entry with transforms, which fastema's snapshots never use")
        name = info.relative_path
        if name not in found:                         # data inside this snapshot's directory, within its files
            data = os.path.join(os.path.dirname(path), name)
            try:
                st = os.stat(data)
            except FileNotFoundError:
                found[name] = -1
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise not_regular(data, st.st_mode)
                found[name] = st.st_size
        if info.offset + info.length > found[name]:
            have = found[name]
            raise ValueError(f"the DCP snapshot {os.path.dirname(path)!r}: its data file {name!r} "
                             f"{'is missing' if have < 0 else f'has {have} bytes'}, fewer than the "
                             f"{info.offset + info.length} its metadata describes: the snapshot is truncated; move "
                             f"it (and its .json) out of the folder to synthesise from the others")


_SAFE_READER: Any = None


def safe_reader_type():
    """``dcp.FileSystemReader`` whose metadata is one parsed and checked by :func:`load_dcp_metadata`:
    given (``metadata=``: a snapshot's, parsed once for all its reads), or parsed on demand (made once)."""
    global _SAFE_READER
    if _SAFE_READER is None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import StorageMeta

        class SafeReader(dcp.FileSystemReader):
            def __init__(self, path: Any, metadata: Any = None) -> None:
                super().__init__(path)
                self._metadata = metadata

            def read_metadata(self, *args: Any, **kwargs: Any):
                rank = kwargs.get("rank")
                if rank is None and self._metadata is not None:
                    md = self._metadata
                else:
                    name = ".metadata" if rank is None else f"__{int(rank)}.metadata"
                    md = load_dcp_metadata(os.path.join(os.fspath(self.path), name))
                if md.storage_meta is None:           # checked: a StorageMeta this reader made, or None
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
                return md

        _SAFE_READER = SafeReader
    return _SAFE_READER


def dcp_reader(path: str) -> Callable:
    """``read(key, want) -> tensor`` of the DCP snapshot folder ``path``: its metadata parsed and checked
    once (:func:`load_dcp_metadata`), each tensor read alone (``no_dist``), its size bounded before it is
    allocated; ``want``, the shape the snapshot's ``.json`` gives (or None). ValueError or MemoryError
    naming the snapshot and the tensor."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader_type = safe_reader_type()
    md = load_dcp_metadata(os.path.join(path, ".metadata"))          # parsed and checked once, for every read
    entries = md.state_dict_metadata
    stored: dict = {}                                   # tensor -> bytes its data files hold of it
    files_of: dict = {}                                 # tensor -> the data files holding it
    for index, info in md.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        files_of.setdefault(index.fqn, set()).add(info.relative_path)

    def read(key: str, want):
        meta = entries.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"the DCP snapshot {path!r} has no tensor {key!r}, which its metadata names; the "
                             f"snapshot is corrupt: move it (and its .json) out of the folder")
        size = list(meta.size)
        if want is not None and size != list(want) and size != [math.prod(want)]:
            raise ValueError(f"the DCP snapshot {path!r}: {key!r} has shape {size}, but its .json gives {want}; "
                             f"the snapshot is corrupt")
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        nbytes = math.prod(size) * itemsize
        if nbytes > stored.get(key, 0):                 # before allocating what a forged size asks for
            raise ValueError(f"the DCP snapshot {path!r}: {key!r} claims shape {size} ({math.prod(size)} "
                             f"values), but its data files hold {stored.get(key, 0)} bytes of it; the snapshot is "
                             f"corrupt")
        files = sorted(files_of.get(key, ()))
        fits(path, repr(key), nbytes, {f: regular(os.path.join(path, f)) for f in files})
        try:
            out = {key: torch.empty(tuple(size), dtype=meta.properties.dtype)}
        except (RuntimeError, MemoryError) as err:
            raise MemoryError(f"the DCP snapshot {path!r}: {nbytes} bytes for {key!r} could not be allocated "
                              f"({first_line(err)}): synthesise on a machine with more memory") from None
        try:
            with warnings.catch_warnings():
                # no_dist: this rank alone reads the full tensor (no collective, so rank 0 alone may synthesise)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=reader_type(path, metadata=md), no_dist=True)
        except (Exception, CheckpointException) as err:
            cause = root_error(err)
            if out_of_memory(cause):
                raise MemoryError(f"the DCP snapshot {path!r}: reading {key!r} ({nbytes} bytes, from "
                                  f"{', '.join(files)}) ran out of memory ({first_line(cause)}): synthesise on a "
                                  f"machine with more memory") from None
            why = (f"{', '.join(files)} holds a pickle that is not plain tensor data: torch.load(weights_only=True) "
                   f"refused it, nothing ran" if isinstance(cause, pickle.UnpicklingError) else
                   f"{', '.join(files)}: {first_line(cause)}")
            raise ValueError(f"the DCP snapshot {path!r}: tensor {key!r} could not be read ({why}); the "
                             f"snapshot is truncated or corrupt: move it (and its .json) out of the folder to "
                             f"synthesise from the others") from None
        return out[key]

    return read
