"""THE post-hoc snapshot file format: written and read here, and nowhere else.

Snapshot files (written by :class:`fastema.torch.PostHocEMA` through :func:`write_snapshot`) are
safetensors, one per snapshot (a sharded model's: one DCP checkpoint directory each, with a
``.json`` of the same metadata beside it), every tracked profile in each: the tensor
``"{k}:{name}"`` is profile ``k`` of the averaged tensor ``name``, ``"model:{name}"`` a tensor
that is not averaged (copied buffers, excluded tensors; taken from the last snapshot), and the
metadata (:class:`SnapshotMeta`, strings only) holds the time, the exponents and the names.
Reading is one tensor at a time (:func:`_reader`: memory-mapped safetensors, or DCP with
``no_dist``). Importing this module imports numpy only; torch and safetensors when used.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import NamedTuple

from .._files import atomic_write

__all__ = ["FORMAT", "VERSION", "Snapshot", "SnapshotMeta", "read_snapshots", "write_snapshot"]

#: The ``format`` every snapshot's metadata carries.
FORMAT = "fastema.posthoc"
#: The snapshot format version this fastema writes and reads.
VERSION = 1


class SnapshotMeta(NamedTuple):
    """The metadata of one snapshot: what :meth:`to_metadata` writes (a ``str -> str`` dict, as
    safetensors stores it, with ``format`` and ``version`` added) and :meth:`from_metadata` reads
    back (checking the format and the version). The keys are spelled here only."""
    time: float                   # training time of the snapshot (the plan's last update time)
    updates: int                  # updates made so far
    gammas: list                  # one exponent per tracked profile (row k of "{k}:{name}")
    averaged: list                # names of the averaged tensors
    others: list                  # names of the tensors kept as they are ("model:{name}")
    calls: int | None = None      # update() calls so far (None: not recorded)
    sigma_rels: list | None = None    # the tracked widths, one per gamma (None: not recorded)
    dtype: str | None = None      # the snapshot dtype ("float32", "bfloat16", "float16")
    shapes: dict = {}             # name -> full shape of tensors stored flat (ZeRO-3 partitions)
    kind: str = "safetensors"     # or "dcp": a torch.distributed.checkpoint directory (sharded models)

    def to_metadata(self) -> dict:
        """``str -> str``: format, version, time, updates, calls, gammas, sigma_rels, averaged,
        others, dtype, shapes (the unrecorded ones left out), and kind when it is not safetensors."""
        meta = {"format": FORMAT, "version": str(VERSION), "time": repr(self.time), "updates": str(self.updates)}
        if self.calls is not None:
            meta["calls"] = str(self.calls)
        meta["gammas"] = json.dumps(list(self.gammas))
        if self.sigma_rels is not None:
            meta["sigma_rels"] = json.dumps(list(self.sigma_rels))
        meta["averaged"] = json.dumps(list(self.averaged))
        meta["others"] = json.dumps(list(self.others))
        if self.dtype is not None:
            meta["dtype"] = self.dtype
        meta["shapes"] = json.dumps(self.shapes)
        if self.kind != "safetensors":
            meta["kind"] = self.kind
        return meta

    @classmethod
    def from_metadata(cls, meta: dict, path: str = "the snapshot") -> SnapshotMeta:
        """Parse a snapshot's metadata; ``ValueError`` (naming ``path``) for another format or a
        newer version."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a fastema post-hoc snapshot (metadata format={meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{path!r} was written by a newer fastema (snapshot version {meta['version']}); "
                             f"upgrade fastema to read it")
        return cls(float(meta["time"]), int(meta["updates"]), json.loads(meta["gammas"]), json.loads(meta["averaged"]),
                   json.loads(meta["others"]), int(meta["calls"]) if "calls" in meta else None,
                   json.loads(meta["sigma_rels"]) if "sigma_rels" in meta else None, meta.get("dtype"),
                   json.loads(meta.get("shapes", "{}")), meta.get("kind", "safetensors"))


class Snapshot(NamedTuple):
    path: str
    time: float
    updates: int
    gammas: list          # one per tracked profile (row)
    averaged: list        # names of the averaged tensors
    others: list          # names of the tensors kept as they are (from the last snapshot)
    kind: str = "safetensors"     # or "dcp": a torch.distributed.checkpoint directory (sharded models)
    shapes: dict = {}             # name -> full shape of tensors stored flat (ZeRO-3 partitions)


def read_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``directory`` (their metadata only), by time."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory of post-hoc EMA snapshots")
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith("snapshot-") and name.endswith(".json"):        # a sharded model's DCP snapshot
            with open(path) as f:
                meta = json.load(f)
            path = path[:-len(".json")]
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path + '.json'!r} describes a DCP snapshot, but {path!r} is missing")
        elif name.startswith("snapshot-") and name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        else:
            continue
        m = SnapshotMeta.from_metadata(meta, path)
        out.append(Snapshot(path, m.time, m.updates, m.gammas, m.averaged, m.others, m.kind, m.shapes))
    if not out:
        raise FileNotFoundError(f"no snapshot-*.safetensors files (or snapshot-*.json DCP snapshots) in "
                                f"{directory!r}")
    out.sort(key=lambda s: s.time)
    names = out[-1].averaged
    for s in out:
        if s.averaged != names:
            raise ValueError(f"{s.path!r} holds other tensors than {out[-1].path!r}: snapshots of different "
                             f"models in one directory")
    return out


def write_snapshot(directory: str, time: float, tensors: dict, meta: SnapshotMeta | dict, *,
                   sharded: bool = False) -> str:
    """Write one snapshot of time ``time`` into ``directory``, whole or not at all; returns its path.

    ``tensors``: ``"{k}:{name}"`` (profile ``k``) and ``"model:{name}"`` entries; ``meta``: the
    metadata strings (format, version, time, gammas, names). A plain model's snapshot is one
    safetensors file (temporary file, then rename), ``tensors`` mapping to ``(tensor, dtype)``
    pairs streamed one at a time (:func:`fastema.torch._safetensors.stream_safetensors`). A sharded
    model's (``tensors`` holding DTensors) is a collective: one DCP checkpoint directory written by
    every rank from its own shards into a temporary directory, renamed, then the metadata ``.json`` beside it, written
    last by rank 0: readers ignore a snapshot without it. ``meta`` may be a :class:`SnapshotMeta`
    (written through :meth:`SnapshotMeta.to_metadata`)."""
    if isinstance(meta, SnapshotMeta):
        meta = meta.to_metadata()
    stamp = f"{int(time):012d}" if float(time).is_integer() else f"{time:020.6f}"
    base = os.path.join(directory, f"snapshot-{stamp}")
    if sharded:
        return _save_dcp(base, tensors, meta)
    from ..torch._safetensors import stream_safetensors

    atomic_write(base + ".safetensors", lambda f: stream_safetensors(f, tensors, meta))
    return base + ".safetensors"


def _save_dcp(base: str, tensors: dict, meta: dict) -> str:
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    tmp = f"{os.path.dirname(base)}/.{os.path.basename(base)}.tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)                       # left by a snapshot that was killed
    dist.barrier()
    dcp.save(tensors, checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        if os.path.exists(base):                 # the same time again: the old metadata goes first
            if os.path.exists(base + ".json"):
                os.unlink(base + ".json")
            shutil.rmtree(base)
        os.replace(tmp, base)
        data = json.dumps({**meta, "kind": "dcp"}).encode()
        atomic_write(base + ".json", lambda f: f.write(data))
    dist.barrier()
    return base


def _reader(snap: Snapshot):
    """``key -> full tensor`` of one snapshot, read on demand (one tensor at a time)."""
    if snap.kind == "dcp":
        import torch
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(snap.path)
        entries = reader.read_metadata().state_dict_metadata

        def read(key):
            # no_dist: this rank alone reads the full tensor (no collective, so rank 0 alone may synthesise)
            meta = entries[key]
            out = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=dcp.FileSystemReader(snap.path), no_dist=True)
            return out[key]

        return read
    from safetensors import safe_open

    handle = safe_open(snap.path, framework="pt")
    return handle.get_tensor
