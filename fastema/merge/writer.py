"""The output of a merge: safetensors files written tensor by tensor
(:class:`fastema._io.safetensors.SafetensorsWriter`) into a temporary folder beside the output, then
renamed into place in one step.

Publishing without ``overwrite`` never replaces what is at ``out`` at that moment (a file another
merge published meanwhile, an empty folder): the rename fails on an existing target
(``renameat2(RENAME_NOREPLACE)``, else a hard link, else claiming the name first) and the merge
fails with "out exists". The temporary name is unique per merge, so two merges to one output, from
one process or two, never share it: the first to publish wins.

An interrupted or failed merge (an exception, a Ctrl-C, a full disk, and in ``python -m fastema
merge`` a SIGTERM or SIGHUP) removes its temporary folder and leaves no output; a signal that
arrives while the output is renamed into place is held until the renames are done. A merge killed
outright (SIGKILL, or a signal the process does not handle) leaves the temporary folder
(``.<name>.fastema-merge-<pid>-<token>@<host>.tmp``), which the next merge to the same output
removes once that process is gone. Inputs are only ever opened for reading.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import stat
import threading
from typing import Iterator

from .._interrupts import ctrl_c_held
from .._io.files import alive
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
    """Bytes free for this user on ``folder``'s file system (the check tests replace)."""
    return shutil.disk_usage(folder).free


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
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        return f"changed since it was listed: {err.strerror or err}"
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > SMALL:
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
    """Where a merge writes: ``folder`` (a temporary folder beside ``out``, named uniquely per
    merge), published by :meth:`publish` in one rename, removed by :meth:`discard`. ``as_folder``:
    ``out`` is a model folder (else a file, ``folder/<its name>`` until published)."""

    def __init__(self, out: str, as_folder: bool, overwrite: bool, need: int):
        self.given, self.out = out, os.path.abspath(out)
        self.as_folder, self.overwrite = as_folder, overwrite
        parent = os.path.dirname(self.out)
        self.check(out, as_folder, overwrite)
        _remove_stale(parent, os.path.basename(self.out))
        free = free_bytes(parent)
        if free < need:
            raise MergeError(f"out {out!r}: the merge writes {need} bytes, and {parent!r} has {free} free; free "
                             f"{need - free} bytes or write elsewhere")
        token = os.urandom(4).hex()        # two merges to one out, in one process or two, never share a folder
        name = f".{os.path.basename(self.out)}{_TAG}{os.getpid()}-{token}@{socket.gethostname()}.tmp"
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
        """The output, whole, at ``out`` (a Ctrl-C, and a SIGTERM or SIGHUP the process handles, held
        over the renames). Without ``overwrite``, MergeError if anything is at ``out`` now (another
        merge published there meanwhile): that is left as it is."""
        with _signals_held():
            _sync_folder(self.folder)
            src = os.path.join(self.folder, os.path.basename(self.out)) if not self.as_folder else self.folder
            if not self.overwrite:
                try:
                    _rename_new(src, self.out, self.as_folder)
                except FileExistsError:
                    raise MergeError(f"out {self.given!r} exists: it appeared while the merge ran (another merge "
                                     f"published there first?) and was left as it is; nothing was written. Remove "
                                     f"it, or pass overwrite=True (--overwrite) to replace it") from None
            elif not self.as_folder:
                os.replace(src, self.out)
            elif os.path.lexists(self.out):
                old = self.folder[:-len(".tmp")] + ".old"
                os.rename(self.out, old)
                os.rename(self.folder, self.out)
                _remove(old)
            else:
                os.rename(self.folder, self.out)
            if not self.as_folder:
                os.rmdir(self.folder)
            _sync_folder(os.path.dirname(self.out))

    def discard(self) -> None:
        """Nothing of the merge left behind; by path where ``rmtree`` cannot (it needs two descriptors,
        and a merge that ran out of them fails here)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if os.path.lexists(self.folder):
            _remove_by_path(self.folder)


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100
_CANNOT = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
_renameat2: list = []


def _rename_new(src: str, dst: str, is_dir: bool) -> None:
    """Rename ``src`` to ``dst`` unless anything is at ``dst`` (FileExistsError, ``dst`` untouched):
    ``renameat2(RENAME_NOREPLACE)``; where the system or file system has none, a hard link then an
    unlink (a file), or claiming the name (a new empty folder or file) and renaming over the claim."""
    if _rename_noreplace(src, dst):
        return
    if not is_dir:
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError as err:
            if err.errno not in _CANNOT:
                raise
        else:
            os.unlink(src)
            return
    if is_dir:
        os.mkdir(dst, 0o700)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.replace(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            (os.rmdir if is_dir else os.unlink)(dst)
        raise


def _rename_noreplace(src: str, dst: str) -> bool:
    """``renameat2(src, dst, RENAME_NOREPLACE)`` (Linux 3.15+, glibc 2.28+): True when renamed,
    FileExistsError when something is at ``dst``, False where the system or file system cannot."""
    if not _renameat2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            _renameat2.append(fn)
        except (OSError, AttributeError):
            _renameat2.append(None)
    fn = _renameat2[0]
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT:
        return False
    raise OSError(err, os.strerror(err), dst)         # EEXIST: FileExistsError


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A Ctrl-C (:func:`ctrl_c_held`), and a SIGTERM or SIGHUP whose handler is a Python function
    (``python -m fastema merge`` installs one: the Ctrl-C path), held over the block and delivered
    when it exits: the renames of :meth:`Output.publish` run whole."""
    old: dict = {}
    caught: list = []
    if threading.current_thread() is threading.main_thread():
        for signum in _TERMINATING:
            handler = signal.getsignal(signum)
            if callable(handler):
                old[signum] = handler
                signal.signal(signum, lambda n, frame: caught.append((n, frame)))
    try:
        with ctrl_c_held():
            yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if caught:
            signum, frame = caught[0]
            old[signum](signum, frame)


_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    """``path`` gone: a link unlinked (its target kept), a folder removed with what it holds."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_by_path(folder: str) -> None:
    """``folder`` and what it holds removed with one descriptor at a time (``listdir``)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                _remove_by_path(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        os.rmdir(folder)


def _remove_stale(parent: str, base: str) -> None:
    """Temporary folders of earlier merges to ``base`` whose process (on this host) is gone (and the
    ``.old`` name of an output being replaced, a link to a folder included)."""
    prefix, host = f".{base}{_TAG}", socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not (entry.startswith(prefix) and entry.endswith((".tmp", ".old"))):
                continue
            who, _, rest = entry[len(prefix):].partition("@")
            pid = who.partition("-")[0]        # <pid>-<token>, or <pid> (before the token)
            if pid.isdigit() and rest.rpartition(".")[0] == host and not alive(int(pid)):
                _remove(os.path.join(parent, entry))
