"""The one publish protocol (fastema._io.files) that a merge's output and a post-hoc snapshot folder
share: files published whole (replacing, or only where nothing is), a staged folder published in one
rename with the signals held, the rename that never replaces (renameat2, a hard link, a claimed name),
and the one sweep of stale temporaries (the pid@host liveness protocol) both of them call."""
import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
from merge_helpers import checkpoints, fingerprint, leftovers
from torch import nn

from fastema._io import files
from fastema.merge import merge_checkpoints
from fastema.torch import PostHocEMA


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _without(monkeypatch, way: str) -> None:
    """The rename that never replaces as on a system without renameat2 (``link``), and without hard
    links either (``claim``)."""
    if way != "renameat2":
        monkeypatch.setattr(files, "_rename_noreplace", lambda src, dst: False)
    if way == "claim":
        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(files.os, "link", no_links)


# ------------------------------------------------------------ the one sweep


def test_one_sweep_serves_the_merge_and_the_posthoc_folder(tmp_path, monkeypatch):
    """issue 51: the merge had its own copy of the stale-temporary sweep; now a merge's staged folder, a
    snapshot's file and a post-hoc folder's claim all call fastema._io.files.sweep_stale."""
    calls = []
    real = files.sweep_stale
    monkeypatch.setattr(files, "sweep_stale", lambda d, prefix, *a: calls.append((d, prefix)) or real(d, prefix, *a))
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert (str(tmp_path), ".out.safetensors.fastema-merge-") in calls
    calls.clear()
    snaps = tmp_path / "snaps"
    ph = PostHocEMA(nn.Linear(3, 2), snapshot_every=1, path=snaps)
    ph.update()
    prefixes = sorted(p for d, p in calls if d == str(snaps))
    assert ".fastema-.fastema-run." in prefixes                      # the claim, published by write_new
    assert any(p.startswith(".fastema-snapshot-") for p in prefixes)  # the snapshot, by atomic_write


def test_a_posthoc_claim_sweeps_the_temporaries_of_dead_processes_only(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    stale = snaps / f".fastema-.fastema-run.{dead}@{host}.x1.tmp"
    live = snaps / f".fastema-.fastema-run.{os.getpid()}@{host}.x2.tmp"      # a claim being written elsewhere
    remote = snaps / f".fastema-.fastema-run.{dead}@not-{host}.x3.tmp"      # another machine's (shared disk)
    for f in (stale, live, remote):
        f.write_bytes(b"partial")
    PostHocEMA(nn.Linear(3, 2), snapshot_every=1, path=snaps).update()
    assert not stale.exists() and live.exists() and remote.exists()
    assert (snaps / ".fastema-run").is_file()


def test_the_sweep_reads_every_temporary_name_the_protocol_writes(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    names = {
        f".out.fastema-merge-{dead}-0badc0de@{host}.tmp": True,     # a staged folder
        f".out.fastema-merge-{dead}@{host}.tmp": True,              # (without a token)
        f".out.fastema-merge-{dead}-0badc0de@{host}.old": True,     # an output being replaced
        f".out.fastema-merge-{os.getpid()}-0badc0de@{host}.tmp": False,
        f".out.fastema-merge-{dead}-0badc0de@{host}x.tmp": False,   # another host whose name starts like ours
        f".out.fastema-merge-{dead}-0badc0de@other.tmp": False,
        f".out.fastema-merge-x{dead}@{host}.tmp": False,            # not a pid
        f".out.fastema-merge-{dead}-0bad.c0de@{host}.tmp": False,   # not a token
        f".out.fastema-merge-{dead}-0badc0de@{host}.part": False,   # not a temporary's suffix
        f".other.fastema-merge-{dead}@{host}.tmp": False,           # another output's
        "out": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".out.fastema-merge-{dead}@{host}.tmp" / "inside").write_bytes(b"x")
    removed = files.sweep_stale(str(tmp_path), ".out.fastema-merge-", (".tmp", ".old"))
    assert sorted(removed) == sorted(n for n, swept in names.items() if swept)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, swept in names.items() if not swept)
    assert files.sweep_stale(str(tmp_path / "missing"), ".x") == []


# ------------------------------------------------------------ files


@pytest.mark.parametrize("way", ["renameat2", "link", "claim"])
def test_write_new_publishes_whole_or_leaves_what_is_there(tmp_path, monkeypatch, way):
    _without(monkeypatch, way)
    target = tmp_path / "claim"
    files.write_new(str(target), lambda f: f.write(b"mine"))
    assert target.read_bytes() == b"mine"
    with pytest.raises(FileExistsError):
        files.write_new(str(target), lambda f: f.write(b"theirs"))
    assert target.read_bytes() == b"mine" and os.listdir(tmp_path) == ["claim"]     # no temporary left


def test_a_failed_write_names_the_path_and_leaves_nothing(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    for publish in (files.write_new, files.atomic_write):
        with pytest.raises(OSError, match=r"could not write '.*/new' \(\d+ bytes free on its disk\)"):
            publish(str(tmp_path / "new"), full)
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("way", ["renameat2", "link", "claim"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_new_never_replaces(tmp_path, monkeypatch, way, kind):
    _without(monkeypatch, way)
    src, dst = tmp_path / "src", tmp_path / "dst"
    if kind == "file":
        src.write_bytes(b"new")
    else:
        src.mkdir()
        (src / "a").write_bytes(b"new")
    files.rename_new(str(src), str(dst))
    assert not src.exists() and (dst.read_bytes() if kind == "file" else (dst / "a").read_bytes()) == b"new"
    other = tmp_path / "other"
    other.write_bytes(b"kept") if kind == "file" else other.mkdir()
    with pytest.raises(FileExistsError):
        files.rename_new(str(dst), str(other))
    assert dst.exists() and (other.read_bytes() == b"kept" if kind == "file" else os.listdir(other) == [])


# ------------------------------------------------------------ folders


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_signal_during_a_publish_is_held_until_the_output_is_whole(tmp_path, monkeypatch, how):
    """A SIGTERM with a Python handler (python -m fastema merge installs one) or a Ctrl-C that arrives
    between the first sync and the renames is delivered after them: the output is published whole."""
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda n, frame: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        staging = files.Staging(str(tmp_path / "merged"), ".fastema-merge-", True)
        with open(staging.path("model.safetensors"), "wb") as f:
            f.write(b"whole")
        real, sent = files.sync_folder, []

        def interrupted(folder):
            if not sent:
                sent.append(folder)
                os.kill(os.getpid(), signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
            real(folder)

        monkeypatch.setattr(files, "sync_folder", interrupted)
        with pytest.raises(KeyboardInterrupt):
            staging.publish(overwrite=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sent and (tmp_path / "merged" / "model.safetensors").read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["merged"]


def test_a_staged_output_replaces_only_when_asked_and_syncs_both_folders(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "sync_folder", synced.append)
    (tmp_path / "out.safetensors").write_bytes(b"old")
    staging = files.Staging(str(tmp_path / "out.safetensors"), ".fastema-merge-", False)
    with open(staging.path("out.safetensors"), "wb") as f:
        f.write(b"new")
    with pytest.raises(FileExistsError):
        staging.publish(overwrite=False)
    assert (tmp_path / "out.safetensors").read_bytes() == b"old" and synced == [staging.folder]
    staging.publish(overwrite=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"new" and synced[1:] == [staging.folder, str(tmp_path)]
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_a_merge_still_leaves_nothing_when_another_publishes_first(tmp_path, monkeypatch):
    """The merge's side of the protocol: Output turns the protocol's FileExistsError into "out exists" and
    removes only its own staged folder."""
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    real = files.Staging.publish

    def another_first(self, overwrite):
        (tmp_path / "out.safetensors").write_bytes(b"theirs")
        real(self, overwrite)

    monkeypatch.setattr(files.Staging, "publish", another_first)
    with pytest.raises(ValueError, match=r"out '.*out\.safetensors' exists: it appeared while the merge ran"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"theirs"
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before
