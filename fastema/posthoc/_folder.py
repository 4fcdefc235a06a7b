"""One run per snapshot folder: what a writer asks before it writes (:func:`check_folder`).

A folder holds the snapshots of one run (:attr:`fastema.torch.PostHocEMA.run_id`). Before it writes
its first snapshot there, a run *claims* the folder: ``DIR/.fastema-run``, a regular file holding
its run id, host and process id, published whole and exclusively
(:func:`fastema._io.files.write_new`: of two runs, one gets it). Every check reads the claim again,
so a run that finds another's claim is refused before it writes: two runs pointed at one folder
never overwrite each other's snapshots, even when both checked before either wrote. A claim that is
not a regular file (a symbolic link, dangling or not) or not readable is refused, naming it.

A claim whose run wrote no snapshot and whose process is gone (:func:`fastema._io.files.gone`: same
host; another host's processes cannot be seen) is stale: the next run that writes takes it, with a
warning. Taking a claim over is exclusive: the taker first publishes a lock named after that claim
(:func:`~fastema._io.files.write_new` again), reads the claim again and replaces it whole; of two
runs that found the same stale claim, one takes it and the other is refused. A claim by a run on
another host stays until that run's checkpoint is loaded or the file is removed.

The claim also keeps a run to one process: a second process of the same run (an evaluation job that
loaded the training checkpoint into a PostHocEMA with the same path) is refused while the claiming
process runs on this host, before anything is moved; give it another folder. A claim of the same run
from another host is taken as a resume there (with a warning: that host's processes cannot be seen).
Process ids are only checked on this host, and one reused after a restart (a container's processes
numbered from 1 again) looks alive: the refusal says to remove the claim then.

A run resumed from a checkpoint finds its own snapshots later than its time, written by the
trajectory it abandoned (a preemption after the last checkpoint): they are moved into
``DIR/superseded-<time>/`` (renames that never replace: :func:`fastema._io.files.rename_new`), which
synthesis does not read, with a warning naming them, and the run goes on. Nothing else is ever moved
or removed. Importing this module imports no framework.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import time as _time
import warnings

from .._io.files import atomic_write, gone, rename_new, write_new
from .._io.safe_files import few, first_line, open_regular
from ._meta import same_run, stamp, valid_run_id
from ._snapshots import snapshot_at

__all__ = ["CLAIM", "SUPERSEDED", "check_folder", "run_owns"]

#: The file in a snapshot folder that names the run writing there.
CLAIM = ".fastema-run"

#: The prefix of the subfolders that keep the snapshots a resumed run superseded.
SUPERSEDED = "superseded-"
_MAX_CLAIM = 4096


def run_owns(name: str) -> bool:
    """Whether ``name`` (an entry of a run's folder) is the run's own: a snapshot, its claim or a
    temporary of fastema's (``.fastema-*``), a folder of superseded snapshots. Other names are not
    read (``python -m fastema posthoc`` writes beside the snapshots under them only)."""
    return name.startswith(("snapshot-", ".fastema-", SUPERSEDED))


def check_folder(directory: str, run_id: str, time: float, seen: dict | None = None, *,
                 writing: bool = False, stacklevel: int = 1) -> str | None:
    """Why run ``run_id``, now at ``time``, may not write into ``directory`` (None: it may).

    A writer asks this before it applies an update that writes a snapshot (``writing=True``) and
    at its first update. Refused (a message naming the files and the fix; nothing is changed):

    - another run's snapshots (a fresh run pointed at an old folder, two runs in one folder), or
      version-1 snapshots (no run id) unless ``run_id`` is :data:`~.snapshots.LEGACY_RUN_ID`;
    - another run's claim (:data:`CLAIM`) that is not stale, and this run's own claim from
      another process that runs on this host (a second process of one run);
    - files named like snapshots that cannot be read (or are not regular files), and a claim
      that cannot be read or is not a regular file (a symbolic link).

    Then this run's own snapshots later than ``time`` (left by the trajectory after the checkpoint
    it resumed from) are moved into ``superseded-<time>/`` with a warning, and, when
    ``writing``, the folder is claimed for ``run_id`` (a stale claim taken over exclusively, with a
    warning).
    ``seen`` caches what was read of the snapshot files, by name, size and mtime; ``stacklevel``:
    the warnings' (1: this function's caller).
    """
    seen = {} if seen is None else seen
    others: dict = {}
    later, unreadable = [], []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None                                   # the write itself reports a folder that is gone
    for name in names:
        if not name.startswith("snapshot-") or not name.endswith((".json", ".safetensors")):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)                        # (a FIFO is not opened: snapshot_at refuses it)
        except OSError:
            if not os.path.lexists(path):
                continue                              # removed since the listing
            st = os.lstat(path)                       # a link to nothing: snapshot_at refuses it
        key = (name, st.st_size, st.st_mtime_ns, st.st_mode)
        found = seen.get(key)
        if key not in seen:
            try:
                snap = snapshot_at(directory, name)
                found = seen[key] = None if snap is None else (snap.run_id, snap.time)
            except (ValueError, OSError) as err:     # not kept: what it needs may be mended beside it
                found = ("unreadable", first_line(err))   # (a DCP snapshot's folder put back)
        if found is None:
            continue
        if found[0] == "unreadable":
            unreadable.append((path, found[1]))
        elif same_run(found[0]) != same_run(run_id):
            others.setdefault(same_run(found[0]), []).append(path)
        elif found[1] > time:
            later.append(path)
    problems = []
    for other, paths in others.items():
        if other is None:
            problems.append(f"it holds version-1 snapshots, written before run ids ({few(paths)}): give this "
                            f"PostHocEMA a new folder (path=), or, to continue that run, load its fastema 0.1 "
                            f"checkpoint first (load_state_dict): its snapshots then go on beside those")
        else:
            problems.append(f"it holds the snapshots of another run, run {other} ({few(paths)}), which this run "
                            f"({run_id}) would overwrite or mix with: give this PostHocEMA a new folder (path=), "
                            f"or, to continue that run, load its checkpoint first (load_state_dict): the "
                            f"PostHocEMA then takes that run's id")
    if unreadable:
        listed = few([p for p, _ in unreadable])
        fix = "" if "rename it back" in unreadable[0][1] else ": move them out of the folder"  # (its fix said)
        problems.append(f"it holds files named like snapshots that are not readable ones ({listed}: "
                        f"{unreadable[0][1]}){fix}")
    claim = os.path.join(directory, CLAIM)
    held = None
    if not problems:
        held, problem = _held(claim, run_id)
        if problem is not None:
            problems.append(problem)
    if problems:
        return f"PostHocEMA will not write its snapshots into {directory!r}: " + "; ".join(problems) + \
            ". Nothing was written and this call changed nothing."
    if later:
        problem = _supersede(directory, later, time, stacklevel + 2)
        if problem is not None:
            return f"PostHocEMA will not write its snapshots into {directory!r}: {problem}"
    if writing:
        return _claim(claim, run_id, held, stacklevel + 2)
    return None


# --------------------------------------------------------------------------- the claim


def _mine(run_id: str) -> dict:
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}


def _read_claim(path: str) -> dict | None:
    """The claim in ``path`` (None: there is none). ValueError when it is not one (a symbolic link,
    dangling or not, is not: fastema writes a regular file); an empty one (a claim published by
    claiming its name first, where the file system has no ``renameat2`` and no hard links) is read
    again."""
    for attempt in range(6):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            target = "to nothing" if not os.path.exists(path) else "to another file"
            raise ValueError(f"it is a symbolic link {target}, not a claim fastema writes (a regular file)")
        try:
            with open_regular(path, follow=False) as f:
                data = f.read(_MAX_CLAIM + 1)
        except FileNotFoundError:
            return None
        if data or attempt == 5:
            break
        _time.sleep(0.01 * 2 ** attempt)              # its name claimed, the claim renamed over it next
    try:
        claim = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        claim = None
    if not (isinstance(claim, dict) and valid_run_id(claim.get("run_id")) and isinstance(claim.get("host"), str)
            and isinstance(claim.get("pid"), int) and not isinstance(claim.get("pid"), bool)):
        raise ValueError(f"{path!r} is not a claim fastema wrote ({len(data)} bytes)")
    return claim


def _stale(claim: dict) -> bool:
    """True when the claiming process is known to be gone (:func:`fastema._io.files.gone`: it ran
    on this host; a process id reused since looks alive)."""
    return gone(claim["pid"], claim["host"])


def _held(path: str, run_id: str) -> tuple[dict | None, str | None]:
    """(the claim, None) when ``run_id`` may write beside it; (None, why not) otherwise. Called
    when the folder holds no other run's snapshot: a claim by another run means that run checked
    and may be about to write; a claim by this run from another process of this host that still
    runs means a second process of one run (an evaluation job that loaded the training
    checkpoint), which would move the live run's later snapshots aside and write among them."""
    try:
        claim = _read_claim(path)
    except (ValueError, OSError) as err:
        return None, (f"its claim file {path!r} cannot be read ({first_line(err)}): remove it if no other run "
                      f"writes into this folder")
    if claim is None or _stale(claim):
        return claim, None
    here = claim["host"] == socket.gethostname()
    if claim["run_id"] == run_id:
        if not here or claim["pid"] == os.getpid():
            return claim, None                        # this process, or another host's (cannot be seen): a resume
        return None, (f"it is claimed by this run, run {run_id}, from another process that still runs ({path}: "
                      f"process {claim['pid']} on this host): two processes of one run (an evaluation or inference "
                      f"job that loaded the training checkpoint into a PostHocEMA with the same path) would move "
                      f"each other's later snapshots aside and write among them. Give this PostHocEMA another folder "
                      f"(path=); if process {claim['pid']} is not run {run_id} (its process id reused after a "
                      f"restart, as in containers), remove {path}")
    where = "this host, still running" if here else f"host {claim['host']!r}"
    other = claim["run_id"]
    return None, (f"it is claimed by another run, run {other} ({path}: process {claim['pid']} on {where}), which "
                  f"has written no snapshot here yet: two runs writing into one folder overwrite each other's "
                  f"snapshots. Give this PostHocEMA a new folder (path=); to continue run {other}, load its "
                  f"checkpoint first (load_state_dict); if run {other} is over, remove {path}")


def _claim(path: str, run_id: str, held: dict | None, stacklevel: int) -> str | None:
    """Claim the folder for ``run_id`` (before its first write); None, or why not. No claim: one
    is published exclusively (:func:`_create`). A claim ``held`` by a gone process, or by this run from another
    host (a resume elsewhere), is taken over exclusively (:func:`_take`). A folder that cannot be
    written is left to the snapshot's write, which reports it (SnapshotError)."""
    mine = _mine(run_id)
    directory = os.path.dirname(path)
    for attempt in range(8):
        if held == mine:
            return None
        made: bool | str | None
        if held is None:
            made = _create(path, json.dumps(mine).encode())
        else:
            made = _take(path, held, mine)
        if made is None:
            return None                               # not writable, or gone: the write says so
        if made is True:
            if held is not None and held["run_id"] != run_id:
                warnings.warn(f"{directory!r} was claimed by run {held['run_id']} (process {held['pid']} on this "
                              f"host), which is gone and wrote no snapshot there: run {run_id} takes the folder",
                              stacklevel=stacklevel)
            elif held is not None and held["host"] != mine["host"]:
                warnings.warn(f"{directory!r} was claimed by this run, run {run_id}, from process {held['pid']} on "
                              f"host {held['host']!r}, which this host cannot see: taken as a resume. If that "
                              f"process still runs (this is a second process of the run, such as an evaluation "
                              f"job), stop this one and give it another folder (path=)", stacklevel=stacklevel)
            return None
        if made == "busy":                            # another process is taking it over right now
            _time.sleep(0.01 * 2 ** attempt)
        held, problem = _held(path, run_id)           # changed by another run since: read it again
        if problem is not None:
            return f"PostHocEMA will not write its snapshots into {directory!r}: {problem}. Nothing was written " \
                   f"and this call changed nothing."
    lock = _lock_of(path, held) if held is not None else path
    return (f"PostHocEMA will not write its snapshots into {directory!r}: its claim file {path!r} could not be "
            f"taken ({lock!r} says another process is taking it over; if none is, a takeover was interrupted: "
            f"remove {lock!r}). Nothing was written and this call changed nothing.")


def _create(path: str, data: bytes) -> bool | None:
    """Publish the file ``path`` holding ``data``, whole, unless one is there: True, False (one is),
    or None (the folder cannot be written: nothing is left)."""
    try:
        write_new(path, lambda f: f.write(data))
    except FileExistsError:
        return False
    except OSError:
        return None
    return True


def _lock_of(path: str, claim: dict) -> str:
    """The lock that whoever takes over ``claim`` holds: named after that claim."""
    digest = hashlib.sha256(json.dumps(claim, sort_keys=True).encode()).hexdigest()[:16]
    return f"{path}.take-{digest}"


def _take(path: str, held: dict, mine: dict) -> bool | str | None:
    """Replace the claim ``held`` in ``path`` by ``mine``, exclusively: a claim changes only by its
    creation (:func:`_create`) or by the holder of the lock named after it (published the same
    way), which first reads it again. True (taken), False (it changed: read it again), ``"busy"``
    (another process holds the lock) or None (not writable)."""
    lock = _lock_of(path, held)
    made = _create(lock, json.dumps(mine).encode())
    if made is not True:
        return "busy" if made is False else None
    try:
        try:
            if _read_claim(path) != held:
                return False                          # taken by another run before this lock was made
        except (ValueError, OSError):
            return False
        data = json.dumps(mine).encode()
        try:
            atomic_write(path, lambda f: f.write(data))   # the new claim, whole, renamed over the old one
        except OSError:
            return None
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


# --------------------------------------------------------------------------- a resumed run's later snapshots


def _supersede(directory: str, later: list, time: float, stacklevel: int) -> str | None:
    """Move ``later`` (a resumed run's own snapshots after its checkpoint) into a new
    ``superseded-<time>/``, with a warning; None, or why they could not be moved (then none is)."""
    base = os.path.join(directory, SUPERSEDED + stamp(time))
    folder, n = base, 1
    while True:
        try:
            os.mkdir(folder)
            break
        except FileExistsError:
            n += 1
            folder = f"{base}-{n}"
        except OSError as err:
            return (f"it holds {len(later)} snapshot(s) of this run later than its time {time:g} ({few(later)}), "
                    f"which could not be moved aside into {folder!r} ({err}); move them out of the folder. Nothing "
                    f"was written and this call changed nothing.")
    moved: list = []
    try:
        for path in sorted(later):
            parts = [path]
            if path.endswith(".json") and os.path.isdir(path[:-len(".json")]):
                parts.append(path[:-len(".json")])    # a DCP snapshot: its .json first, then its directory
            for part in parts:
                rename_new(part, os.path.join(folder, os.path.basename(part)))
                moved.append(part)
    except OSError as err:
        for part in reversed(moved):
            with contextlib.suppress(OSError):
                rename_new(os.path.join(folder, os.path.basename(part)), part)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
        return (f"it holds {len(later)} snapshot(s) of this run later than its time {time:g} ({few(later)}), which "
                f"could not be moved aside into {folder!r} ({err}); move them out of the folder. Nothing was "
                f"written and this call changed nothing.")
    warnings.warn(f"PostHocEMA resumed at time {time:g} found {len(later)} snapshot(s) of its own run later than "
                  f"that ({few(later)}), written after the checkpoint it resumed from; they were moved into "
                  f"{folder!r}, which synthesis does not read (delete it once you no longer need them)",
                  stacklevel=stacklevel)
    return None
