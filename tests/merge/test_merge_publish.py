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
from merge_helpers import System, checkpoints, fingerprint, leftovers
from torch import nn

from fastema._io import files
from fastema.merge import merge_checkpoints
from fastema.torch import PostHocEMA


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ------------------------------------------------------------ the one sweep


def test_one_sweep_serves_the_merge_and_the_posthoc_folder(tmp_path):
    """issue 51: the merge had its own copy of the stale-temporary sweep; now a merge's staged folder, a
    snapshot's file and a post-hoc folder's claim all sweep by the one protocol (fastema._io.files.
    sweep_stale): a dead process's temporaries of each go, a living one's and the look-alikes stay."""
    host, dead = socket.gethostname(), _dead_pid()
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    merge_tmp = [f".out.safetensors.fastema-merge-{pid}-0badc0de@{host}.tmp" for pid in (dead, os.getpid())]
    for name in merge_tmp:
        (tmp_path / name).mkdir()
    merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert leftovers(tmp_path) == [merge_tmp[1]]                     # the dead merge's staged folder went
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    theirs = {kind: [f"{prefix}{pid}@{host}.x1y2.tmp" for pid in (dead, os.getpid())]
              for kind, prefix in (("claim", ".fastema-.fastema-run."),
                                   ("snapshot", ".fastema-snapshot-000000000001.safetensors."))}
    for names in theirs.values():
        for name in names:
            (snaps / name).write_bytes(b"partial")
    ph = PostHocEMA(nn.Linear(3, 2), snapshot_every=1, path=snaps)
    ph.update()
    left = set(os.listdir(snaps))
    assert all(live in left and gone not in left for gone, live in theirs.values()), sorted(left)


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
def test_write_new_publishes_whole_or_leaves_what_is_there(tmp_path, way):
    with files.using(System(way)):
        _write_new_publishes_whole_or_leaves_what_is_there(tmp_path)


def _write_new_publishes_whole_or_leaves_what_is_there(tmp_path):
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


@pytest.mark.parametrize("size", [2000, 100_000])
def test_a_write_past_a_file_size_limit_raises_the_named_error_whatever_its_size(tmp_path, size):
    """A write smaller than the file's buffer failed at the flush, and closing the file flushed the rest
    again: that bare 'File too large' replaced the error naming the path. The named error is raised now
    (the write's own chained), for a write the buffer holds and for one it does not."""
    resource = pytest.importorskip("resource")
    target = tmp_path / "state.safetensors"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(OSError, match=r"could not write '.*/state\.safetensors' \(\d+ bytes free on its disk\): "
                                          r".*the previous file is unchanged$") as err:
            files.atomic_write(str(target), lambda f: f.write(b"x" * size))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and isinstance(err.value.__cause__, OSError)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.safetensors"]


@pytest.mark.parametrize("way", ["renameat2", "link", "claim"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_new_never_replaces(tmp_path, way, kind):
    with files.using(System(way)):
        _rename_new_never_replaces(tmp_path, kind)


def _rename_new_never_replaces(tmp_path, kind):
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
def test_a_signal_during_a_publish_is_held_until_the_output_is_whole(tmp_path, how):
    """A SIGTERM with a Python handler (python -m fastema merge installs one) or a Ctrl-C that arrives
    between the first sync and the renames is delivered after them: the output is published whole."""
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda n, frame: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        staging = files.Staging(str(tmp_path / "merged"), ".fastema-merge-", True)
        with open(staging.path("model.safetensors"), "wb") as f:
            f.write(b"whole")
        sent = []

        def interrupted(folder):                        # at the first sync, before the renames
            sent.append(folder)
            os.kill(os.getpid(), signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)

        with files.using(System(at_publish=interrupted)), pytest.raises(KeyboardInterrupt):
            staging.publish(overwrite=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sent and (tmp_path / "merged" / "model.safetensors").read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["merged"]


def test_a_staged_output_replaces_only_when_asked_and_syncs_both_folders(tmp_path):
    synced: list = []
    with files.using(System(synced=synced)):
        _replaces_only_when_asked(tmp_path, synced)


def _replaces_only_when_asked(tmp_path, synced):
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


def test_an_output_folder_being_replaced_comes_back_when_the_new_one_cannot_be_renamed_in(tmp_path):
    """With overwrite, the old folder went aside under a .old name and stayed there when the rename of
    the new one failed: out was gone, and the next staging's sweep removes .old names. Put back."""
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(b"old")
    staging = files.Staging(str(tmp_path / "merged"), ".fastema-merge-", True)
    with open(staging.path("model.safetensors"), "wb") as f:
        f.write(b"new")

    class Refusing(files.FileSystem):
        def rename(self, src, dst):
            if src == staging.folder:
                raise OSError(errno.EXDEV, "the new one cannot move")
            super().rename(src, dst)

    with files.using(Refusing()), pytest.raises(OSError, match="cannot move"):
        staging.publish(overwrite=True)
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"old"
    staging.discard()
    assert os.listdir(tmp_path) == ["merged"]


def test_a_merge_still_leaves_nothing_when_another_publishes_first(tmp_path):
    """The merge's side of the protocol: Output turns the protocol's FileExistsError into "out exists" and
    removes only its own staged folder."""
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    another_first = System(at_publish=lambda folder: (tmp_path / "out.safetensors").write_bytes(b"theirs"))
    with files.using(another_first), \
            pytest.raises(ValueError, match=r"out '.*out\.safetensors' exists: it appeared while the merge ran"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"theirs"
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


def test_the_file_system_and_the_free_memory_are_set_for_a_block_and_put_back(tmp_path):
    """The seams the fault tests use (issue 72 item 4): ``files.using`` (a FileSystem only) and
    ``safe_files.assumed_free`` hold for their block, nested, and are put back however it ends."""
    from fastema._io import safe_files

    real = files.system()
    with pytest.raises(TypeError, match="takes a FileSystem"), files.using(object()):
        pass
    outer, inner = System("link"), System("claim")
    with pytest.raises(ZeroDivisionError), files.using(outer), files.using(inner):
        assert files.system() is inner
        (tmp_path / "src").write_bytes(b"x")
        files.rename_new(str(tmp_path / "src"), str(tmp_path / "dst"))    # the name claimed: no link
        1 / 0
    assert files.system() is real and (tmp_path / "dst").read_bytes() == b"x"
    with pytest.raises(ValueError, match="bytes >= 0"), safe_files.assumed_free(-1):
        pass
    with safe_files.assumed_free(8 << 20), safe_files.assumed_free(1 << 20):
        assert safe_files.memory_available() == 1 << 20
    assert safe_files.memory_available() != 1 << 20
