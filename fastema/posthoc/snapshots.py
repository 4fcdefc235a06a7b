"""THE post-hoc snapshot file format: written and read here, and nowhere else.

Snapshot files (written by :class:`fastema.torch.PostHocEMA` through :func:`write_snapshot`) are
safetensors, one per snapshot (a sharded model's: one DCP checkpoint directory each, with a
``.json`` of the same metadata beside it), every tracked profile in each: the tensor
``"{k}:{name}"`` is profile ``k`` of the averaged tensor ``name``, ``"model:{name}"`` a tensor
that is not averaged (copied buffers, excluded tensors; taken from the last snapshot), and the
metadata (:class:`SnapshotMeta`, strings only) holds the run id, the time, the exponents, the
names and shapes, and (safetensors) a CRC-32 of every tensor's bytes.

Version 2 (this one) adds the run id, every tensor's shape, the checksums and tensors stored as
their bytes (dtypes safetensors has no name for); version 1 snapshots, and those of a run resumed
from a 0.1 checkpoint (:data:`LEGACY_RUN_ID`), are read as one legacy run, never mixed with
another. One folder holds one run: :func:`read_snapshots` refuses a folder that mixes runs or
shapes; :mod:`.folder` is what a writer asks before it writes.

Reading executes nothing from the folder. Safetensors and JSON hold no code. The one pickle, a
DCP snapshot's ``.metadata``, goes through :class:`_DcpMetadataUnpickler`: an allow-list of
opcodes and globals (DCP's metadata classes, ``torch.Size``, dtypes, layouts, paths), which calls
only those constructors and sets state only on the fresh metadata instances it made, never on a
class, function, module or other object of the process; anything else is refused, naming the
file, and the process is as it was. A DCP snapshot's ``.distcp`` data goes through
``torch.load(weights_only=True)``. Only regular files are opened (a FIFO or a device named like a
snapshot's file is refused, never read). Reading is one tensor at a time (:func:`_reader`:
memory-mapped safetensors, or DCP with ``no_dist``), every tensor checked (shape, dtype, checksum)
and its size bounded before it is allocated: by the bytes its data files hold, and, beyond the
memory free on this machine, refused (a sparse file's apparent size is a forged snapshot's).
Importing this module imports numpy only; torch and safetensors when used.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import types
import warnings
import zlib
from typing import Any, Callable, ClassVar, NamedTuple, NoReturn

from .._files import atomic_write

__all__ = ["FORMAT", "LEGACY_RUN_ID", "VERSION", "Snapshot", "SnapshotError", "SnapshotMeta", "read_snapshots",
           "same_run", "write_snapshot"]

#: The ``format`` every snapshot's metadata carries.
FORMAT = "fastema.posthoc"
#: The snapshot format version this fastema writes (it reads 1 and 2).
VERSION = 2
_READS = (1, 2)
#: The dtypes a snapshot may store its profiles in.
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")
_MAX_ROWS = 8
_MAX_JSON = 64 << 20                  # a DCP snapshot's .json is small; a larger file is not one
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}$")
_CRC = re.compile(r"[0-9a-f]{8}$")
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}$")
#: The run id of a run resumed from a fastema 0.1 checkpoint (which has none): its snapshots and the
#: version-1 ones are read as one legacy run (:func:`same_run`).
LEGACY_RUN_ID = "legacy"


class SnapshotError(OSError):
    """A snapshot that was not written: a full disk, a file size limit, a folder that is gone or
    not writable, or values that overflow ``snapshot_dtype``.

    Raised by :meth:`fastema.torch.PostHocEMA.update` *after* the update was applied and counted
    (``applied=True``: do not repeat that update), and by
    :meth:`~fastema.torch.PostHocEMA.snapshot` (``applied=False``). The snapshot stays due: the
    next ``update()`` writes one (or call ``snapshot()``). An ``OSError``, so code that catches
    write errors catches it; ``errno`` is the failed write's when there was one.

    Attributes:
        time: the time of the snapshot that was not written.
        updates: the update count when it was raised.
        applied: True when raised by ``update()`` after its update was applied and counted.
    """

    def __init__(self, message: str, *, time: float | None = None, updates: int | None = None, applied: bool = False,
                 errno: int | None = None):
        super().__init__(message)
        self.time, self.updates, self.applied = time, updates, applied
        if errno is not None:
            self.errno = errno


class SnapshotMeta(NamedTuple):
    """The metadata of one snapshot: what :meth:`to_metadata` writes (a ``str -> str`` dict, as
    safetensors stores it, with ``format`` and ``version`` added) and :meth:`from_metadata` reads
    back (checking every field). The keys are spelled here only."""
    time: float                   # training time of the snapshot (the plan's last update time)
    updates: int                  # updates made so far
    gammas: list                  # one exponent per tracked profile (row k of "{k}:{name}")
    averaged: list                # names of the averaged tensors
    others: list                  # names of the tensors kept as they are ("model:{name}")
    calls: int | None = None      # update() calls so far (None: not recorded)
    sigma_rels: list | None = None    # the tracked widths, one per gamma (None: not recorded)
    dtype: str | None = None      # the snapshot dtype ("float32", "bfloat16", "float16")
    shapes: dict = {}             # name -> full shape: every tensor (version 1: ZeRO-3's flat ones only)
    kind: str = "safetensors"     # or "dcp": a torch.distributed.checkpoint directory (sharded models)
    run_id: str | None = None     # the run that wrote it (None: version 1, before run ids)
    raw: dict = {}                # "model:{name}" -> torch dtype of a tensor stored as its bytes (uint8)
    checksums: dict = {}          # key -> CRC-32 of its stored bytes, 8 hex digits (safetensors; the writer's)
    version: int = VERSION        # the format version it was written in

    def to_metadata(self) -> dict:
        """``str -> str``: format, version, run_id, time, updates, calls, gammas, sigma_rels,
        averaged, others, dtype, shapes, raw (the unrecorded ones left out), and kind when it is
        not safetensors. The checksums are the writer's (:func:`write_snapshot`)."""
        meta = {"format": FORMAT, "version": str(VERSION)}
        if self.run_id is not None:
            meta["run_id"] = self.run_id
        meta.update({"time": repr(float(self.time)), "updates": str(self.updates)})
        if self.calls is not None:
            meta["calls"] = str(self.calls)
        meta["gammas"] = json.dumps([float(g) for g in self.gammas])
        if self.sigma_rels is not None:
            meta["sigma_rels"] = json.dumps([float(s) for s in self.sigma_rels])
        meta["averaged"] = json.dumps(list(self.averaged))
        meta["others"] = json.dumps(list(self.others))
        if self.dtype is not None:
            meta["dtype"] = self.dtype
        meta["shapes"] = json.dumps({k: [int(d) for d in v] for k, v in self.shapes.items()})
        if self.raw:
            meta["raw"] = json.dumps(dict(self.raw))
        if self.kind != "safetensors":
            meta["kind"] = self.kind
        return meta

    @classmethod
    def from_metadata(cls, meta: dict, path: str = "the snapshot") -> SnapshotMeta:
        """Parse and check a snapshot's metadata: ``ValueError`` naming ``path`` and the field for
        another format, a newer version, a missing or malformed field (a time that is not a
        finite number >= 0, gammas that are not 1 to 8 finite numbers > 0, names and shapes
        that disagree, ...)."""
        if not isinstance(meta, dict):
            raise ValueError(f"{path!r} has no snapshot metadata (found a {type(meta).__name__})")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a fastema post-hoc snapshot (metadata format={meta.get('format')!r})")
        try:
            version = int(meta.get("version", ""))
        except (TypeError, ValueError):
            raise ValueError(f"{path!r}: its metadata's version is {meta.get('version')!r}, not a number") from None
        if version > VERSION:
            raise ValueError(f"{path!r} was written by a newer fastema (snapshot version {version}); upgrade fastema "
                             f"to read it")
        if version not in _READS:
            raise ValueError(f"{path!r}: snapshot version {version} is not one fastema wrote (it reads {_READS})")
        field = _Fields(meta, path)
        time = field.number("time")
        if not (math.isfinite(time) and time >= 0):
            field.bad("time", "a finite number >= 0")
        updates = field.count("updates")
        calls = field.count("calls") if "calls" in meta else None
        gammas = field.json("gammas")
        if not (isinstance(gammas, list) and 1 <= len(gammas) <= _MAX_ROWS and all(_gamma_ok(g) for g in gammas)):
            field.bad("gammas", f"1 to {_MAX_ROWS} exponents, finite numbers > 0")
        sigma_rels = field.json("sigma_rels") if "sigma_rels" in meta else None
        if sigma_rels is not None and not (isinstance(sigma_rels, list) and len(sigma_rels) == len(gammas) and
                                           all(_real(s) for s in sigma_rels)):
            field.bad("sigma_rels", "one number per gamma")
        averaged, others = field.json("averaged"), field.json("others")
        for key, names in (("averaged", averaged), ("others", others)):
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and
                    len(set(names)) == len(names)):
                field.bad(key, "a list of distinct tensor names")
        if not averaged:
            field.bad("averaged", "at least one averaged tensor")
        if set(averaged) & set(others):
            field.bad("others", f"names that are not averaged too ({sorted(set(averaged) & set(others))[:3]})")
        dtype = meta.get("dtype")
        if dtype is not None and dtype not in SNAPSHOT_DTYPES:
            field.bad("dtype", f"one of {SNAPSHOT_DTYPES}")
        shapes = field.json("shapes") if "shapes" in meta else {}
        if not (isinstance(shapes, dict) and all(
                isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
                for v in shapes.values())):
            field.bad("shapes", "name -> a list of sizes >= 0")
        kind = meta.get("kind", "safetensors")
        if kind not in ("safetensors", "dcp"):
            field.bad("kind", "'safetensors' or 'dcp'")
        run_id: str | None = None
        raw: dict = {}
        checksums: dict = {}
        if version >= 2:
            run_id = meta.get("run_id")
            if not valid_run_id(run_id):
                field.bad("run_id", "the id of the run that wrote it")
            missing = [n for n in [*averaged, *others] if n not in shapes]
            if missing:
                field.bad("shapes", f"the shape of every tensor (missing {missing[:3]})")
            raw = field.json("raw") if "raw" in meta else {}
            if not (isinstance(raw, dict) and all(isinstance(k, str) and k.startswith("model:") and
                                                  k[len("model:"):] in others and isinstance(v, str) and
                                                  _DTYPE_NAME.match(v) for k, v in raw.items())):
                field.bad("raw", "\"model:{name}\" -> a torch dtype name, for tensors kept as they are")
            checksums = field.json("checksums") if "checksums" in meta else {}
            if not (isinstance(checksums, dict) and all(isinstance(v, str) and _CRC.match(v)
                                                        for v in checksums.values())):
                field.bad("checksums", "tensor -> a CRC-32 in 8 hex digits")
        return cls(time, updates, gammas, averaged, others, calls, sigma_rels, dtype, shapes, kind, run_id, raw,
                   checksums, version)


class _Fields:
    """Reads the fields of one snapshot's metadata; every refusal names the file and the field."""

    def __init__(self, meta: dict, path: str):
        self.meta, self.path = meta, path

    def bad(self, key: str, expected: str) -> NoReturn:
        raise ValueError(f"{self.path!r}: its metadata's {key!r} is {_short(self.meta.get(key))}, expected "
                         f"{expected}; the snapshot is corrupt or was not written by fastema: move it out of the "
                         f"folder to synthesise from the others")

    def raw(self, key: str) -> str:
        if key not in self.meta:
            raise ValueError(f"{self.path!r}: its metadata has no {key!r}; the snapshot is corrupt or was not "
                             f"written by fastema: move it out of the folder to synthesise from the others")
        value = self.meta[key]
        if not isinstance(value, str):
            self.bad(key, "a string")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        try:
            return float(value)
        except ValueError:
            self.bad(key, "a number")

    def count(self, key: str) -> int:
        value = self.raw(key)
        if not re.fullmatch(r"[0-9]{1,18}", value):
            self.bad(key, "an int >= 0")
        return int(value)

    def json(self, key: str) -> Any:
        value = self.raw(key)
        try:
            return json.loads(value)
        except (ValueError, RecursionError):     # JSONDecodeError, or nesting deeper than Python's stack
            self.bad(key, "JSON")


def valid_run_id(run_id) -> bool:
    """True for a run id a snapshot or a PostHocEMA checkpoint may carry (1 to 64 of ``[0-9A-Za-z_-]``)."""
    return isinstance(run_id, str) and _RUN_ID.match(run_id) is not None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _gamma_ok(g) -> bool:
    if not (_real(g) and g > 0):
        return False
    try:                                          # a gamma whose width underflows is no profile either
        from ..schedules import gamma_to_sigma_rel

        return gamma_to_sigma_rel(g) > 0
    except (OverflowError, ValueError):
        return False


class Snapshot(NamedTuple):
    path: str
    time: float
    updates: int
    gammas: list          # one per tracked profile (row)
    averaged: list        # names of the averaged tensors
    others: list          # names of the tensors kept as they are (from the last snapshot)
    kind: str = "safetensors"     # or "dcp": a torch.distributed.checkpoint directory (sharded models)
    shapes: dict = {}             # name -> full shape (version 1: of tensors stored flat, ZeRO-3 partitions)
    run_id: str | None = None     # the run that wrote it (None: a version-1 snapshot)
    meta: SnapshotMeta | None = None      # all of its metadata


# --------------------------------------------------------------------------- reading


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a plain file"


def _not_regular(path: str, mode: int) -> ValueError:
    return ValueError(f"{path!r} is {_kind(mode)}, not a regular file (reading it could block, or never end): a "
                      f"snapshot is made of regular files; move it out of the folder")


def _regular(path: str) -> os.stat_result:
    """``os.stat(path)`` (a symlink followed), refused (ValueError naming it) unless a regular file:
    a FIFO, a device or a socket named like a snapshot's file is never opened."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def _open_regular(path: str):
    """``open(path, "rb")`` of a regular file, checked on the open file itself (opened without
    blocking, so a FIFO swapped in after a check cannot hang the reader either)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _memory_available() -> int | None:
    """Bytes of memory this process can still get (Linux: MemAvailable + SwapFree, within its
    cgroup's limit), or None where that is not known (no bound)."""
    avail = None
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {}
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                key, _, value = line.partition(":")
                if value.split() and value.split()[0].isdigit():
                    info[key] = int(value.split()[0]) * 1024
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    try:                                          # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read(64).strip()
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            current = f.read(64).strip()
        if limit.isdigit() and current.isdigit():
            avail = min(avail, max(int(limit) - int(current), 0))
    except OSError:
        pass
    return avail


def _out_of_memory(err: BaseException) -> bool:
    """An allocation failure: MemoryError, or torch's RuntimeError for one (CPU or GPU)."""
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "Cannot allocate memory" in text))


_SMALL = 1 << 24                      # reads below 16 MiB are not bounded (no /proc read per small tensor)


def _fits(path: str, key: str, nbytes: int, files: dict) -> None:
    """Before a read allocates ``nbytes`` for ``key``: refuse a claim larger than the memory this
    machine has free. A claim that the data ``files`` (name -> os.stat_result) do not hold on disk
    (a sparse file, its size only apparent) is a forged or damaged snapshot (ValueError); a real
    one too large for this machine is a MemoryError. Both name the file; nothing is allocated."""
    if nbytes < _SMALL:
        return
    avail = _memory_available()
    if avail is None or nbytes <= avail:
        return
    on_disk = sum(getattr(st, "st_blocks", 0) * 512 for st in files.values())
    if all(hasattr(st, "st_blocks") for st in files.values()) and on_disk < nbytes:
        raise ValueError(f"{path!r}: {key!r} claims {nbytes} bytes, more than the {avail} bytes of memory free here, "
                         f"and its data file(s) {', '.join(sorted(files))} hold only {on_disk} bytes on disk (a "
                         f"sparse file: its size is only apparent): the snapshot is forged or damaged; move it out "
                         f"of the folder to synthesise from the others")
    raise MemoryError(f"{path!r}: reading {key!r} needs {nbytes} bytes of memory, more than the {avail} bytes free "
                      f"here: synthesise on a machine with more memory")


def _safetensors_metadata(path: str) -> dict:
    from safetensors import safe_open

    _regular(path)
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:                      # SafetensorError, OSError: a file that is not one
        raise ValueError(f"{path!r} is not a readable safetensors snapshot ({_first_line(err)}); it is truncated, "
                         f"empty or corrupt: move it out of the folder to synthesise from the others") from None


def _json_metadata(path: str) -> dict:
    with _open_regular(path) as f:
        data = f.read(_MAX_JSON + 1)
    try:
        if len(data) > _MAX_JSON:
            raise ValueError(f"larger than {_MAX_JSON} bytes")
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path!r} is not a DCP snapshot's metadata (not JSON: {_first_line(err)}); it is "
                         f"corrupt: move it (and its directory) out of the folder to synthesise from the others") \
            from None
    return meta


def _snapshot_at(directory: str, name: str) -> Snapshot | None:
    """The snapshot whose file in ``directory`` is ``name`` (None: not a snapshot's name)."""
    path = os.path.join(directory, name)
    if not name.startswith("snapshot-"):
        return None
    if name.endswith(".json"):                    # a sharded model's DCP snapshot
        meta = _json_metadata(path)
        data = path[:-len(".json")]
        m = SnapshotMeta.from_metadata(meta, path)
        if m.kind != "dcp":
            raise ValueError(f"{path!r} is a snapshot's .json, but its kind is {m.kind!r}, not 'dcp'")
        if not os.path.isdir(data):
            raise FileNotFoundError(f"{path!r} describes a DCP snapshot, but {data!r} is missing")
    elif name.endswith(".safetensors"):
        data = path
        m = SnapshotMeta.from_metadata(_safetensors_metadata(path), path)
        if m.kind != "safetensors":
            raise ValueError(f"{path!r} is a safetensors file, but its metadata says kind {m.kind!r}")
    else:
        return None
    return Snapshot(data, m.time, m.updates, m.gammas, m.averaged, m.others, m.kind, m.shapes, m.run_id, m)


def _few(paths: list, n: int = 3) -> str:
    names = [os.path.basename(p) for p in paths]
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def same_run(run_id: str | None) -> str | None:
    """The run a snapshot's ``run_id`` belongs to: version-1 snapshots (None) and the snapshots of
    a run resumed from a fastema 0.1 checkpoint (:data:`LEGACY_RUN_ID`) are one legacy run (None)."""
    return None if run_id == LEGACY_RUN_ID else run_id


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
        snap = _snapshot_at(directory, name)
        if snap is not None:
            out.append(snap)
    if not out:
        raise FileNotFoundError(f"no snapshot-*.safetensors files (or snapshot-*.json DCP snapshots) in "
                                f"{directory!r}")
    runs: dict = {}
    for s in out:
        runs.setdefault(same_run(s.run_id), []).append(s.path)
    if len(runs) > 1:
        listed = "; ".join(f"{_run_name(r)}: {_few(p)}" for r, p in runs.items())
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
                   sharded: bool = False) -> str:
    """Write one snapshot of time ``time`` into ``directory``, whole or not at all; returns its path.

    ``tensors``: ``"{k}:{name}"`` (profile ``k``) and ``"model:{name}"`` entries; ``meta``: the
    metadata strings (format, version, run id, time, gammas, names, shapes). A plain model's
    snapshot is one safetensors file (temporary file, then rename), ``tensors`` mapping to
    ``(tensor, dtype)`` pairs streamed one at a time
    (:func:`fastema.torch._safetensors.stream_safetensors`), with the CRC-32 of every tensor's
    bytes in the metadata (``checksums``). A sharded model's (``tensors`` holding DTensors) is a
    collective: one DCP checkpoint directory written by every rank from its own shards into a
    temporary directory, renamed, then the metadata ``.json`` beside it, written last by rank 0:
    readers ignore a snapshot without it. Every rank raises the same error when a rank could not
    write. ``meta`` may be a :class:`SnapshotMeta` (written through :meth:`SnapshotMeta.to_metadata`)."""
    if isinstance(meta, SnapshotMeta):
        meta = meta.to_metadata()
    base = os.path.join(directory, f"snapshot-{stamp(time)}")
    if sharded:
        return _save_dcp(base, tensors, meta)
    from ..torch._safetensors import stream_safetensors

    atomic_write(base + ".safetensors", lambda f: stream_safetensors(f, tensors, meta, checksums="checksums"))
    return base + ".safetensors"


def stamp(time: float) -> str:
    """A time as snapshot names spell it (12 digits, or 20 characters with 6 decimals)."""
    return f"{int(time):012d}" if float(time).is_integer() else f"{time:020.6f}"


def _save_dcp(base: str, tensors: dict, meta: dict) -> str:
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank = dist.get_rank()
    tmp = f"{os.path.dirname(base)}/.{os.path.basename(base)}.tmp"
    error = None
    if rank == 0 and os.path.exists(tmp):
        try:
            shutil.rmtree(tmp)                       # left by a snapshot that was killed
        except OSError as err:
            error = f"could not remove {tmp!r}, left by an earlier snapshot: {err}"
    _agree(error)
    try:
        dcp.save(tensors, checkpoint_id=tmp)         # DCP raises on every rank when one could not write
    except CheckpointException as err:
        raise OSError(_errno_of(err), f"could not write the DCP snapshot {base!r}: {_first_line(err)}") from None
    if rank == 0:
        try:
            if os.path.exists(base):                 # the same time again: the old metadata goes first
                if os.path.exists(base + ".json"):
                    os.unlink(base + ".json")
                shutil.rmtree(base)
            os.replace(tmp, base)
            data = json.dumps({**meta, "kind": "dcp"}).encode()
            atomic_write(base + ".json", lambda f: f.write(data))
        except OSError as err:
            error = str(err)
            shutil.rmtree(base, ignore_errors=True)   # no .json: never read; not left behind either
    _agree(error)
    return base


def _agree(error: str | None) -> None:
    """Every rank raises rank 0's error (a collective: no rank goes on into a collective alone)."""
    import torch.distributed as dist

    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise OSError(box[0])


def _errno_of(err: BaseException) -> int:
    import errno

    for failure in getattr(err, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
    return errno.EIO


def _cause(err: BaseException) -> BaseException:
    """The first rank's error inside a DCP CheckpointException (else ``err``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        failure = next(iter(failures.values()))
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def _first_line(err: BaseException) -> str:
    err = _cause(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- reading tensors


def _reader(snap: Snapshot) -> Callable[[str], Any]:
    """``key -> tensor`` of one snapshot, read on demand (one tensor at a time), each checked: a
    key the metadata names, the shape the metadata gives (or the flat form of a ZeRO-3
    partition), a floating dtype for the profiles, the checksum; tensors stored as bytes get their
    dtype back. Every refusal is a ValueError naming the file and the tensor."""
    meta = snap.meta
    read = _dcp_reader(snap) if snap.kind == "dcp" else _safetensors_reader(snap)

    def expected(key: str):
        if meta is None or meta.version < 2:
            return None
        kind, _, name = key.partition(":")
        return meta.shapes.get(name)

    def get(key: str):
        import torch

        want = expected(key)
        t = read(key, want)
        averaged = not key.startswith("model:")
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

    return get


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _safetensors_reader(snap: Snapshot) -> Callable:
    from safetensors import safe_open

    st = _regular(snap.path)
    try:
        handle = safe_open(snap.path, framework="pt")
        keys = set(handle.keys())
    except Exception as err:                      # SafetensorError, OSError
        raise ValueError(f"{snap.path!r} is not a readable safetensors snapshot ({_first_line(err)}); move it out "
                         f"of the folder to synthesise from the others") from None
    checksums = snap.meta.checksums if snap.meta is not None else {}

    def read(key: str, want):
        if key not in keys:
            raise ValueError(f"{snap.path!r} has no tensor {key!r}, which its metadata names; the snapshot is "
                             f"corrupt: move it out of the folder to synthesise from the others")
        try:
            part = handle.get_slice(key)
            nbytes = math.prod(part.get_shape()) * _ITEMSIZE.get(part.get_dtype(), 8)
        except Exception as err:                  # SafetensorError
            raise ValueError(f"{snap.path!r}: tensor {key!r} could not be read ({_first_line(err)}); the snapshot "
                             f"is corrupt: move it out of the folder") from None
        _fits(snap.path, key, nbytes, {os.path.basename(snap.path): st})
        try:
            t = handle.get_tensor(key)
        except Exception as err:                  # SafetensorError, an allocation that failed
            if _out_of_memory(err):
                raise MemoryError(f"{snap.path!r}: reading {key!r} ({nbytes} bytes) ran out of memory "
                                  f"({_first_line(err)}): synthesise on a machine with more memory") from None
            raise ValueError(f"{snap.path!r}: tensor {key!r} could not be read ({_first_line(err)}); the snapshot "
                             f"is corrupt: move it out of the folder") from None
        if key in checksums:
            import torch

            data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else b""
            crc = f"{zlib.crc32(data):08x}"
            if crc != checksums[key]:
                raise ValueError(f"{snap.path!r}: tensor {key!r} fails its checksum (CRC-32 {crc}, written "
                                 f"{checksums[key]}): the file was changed or damaged on disk after it was written. "
                                 f"Move it out of the folder to synthesise from the others")
        return t

    return read


def _dcp_reader(snap: Snapshot) -> Callable:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader_type = _safe_reader_type()
    md = reader_type(snap.path).read_metadata()
    entries = md.state_dict_metadata

    def read(key: str, want):
        meta = entries.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"the DCP snapshot {snap.path!r} has no tensor {key!r}, which its metadata names; the "
                             f"snapshot is corrupt: move it (and its .json) out of the folder")
        size = list(meta.size)
        if want is not None and size != list(want) and size != [math.prod(want)]:
            raise ValueError(f"the DCP snapshot {snap.path!r}: {key!r} has shape {size}, but its .json gives {want}; "
                             f"the snapshot is corrupt")
        stored = sum(info.length for index, info in md.storage_data.items() if index.fqn == key)
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        nbytes = math.prod(size) * itemsize
        if nbytes > stored:                              # before allocating what a forged size asks for
            raise ValueError(f"the DCP snapshot {snap.path!r}: {key!r} claims shape {size} ({math.prod(size)} "
                             f"values), but its data files hold {stored} bytes of it; the snapshot is corrupt")
        files = sorted({info.relative_path for index, info in md.storage_data.items() if index.fqn == key})
        _fits(snap.path, key, nbytes, {f: _regular(os.path.join(snap.path, f)) for f in files})
        try:
            out = {key: torch.empty(tuple(size), dtype=meta.properties.dtype)}
        except (RuntimeError, MemoryError) as err:
            raise MemoryError(f"the DCP snapshot {snap.path!r}: {nbytes} bytes for {key!r} could not be allocated "
                              f"({_first_line(err)}): synthesise on a machine with more memory") from None
        try:
            with warnings.catch_warnings():
                # no_dist: this rank alone reads the full tensor (no collective, so rank 0 alone may synthesise)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=reader_type(snap.path), no_dist=True)
        except (Exception, CheckpointException) as err:
            cause = _cause(err)
            if _out_of_memory(cause):
                raise MemoryError(f"the DCP snapshot {snap.path!r}: reading {key!r} ({nbytes} bytes, from "
                                  f"{', '.join(files)}) ran out of memory ({_first_line(cause)}): synthesise on a "
                                  f"machine with more memory") from None
            why = (f"{', '.join(files)} holds a pickle that is not plain tensor data: torch.load(weights_only=True) "
                   f"refused it, nothing ran" if isinstance(cause, pickle.UnpicklingError) else
                   f"{', '.join(files)}: {_first_line(cause)}")
            raise ValueError(f"the DCP snapshot {snap.path!r}: tensor {key!r} could not be read ({why}); the "
                             f"snapshot is truncated or corrupt: move it (and its .json) out of the folder to "
                             f"synthesise from the others") from None
        return out[key]

    return read


# --------------------------------------------------------------------------- DCP metadata without pickle's reach

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")
#: What a DCP ``.metadata`` may name (module -> names), besides ``torch.Size`` and ``torch.<dtype>``.
_ALLOWED = {
    _DCP_METADATA: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    _FILESYSTEM: ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),          # a layout by its name, from torch's own table
    "pathlib": _PATHS,
    "pathlib._local": _PATHS,
    "collections": ("OrderedDict",),
}
#: The only classes whose state a pickle may set (BUILD): DCP's metadata dataclasses, on the fresh
#: instances this unpickler made. Never a class, a function, a module, a dtype or an enum member.
_BUILDABLE = {
    _DCP_METADATA: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta"),
    _FILESYSTEM: ("_StorageInfo",),
}
# Opcodes that only build plain data (numbers, strings, bytes, tuples, lists, dicts, sets), move it
# on the stack or the memo, or frame the stream; GLOBAL and STACK_GLOBAL go through find_class.
_DATA_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 EMPTY_LIST LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT "
    "EMPTY_SET FROZENSET GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL").split()


class _DcpMetadataUnpickler(pickle._Unpickler):           # the pure-Python unpickler: its dispatch is ours
    """Builds what DCP's ``.metadata`` holds and nothing else, with an allow-list of opcodes.

    Globals: DCP's metadata classes, ``torch.Size``, dtypes, layouts (``_get_layout``), paths and
    ``OrderedDict`` (:data:`_ALLOWED`); any other is refused before it is looked up. Calls
    (REDUCE, NEWOBJ): those globals only. State (BUILD): only on an instance of DCP's metadata
    dataclasses (:data:`_BUILDABLE`), only their declared fields (or the class's own
    ``__setstate__``): a pickle cannot set an attribute of a class, a function, a module or any
    object shared with the rest of the process. Appends and item sets: only into the lists,
    dicts and sets it built. Persistent ids, extension codes, INST/OBJ and out-of-band buffers
    are refused."""

    dispatch: ClassVar[dict] = {}              # opcode -> handler: _make_dispatch()'s table
    # the pure-Python unpickler's own (typeshed does not declare them)
    stack: list
    append: Callable[[Any], None]
    pop_mark: Callable[[], list]

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        import importlib

        import torch

        self._globals: dict = {}
        for module, names in _ALLOWED.items():
            try:
                found = importlib.import_module(module)
            except ImportError:                       # pathlib._local: Python >= 3.13 only
                continue
            for name in names:
                if hasattr(found, name):
                    self._globals[(module, name)] = getattr(found, name)
        self._globals[("torch", "Size")] = torch.Size
        self._torch = torch
        self._callables = tuple(self._globals.values())
        self._classes = tuple(v for v in self._callables if isinstance(v, type))
        self._buildable: dict = {}
        for module, names in _BUILDABLE.items():
            for name in names:
                cls = self._globals.get((module, name))
                if cls is not None:
                    self._buildable[cls] = {f.name for f in _dataclass_fields(cls)}

    def find_class(self, module: str, name: str):
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        if module == "torch" and isinstance(getattr(self._torch, name, None), self._torch.dtype):
            return getattr(self._torch, name)
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which DCP metadata never holds")

    def _refuse(self, what: str) -> NoReturn:
        raise pickle.UnpicklingError(f"it {what}, which DCP metadata never does")

    def _allowed(self, obj, among: tuple) -> bool:
        return any(obj is c for c in among)          # by identity: nothing of the pickle's is hashed or compared

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if type(args) is not tuple or not self._allowed(func, self._callables):
            self._refuse(f"calls {_named(func)}")
        self.stack[-1] = func(*args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple or not self._allowed(cls, self._classes):
            self._refuse(f"makes an object of {_named(cls)}")
        self.append(cls.__new__(cls, *args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple or type(kwargs) is not dict or not self._allowed(cls, self._classes):
            self._refuse(f"makes an object of {_named(cls)}")
        self.append(cls.__new__(cls, *args, **kwargs))

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        fields = next((f for c, f in self._buildable.items() if c is cls), None)
        if fields is None:
            self._refuse(f"sets the state of {_named(inst)}")
        setstate = cls.__dict__.get("__setstate__")
        if setstate is not None:                      # TensorProperties: its own decoder, on its instance
            setstate(inst, state)
            return
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict:
                self._refuse(f"sets the state of a {cls.__name__} from a {type(part).__name__}")
            for key, value in part.items():
                if type(key) is not str or key not in fields:
                    name = repr(key[:40]) if type(key) is str else _named(key)
                    self._refuse(f"sets {cls.__name__}.{name}, not a field of it")
                object.__setattr__(inst, key, value)  # frozen dataclasses too (MetadataIndex), as pickle does

    def _load_append(self) -> None:
        value = self.stack.pop()
        if type(self.stack[-1]) is not list:
            self._refuse(f"appends to a {type(self.stack[-1]).__name__}")
        self.stack[-1].append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        if type(self.stack[-1]) is not list:
            self._refuse(f"appends to a {type(self.stack[-1]).__name__}")
        self.stack[-1].extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems([key, value])

    def _load_setitems(self) -> None:
        self._setitems(self.pop_mark())

    def _setitems(self, items: list) -> None:
        target = self.stack[-1]
        if type(target) is not dict and type(target) is not self._globals[("collections", "OrderedDict")]:
            self._refuse(f"sets items of a {type(target).__name__}")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            self._refuse(f"adds to a {type(self.stack[-1]).__name__}")
        self.stack[-1].update(items)


def _make_dispatch() -> dict:
    import pickletools

    def refuse(name: str):
        def op(self):
            raise pickle.UnpicklingError(f"it holds the pickle opcode {name}, which DCP metadata never holds")
        return op

    base = pickle._Unpickler.dispatch                  # type: ignore[attr-defined]
    table = {code: refuse(f"0x{code:02x}") for code in range(256)}
    for op in pickletools.opcodes:
        table[ord(op.code.encode("latin-1"))] = refuse(op.name)
    for name in _DATA_OPCODES:
        code = getattr(pickle, name)[0]
        table[code] = base[code]
    restricted = {"REDUCE": "_load_reduce", "NEWOBJ": "_load_newobj", "NEWOBJ_EX": "_load_newobj_ex",
                  "BUILD": "_load_build", "APPEND": "_load_append", "APPENDS": "_load_appends",
                  "SETITEM": "_load_setitem", "SETITEMS": "_load_setitems", "ADDITEMS": "_load_additems"}
    for name, method in restricted.items():
        table[getattr(pickle, name)[0]] = getattr(_DcpMetadataUnpickler, method)
    return table


_DcpMetadataUnpickler.dispatch = _make_dispatch()


def _named(obj) -> str:
    """What an object of a pickle is, without calling anything of it (no repr, no str)."""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"the function {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _dataclass_fields(cls) -> tuple:
    import dataclasses

    return dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()


def _load_dcp_metadata(path: str):
    """DCP's ``Metadata`` from ``path`` (a regular file) through :class:`_DcpMetadataUnpickler`, its
    structure checked (the tensors' sizes and dtypes, data files inside the snapshot directory,
    regular files holding what it describes)."""
    with _open_regular(path) as f:
        try:
            md = _DcpMetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path!r} was not loaded: {err}. Nothing of it ran: fastema builds DCP's metadata "
                             f"classes from it and nothing else. It is not a snapshot fastema wrote: remove this "
                             f"snapshot, or get an intact copy from its author") from None
        except Exception as err:                      # EOFError, a truncated or garbled pickle
            raise ValueError(f"{path!r} is not readable DCP metadata ({_first_line(err)}); the snapshot is "
                             f"truncated or corrupt: move it (and its .json) out of the folder") from None
    try:
        _check_dcp_metadata(path, md)
    except (AttributeError, TypeError) as err:        # a field missing, or of another type
        raise ValueError(f"{path!r} is not DCP metadata a snapshot holds ({_first_line(err)}); the snapshot is "
                         f"corrupt: move it (and its .json) out of the folder") from None
    return md


def _check_dcp_metadata(path: str, md) -> None:
    import torch
    from torch.distributed.checkpoint import metadata as M
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    def bad(what: str):
        return ValueError(f"{path!r} is not DCP metadata a snapshot holds ({what}); the snapshot is corrupt: move "
                          f"it (and its .json) out of the folder")

    if not isinstance(md, M.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise bad(f"a {type(md).__name__}")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise bad(f"a key of type {type(key).__name__}")
        if isinstance(entry, M.BytesStorageMetadata):
            continue
        if not (isinstance(entry, M.TensorStorageMetadata) and isinstance(entry.size, torch.Size) and
                all(isinstance(d, int) and d >= 0 for d in entry.size) and
                isinstance(entry.properties, M.TensorProperties) and
                isinstance(entry.properties.dtype, torch.dtype)):
            raise bad(f"the entry of {key[:80]!r}")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise bad("no storage table")
    sizes: dict = {}
    for index, info in storage.items():
        if not (isinstance(index, M.MetadataIndex) and isinstance(index.fqn, str) and
                isinstance(info, _StorageInfo) and isinstance(info.relative_path, str) and
                os.path.basename(info.relative_path) == info.relative_path and
                info.relative_path not in ("", ".", "..") and "\\" not in info.relative_path and
                isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and
                info.length >= 0):
            raise bad(f"a storage entry {_named(info)}")
        if getattr(info, "transform_descriptors", None):   # compression: the stored sizes would not bound a read
            raise bad("a storage entry with transforms, which fastema's snapshots never use")
        name = info.relative_path
        if name not in sizes:                        # data inside this snapshot's directory, within its files
            data = os.path.join(os.path.dirname(path), name)
            try:
                st = os.stat(data)
            except FileNotFoundError:
                sizes[name] = -1
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise _not_regular(data, st.st_mode)
                sizes[name] = st.st_size
        if info.offset + info.length > sizes[name]:
            have = sizes[name]
            raise ValueError(f"the DCP snapshot {os.path.dirname(path)!r}: its data file {name!r} "
                             f"{'is missing' if have < 0 else f'has {have} bytes'}, fewer than the "
                             f"{info.offset + info.length} its metadata describes: the snapshot is truncated; move "
                             f"it (and its .json) out of the folder to synthesise from the others")


_SAFE_READER: Any = None


def _safe_reader_type():
    """``dcp.FileSystemReader`` whose metadata comes through :func:`_load_dcp_metadata` (made once)."""
    global _SAFE_READER
    if _SAFE_READER is None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import StorageMeta

        class SafeReader(dcp.FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any):
                rank = kwargs.get("rank")
                name = ".metadata" if rank is None else f"__{int(rank)}.metadata"
                md = _load_dcp_metadata(os.path.join(os.fspath(self.path), name))
                if getattr(md, "storage_meta", None) is None:
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
                return md

        _SAFE_READER = SafeReader
    return _SAFE_READER
