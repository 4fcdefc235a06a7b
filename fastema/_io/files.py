"""Files written whole or not at all: a temporary file beside the target, then a rename."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile

__all__ = ["alive", "atomic_write"]

_TMP_PREFIX = ".fastema-"


def atomic_write(path: str, write) -> None:
    """``write(f)`` into a temporary file in ``path``'s directory, then rename it to ``path``; the
    file gets the mode a plain ``open`` would give (0666 less the umask). A failed write raises
    ``OSError`` naming the path and the free space, and leaves the previous file as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_temporaries(directory, base)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{base}.{os.getpid()}@{socket.gethostname()}.",
                               suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:      # torch.save reports a failed write as RuntimeError
                free = shutil.disk_usage(directory).free
                raise OSError(getattr(err, "errno", None) or errno.EIO,
                              f"could not write {path!r} ({free} bytes free on its disk): {err}; the previous "
                              f"file is unchanged") from err
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def _remove_stale_temporaries(directory: str, base: str) -> None:
    # Saves killed mid-write leave .fastema-<name>.<pid>@<host>.*.tmp behind: remove this host's whose
    # process is gone (on a shared file system another host's pids mean nothing here).
    prefix, host = f"{_TMP_PREFIX}{base}.", socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if not (entry.startswith(prefix) and entry.endswith(".tmp")):
                continue
            pid, _, rest = entry[len(prefix):].partition("@")
            if pid.isdigit() and rest.startswith(host + ".") and not alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary it left is stale when it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
