"""THE post-hoc snapshot file format: written and read here, and nowhere else.

Snapshot files (written by :class:`fastema.torch.PostHocEMA` through :func:`write_snapshot`) are
safetensors, one per snapshot (a sharded model's: one DCP checkpoint directory each, with a
``.json`` of the same metadata beside it), every tracked profile in each: the tensor
``"{k}:{name}"`` is profile ``k`` of the averaged tensor ``name``, ``"model:{name}"`` a tensor
that is not averaged (copied buffers, excluded tensors; taken from the last snapshot), and the
metadata (:class:`SnapshotMeta`, strings only) holds the run id, the time, the exponents, the
names and shapes, and (safetensors) a CRC-32 of every tensor's bytes. The metadata, the tensor
keys and run ids are spelled in :mod:`._meta` only.

Version 2 (this one) adds the run id, every tensor's shape, the checksums and tensors stored as
their bytes (dtypes safetensors has no name for); version 1 snapshots, and those of a run resumed
from a 0.1 checkpoint (:data:`LEGACY_RUN_ID`), are read as one legacy run, never mixed with
another. One folder holds one run: :func:`read_snapshots` refuses a folder that mixes runs or
shapes; :func:`fastema.posthoc.check_folder` is what a writer asks before it writes.

Reading executes nothing from the folder. Safetensors and JSON hold no code; the one pickle, a
DCP snapshot's ``.metadata`` (at most 256 MiB; from 16 MiB, no more than the memory free), goes
through an allow-list unpickler that builds DCP's metadata classes and nothing else
(:mod:`fastema._io.dcp_unpickler`, the security boundary), and is then checked by exact types before
anything reads it (:mod:`fastema._io.dcp`); a DCP snapshot's ``.distcp`` data goes through
``torch.load(weights_only=True)``. Only regular files are opened (a FIFO or a device named like a
snapshot's file is refused, never read: :mod:`fastema._io.safe_files`). Reading is one tensor at a time
(:func:`tensor_reader`: a safetensors snapshot with ``pread`` of each tensor's bytes from one
descriptor held open, its header parsed from it, never a memory map; a DCP snapshot with
``no_dist`` and its metadata parsed once), every tensor checked (shape, dtype, checksum) and its
size bounded before it is allocated: by the bytes its data files hold, and, from 16 MiB, by the
memory free here (a MemoryError, which says so when the files are not fully stored on disk:
sparse or compressed). The held descriptor keeps the file it opened: a snapshot removed or
renamed over while it is read is read whole; one truncated in place is a ValueError naming it
(never SIGBUS); one rewritten in place fails its checksum. Importing this module imports numpy
only; torch when a tensor is read or written.
"""
from __future__ import annotations

import errno
import json
import math
import os
import zlib
from typing import Any, Callable

from .._io.dcp import dcp_reader, save_dcp
from .._io.files import atomic_write
from .._io.safe_files import (
    FileRefused,
    few,
    first_line,
    fits,
    open_regular,
    out_of_memory,
    pread_into,
    regular,
)
from .._io.safetensors import SAFETENSORS_DTYPES, read_header
from ._meta import (  # noqa: F401  (re-exported: the format's names, importable from here)
    FORMAT,
    LEGACY_RUN_ID,
    SNAPSHOT_DTYPES,
    VERSION,
    Snapshot,
    SnapshotError,
    SnapshotMeta,
    kept_key,
    profile_key,
    same_run,
    split_key,
    stamp,
    valid_run_id,
)

__all__ = ["FORMAT", "LEGACY_RUN_ID", "VERSION", "Snapshot", "SnapshotError", "SnapshotMeta", "read_snapshots",
           "same_run", "write_snapshot"]

_MAX_JSON = 64 << 20                  # a DCP snapshot's .json is small; a larger file is not one


# --------------------------------------------------------------------------- reading


def _label(path: str) -> str:
    """How :func:`~fastema._io.safetensors.read_header`'s refusals name a snapshot's file."""
    return f"snapshot ({path})"


def _unreadable(err: FileRefused) -> ValueError:
    return ValueError(f"{err}; it is not a readable safetensors snapshot: move it out of the "
                      f"folder to synthesise from the others")


def _safetensors_metadata(path: str) -> dict:
    regular(path)                           # a FIFO or device is refused, never opened
    with open_regular(path) as f:           # (one swapped in since: refused, opened not blocking)
        try:
            return read_header(path, _label(path), f.fileno()).metadata
        except FileRefused as err:          # truncated, empty, damaged: not a safetensors file
            raise _unreadable(err) from None


def _json_metadata(path: str) -> dict:
    with open_regular(path) as f:
        data = f.read(_MAX_JSON + 1)
    try:
        if len(data) > _MAX_JSON:
            raise ValueError(f"larger than {_MAX_JSON} bytes")
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path!r} is not a DCP snapshot's metadata (not JSON: {first_line(err)}); it is "
                         f"corrupt: move it (and its directory) out of the folder to synthesise from the others") \
            from None
    return meta


def snapshot_at(directory: str, name: str) -> Snapshot | None:
    """The snapshot whose file in ``directory`` is ``name`` (None: not a snapshot's name)."""
    path = os.path.join(directory, name)
    if not name.startswith("snapshot-"):
        return None
    if name.endswith((".json", ".safetensors")) and os.path.islink(path) and not os.path.exists(path):
        raise FileRefused(f"{path!r} is a symbolic link to nothing (to {os.readlink(path)!r}, or a loop of links): "
                          f"a snapshot is made of regular files; move it out of the folder")
    if name.endswith(".json"):                    # a sharded model's DCP snapshot
        meta = _json_metadata(path)
        data = path[:-len(".json")]
        m = SnapshotMeta.from_metadata(meta, path)
        if m.kind != "dcp":
            raise ValueError(f"{path!r} is a snapshot's .json, but its kind is {m.kind!r}, not 'dcp'")
        if not os.path.isdir(data):
            aside = os.path.join(directory, f".{os.path.basename(data)}.old")
            mend = (f": a save of that time was stopped while it replaced it, and the old one is "
                    f"{aside!r}; rename it back to {data!r}" if os.path.isdir(aside) else "")
            raise FileNotFoundError(f"{path!r} describes a DCP snapshot, but {data!r} is missing{mend}")
    elif name.endswith(".safetensors"):
        data = path
        m = SnapshotMeta.from_metadata(_safetensors_metadata(path), path)
        if m.kind != "safetensors":
            raise ValueError(f"{path!r} is a safetensors file, but its metadata says kind {m.kind!r}")
    else:
        return None
    own = f"snapshot-{stamp(m.time)}{os.path.splitext(name)[1]}"
    if name != own:                               # a writer at that time would replace it
        raise ValueError(f"{path!r} holds the snapshot of time {m.time:g} (its metadata), whose "
                         f"name is {own!r}: was it renamed? Give it its name back, or move it out "
                         f"of the folder")
    return Snapshot(data, m.time, m.updates, m.gammas, m.averaged, m.others, m.kind, m.shapes, m.run_id, m)


def _run_name(run_id: str | None) -> str:
    return "version-1 snapshots (no run id)" if run_id is None else f"run {run_id}"


def read_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``directory`` (their metadata only, checked), by time.

    Refuses (``ValueError`` naming the files) a file named like a snapshot that is not a readable
    one (or not a regular file), a folder that holds the snapshots of more than one run (version-1
    snapshots, and those of a run resumed from a 0.1 checkpoint, count as one legacy run), two
    snapshots of one time, and snapshots whose tensors' names or shapes differ. Subfolders
    (``superseded-*``: snapshots a resumed run moved aside) are not read.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory of post-hoc EMA snapshots")
    out = []
    for name in sorted(os.listdir(directory)):
        snap = snapshot_at(directory, name)
        if snap is not None:
            out.append(snap)
    if not out:
        raise FileNotFoundError(f"no snapshot-*.safetensors files (or snapshot-*.json DCP snapshots) in "
                                f"{directory!r}")
    runs: dict = {}
    for s in out:
        runs.setdefault(same_run(s.run_id), []).append(s.path)
    if len(runs) > 1:
        listed = "; ".join(f"{_run_name(r)}: {few(p)}" for r, p in runs.items())
        raise ValueError(f"{directory!r} holds the snapshots of {len(runs)} runs ({listed}). Synthesis combines "
                         f"the snapshots of one run: move each run's snapshots into a folder of its own")
    out.sort(key=lambda s: s.time)
    for a, b in zip(out, out[1:]):
        if a.time == b.time:
            raise ValueError(f"{a.path!r} and {b.path!r} are two snapshots of time {a.time:g}: keep one of them")
    last = out[-1]
    for s in out:
        if s.averaged != last.averaged:
            raise ValueError(f"{s.path!r} holds other tensors than {last.path!r}: snapshots of different "
                             f"models in one directory")
        for n in last.averaged:
            if n in s.shapes and n in last.shapes and s.shapes[n] != last.shapes[n]:
                raise ValueError(f"{s.path!r} stores {n!r} with shape {s.shapes[n]}, {last.path!r} with shape "
                                 f"{last.shapes[n]}: snapshots of different models in one directory")
    return out


# --------------------------------------------------------------------------- writing


def write_snapshot(directory: str, time: float, tensors: dict, meta: SnapshotMeta | dict, *,
                   sharded: bool = False, decide: Callable[[str | None], None] | None = None) -> str:
    """Write one snapshot of time ``time`` into ``directory``, whole or not at all; returns its path.

    ``tensors``: ``"{k}:{name}"`` (profile ``k``, :func:`profile_key`) and ``"model:{name}"``
    (:func:`kept_key`) entries; ``meta``: the metadata strings (format, version, run id, time,
    gammas, names, shapes). A plain model's snapshot is one safetensors file (temporary file, then
    rename), ``tensors`` mapping to ``(tensor, dtype)`` pairs streamed one at a time
    (:func:`fastema._io.safetensors.stream_safetensors`), with the CRC-32 of every tensor's
    bytes in the metadata (``checksums``). A sharded model's (``tensors`` holding DTensors) is a
    collective: one DCP checkpoint directory written by every rank from its own shards into a
    temporary directory, renamed, then the metadata ``.json`` beside it, written last by rank 0:
    readers ignore a snapshot without it. Every rank raises the same error when a rank could not
    write: ``decide(problem)``, the ranks' agreement a sharded snapshot is made with
    (:func:`fastema.torch._state.decisions.decided`). ``meta`` may be a :class:`SnapshotMeta` (written
    through :meth:`SnapshotMeta.to_metadata`)."""
    if isinstance(meta, SnapshotMeta):
        meta = meta.to_metadata()
    base = os.path.join(directory, f"snapshot-{stamp(time)}")
    if sharded:
        if decide is None:
            raise TypeError("write_snapshot(sharded=True) is a collective: pass decide=, the ranks' "
                            "agreement (fastema.torch._state.decisions.decided)")
        return save_dcp(base, tensors, meta, decide)
    from .._io.safetensors import stream_safetensors

    atomic_write(base + ".safetensors", lambda f: stream_safetensors(f, tensors, meta, checksums="checksums"))
    return base + ".safetensors"


def add_kept(tensors: dict, raw: dict, name: str, tensor) -> None:
    """Put ``tensor``, kept as it is (not averaged), into a plain snapshot's ``tensors`` (for
    :func:`write_snapshot`) as ``"model:{name}"``: in its dtype when every safetensors release reads
    it, else (complex, uint16/32/64, float8...) as its bytes (uint8), its dtype's name in ``raw``
    (:attr:`SnapshotMeta.raw`), which the reader views them as again. Every face's writer keeps
    tensors through this one."""
    import torch

    key, dtype = kept_key(name), str(tensor.dtype).removeprefix("torch.")
    if dtype in SAFETENSORS_DTYPES:
        tensors[key] = (tensor, tensor.dtype)
    else:
        tensors[key] = (tensor.reshape(-1).view(torch.uint8), torch.uint8)
        raw[key] = dtype


# --------------------------------------------------------------------------- reading tensors


def tensor_reader(snap: Snapshot) -> TensorReader:
    """The :class:`TensorReader` of one snapshot (``reader(key) -> tensor``; ``reader.close()``)."""
    return TensorReader(snap)


class Scratch:
    """One buffer that reads reuse (:class:`TensorReader`'s ``scratch``), grown to the largest
    tensor read into it: for a tensor used and dropped before the next read (a synthesis's
    profiles), no fresh memory (and its page faults) for each read."""

    def __init__(self) -> None:
        self._buffer: Any = None

    def take(self, nbytes: int):
        """A uint8 tensor of ``nbytes`` bytes: the buffer's first, valid until the next call."""
        import torch

        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None                    # the old one freed before the larger is made
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


class TensorReader:
    """``key -> tensor`` of one snapshot, read on demand (one tensor at a time), each checked: a
    key the metadata names, the shape the metadata gives (or the flat form of a ZeRO-3
    partition), a floating dtype for the profiles, the checksum; tensors stored as bytes get their
    dtype back. Every refusal is a ValueError naming the file and the tensor. A safetensors
    snapshot is read with ``pread`` from one descriptor held until :meth:`close` (see
    :class:`_SafetensorsFile`), a DCP snapshot through its metadata parsed once. ``reader(key,
    scratch)``: a safetensors tensor read into a :class:`Scratch` (its memory, valid until the
    scratch's next read) instead of memory of its own."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self._file = _SafetensorsFile(snap) if snap.kind != "dcp" else None
        self._dcp: Any = dcp_reader(snap.path) if self._file is None else None

    def _expected(self, key: str):
        meta = self.snap.meta
        if meta is None or meta.version < 2:
            return None
        return meta.shapes.get(split_key(key)[0])

    def __call__(self, key: str, scratch: Scratch | None = None):
        import torch

        snap, meta = self.snap, self.snap.meta
        want = self._expected(key)
        t = self._file.read(key, want, scratch) if self._file is not None else self._dcp(key, want)
        averaged = not split_key(key)[1]
        if meta is not None and key in meta.raw:
            dtype = getattr(torch, meta.raw[key], None)
            if not isinstance(dtype, torch.dtype) or t.dtype != torch.uint8:
                raise ValueError(f"{snap.path!r}: {key!r} is stored as {t.dtype}, with raw dtype "
                                 f"{meta.raw[key]!r}; the snapshot is corrupt")
            try:
                t = t.reshape(-1).view(dtype).reshape(want if want is not None else (-1,))
            except RuntimeError as err:
                raise ValueError(f"{snap.path!r}: {key!r} does not hold whole {dtype} values ({err}); the "
                                 f"snapshot is corrupt") from None
        if want is not None and list(t.shape) != list(want) and not (
                averaged and t.dim() == 1 and t.numel() == math.prod(want)):
            raise ValueError(f"{snap.path!r}: {key!r} has shape {list(t.shape)}, but the metadata gives {want}; "
                             f"the snapshot is corrupt: move it out of the folder to synthesise from the others")
        if averaged and not t.is_floating_point():
            raise ValueError(f"{snap.path!r}: the profile {key!r} is {t.dtype}, not a floating dtype; the snapshot "
                             f"is corrupt")
        return t

    def close(self) -> None:
        """Closes the snapshot's file (a DCP snapshot's reader holds none)."""
        if self._file is not None:
            self._file.close()


class _SafetensorsFile:
    """A safetensors snapshot's tensors, each read with ``pread`` of its byte range into a tensor
    of its own (no memory map), from one descriptor opened when the reader is made, its header
    parsed from that descriptor (:func:`fastema._io.safetensors.read_header`: every field checked
    against the file). The descriptor keeps the file: a snapshot removed or renamed over while it
    is read is read whole. A snapshot truncated in place reads short: a ValueError naming it,
    never SIGBUS; one rewritten in place fails its checksum (a ValueError naming it)."""

    def __init__(self, snap: Snapshot) -> None:
        self.path = snap.path
        self.checksums = snap.meta.checksums if snap.meta is not None else {}
        self.checked = snap.meta is not None and snap.meta.version >= 2   # the writer's CRC of every tensor
        try:
            regular(snap.path)                  # a FIFO or device is refused, never opened
            self._f = open_regular(snap.path)
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                raise OSError(err.errno, f"{snap.path!r} cannot be opened: too many open files "
                                         f"(a synthesis holds one descriptor per snapshot it "
                                         f"combines): raise the limit on open files (`ulimit "
                                         f"-n`), or synthesise from fewer snapshots (time=)") \
                    from None
            raise
        try:
            self.st = os.fstat(self._f.fileno())
            self.tensors = read_header(snap.path, _label(snap.path), self._f.fileno()).tensors
        except FileRefused as err:
            self._f.close()
            raise _unreadable(err) from None
        except BaseException:
            self._f.close()
            raise

    def read(self, key: str, want, scratch: Scratch | None = None):
        import torch

        path = self.path
        if key not in self.tensors:
            raise ValueError(f"{path!r} has no tensor {key!r}, which its metadata names; the "
                             f"snapshot is corrupt: move it out of the folder to synthesise from "
                             f"the others")
        if self._f.closed:
            raise ValueError(f"{path!r} was closed: its reader is not used after close()")
        if self.checked and key not in self.checksums:
            raise ValueError(f"{path!r} has no checksum of tensor {key!r} in its metadata, where fastema "
                             f"writes one of every tensor: the snapshot was changed after it was written, "
                             f"and a damaged tensor could not be told; move it out of the folder to "
                             f"synthesise from the others")
        dtype, shape, nbytes, offset = self.tensors[key]
        fits(path, repr(key), nbytes, {os.path.basename(path): self.st})
        try:
            if scratch is None:
                data = torch.empty(nbytes, dtype=torch.uint8)
            else:
                data = scratch.take(nbytes)
        except (RuntimeError, MemoryError) as err:
            if out_of_memory(err):
                raise MemoryError(f"{path!r}: reading {key!r} ({nbytes} bytes) ran out of memory "
                                  f"({first_line(err)}): synthesise on a machine with more "
                                  f"memory") from None
            raise
        view = data.numpy().data               # a memoryview of its bytes
        try:
            got = pread_into(self._f.fileno(), view, offset)
        except OSError as err:
            raise ValueError(f"{path!r}: tensor {key!r} could not be read ({err.strerror or err}): "
                             f"the disk failed, or the file was damaged; move it out of the "
                             f"folder") from None
        if got < nbytes:
            now = os.fstat(self._f.fileno()).st_size
            raise ValueError(f"{path!r} was truncated while it was read: it has {now} bytes now "
                             f"({self.st.st_size} when it was opened), and tensor {key!r} lies at "
                             f"bytes {offset} to {offset + nbytes}. Let nothing rewrite, truncate "
                             f"or clean up snapshots while they are synthesised; move it out of "
                             f"the folder to synthesise from the others")
        if key in self.checksums:
            crc = f"{zlib.crc32(view):08x}"
            if crc != self.checksums[key]:
                raise ValueError(f"{path!r}: tensor {key!r} fails its checksum (CRC-32 {crc}, "
                                 f"written {self.checksums[key]}): the file was changed or "
                                 f"damaged on disk after it was written. Move it out of the "
                                 f"folder to synthesise from the others")
        return data.view(getattr(torch, dtype)).reshape(shape)

    def close(self) -> None:
        self._f.close()
