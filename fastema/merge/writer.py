"""The output of a merge: safetensors files written tensor by tensor into a temporary folder beside
the output, then renamed into place in one step.

An interrupted or failed merge (an exception, a Ctrl-C, a full disk) removes its temporary
folder and leaves no output; a merge killed outright leaves the temporary folder
(``.<name>.fastema-merge-<pid>@<host>.tmp``), which the next merge to the same output removes
once that process is gone. Inputs are only ever opened for reading.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import zlib

from .._files import alive
from .._interrupts import ctrl_c_held
from ._dtypes import TO_CODE
from ._source import MergeError

__all__ = ["Output", "SafetensorsWriter", "free_bytes", "small_files"]

_TAG = ".fastema-merge-"
_SKIP = ("optimizer", "scheduler", "rng_state", "trainer_state.json", "training_args.bin", "scaler.pt")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
SMALL = 64 << 20
"""Files of a Hugging Face input folder up to this size that are not weights or training state
(config, generation config, tokenizer, chat template, README) are copied into a merged folder."""


def free_bytes(folder: str) -> int:
    """Bytes free for this user on ``folder``'s file system (the check tests replace)."""
    return shutil.disk_usage(folder).free


def small_files(folder: str) -> list:
    """The files of ``folder`` a merged model folder copies (see :data:`SMALL`), by name."""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        low = name.lower()
        if low.startswith(_SKIP) or low.endswith(_WEIGHTS) or name.startswith("."):
            continue
        try:
            if os.path.isfile(path) and os.path.getsize(path) <= SMALL:
                out.append(name)
        except OSError:                    # a link loop, gone meanwhile: not a small file to copy
            continue
    return out


class SafetensorsWriter:
    """One safetensors file, written in order: the header from every tensor's ``(name, dtype,
    shape, nbytes)`` first, then each tensor's bytes through :meth:`write` (pieces in C order);
    :meth:`close` checks every byte arrived and syncs the file. ``crc``: keep a CRC-32 per tensor
    (for ``verify``)."""

    def __init__(self, path: str, tensors: list, metadata: dict, crc: bool = False):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape, nbytes in tensors:
            header[name] = {"dtype": TO_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.path, self.size = path, 8 + len(head) + offset
        self._left = [(name, nbytes) for name, _, _, nbytes in tensors][::-1]
        self._name, self._due = None, 0
        self.crcs: dict | None = {} if crc else None
        self._f = open(path, "xb", buffering=0)
        self._put(struct.pack("<Q", len(head)) + head)
        self._next()

    def _next(self) -> None:
        while self._left and self._due == 0:
            self._name, self._due = self._left.pop()
            if self.crcs is not None:
                self.crcs[self._name] = 0
            if self._due:
                break

    def write(self, data) -> None:
        """The next ``len(data)`` bytes of the tensor being written."""
        data = memoryview(data).cast("B")
        if len(data) > self._due:
            raise RuntimeError(f"{self.path}: {len(data)} bytes given for {self._name!r}, {self._due} left of it")
        self._put(data)
        if self.crcs is not None:
            self.crcs[self._name] = zlib.crc32(data, self.crcs[self._name])
        self._due -= len(data)
        self._next()

    def _put(self, data) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += self._f.write(view[done:])

    def close(self) -> None:
        left = self._due + sum(n for _, n in self._left)
        if left:
            raise RuntimeError(f"{self.path}: {left} bytes of {self._name!r} and later tensors were not written")
        os.fsync(self._f.fileno())
        self._f.close()

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


class Output:
    """Where a merge writes: ``folder`` (a temporary folder beside ``out``), published by
    :meth:`publish` in one rename, removed by :meth:`discard`. ``as_folder``: ``out`` is a model
    folder (else a file, ``folder/<its name>`` until published)."""

    def __init__(self, out: str, as_folder: bool, overwrite: bool, need: int):
        self.out = os.path.abspath(out)
        self.as_folder = as_folder
        parent = os.path.dirname(self.out)
        self.check(out, as_folder, overwrite)
        _remove_stale(parent, os.path.basename(self.out))
        free = free_bytes(parent)
        if free < need:
            raise MergeError(f"out {out!r}: the merge writes {need} bytes, and {parent!r} has {free} free; free "
                             f"{need - free} bytes or write elsewhere")
        name = f".{os.path.basename(self.out)}{_TAG}{os.getpid()}@{socket.gethostname()}.tmp"
        self.folder = os.path.join(parent, name)
        try:
            os.mkdir(self.folder)
        except OSError as err:
            raise MergeError(f"out {out!r}: its folder {parent!r} is not writable ({err.strerror or err})") from None

    @staticmethod
    def check(out: str, as_folder: bool, overwrite: bool) -> None:
        """MergeError when ``out`` cannot be written: its folder missing, or ``out`` there already
        (unless ``overwrite``, and then of the same kind: file or folder)."""
        out_abs = os.path.abspath(out)
        parent = os.path.dirname(out_abs)
        if not os.path.isdir(parent):
            raise MergeError(f"out {out!r}: its folder {parent!r} does not exist; create it first")
        if os.path.lexists(out_abs):
            if not overwrite:
                raise MergeError(f"out {out!r} exists; remove it, or pass overwrite=True (--overwrite) to replace it")
            if os.path.isdir(out_abs) != as_folder:
                raise MergeError(f"out {out!r} exists and is a {'folder' if os.path.isdir(out_abs) else 'file'}; "
                                 f"overwrite replaces it only with the same kind")

    def path(self, name: str) -> str:
        """Where file ``name`` of the output is written now."""
        return os.path.join(self.folder, name)

    def publish(self) -> None:
        """The output, whole, at ``out`` (a Ctrl-C held over the renames)."""
        with ctrl_c_held():
            _sync_folder(self.folder)
            if not self.as_folder:
                os.replace(os.path.join(self.folder, os.path.basename(self.out)), self.out)
                os.rmdir(self.folder)
            elif os.path.lexists(self.out):
                old = self.folder[:-len(".tmp")] + ".old"
                os.rename(self.out, old)
                os.rename(self.folder, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.folder, self.out)
            _sync_folder(os.path.dirname(self.out))

    def discard(self) -> None:
        """Nothing of the merge left behind."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale(parent: str, base: str) -> None:
    """Temporary folders of earlier merges to ``base`` whose process (on this host) is gone."""
    prefix, host = f".{base}{_TAG}", socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not (entry.startswith(prefix) and entry.endswith((".tmp", ".old"))):
                continue
            pid, _, rest = entry[len(prefix):].partition("@")
            if pid.isdigit() and rest.rpartition(".")[0] == host and not alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
