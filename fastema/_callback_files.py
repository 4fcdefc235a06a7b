"""The state files of :class:`fastema.transformers.EMACallback`: one in every Trainer checkpoint
folder (``STATE_FILE``, a replicated average), or one a rank (``fastema_ema-rank<r>-of-<world>.safetensors``,
a sharded average; a split one records the flat range of each tensor it holds, so that any world
size resumes from them). Safetensors, read without code execution; a JSON header of the EMA's
counters and settings, the same in every rank's file of one save, and the CRC-32 of every tensor's
stored bytes (``checksums``, as a post-hoc snapshot's: a tensor changed or damaged on disk is refused
by name, never loaded). Each file is opened by :func:`_safe_open`: a FIFO, device or folder named like
one is refused by name, never opened.

Versions: 2 (this one) carries the checksums; 1, written by development versions of 0.2 before them,
is refused, naming what to do (no released fastema wrote it)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import zlib

import torch

from ._checkpoint_format import GROUPS, from_named, load_refused
from ._io.safe_files import regular
from .torch import SplitEntry

__all__ = ["CHECKSUMS", "FORMAT", "STATE_FILE", "VERSION", "local", "parted", "read", "resharded"]

STATE_FILE = "fastema_ema.safetensors"
_RANK_FILE = re.compile(r"fastema_ema-rank(\d+)-of-(\d+)\.safetensors")

FORMAT = "fastema.transformers.EMACallback"
VERSION = 2
CHECKSUMS = "checksums"     # the metadata key of every tensor's CRC-32 (stream_safetensors' checksums=)
_AFTER = ("Resume from another checkpoint folder, or delete the file and pass EMACallback(..., "
          "missing_state='restart') to start a new EMA from the resumed weights.")


def resharded(ema, folder: str, mine: str, template: dict | None = None) -> dict:
    """The state of ``ema`` from files another world size wrote in ``folder``: an average split
    over replicas on W ranks (one file a rank, each with the flat range of every tensor it holds:
    this rank's range of each tensor is read from the files that overlap it, a tensor at a time),
    or a replicated average's single file (full tensors, which a split average cuts). Anything
    else (FSDP2 or ZeRO-3 shards of another world size) is refused, naming the files. ``template``:
    ``ema.state_dict()``, made on every rank before any file is read."""
    found = sorted(n for n in os.listdir(folder) if n.startswith("fastema_ema"))
    template = template if template is not None else ema.state_dict()   # (a collective with ZeRO-1/2 masters)
    split = any(isinstance(v, SplitEntry) for g in GROUPS for v in template.get(g, {}).values())
    worlds: dict[int, dict[int, str]] = {}
    for n in found:
        if (m := _RANK_FILE.fullmatch(n)) is not None:
            worlds.setdefault(int(m[2]), {})[int(m[1])] = os.path.join(folder, n)
    whole = [w for w, files in worlds.items() if sorted(files) == list(range(w))]
    refused = FileNotFoundError(f"EMACallback: {folder!r} holds {found} but this process needs {mine} (a sharded "
                                f"EMA saves one file per rank, a replicated one a single file; an EMA split over "
                                f"replicas resumes at any world size from a complete set of its files. Resume "
                                f"with the world size and sharding that wrote them)")
    if not worlds and STATE_FILE in found and split:  # a replicated average's file: full tensors
        return read(os.path.join(folder, STATE_FILE))
    if len(whole) != 1:
        raise refused
    files = [worlds[whole[0]][r] for r in range(whole[0])]
    _one_save(files)
    state = read(files[0])                       # the header, and the entries every rank holds whole
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(_safe_open(p)) for p in files]
        crcs = [_checksums(f, p) for f, p in zip(opened, files)]
        found_ranges = [_ranges(f, p) for f, p in zip(opened, files)]
        ranges = [r for r in found_ranges if r is not None]
        if len(ranges) != len(found_ranges):
            raise refused                            # sharded (DTensor) parts: the same world size only
        for group in GROUPS:
            for name, value in template.get(group, {}).items():
                key = f"{group}/{name}"
                if key not in ranges[0]:
                    continue                         # whole on every rank: rank 0's
                pieces = isinstance(value, SplitEntry)
                rows, inner = value.shape[0], 0 if pieces else value[0].numel()
                want = value.flat_range() if pieces else (0, inner)
                if want is None:                     # HSDP pieces of a shard on an inner dimension
                    raise refused
                first, count = want
                parts = []
                for f, p, held, crc in zip(opened, files, ranges, crcs):
                    f0, c0 = held.get(key, (0, 0))
                    lo, hi = max(first, f0), min(first + count, f0 + c0)
                    if lo < hi:                      # the file's piece, checked whole, then this rank's part
                        parts.append(_checked(p, key, f.get_tensor(key), crc)[:, lo - f0:hi - f0])
                local = torch.cat(parts, 1) if parts else torch.empty((rows, 0), dtype=value.dtype)
                if tuple(local.shape) != (rows, count):
                    raise load_refused(f"EMACallback: {files!r} hold {tuple(local.shape)} of this rank's "
                                       f"{(rows, count)} elements of {key!r}: the files are damaged or of "
                                       f"another model. Resume from another checkpoint folder.")
                if pieces:                           # this rank's pieces, split again
                    value.load_local(local)
                    state[group][name] = value
                else:
                    state[group][name] = local.reshape(value.shape)
    return state


def _safe_open(path: str):
    """safetensors' ``safe_open`` of the callback's file ``path``, a regular file: a FIFO, device
    or folder named like one is refused by name (:func:`~fastema._io.safe_files.regular`) before
    safetensors opens it (it takes a path only, and would block on a FIFO)."""
    from safetensors import safe_open

    regular(path)
    return safe_open(path, framework="pt")


def read(path: str) -> dict:
    """The EMA state in the callback's file ``path``, not yet checked against an EMA (a
    ``ValueError`` naming the file when it is not one the callback wrote)."""
    with _safe_open(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not an EMACallback state file (format {meta.get('format')!r}); "
                             f"the callback reads only the files it wrote")
        if meta.get("version") == "1":
            raise load_refused(f"EMACallback: {path!r} has version 1, written by a development version of fastema "
                               f"0.2 before the state file carried checksums of its tensors; this fastema reads "
                               f"version {VERSION}, whose tensors it can check. {_AFTER}")
        if meta.get("version") != str(VERSION):
            raise ValueError(f"{path!r} has version {meta.get('version')!r}; this fastema reads version "
                             f"{VERSION}: upgrade fastema")
        try:
            header = json.loads(meta["ema"])
        except (KeyError, ValueError, RecursionError) as err:          # (JSON nested past the stack)
            raise ValueError(f"{path!r} has no readable EMA header ({err}); the file is damaged") from err
        if not isinstance(header, dict):
            raise ValueError(f"{path!r} has an EMA header of type {type(header).__name__}; the file is damaged")
        crcs = _checksums(f, path)
        return from_named(header, ((key, _checked(path, key, f.get_tensor(key), crcs)) for key in f.keys()),
                          repr(path))


def _checksums(f, path: str) -> dict:
    """The CRC-32 of every tensor the callback's file ``path`` holds (its ``checksums`` metadata);
    refused as damaged when missing or malformed."""
    try:
        crcs = json.loads((f.metadata() or {})[CHECKSUMS])
    except (KeyError, ValueError, RecursionError):
        crcs = None
    if not isinstance(crcs, dict) or not all(isinstance(v, str) and _CRC.fullmatch(v) for v in crcs.values()):
        raise load_refused(f"EMACallback: {path!r} has no readable {CHECKSUMS!r} metadata (the CRC-32 of each "
                           f"tensor, which fastema writes): the file is damaged. {_AFTER}")
    return crcs


_CRC = re.compile(r"[0-9a-f]{8}")


def _checked(path: str, key: str, t: torch.Tensor, crcs: dict) -> torch.Tensor:
    """``t``, tensor ``key`` of ``path`` as read, when the CRC-32 of its bytes is the one written;
    refused naming the file and the tensor otherwise (nothing is loaded)."""
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    crc = f"{zlib.crc32(data):08x}"
    if key not in crcs:
        raise load_refused(f"EMACallback: {path!r} has no checksum of tensor {key!r}, where fastema writes one of "
                           f"every tensor: the file was changed after it was written. {_AFTER}")
    if crc != crcs[key]:
        raise load_refused(f"EMACallback: {path!r}: tensor {key!r} fails its checksum (CRC-32 {crc}, written "
                           f"{crcs[key]}): the file was changed or damaged on disk after it was written. {_AFTER}")
    return t


def _one_save(files: list) -> None:
    """Refuse per-rank files that are not of one save: every rank's header (the counters, the split's
    run id) must be the same. A folder re-saved where one rank failed, or written by two runs, holds
    files of two steps, whose slices would resume at different steps."""
    heads = []
    for p in files:
        with _safe_open(p) as f:
            heads.append((f.metadata() or {}).get("ema"))
    odd = [p for p, h in zip(files, heads) if h != heads[0]]
    if odd:
        def said(h):
            try:
                d = json.loads(h)
                return f"calls={d.get('calls')!r}, split_id={d.get('split_id')!r}"
            except (TypeError, ValueError, AttributeError, RecursionError):     # (no dict; nested past the stack)
                return "no readable header"
        raise load_refused(f"EMACallback: the per-rank files {[os.path.basename(p) for p in files]} are not of one "
                           f"save ({os.path.basename(files[0])}: {said(heads[0])}; {os.path.basename(odd[0])}: "
                           f"{said(heads[files.index(odd[0])])}): a save that failed on some ranks, or two runs "
                           f"writing one output_dir. Resume from another checkpoint folder.")


def _ranges(f, path: str) -> dict | None:
    """The flat range ``[first, count]`` of every tensor a split average's per-rank file holds (its
    ``pieces`` metadata), None for a file with none (sharded parts); refused as damaged when malformed."""
    text = (f.metadata() or {}).get("pieces")
    if text is None:
        return None
    try:
        ranges = json.loads(text)
    except (ValueError, RecursionError):
        ranges = None
    if not isinstance(ranges, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 0 for x in v) for v in ranges.values()):
        raise load_refused(f"EMACallback: {path!r} has unreadable 'pieces' metadata (the flat range of each "
                           f"tensor it holds): the file is damaged. Resume from another checkpoint folder.")
    return ranges


def parted(value) -> bool:
    """Whether a state tensor is one rank's part of a tensor: a split average's
    :class:`~fastema.torch.SplitEntry`, or a sharded average's DTensor."""
    return isinstance(value, SplitEntry) or isinstance(value, _dtensor())


def local(value):
    """This rank's part of a sharded (DTensor) or split state tensor; any other tensor as it is."""
    return value.to_local() if parted(value) else value


class _NoDTensor:
    """What nothing is an instance of: DTensor where torch has no distributed package."""


def _dtensor() -> type:
    """torch's DTensor class (no process group needed), or :class:`_NoDTensor`."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                                  # pragma: no cover - no torch.distributed
        return _NoDTensor
    return DTensor
