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
DCP snapshot's ``.metadata`` (at most 256 MiB; from 16 MiB, no more than the memory free), goes
through :class:`_DcpMetadataUnpickler`: an allow-list of opcodes and globals (DCP's metadata
classes, ``torch.Size``, dtypes, layouts, paths, looked up in their modules' own namespaces),
which calls only those constructors with the arguments DCP gives them, sets state only on the
fresh metadata instances it made (once, each field of the exact type DCP gives it), hashes only
strings, ints and checked ``MetadataIndex`` keys, nests objects at most 32 deep, reads no string
or frame over 4 MiB and stops when what it built holds over half of the memory that was free
(Linux); :func:`_check_dcp_metadata` then checks every object of it by exact type before
anything reads it. Anything else is refused, naming the file. No class, function, module or
shared object of the process gets state from the file, refused or not. A DCP snapshot's
``.distcp`` data goes through ``torch.load(weights_only=True)``. Only regular files are opened
(a FIFO or a device named like a snapshot's file is refused, never read). Reading is one tensor
at a time (:func:`_reader`: memory-mapped safetensors, or DCP with ``no_dist`` and the
snapshot's metadata parsed once), every tensor checked (shape, dtype, checksum) and its size
bounded before it is allocated: by the bytes its data files hold, and, from 16 MiB, by the
memory free here (a MemoryError, which says so when the files are not fully stored on disk:
sparse or compressed).
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


def _open_regular(path: str, follow: bool = True):
    """``open(path, "rb")`` of a regular file, checked on the open file itself (opened without
    blocking, so a FIFO swapped in after a check cannot hang the reader either); ``follow=False``:
    a symbolic link is not followed (OSError ELOOP)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
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


def _fits(path: str, what: str, nbytes: int, files: dict) -> None:
    """Before a read allocates ``nbytes`` for ``what`` (a tensor's key, quoted, or a phrase):
    refuse it when it is larger than the memory this machine has free (a MemoryError naming the
    file; nothing is allocated). When the data ``files`` (name -> os.stat_result) hold fewer bytes
    on disk than that (sparse, or compressed by the file system), the message says so: a snapshot
    that was not written this large is damaged or forged."""
    if nbytes < _SMALL:
        return
    avail = _memory_available()
    if avail is None or nbytes <= avail:
        return
    on_disk = sum(getattr(st, "st_blocks", 0) * 512 for st in files.values())
    short = ""
    if all(hasattr(st, "st_blocks") for st in files.values()) and on_disk < nbytes:
        short = (f"; its data file(s) {', '.join(sorted(files))} are not fully stored on disk ({on_disk} bytes: "
                 f"sparse or compressed), so if the snapshot was not written this large it is damaged: move it out "
                 f"of the folder; if it was,")
    raise MemoryError(f"{path!r}: reading {what} needs {nbytes} bytes of memory, more than the {avail} bytes free "
                      f"here{short or ':'} synthesise on a machine with more memory")


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
    (:func:`fastema._safetensors.stream_safetensors`), with the CRC-32 of every tensor's
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
    from .._safetensors import stream_safetensors

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
        _fits(snap.path, repr(key), nbytes, {os.path.basename(snap.path): st})
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
    md = _load_dcp_metadata(os.path.join(snap.path, ".metadata"))     # parsed and checked once, for every read
    entries = md.state_dict_metadata
    stored: dict = {}                                   # tensor -> bytes its data files hold of it
    files_of: dict = {}                                 # tensor -> the data files holding it
    for index, info in md.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        files_of.setdefault(index.fqn, set()).add(info.relative_path)

    def read(key: str, want):
        meta = entries.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"the DCP snapshot {snap.path!r} has no tensor {key!r}, which its metadata names; the "
                             f"snapshot is corrupt: move it (and its .json) out of the folder")
        size = list(meta.size)
        if want is not None and size != list(want) and size != [math.prod(want)]:
            raise ValueError(f"the DCP snapshot {snap.path!r}: {key!r} has shape {size}, but its .json gives {want}; "
                             f"the snapshot is corrupt")
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        nbytes = math.prod(size) * itemsize
        if nbytes > stored.get(key, 0):                 # before allocating what a forged size asks for
            raise ValueError(f"the DCP snapshot {snap.path!r}: {key!r} claims shape {size} ({math.prod(size)} "
                             f"values), but its data files hold {stored.get(key, 0)} bytes of it; the snapshot is "
                             f"corrupt")
        files = sorted(files_of.get(key, ()))
        _fits(snap.path, repr(key), nbytes, {f: _regular(os.path.join(snap.path, f)) for f in files})
        try:
            out = {key: torch.empty(tuple(size), dtype=meta.properties.dtype)}
        except (RuntimeError, MemoryError) as err:
            raise MemoryError(f"the DCP snapshot {snap.path!r}: {nbytes} bytes for {key!r} could not be allocated "
                              f"({_first_line(err)}): synthesise on a machine with more memory") from None
        try:
            with warnings.catch_warnings():
                # no_dist: this rank alone reads the full tensor (no collective, so rank 0 alone may synthesise)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=reader_type(snap.path, metadata=md), no_dist=True)
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
#: The only classes a pickle may make (NEWOBJ, no arguments) and set the state of (BUILD, once, on
#: an instance it made): DCP's metadata dataclasses. Never a class, a function, a module, a dtype
#: or an enum member.
_BUILDABLE = {
    _DCP_METADATA: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta"),
    _FILESYSTEM: ("_StorageInfo",),
}
# Opcodes that only build plain data (numbers, strings, bytes, tuples, lists, dicts), move it on the
# stack or the memo, or frame the stream; GLOBAL and STACK_GLOBAL go through find_class, the
# container opcodes through _DcpMetadataUnpickler's bookkeeping. Sets and bytearrays: refused.
_DATA_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 EMPTY_LIST LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT "
    "GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL").split()
_MAX_METADATA = 256 << 20     # bytes of a .metadata fastema reads (a snapshot's: ~100 bytes a tensor and shard)
_MAX_ITEM = 4 << 20           # bytes of one string, line or frame in it (the pickler frames 64 KiB)
_MAX_DEPTH = 32               # objects nested in it, and MARKs open at once (DCP's nest 8 deep)
_LOOK_EVERY = 1 << 16         # opcodes between two looks at the memory the parse holds
_PLAIN = (type(None), bool, int, float, str)      # a field DCP may add later: plain values only


class _BoundedInput:
    """A ``.metadata`` as :class:`_DcpMetadataUnpickler` reads it: no read (a string, bytes or a
    frame) and no line longer than :data:`_MAX_ITEM`, and ``size`` bytes in all (what it had when
    it was opened): a length field or a line without end asks for nothing more."""

    def __init__(self, file: Any, size: int) -> None:
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if not 0 <= n <= _MAX_ITEM:
            raise pickle.UnpicklingError(f"it holds a string, bytes or frame of {n} bytes, more than the {_MAX_ITEM} "
                                         f"DCP metadata holds in one")
        return self._take(self._file.read(n))

    def readline(self) -> bytes:
        line = self._file.readline(_MAX_ITEM + 1)
        if len(line) > _MAX_ITEM:
            raise pickle.UnpicklingError(f"it holds a line longer than {_MAX_ITEM} bytes, which DCP metadata never "
                                         f"does")
        return self._take(line)

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise pickle.UnpicklingError("it grew while it was read")
        return data


def _resident() -> int | None:
    """Bytes of memory this process holds (Linux: /proc/self/statm), or None where not known."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read(256).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _size_args(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) in (tuple, list) and len(args[0]) <= 64 and \
        all(type(d) is int for d in args[0])


class _DcpMetadataUnpickler(pickle._Unpickler):           # the pure-Python unpickler: its dispatch is ours
    """Builds what DCP's ``.metadata`` holds and nothing else, with an allow-list of opcodes.

    Globals: DCP's metadata classes, ``torch.Size``, dtypes, layouts (``_get_layout``), paths and
    ``OrderedDict`` (:data:`_ALLOWED`), looked up in their modules' own namespaces (never through a
    module's ``__getattr__``, which could import); any other is refused. Calls (REDUCE): those
    globals, each with the arguments DCP gives it (``torch.Size`` a list of ints, a layout or a
    path strings, an enum member an int, ``OrderedDict`` none). Objects (NEWOBJ): DCP's metadata
    dataclasses, without arguments. State (BUILD): once, on such an instance it made and placed
    nowhere yet, only declared fields, each of the exact type DCP gives it: a pickle cannot set an
    attribute of a class, a function, a module or any object shared with the rest of the process.
    Appends and item sets: only into the lists and dicts it made, before they are placed in
    another; dict keys are strings, ints or built ``MetadataIndex`` (nothing deep is ever hashed).
    Objects nest at most :data:`_MAX_DEPTH` deep. Reads are bounded (:class:`_BoundedInput`), and
    the memory the parse holds is looked at every :data:`_LOOK_EVERY` opcodes: beyond half of what
    was free when it began, a MemoryError. Persistent ids, extension codes, INST/OBJ, sets,
    bytearrays and out-of-band buffers are refused."""

    dispatch: ClassVar[dict] = {}              # opcode -> handler: _make_dispatch()'s table
    # the pure-Python unpickler's own (typeshed does not declare them)
    stack: list
    metastack: list
    append: Callable[[Any], None]
    pop_mark: Callable[[], list]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]
    readinto: Callable[[Any], int]
    _file_read: Callable[[int], bytes]
    _file_readline: Callable[[], bytes]
    proto: int

    def __init__(self, file: Any, size: int = _MAX_METADATA) -> None:
        super().__init__(_BoundedInput(file, size))
        import collections
        import importlib

        import torch

        self._globals: dict = {}
        for module, names in _ALLOWED.items():
            try:
                space = vars(importlib.import_module(module))
            except ImportError:                       # pathlib._local: Python >= 3.13 only
                continue
            for name in names:
                if name in space:
                    self._globals[(module, name)] = space[name]
        self._globals[("torch", "Size")] = torch.Size
        self._torch = vars(torch)
        self._dtype = torch.dtype
        md = importlib.import_module(_DCP_METADATA)
        self._props = md.TensorProperties
        self._index = md.MetadataIndex
        self._encoding = md._MEM_FORMAT_ENCODING
        self._ordered = collections.OrderedDict
        paths = tuple(v for (m, n), v in self._globals.items() if n in _PATHS and m.startswith("pathlib"))
        one_str = lambda a: len(a) == 1 and type(a[0]) is str  # noqa: E731
        self._calls = [(torch.Size, _size_args), (self._globals[("torch.serialization", "_get_layout")], one_str),
                       (self._encoding, lambda a: len(a) == 1 and type(a[0]) is int),
                       (self._ordered, lambda a: not a)]
        self._calls += [(p, lambda a: len(a) <= 4096 and all(type(x) is str for x in a)) for p in paths]
        self._fields = _field_types(md, importlib.import_module(_FILESYSTEM), torch, paths)
        self._made: dict = {}          # id -> [object, depth, placed, built]: what this unpickler made (kept alive)

    def find_class(self, module: str, name: str):
        found = self._globals.get((module, name))
        if found is not None:
            return found
        if module == "torch" and type(self._torch.get(name)) is self._dtype:
            return self._torch[name]
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which DCP metadata never holds")

    def load(self) -> Any:
        """The pure-Python ``load`` (Python 3.9-3.13), with a look at the memory every
        :data:`_LOOK_EVERY` opcodes."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)   # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        start, free = _resident(), _memory_available()
        count = 0
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
                count += 1
                if count % _LOOK_EVERY == 0 and start is not None and free is not None:
                    held = (_resident() or start) - start
                    if held > free // 2:
                        raise MemoryError(f"building it took {held} bytes of memory after {count} opcodes, over "
                                          f"half of the {free} bytes free when it began")
        except pickle._Stop as stop:                  # type: ignore[attr-defined]
            return stop.value

    def _refuse(self, what: str) -> NoReturn:
        raise pickle.UnpicklingError(f"it {what}, which DCP metadata never does")

    # -- bookkeeping: what it made, how deep, placed in another yet, built yet

    def _place(self, items) -> int:
        """Mark what this unpickler made among ``items`` placed (never changed again); their depth."""
        depth = 0
        made = self._made
        for item in items:
            entry = made.get(id(item))               # ids are its own objects': they are kept alive
            if entry is not None:
                entry[2] = True
                if entry[1] > depth:
                    depth = entry[1]
        return depth

    def _made_of(self, obj, items=()) -> None:
        self._made[id(obj)] = entry = [obj, 1, False, False]
        self._grow(entry, self._place(items))

    def _grow(self, entry: list, depth: int) -> None:
        if depth >= _MAX_DEPTH:
            self._refuse(f"nests objects more than {_MAX_DEPTH} deep")
        if depth + 1 > entry[1]:
            entry[1] = depth + 1

    def _open(self, target, kinds: tuple, what: str) -> list:
        """The entry of ``target``, a list or dict this unpickler made and placed nowhere yet."""
        entry = self._made.get(id(target))
        if type(target) not in kinds or entry is None:
            self._refuse(f"{what} a {type(target).__name__} it did not make")
        if entry[2]:
            self._refuse(f"{what} a {type(target).__name__} after placing it in another")
        return entry

    def _key_ok(self, key) -> bool:
        kind = type(key)
        if kind is str or kind is int:
            return True
        entry = self._made.get(id(key))
        return kind is self._index and entry is not None and entry[3]     # its fields checked: a flat hash

    # -- the container opcodes

    def _load_mark(self) -> None:
        if len(self.metastack) >= _MAX_DEPTH:
            self._refuse(f"opens more than {_MAX_DEPTH} marks at once")
        self.metastack.append(self.stack)
        self.stack = []
        self.append = self.stack.append

    def _load_empty_list(self) -> None:
        self.append([])
        self._made_of(self.stack[-1])

    def _load_empty_dict(self) -> None:
        self.append({})
        self._made_of(self.stack[-1])

    def _load_list(self) -> None:
        items = self.pop_mark()
        self._made_of(items, items)
        self.append(items)

    def _load_tuple(self) -> None:
        items = tuple(self.pop_mark())
        self._made_of(items, items)
        self.append(items)

    def _load_tuple1(self) -> None:
        self.stack[-1] = items = (self.stack[-1],)
        self._made_of(items, items)

    def _load_tuple2(self) -> None:
        items = (self.stack[-2], self.stack[-1])
        self.stack[-2:] = [items]
        self._made_of(items, items)

    def _load_tuple3(self) -> None:
        items = (self.stack[-3], self.stack[-2], self.stack[-1])
        self.stack[-3:] = [items]
        self._made_of(items, items)

    def _load_dict(self) -> None:
        items = self.pop_mark()
        d: dict = {}
        self._made_of(d)
        self._fill(d, items)
        self.append(d)

    def _load_append(self) -> None:
        value = self.stack.pop()
        entry = self._open(self.stack[-1], (list,), "appends to")
        self._grow(entry, self._place((value,)))
        self.stack[-1].append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        entry = self._open(self.stack[-1], (list,), "appends to")
        self._grow(entry, self._place(items))
        self.stack[-1].extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._fill(self.stack[-1], [key, value])

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        self._fill(self.stack[-1], items)

    def _fill(self, target, items: list) -> None:
        entry = self._open(target, (dict, self._ordered), "sets items of")
        if len(items) % 2:
            self._refuse("sets an item without a value")
        for key in items[::2]:
            if not self._key_ok(key):
                self._refuse(f"uses {_named(key)} as a key")
        self._grow(entry, self._place(items))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    # -- calls, objects, state

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        check = next((ok for f, ok in self._calls if f is func), None)   # by identity: nothing is hashed
        if check is None:
            self._refuse(f"calls {_named(func)}")
        if type(args) is not tuple or not check(args):
            self._refuse(f"calls {_named(func)} with arguments DCP never gives it")
        self.stack[-1] = result = func(*args)
        if type(result) is self._ordered:
            self._made_of(result)

    def _new(self, cls, args, kwargs) -> None:
        if next((f for c, f in self._fields.items() if c is cls), None) is None:
            self._refuse(f"makes an object of {_named(cls)}")
        if type(args) is not tuple or args or type(kwargs) is not dict or kwargs:
            self._refuse(f"makes a {cls.__name__} with arguments")
        inst = cls.__new__(cls)
        self._made_of(inst)
        self.append(inst)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        self._new(self.stack.pop(), args, {})

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        fields = next((f for c, f in self._fields.items() if c is cls), None)
        entry = self._made.get(id(inst))
        if fields is None or entry is None:
            self._refuse(f"sets the state of {_named(inst)}")
        if entry[2] or entry[3]:
            self._refuse(f"sets the state of a {cls.__name__} twice, or after placing it")
        values: list
        if cls is self._props:                        # TensorProperties: its own __setstate__, on a checked tuple
            values = list(state) if type(state) is tuple else []
            want = fields["__state__"]
            if len(values) != len(want) or any(type(v) is not t for v, t in zip(values, want)):
                self._refuse("sets the state of a TensorProperties from anything but (dtype, layout, bool, "
                             "memory format, bool)")
            cls.__setstate__(inst, state)
        else:
            pairs = self._build_state(cls, fields, state)
            for key, value in pairs:
                object.__setattr__(inst, key, value)  # frozen dataclasses too (MetadataIndex), as pickle does
            values = [v for _, v in pairs]
        self._grow(entry, self._place(values))
        entry[3] = True

    def _build_state(self, cls, fields: dict, state) -> list:
        """``[(field, value)]`` of a BUILD's state (a dict, or a (dict, slots) pair), each checked."""
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        out = []
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict:
                self._refuse(f"sets the state of a {cls.__name__} from a {type(part).__name__}")
            for key, value in part.items():
                if type(key) is not str or key not in fields:
                    name = repr(key[:40]) if type(key) is str else _named(key)
                    self._refuse(f"sets {cls.__name__}.{name}, not a field of it")
                if type(value) not in fields[key]:
                    self._refuse(f"sets {cls.__name__}.{key} to {_named(value)}")
                out.append((key, value))
        return out


def _field_types(md, fs, torch, paths: tuple) -> dict:
    """DCP's metadata classes -> field -> the exact types a ``.metadata`` may give it (checked at
    BUILD; :func:`_check_dcp_metadata` then checks what the containers hold). A declared field
    not listed here (one a later torch adds) may hold a plain value only."""
    import collections
    import dataclasses

    none, size, dicts = type(None), torch.Size, (dict, collections.OrderedDict)
    known: dict[Any, dict[str, tuple]] = {
        md.Metadata: {"state_dict_metadata": dicts, "planner_data": (none, *dicts), "storage_data": (none, *dicts),
                      "storage_meta": (none, md.StorageMeta), "version": (none, str)},
        md.TensorStorageMetadata: {"properties": (md.TensorProperties,), "size": (size,), "chunks": (list,)},
        md.BytesStorageMetadata: {},
        md.ChunkStorageMetadata: {"offsets": (size,), "sizes": (size,)},
        md.MetadataIndex: {"fqn": (str,), "offset": (none, size), "index": (none, int)},
        md.StorageMeta: {"checkpoint_id": (none, str, *paths), "save_id": (none, str), "load_id": (none, str),
                         "modules": (list,)},
        fs._StorageInfo: {"relative_path": (str,), "offset": (int,), "length": (int,),
                          "transform_descriptors": (none, list, tuple)},
        # its __getstate__'s tuple, in order
        md.TensorProperties: {"__state__": (torch.dtype, type(torch.strided), bool, md._MEM_FORMAT_ENCODING, bool)},
    }
    out: dict = {}
    for cls, given in known.items():
        declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        out[cls] = {**{name: _PLAIN for name in declared}, **given}
    return out


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
    ours = {"MARK": "_load_mark", "EMPTY_LIST": "_load_empty_list", "EMPTY_DICT": "_load_empty_dict",
            "LIST": "_load_list", "TUPLE": "_load_tuple", "TUPLE1": "_load_tuple1", "TUPLE2": "_load_tuple2",
            "TUPLE3": "_load_tuple3", "DICT": "_load_dict", "REDUCE": "_load_reduce", "NEWOBJ": "_load_newobj",
            "NEWOBJ_EX": "_load_newobj_ex", "BUILD": "_load_build", "APPEND": "_load_append",
            "APPENDS": "_load_appends", "SETITEM": "_load_setitem", "SETITEMS": "_load_setitems"}
    for name, method in ours.items():
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


def _load_dcp_metadata(path: str):
    """DCP's ``Metadata`` from ``path`` (a regular file of at most :data:`_MAX_METADATA` bytes that
    the memory free here holds) through :class:`_DcpMetadataUnpickler`, then checked whole by
    exact types (:func:`_check_dcp_metadata`) before anything reads it."""
    with _open_regular(path) as f:
        st = os.fstat(f.fileno())
        if st.st_size > _MAX_METADATA:
            raise ValueError(f"{path!r} is {st.st_size} bytes, more than the {_MAX_METADATA} fastema reads as a DCP "
                             f"snapshot's metadata (a snapshot's holds about 100 bytes a tensor and shard): it is not "
                             f"one; move the snapshot (and its .json) out of the folder")
        _fits(path, "its DCP metadata", st.st_size, {os.path.basename(path): st})
        try:
            md = _DcpMetadataUnpickler(f, st.st_size).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path!r} was not loaded: {err}. Nothing of it ran: fastema builds DCP's metadata "
                             f"classes from it and nothing else. It is not a snapshot fastema wrote: remove this "
                             f"snapshot, or get an intact copy from its author") from None
        except MemoryError as err:
            raise MemoryError(f"{path!r}: {err or 'out of memory'}: synthesise on a machine with more memory, or, "
                              f"if the snapshot was not this large, move it (and its .json) out of the folder") \
                from None
        except Exception as err:                      # EOFError, a truncated or garbled pickle
            raise ValueError(f"{path!r} is not readable DCP metadata ({_first_line(err)}); the snapshot is "
                             f"truncated or corrupt: move it (and its .json) out of the folder") from None
    _check_dcp_metadata(path, md)
    return md


def _check_dcp_metadata(path: str, md) -> None:
    """Every object of ``md`` by its exact type (no subclass, no other object of the process), the
    tensors' sizes and dtypes, data files inside the snapshot directory, regular files holding
    what it describes. ValueError naming ``path``."""
    import collections
    import pathlib

    import torch
    from torch.distributed.checkpoint import metadata as M
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    def bad(what: str):
        return ValueError(f"{path!r} is not DCP metadata a snapshot holds ({what}); the snapshot is corrupt: move "
                          f"it (and its .json) out of the folder")

    def field(obj, name: str):                        # an instance's field (its class default if not set)
        try:
            return getattr(obj, name)                 # exact DCP classes: no __getattr__ of theirs runs
        except AttributeError:
            raise bad(f"a {type(obj).__name__} without its {name!r}") from None

    none, size, dicts = type(None), torch.Size, (dict, collections.OrderedDict)
    paths = tuple(getattr(pathlib, n) for n in _PATHS)

    def sizes(*values) -> bool:
        return all(type(v) is size and all(d >= 0 for d in v) for v in values)

    if type(md) is not M.Metadata:
        raise bad(_named(md))
    entries = field(md, "state_dict_metadata")
    if type(entries) not in dicts:
        raise bad("no tensor table")
    for key, entry in entries.items():
        if type(key) is not str:
            raise bad(f"a key that is {_named(key)}")
        if type(entry) is M.BytesStorageMetadata:
            continue
        if type(entry) is not M.TensorStorageMetadata:
            raise bad(f"{_named(entry)} for {key[:80]!r}")
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
        raise bad(f"its storage_meta, {_named(meta)}")
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
            raise bad(f"a storage entry {_named(info)}")
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
                    raise _not_regular(data, st.st_mode)
                found[name] = st.st_size
        if info.offset + info.length > found[name]:
            have = found[name]
            raise ValueError(f"the DCP snapshot {os.path.dirname(path)!r}: its data file {name!r} "
                             f"{'is missing' if have < 0 else f'has {have} bytes'}, fewer than the "
                             f"{info.offset + info.length} its metadata describes: the snapshot is truncated; move "
                             f"it (and its .json) out of the folder to synthesise from the others")


_SAFE_READER: Any = None


def _safe_reader_type():
    """``dcp.FileSystemReader`` whose metadata is one parsed and checked by :func:`_load_dcp_metadata`:
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
                    md = _load_dcp_metadata(os.path.join(os.fspath(self.path), name))
                if md.storage_meta is None:           # checked: a StorageMeta this reader made, or None
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
                return md

        _SAFE_READER = SafeReader
    return _SAFE_READER
