"""Safe file access for every checkpoint reader (the post-hoc snapshots, ``fastema.posthoc.check_folder``,
the merge's inputs): only regular files are opened (a FIFO, a socket or a device named like a
checkpoint's file is refused, never read: :func:`regular`; :func:`open_regular` checks the open file
itself), a read is bounded by the memory free here before it allocates (:func:`fits`), and bytes are
read with ``pread`` from a descriptor the reader holds (:func:`pread_into`: never a memory map, so a
file that shrinks while it is read is a short read, never SIGBUS). A refusal
is a :class:`FileRefused` (a ValueError; :mod:`fastema.merge` raises it as its MergeError, the message
kept). With the helpers their messages share (:func:`few`, :func:`first_line`, :func:`os_problem`),
and the writers' check of an output path before their work (:func:`writable`).
Importing this module imports the standard library only."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

__all__ = ["FileRefused", "few", "first_line", "fits", "memory_available", "not_regular", "open_problem",
           "open_regular", "os_problem", "out_of_memory", "pread_into", "regular", "regular_fd",
           "resident", "root_error", "writable"]


class FileRefused(ValueError):
    """A file refused before it is read: not a regular file, or (read for an input named ``what``) one
    that cannot be opened, or whose safetensors header is damaged. The message names the file and the fix."""


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a plain file"


def not_regular(path: str, mode: int, what: str | None = None) -> FileRefused:
    """The refusal of ``path`` (of ``mode``): a snapshot's file, or the file of the input ``what``."""
    if what is not None:
        return FileRefused(f"{what}: {path!r} is not a regular file (a FIFO, device or socket could block or never "
                           f"end); give the checkpoint file itself")
    return FileRefused(f"{path!r} is {_kind(mode)}, not a regular file (reading it could block, or never end): a "
                       f"snapshot is made of regular files; move it out of the folder")


def regular(path: str, what: str | None = None) -> os.stat_result:
    """``os.stat(path)`` (a symlink followed), refused (:class:`FileRefused` naming it) unless a regular
    file: a FIFO, a device or a socket named like a checkpoint's file is never opened. ``what``: the
    input the file is read for (a merge's ``input 0 (path)``), named by the refusal, which then also
    words a file that cannot be stat'ed (:func:`os_problem`; without ``what`` that OSError is raised)."""
    try:
        st = os.stat(path)
    except OSError as err:
        if what is None:
            raise
        raise FileRefused(os_problem(path, what, err)) from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode, what)
    return st


def os_problem(path: str, what: str, err: OSError) -> str:
    """What to say when ``path``, read for ``what``, could not be stat'ed or opened (``err``)."""
    if err.errno == errno.ELOOP:
        return f"{what}: {path!r} is a loop of symbolic links; point it at the checkpoint itself"
    if err.errno == errno.ENOENT:
        return f"{what}: {path!r} does not exist"
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return open_problem(path, what, err)
    return f"{what}: {path!r} cannot be read ({err.strerror or err})"


def open_problem(path: str, what: str, err: OSError) -> str:
    """What to say when ``path`` could not be opened for lack of descriptors (EMFILE, ENFILE)."""
    try:
        import resource

        limit = f", now {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
    except (ImportError, OSError, ValueError):
        limit = ""
    whose = "this process's" if err.errno == errno.EMFILE else "the system's"
    return (f"{what}: {path!r} cannot be opened: too many open files ({whose} limit{limit}); raise the limit on "
            f"open files (`ulimit -n`) or merge fewer inputs")


def open_regular(path: str, follow: bool = True, what: str | None = None):
    """``open(path, "rb")`` of a regular file, checked on the open file itself (opened without
    blocking, so a FIFO swapped in after a check cannot hang the reader either); ``follow=False``:
    a symbolic link is not followed (OSError ELOOP). ``what``: the input it is read for, named by
    the refusal (:func:`not_regular`). The one road by which fastema opens a file to read it
    (``tests/test_file_reads.py``); ``torch.load`` reads the file object it returns."""
    fd = regular_fd(path, follow, what)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_fd(path: str, follow: bool = True, what: str | None = None) -> int:
    """:func:`open_regular`'s descriptor (the caller closes it), for a reader of descriptors
    (``pread``)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def pread_into(fd: int, out, offset: int) -> int:
    """Fill ``out`` (a writable buffer) with the bytes of the file open at ``fd`` from ``offset``
    (``pread``: the descriptor's position is not used, so threads may share it); returns how many
    were read, fewer than ``len(out)`` only where the file ended first (it shrank since its size was
    read: the caller says so, naming the file). OSError (EIO: the disk) passes through. The one
    ``pread`` loop of the checkpoint readers (the merge's ``read="pread"``, post-hoc snapshots)."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)      # EINTR is retried by Python
        if got <= 0:
            break
        done += got
    return done


_ASSUMED: list = []            # the open assumed_free() blocks' figures, innermost last


@contextlib.contextmanager
def assumed_free(nbytes: int) -> Iterator[None]:
    """For the ``with`` block, :func:`memory_available` says ``nbytes`` (every thread): a machine
    with that much memory free, how the tests meet a small one. Put back after, however it ends."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"assumed_free() takes a number of bytes >= 0, got {nbytes!r}")
    _ASSUMED.append(nbytes)
    try:
        yield
    finally:
        _ASSUMED.pop()


def memory_available() -> int | None:
    """Bytes of memory this process can still get (Linux: MemAvailable + SwapFree, within its
    cgroup's limit), or None where that is not known (no bound); in an :func:`assumed_free`
    block, the figure it gives."""
    if _ASSUMED:
        return _ASSUMED[-1]
    avail = None
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {}
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                key, _, value = line.partition(":")
                if value.split() and value.split()[0].isdecimal():
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


def resident() -> int | None:
    """Bytes of memory this process holds (Linux: /proc/self/statm), or None where not known."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read(256).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def out_of_memory(err: BaseException) -> bool:
    """An allocation failure: MemoryError, or torch's RuntimeError for one (CPU or GPU)."""
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "Cannot allocate memory" in text))


_SMALL = 1 << 24                      # reads below 16 MiB are not bounded (no /proc read per small tensor)


def fits(path: str, what: str, nbytes: int, files: dict) -> None:
    """Before a read allocates ``nbytes`` for ``what`` (a tensor's key, quoted, or a phrase):
    refuse it when it is larger than the memory this machine has free (a MemoryError naming the
    file; nothing is allocated). When the data ``files`` (name -> os.stat_result) hold fewer bytes
    on disk than that (sparse, or compressed by the file system), the message says so: a snapshot
    that was not written this large is damaged or forged."""
    if nbytes < _SMALL:
        return
    avail = memory_available()
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


def few(paths: list, n: int = 3) -> str:
    """The first ``n`` of ``paths`` by their base names, and how many more (for messages)."""
    names = [os.path.basename(p) for p in paths]
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def root_error(err: BaseException) -> BaseException:
    """The first rank's error inside a DCP CheckpointException (else ``err``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        failure = next(iter(failures.values()))
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def first_line(err: BaseException) -> str:
    """``"Type: first line"`` of an error (of the first rank's, for a DCP CheckpointException)."""
    err = root_error(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def writable(option: str, path: str, example: str = "out.png") -> None:
    """ValueError naming ``option`` (``--out``, ``save()``) for an output file that cannot be written (a
    directory, a name ending in a separator, a missing or read-only folder), before the work; ``example``:
    the file name suggested in a directory given instead (``"ema.safetensors"``; an image by default)."""
    if os.path.isdir(path) or path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ValueError(f"{option} {path!r} is a directory: give a file name in it, e.g. "
                         f"{os.path.join(path, example)!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path!r}: its folder {parent!r} does not exist; create it first "
                         f"(mkdir -p {parent}) or write somewhere else")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r}: its folder {parent!r} is not writable; write somewhere else")
