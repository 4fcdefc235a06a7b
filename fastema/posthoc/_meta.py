"""The snapshot metadata and names: :class:`SnapshotMeta` (every metadata key is spelled there
only), the tensor keys (:func:`profile_key`, :func:`kept_key`: spelled here only), run ids,
snapshot file names (:func:`stamp`), :class:`Snapshot` (what :func:`~.snapshots.read_snapshots`
lists) and :class:`SnapshotError`. Importing this module imports the standard library only.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple, NoReturn

__all__ = ["FORMAT", "LEGACY_RUN_ID", "SNAPSHOT_DTYPES", "VERSION", "Snapshot", "SnapshotError", "SnapshotMeta",
           "kept_key", "profile_key", "same_run", "split_key", "stamp", "valid_run_id"]

#: The ``format`` every snapshot's metadata carries.
FORMAT = "fastema.posthoc"
#: The snapshot format version this fastema writes (it reads 1 and 2).
VERSION = 2
_READS = (1, 2)
#: The dtypes a snapshot may store its profiles in.
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")
_MAX_ROWS = 8
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
        if not (math.isfinite(time) and time > 0):     # time 0: the weights it began from (unusable)
            field.bad("time", "a finite number > 0")
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
            kept = {kept_key(n) for n in others}
            if not (isinstance(raw, dict) and all(isinstance(k, str) and k in kept and isinstance(v, str) and
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


def same_run(run_id: str | None) -> str | None:
    """The run a snapshot's ``run_id`` belongs to: version-1 snapshots (None) and the snapshots of
    a run resumed from a fastema 0.1 checkpoint (:data:`LEGACY_RUN_ID`) are one legacy run (None)."""
    return None if run_id == LEGACY_RUN_ID else run_id


def stamp(time: float) -> str:
    """A time as snapshot names spell it (12 digits, or 20 characters with 6 decimals)."""
    return f"{int(time):012d}" if float(time).is_integer() else f"{time:020.6f}"


# The tensor keys of a snapshot: profile ``row`` of the averaged tensor ``name`` is "{row}:{name}";
# a tensor kept as it is (copied buffers, excluded tensors; taken from the last snapshot) is "model:{name}".
_KEPT = "model:"


def profile_key(row: int, name: str) -> str:
    """The key of profile ``row`` of the averaged tensor ``name``: ``"{row}:{name}"``."""
    return f"{row}:{name}"


def kept_key(name: str) -> str:
    """The key of the tensor ``name`` kept as it is (not averaged): ``"model:{name}"``."""
    return f"{_KEPT}{name}"


def split_key(key: str) -> tuple[str, bool]:
    """``(name, kept)`` of a snapshot's tensor key: its tensor's name, and whether it is a
    :func:`kept_key` (else a :func:`profile_key`)."""
    return key.partition(":")[2], key.startswith(_KEPT)
