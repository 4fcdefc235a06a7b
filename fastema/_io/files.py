"""Files and folders written whole or not at all: the one publish protocol of fastema.

- :func:`atomic_write`: a file written into a temporary beside it, flushed to disk, then renamed
  over the target (a failed write leaves the previous file as it was);
- :func:`write_new`: the same, published only where nothing is at the target (a claim, a lock):
  ``FileExistsError`` otherwise, the target untouched;
- :class:`Staging`: a temporary folder beside an output (a merge's), published at it in one rename,
  without replacing what is there unless asked, or removed whole;
- :func:`rename_new`: the rename that never replaces (``renameat2(RENAME_NOREPLACE)``, else a hard
  link, else claiming the name first).

A publish holds a Ctrl-C, and a SIGTERM or SIGHUP the process handles in Python, until its renames
are done (:func:`signals_held`), and flushes the folders it changes (:func:`sync_folder`).

Every temporary is named ``<prefix><pid>[-<token>]@<host>[.<random>].tmp``: a process killed
mid-write leaves it. The next write to the same target sweeps them (:func:`sweep_stale`, the one
sweep): those of this host whose process is gone (:func:`gone`); a live process's, and another
host's (on a shared file system its process ids mean nothing here), are left.
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
import tempfile
import threading
from typing import Callable, Iterator

from .._interrupts import ctrl_c_held

__all__ = ["FileSystem", "Staging", "alive", "atomic_write", "gone", "rename_new", "renamed_in", "save_figure",
           "signals_held", "sweep_stale", "sync_folder", "using", "write_new"]

_TMP_PREFIX = ".fastema-"


# --------------------------------------------------------------------------- files


def atomic_write(path: str, write: Callable) -> None:
    """``write(f)`` into a temporary file in ``path``'s directory, then rename it to ``path``; the
    file gets the mode a plain ``open`` would give (the old file's, else 0666 less the umask). A failed write raises
    ``OSError`` naming the path and the free space, and leaves the previous file as it was. A ``path`` that is a
    symbolic link is replaced by the file, its target left as it was (a rename replaces the name it is given)."""
    tmp = _written(path, write, "the previous file is unchanged")
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: str, **savefig) -> None:
    """A matplotlib figure written to ``path`` as :func:`atomic_write` writes (in the format its
    extension names, PNG without one): a failed write leaves the previous image as it was."""
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=ext, **savefig))


def write_new(path: str, write: Callable) -> None:
    """As :func:`atomic_write`, but published only where nothing is at ``path``: ``FileExistsError``
    (``path`` untouched, the temporary removed) when something is. The file appears whole: of two
    writers, one publishes and the other gets ``FileExistsError``."""
    tmp = _written(path, write, "nothing was written there")
    try:
        rename_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)                          # still there when the rename failed


def _written(path: str, write: Callable, unchanged: str) -> str:
    """``write(f)`` into a new temporary beside ``path``, flushed and synced; its path. Temporaries
    of earlier writes to ``path`` whose process is gone are swept first."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    sweep_stale(directory, f"{_TMP_PREFIX}{base}.")
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{base}.{os.getpid()}@{socket.gethostname()}.",
                               suffix=".tmp", dir=directory)
    try:
        f = os.fdopen(fd, "wb")
        try:        # closed in here: a close that flushes the rest of a failed write again must not hide its error
            os.fchmod(fd, _mode_for(path))
            write(f)
            f.flush()
            system().sync_file(f.fileno(), path)
            f.close()
        except (OSError, RuntimeError) as err:          # torch.save reports a failed write as RuntimeError
            free = shutil.disk_usage(directory).free
            raise OSError(getattr(err, "errno", None) or errno.EIO,
                          f"could not write {path!r} ({free} bytes free on its disk): {err}; {unchanged}") from err
        finally:
            with contextlib.suppress(OSError):
                f.close()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _mode_for(path: str) -> int:
    """The mode a plain ``open(path, "wb")`` leaves: the file's own where one is there (a private
    0600 checkpoint stays private), else 0666 less the umask."""
    try:
        st = os.stat(path)
    except OSError:
        return 0o666 & ~_umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()


def _umask() -> int:
    # /proc gives it without changing it; os.umask() sets it, briefly, for every thread
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- the file system


class FileSystem:
    """The calls of the file system that publishing and clean-up go through (:func:`rename_new`,
    :class:`Staging`, :func:`sweep_stale`): this system's. :func:`using` hands another to a
    ``with`` block, one that is another system (no ``renameat2``: :meth:`rename_noreplace` says
    False; no hard links: :meth:`link` raises EPERM), or this one where something else happens at
    a given call (another writer publishes first, a signal arrives, ``rmtree`` finds no descriptor
    left): how the tests meet those systems and races here."""

    def rename_noreplace(self, src: str, dst: str) -> bool:
        """Rename ``src`` to ``dst`` unless something is there (FileExistsError): True when renamed,
        False where the system or file system has no such rename."""
        return _rename_noreplace(src, dst)

    def rename(self, src: str, dst: str) -> None:
        """``os.rename``: an output replaced with ``overwrite``, moved aside and in (:class:`Staging`)."""
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        """A hard link ``dst`` of ``src`` (``os.link``)."""
        os.link(src, dst)

    def sync_file(self, fd: int, path: str) -> None:
        """``fsync`` of the open file ``fd``, written to become ``path``: where a full disk (or a
        network file system's server) reports a write that did not land."""
        os.fsync(fd)

    def sync_folder(self, folder: str) -> None:
        """``fsync`` of ``folder``, where the file system allows it (errors ignored)."""
        _sync_folder(folder)

    def free_bytes(self, folder: str) -> int:
        """Bytes free for this user on ``folder``'s file system."""
        return shutil.disk_usage(folder).free

    def rmtree(self, path: str) -> None:
        """``path``, a folder, removed with what it holds, as far as it can be (errors ignored)."""
        shutil.rmtree(path, ignore_errors=True)


_SYSTEMS: list[FileSystem] = [FileSystem()]


def system() -> FileSystem:
    """The file system the calls here go through now (:func:`using`)."""
    return _SYSTEMS[-1]


@contextlib.contextmanager
def using(fs: FileSystem) -> Iterator[FileSystem]:
    """``fs`` for the ``with`` block (process-wide, every thread), the one before after it,
    however it ends."""
    if not isinstance(fs, FileSystem):
        raise TypeError(f"files.using() takes a FileSystem, got {type(fs).__name__}")
    _SYSTEMS.append(fs)
    try:
        yield fs
    finally:
        _SYSTEMS.remove(fs)


# --------------------------------------------------------------------------- folders


class Staging:
    """A temporary folder beside ``out``, ``.<name><tag><pid>-<token>@<host>.tmp`` (unique per
    staging: two writers to one ``out``, in one process or two, never share it), published at
    ``out`` by :meth:`publish` or removed by :meth:`discard`. ``as_folder``: ``out`` is the folder
    itself; else a file, written at ``folder/<its name>`` until published. Stale folders of ``tag``
    to the same ``out`` (and the ``.old`` names of an output being replaced) are swept first.
    ``OSError`` when the folder cannot be made."""

    def __init__(self, out: str, tag: str, as_folder: bool):
        self.out, self.as_folder = os.path.abspath(out), as_folder
        parent, base = os.path.split(self.out)
        prefix = f".{base}{tag}"
        sweep_stale(parent, prefix, (".tmp", ".old"))
        token = os.urandom(4).hex()
        self.folder = os.path.join(parent, f"{prefix}{os.getpid()}-{token}@{socket.gethostname()}.tmp")
        os.mkdir(self.folder)

    def path(self, name: str) -> str:
        """Where file ``name`` of the output is written now."""
        return os.path.join(self.folder, name)

    def publish(self, overwrite: bool) -> None:
        """The output, whole, at ``out``, the signals held over the renames, both folders synced.
        Without ``overwrite``, ``FileExistsError`` if anything is at ``out`` now (another writer
        published there meanwhile, a file someone made): that is left as it is, and so is the
        staging folder (:meth:`discard` it). With ``overwrite``, a folder ``out`` (or a link to one:
        the link is replaced, its target kept) is renamed aside, the new one renamed in, the old
        one removed; where the new one cannot be renamed in, the old one is put back."""
        with signals_held():
            sync_folder(self.folder)
            src = self.folder if self.as_folder else os.path.join(self.folder, os.path.basename(self.out))
            if not overwrite:
                rename_new(src, self.out)
            elif not self.as_folder:
                os.replace(src, self.out)
            elif os.path.lexists(self.out):         # (a .old name left by a kill is swept)
                with renamed_in(self.folder, self.out, self.folder[:-len(".tmp")] + ".old"):
                    pass
            else:
                os.rename(self.folder, self.out)
            if not self.as_folder:
                os.rmdir(self.folder)
            sync_folder(os.path.dirname(self.out))

    def discard(self) -> None:
        """Nothing of the staging left behind; by path where ``rmtree`` cannot (it needs two
        descriptors, and a writer that ran out of them fails here)."""
        system().rmtree(self.folder)
        if os.path.lexists(self.folder):
            _remove_by_path(self.folder)


@contextlib.contextmanager
def renamed_in(new: str, out: str, aside: str) -> Iterator[None]:
    """``new`` renamed to ``out`` for the block (what completes it: a folder's metadata beside it),
    what was at ``out`` renamed ``aside`` first and removed after the block; where the rename or the
    block raises, the new one is removed and the old one put back. Through :class:`FileSystem`."""
    fs = system()
    replacing = os.path.lexists(out)
    if replacing:
        fs.rename(out, aside)
    try:
        fs.rename(new, out)
        try:
            yield
        except BaseException:
            _remove(out)
            raise
    except BaseException:
        if replacing:
            fs.rename(aside, out)
        raise
    if replacing:
        _remove(aside)


def sync_folder(folder: str) -> None:
    """``fsync`` of ``folder`` (its renames on disk), where the file system allows it
    (:meth:`FileSystem.sync_folder`)."""
    system().sync_folder(folder)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A Ctrl-C (:class:`fastema._interrupts.ctrl_c_held`), and a SIGTERM or SIGHUP whose handler is
    a Python function (``python -m fastema merge`` installs one: the Ctrl-C path), held over the
    block and delivered when it exits: a publish's renames run whole."""
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


# --------------------------------------------------------------------------- the rename that never replaces


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100
_CANNOT = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
_renameat2: list = []


def rename_new(src: str, dst: str) -> None:
    """Rename ``src`` (a file or a folder) to ``dst`` unless anything is at ``dst``
    (``FileExistsError``, ``dst`` untouched): ``renameat2(RENAME_NOREPLACE)``; where the system or
    file system has none, a hard link then an unlink (a file), or claiming the name (a new empty
    folder or file) and renaming over the claim."""
    fs = system()
    if fs.rename_noreplace(src, dst):
        return
    is_dir = os.path.isdir(src) and not os.path.islink(src)
    if not is_dir:
        try:
            fs.link(src, dst)
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


# --------------------------------------------------------------------------- stale temporaries


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary it left is stale when it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone(pid: int, host: str) -> bool:
    """True when process ``pid`` of ``host`` is known to be gone: it ran on this host and no longer
    runs. Another host's processes cannot be seen, and a process id reused since (a container
    restarted: its processes numbered from 1 again) looks alive."""
    return host == socket.gethostname() and pid > 0 and not alive(pid)


def sweep_stale(directory: str, prefix: str, suffixes: tuple = (".tmp",)) -> list:
    """Remove the temporaries in ``directory`` named ``<prefix><pid>[-<token>]@<host>[.<random>]``
    and one of ``suffixes`` whose process is :func:`gone` (a file, a link: its target kept, or a
    folder with what it holds); the names removed. Nothing else is touched, and a directory that
    cannot be listed is left alone."""
    removed, host = [], socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if not entry.startswith(prefix):
                continue
            suffix = next((s for s in suffixes if entry.endswith(s)), None)
            if suffix is None:
                continue
            who, at, where = entry[len(prefix):len(entry) - len(suffix)].partition("@")
            pid, _, token = who.partition("-")        # <pid>-<token> (a staging folder) or <pid>
            if not (at and pid.isdecimal() and (token == "" or token.isalnum())):
                continue
            if (where == host or where.startswith(host + ".")) and gone(int(pid), host):
                _remove(os.path.join(directory, entry))
                removed.append(entry)
    return removed


def _remove(path: str) -> None:
    """``path`` gone: a link unlinked (its target kept), a folder removed with what it holds."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        system().rmtree(path)


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
