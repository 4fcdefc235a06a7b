"""Where a merge writes (:class:`Output`) and the small files a merged folder copies
(:func:`small_files`).

The output is written into a temporary folder beside ``out``,
``.<name>.fastema-merge-<pid>-<token>@<host>.tmp`` (unique per merge), and published in one rename
by :class:`fastema._io.files.Staging`: without ``overwrite`` never over what is at ``out`` at that
moment (another merge published first: "out exists", the first to publish wins), with a Ctrl-C,
SIGTERM or SIGHUP held until the renames are done. An interrupted or failed merge removes the
folder; one killed outright (SIGKILL, a signal it does not handle) leaves it, and the next merge to
the same output removes it once that process is gone. Inputs are only ever opened for reading.
"""
from __future__ import annotations

import os
import shutil
import stat

from .._io import files
from .._io.files import Staging
from .._io.safe_files import FileRefused, open_regular
from ._source import MergeError

__all__ = ["Output", "copy_small", "free_bytes", "small_files"]

_TAG = ".fastema-merge-"
_SKIP = ("optimizer", "scheduler", "rng_state", "trainer_state.json", "training_args.bin", "scaler.pt")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_PSEUDO = ("/proc", "/sys", "/dev")      # never copied, whatever links there
SMALL = 64 << 20
"""Files of a Hugging Face input folder up to this size that are not weights or training state
(config, generation config, tokenizer, chat template, README) are copied into a merged folder."""


def free_bytes(folder: str) -> int:
    """Bytes free for this user on ``folder``'s file system (:meth:`fastema._io.files.FileSystem.free_bytes`)."""
    return files.system().free_bytes(folder)


def small_files(folder: str) -> tuple:
    """``(files, skipped)``: the files of ``folder`` a merged model folder copies (see :data:`SMALL`),
    ``[(name, path, size)]`` with ``path`` the regular file it is, links resolved; and ``{name: why}``
    of the others it would have copied: links that lead out of the folder (a Hugging Face cache
    snapshot's links into its repo folder's ``blobs/`` count as inside), broken links, and what
    is not a regular file (a FIFO, a device, a socket; anything under ``/proc``, ``/sys``, ``/dev``).
    A merged folder is often uploaded: nothing outside the donor folder goes into it."""
    homes = _homes(folder)
    files, skipped = [], {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        low = name.lower()
        if low.startswith(_SKIP) or low.endswith(_WEIGHTS) or name.startswith("."):
            continue
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as err:             # a link loop, a broken link, gone meanwhile
            if os.path.islink(path):
                skipped[name] = f"a link that leads nowhere: {err.strerror or err}"
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if not any(_inside(real, h) for h in homes) or any(_inside(real, p) for p in _PSEUDO):
            skipped[name] = f"a link to {real!r}, outside the folder"
        elif not stat.S_ISREG(st.st_mode):
            skipped[name] = "a FIFO, device or socket, not a regular file"
        elif st.st_size <= SMALL:
            files.append((name, real, st.st_size))
    return files, skipped


def copy_small(src: str, dst: str) -> str:
    """Copy the small file ``src`` (a resolved path of :func:`small_files`) to the new file ``dst``;
    returns why not ("" when copied): it changed into a link, or something not a regular file,
    or grew past :data:`SMALL`, since it was listed."""
    try:
        f = open_regular(src, follow=False)
    except FileRefused:
        return "changed since it was listed (no longer a small regular file)"
    except OSError as err:
        return f"changed since it was listed: {err.strerror or err}"
    with f:
        if os.fstat(f.fileno()).st_size > SMALL:
            return "changed since it was listed (no longer a small regular file)"
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out)
    return ""


def _homes(folder: str) -> tuple:
    """The folders a small file of ``folder`` may link into: ``folder`` itself (links resolved), and
    for a Hugging Face cache snapshot (``models--org--name/snapshots/<revision>``) its repo folder's
    ``blobs/``, where the cache keeps the files its links point to."""
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        return real, os.path.join(os.path.dirname(parent), "blobs")
    return (real,)


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


class Output:
    """Where a merge writes: ``folder``, a temporary folder beside ``out`` (a
    :class:`fastema._io.files.Staging`, named uniquely per merge), published by :meth:`publish` in
    one rename, removed by :meth:`discard`. ``as_folder``: ``out`` is a model folder (else a file,
    ``folder/<its name>`` until published). ``need``: the bytes the merge writes (refused when
    ``out``'s file system has fewer free)."""

    def __init__(self, out: str, as_folder: bool, overwrite: bool, need: int):
        self.given, self.out = out, os.path.abspath(out)
        self.as_folder, self.overwrite = as_folder, overwrite
        parent = os.path.dirname(self.out)
        self.check(out, as_folder, overwrite)
        try:
            self._staging = Staging(self.out, _TAG, as_folder)      # stale folders of dead merges swept first
        except OSError as err:
            raise MergeError(f"out {out!r}: its folder {parent!r} is not writable ({err.strerror or err})") from None
        self.folder = self._staging.folder
        free = free_bytes(parent)
        if free < need:
            self.discard()
            raise MergeError(f"out {out!r}: the merge writes {need} bytes, and {parent!r} has {free} free; free "
                             f"{need - free} bytes or write elsewhere")

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
        return self._staging.path(name)

    def publish(self) -> None:
        """The output, whole, at ``out`` (:meth:`fastema._io.files.Staging.publish`: a Ctrl-C, and a
        SIGTERM or SIGHUP the process handles, held over the renames). Without ``overwrite``,
        MergeError if anything is at ``out`` now (another merge published there meanwhile): that is
        left as it is."""
        try:
            self._staging.publish(self.overwrite)
        except FileExistsError:
            raise MergeError(f"out {self.given!r} exists: it appeared while the merge ran (another merge published "
                             f"there first?) and was left as it is; nothing was written. Remove it, or pass "
                             f"overwrite=True (--overwrite) to replace it") from None

    def discard(self) -> None:
        """Nothing of the merge left behind (the temporary folder removed, by path where ``rmtree``
        cannot)."""
        self._staging.discard()
