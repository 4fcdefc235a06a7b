"""fastema's post-hoc snapshots as merge inputs: one :class:`SnapshotSource` per stored profile (row
``k`` of snapshot ``t``: the tensors ``"{k}:{name}"``), at the snapshot's time, with its exponent
``gamma``, so ``sigma_rel:X`` weights are EDM2's synthesis and every other style works too.

Read through :mod:`fastema.posthoc`'s own checks: the folder's snapshots by
:func:`fastema.posthoc.read_snapshots` (one run, shapes agree, regular files only), each tensor by
``fastema.posthoc.tensor_reader`` (the checksum, the shape, a DCP snapshot's metadata
through the allow-list unpickler). A snapshot's tensors are read whole (:attr:`mappable` False),
with ``pread`` from a descriptor held until the merge closes its inputs, whatever ``read=`` says (a
snapshot truncated during the merge is a MergeError naming it, never SIGBUS);
the tensors it keeps as they are (``"model:{name}"``) are copied from the ``copy_from`` input.
"""
from __future__ import annotations

import math
import os
from typing import Any

from .._io.safetensors import ITEMSIZE
from ..posthoc import FORMAT, kept_key, profile_key
from ._safetensors_input import read_safetensors_header
from ._source import Entry, MergeError, WholeTensorSource

__all__ = ["SnapshotSource", "snapshot_file", "snapshot_folder"]


class _Snapshot:
    """One snapshot's stored tensors (key -> (dtype, shape)) and its reader, shared by its rows."""

    def __init__(self, snap, label: str):
        self.snap, self.label = snap, label
        self.stored = self._stored()
        self._read: Any = None

    def _stored(self) -> dict:
        snap = self.snap
        if snap.kind == "dcp":
            from .._io.dcp import load_dcp_metadata

            md = load_dcp_metadata(os.path.join(snap.path, ".metadata"))
            return {k: (str(m.properties.dtype).removeprefix("torch."), tuple(int(d) for d in m.size))
                    for k, m in md.state_dict_metadata.items() if hasattr(m, "properties")}
        entries, _, _, _ = read_safetensors_header(snap.path, self.label)
        return {k: (e.dtype, tuple(e.shape)) for k, e in entries.items()}

    def entry(self, key: str, name: str) -> Entry:
        meta = self.snap.meta
        if key not in self.stored:
            raise MergeError(f"{self.label}: {self.snap.path!r} has no tensor {key!r}, which its metadata names; "
                             f"the snapshot is damaged")
        dtype, shape = self.stored[key]
        if meta is not None and key in meta.raw:                   # stored as its bytes
            dtype = meta.raw[key]
        shape = tuple(self.snap.shapes.get(name, shape))           # ZeRO-3's flat tensors: their full shape
        if dtype not in ITEMSIZE:
            raise MergeError(f"{self.label}: tensor {key!r} is {dtype}, a dtype fastema does not read")
        return Entry(name, dtype, shape, math.prod(shape) * ITEMSIZE[dtype])

    def read(self, key: str):
        from ..posthoc import tensor_reader

        if self._read is None:
            self._read = tensor_reader(self.snap)
        try:
            return self._read(key).contiguous()
        except (ValueError, MemoryError, OSError) as err:
            raise MergeError(f"{self.label}: {' '.join(str(err).split())}") from None

    def close(self) -> None:
        """Closes the snapshot's file (each row's :meth:`SnapshotSource.close` calls it)."""
        if self._read is not None:
            read, self._read = self._read, None
            read.close()


class SnapshotSource(WholeTensorSource):
    """Stored profile ``row`` of one post-hoc snapshot (see the module)."""

    format = "snapshot"

    def __init__(self, shared: _Snapshot, row: int, label: str):
        snap = shared.snap
        super().__init__(snap.path, label)
        self.display = f"{snap.path} [profile {row}, gamma {snap.gammas[row]:.4g}]"
        self._shared, self._keys = shared, {}
        for name in snap.averaged:
            self._keys[name] = profile_key(row, name)
            self.entries[name] = shared.entry(self._keys[name], name)
        for name in snap.others:
            self._keys[name] = kept_key(name)
            self.entries[name] = shared.entry(self._keys[name], name)
            self.copied[name] = "kept as it is by the snapshots"
        self.profile = (float(snap.time), float(snap.gammas[row]), snap.run_id)
        self.step = snap.time

    def _tensor(self, name: str):
        if name not in self._loaded:                   # until done(name): a piece may still be read
            self._loaded[name] = self._shared.read(self._keys[name])
        return self._loaded[name]

    def close(self) -> None:
        super().close()
        self._shared.close()



def _rows(snaps: list, label: str) -> list:
    out = []
    for snap in snaps:
        shared = _Snapshot(snap, label)
        out += [SnapshotSource(shared, k, label) for k in range(len(snap.gammas))]
    return out


def snapshot_file(src, read: str) -> list:
    """The stored profiles of a post-hoc snapshot file (``src``: its :class:`SafetensorsSource`), or []
    for a safetensors file that is not one."""
    if src.meta.get("format") != FORMAT:
        return []
    from ..posthoc import snapshot_at

    try:
        snap = snapshot_at(os.path.dirname(os.path.abspath(src.path)), os.path.basename(src.path))
    except (ValueError, OSError) as err:
        raise MergeError(f"{src.label}: {' '.join(str(err).split())}") from None
    if snap is None:
        raise MergeError(f"{src.label} is a post-hoc snapshot file renamed: its name must stay snapshot-<time>"
                         f".safetensors")
    return _rows([snap], src.label)


def snapshot_folder(path: str, label: str, read: str) -> list:
    """The stored profiles of every snapshot in a post-hoc snapshot folder (oldest first, rows in order),
    or [] when the folder holds no snapshot."""
    if not any(n.startswith("snapshot-") for n in os.listdir(path)):
        return []
    from ..posthoc import read_snapshots

    try:
        snaps = read_snapshots(path)
    except (ValueError, OSError) as err:
        raise MergeError(f"{label}: {' '.join(str(err).split())}") from None
    return _rows(snaps, label)
