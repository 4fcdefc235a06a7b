"""The temporary folder of a split (DCP) snapshot (reliability M2): a DCP snapshot is written by every
rank into ``DIR/.snapshot-<time>.tmp/``, then renamed. When one rank cannot write (a full disk, a file
size limit), every rank raises SnapshotError and the temporary folder, with the other ranks' shards,
is removed at once (rank 0, once DCP has raised on every rank); the next snapshot is written, and
synthesis reads the folder. A later snapshot removes the temporary folders a dead process left:
fastema's names only, never a live writer's (something in it written in the last hour), never a
folder holding anything but DCP's files, never a link."""
import errno
import os
import shutil
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema._io import dcp as D  # noqa: E402
from fastema.posthoc import SnapshotError  # noqa: E402
from fastema.torch import PostHocEMA  # noqa: E402

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _tmps(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.startswith(".snapshot-") and n.endswith(".tmp"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _step(net, i):
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


def _one_rank_cannot_write(rank, world, snaps, how):
    import resource
    import signal

    import torch.distributed.checkpoint.filesystem as fs

    net = _net()
    ph = PostHocEMA(net, snapshot_every=None, path=snaps, shard_replicas=True)
    for i in range(2):
        _step(net, i)
        ph.update()
    out = {}
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    write = fs._write_files_from_queue
    if rank == 1:
        if how == "file size limit":               # as a full disk: the shard file is cut at 64 bytes
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # (Python's default too): EFBIG, not death
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, limit[1]))
        else:
            def write_fails(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            fs._write_files_from_queue = write_fails
    try:
        ph.snapshot()
    except SnapshotError as err:
        out["failed"] = torch.tensor([err.errno or 0, "could not write the DCP snapshot" in str(err),
                                      err.applied, err.updates])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        fs._write_files_from_queue = write
    dist.barrier()                                  # both ranks raised: the folder is as the failure left it
    out["left"] = sorted(os.listdir(snaps))
    dist.barrier()
    ph.snapshot()                                   # the disk has room again: the same time is written
    _step(net, 2)
    ph.update()
    ph.snapshot()
    dist.barrier()
    out["after"] = sorted(os.listdir(snaps))
    return out


@needs_gloo
@pytest.mark.parametrize("how", ["file size limit", "writer raises"])
def test_a_dcp_snapshot_one_rank_cannot_write_fails_on_every_rank_and_leaves_no_temporary_folder(tmp_path, how):
    from dist import run_ranks

    snaps = str(tmp_path / "snaps")
    ranks = run_ranks(_one_rank_cannot_write, tmp_path / "ranks", 2, snaps, how, timeout=240)
    code = errno.EFBIG if how == "file size limit" else errno.ENOSPC
    for r in ranks:
        assert r["failed"].tolist() == [code, 1, 0, 2]       # every rank: SnapshotError, the rank's errno
        assert r["left"] == [".fastema-run"]                 # was: .snapshot-000000000002.tmp, with the shards
    assert ranks[0]["after"] == ranks[1]["after"] == [
        ".fastema-run", "snapshot-000000000002", "snapshot-000000000002.json", "snapshot-000000000003",
        "snapshot-000000000003.json"]
    assert [(s.kind, s.time) for s in posthoc.read_snapshots(snaps)] == [("dcp", 2.0), ("dcp", 3.0)]
    out = posthoc.synthesize(snaps, 0.1, max_error=1.0)
    assert out["0.weight"].shape == (16, 16) and all(bool(torch.isfinite(t).all()) for t in out.values())


# --------------------------------------------------------------------------- stale folders (one process)

def _folder(path, files=("__0_0.distcp", "__1_0.distcp"), age=0.0):
    os.makedirs(path)
    for name in files:
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * 100)
    when = time.time() - age
    for name in files:
        os.utime(os.path.join(path, name), (when, when))
    os.utime(path, (when, when))


@pytest.fixture
def one_rank(tmp_path):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_a_later_snapshot_removes_the_temporary_folders_a_dead_process_left_and_nothing_else(tmp_path, one_rank):
    snaps = tmp_path / "snaps"
    outside = tmp_path / "outside"
    hour = 3600.0                                               # (D.STALE_TMP_AGE)
    dead = [".snapshot-000000000001.tmp", ".snapshot-000000000001.500000.tmp", ".snapshot--00000000002.tmp"]
    for name in dead:                                           # dead processes' folders, of other times
        _folder(snaps / name, age=2 * hour)
    _folder(snaps / ".snapshot-000000000009.tmp", files=("__0_0.distcp", ".metadata"), age=2 * hour)
    _folder(snaps / ".snapshot-000000000004.tmp", age=10.0)               # a live writer's: written just now
    _folder(snaps / ".snapshot-000000000005.tmp", files=("__0_0.distcp", "notes.txt"), age=2 * hour)   # not DCP's
    _folder(snaps / ".snapshot-000000000006.tmp", age=2 * hour)
    os.utime(snaps / ".snapshot-000000000006.tmp" / "__1_0.distcp")    # one rank still writing into it
    _folder(snaps / ".snapshot-later.tmp", age=2 * hour)                  # not fastema's name
    _folder(snaps / "snapshot-000000000007.tmp", age=2 * hour)            # not fastema's name (no dot)
    _folder(outside, age=2 * hour)
    os.symlink(outside, snaps / ".snapshot-000000000008.tmp")             # a link: never followed
    old = time.time() - 2 * hour
    (snaps / ".snapshot-000000000010.tmp").write_bytes(b"a file, not a folder")
    os.utime(snaps / ".snapshot-000000000010.tmp", (old, old))
    kept = sorted(set(_tmps(snaps)) - set(dead) - {".snapshot-000000000009.tmp"})

    net = _net()
    ph = PostHocEMA(net, snapshot_every=None, path=snaps, shard_replicas=True)
    for i in range(3):
        _step(net, i)
        ph.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # removing them warns of nothing
        assert ph.snapshot() == str(snaps / "snapshot-000000000003")
    assert _tmps(snaps) == kept
    assert sorted(os.listdir(outside)) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(os.listdir(snaps / ".snapshot-000000000005.tmp")) == ["__0_0.distcp", "notes.txt"]
    assert [s.time for s in posthoc.read_snapshots(snaps)] == [3.0]

    # an hour on, nothing written since: the live writer's folders are a dead process's too
    assert D.STALE_TMP_AGE == hour
    assert sorted(D.remove_stale_tmps(str(snaps), now=time.time() + 2 * hour)) == [
        str(snaps / ".snapshot-000000000004.tmp"), str(snaps / ".snapshot-000000000006.tmp")]
    _folder(snaps / ".snapshot-000000000004.tmp")              # killed while writing time 4: written at once
    _step(net, 3)
    ph.update()
    ph.snapshot()
    assert ".snapshot-000000000004.tmp" not in _tmps(snaps)
    assert [s.time for s in posthoc.read_snapshots(snaps)] == [3.0, 4.0]


def _snapshotted_once(snaps):
    """A split PostHocEMA with one update, snapshotted at time 1 into ``snaps``."""
    net = _net()
    ph = PostHocEMA(net, snapshot_every=None, path=snaps, shard_replicas=True)
    _step(net, 0)
    ph.update()
    ph.snapshot()
    return ph


@needs_gloo
@pytest.mark.parametrize("fails", ["metadata", "rename in"])
def test_a_dcp_snapshot_of_a_time_already_stored_that_cannot_be_written_leaves_the_old_one(tmp_path, one_rank,
                                                                                           fails):
    # the old snapshot and its metadata were removed before the new one was written in: a full disk at
    # the new metadata (or a failed rename) lost both
    from fastema._io import files

    class Full(files.FileSystem):
        def sync_file(self, fd, path):
            if fails == "metadata" and path.endswith(".json"):
                raise OSError(errno.ENOSPC, "No space left on device")
            super().sync_file(fd, path)

        def rename(self, src, dst):
            if fails == "rename in" and src.endswith(".tmp"):
                raise OSError(errno.EIO, "Input/output error")
            super().rename(src, dst)

    snaps = tmp_path / "snaps"
    ph = _snapshotted_once(snaps)
    before = posthoc.synthesize(snaps, sigma_rel=0.05)
    with files.using(Full()), pytest.raises(SnapshotError):
        ph.snapshot()                                         # the same time again
    assert sorted(os.listdir(snaps)) == sorted(["snapshot-000000000001", "snapshot-000000000001.json",
                                                ".fastema-run"])
    after = posthoc.synthesize(snaps, sigma_rel=0.05)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ph.snapshot()                                             # written again once the disk has room
    assert sorted(os.listdir(snaps)) == sorted(["snapshot-000000000001", "snapshot-000000000001.json",
                                                ".fastema-run"])


@needs_gloo
def test_a_dcp_snapshot_killed_between_its_renames_is_mended_by_the_next_save_of_that_time(tmp_path, one_rank):
    snaps = tmp_path / "snaps"
    ph = _snapshotted_once(snaps)
    old = snaps / ".snapshot-000000000001.old"
    os.rename(snaps / "snapshot-000000000001", old)           # killed with the old one aside: the fix said
    with pytest.raises(ValueError, match=r"the old one is '.*\.snapshot-000000000001\.old'; rename it back") as err:
        ph.snapshot()
    assert "move them out" not in str(err.value)            # (the one fix said: moving the .json would lose it)
    with pytest.raises(FileNotFoundError, match="rename it back"):
        posthoc.read_snapshots(snaps)
    os.rename(old, snaps / "snapshot-000000000001")
    ph.snapshot()
    shutil.copytree(snaps / "snapshot-000000000001", old)      # killed with the new one in: the old one removed
    ph.snapshot()
    assert sorted(os.listdir(snaps)) == sorted(["snapshot-000000000001", "snapshot-000000000001.json",
                                                ".fastema-run"])
    assert [s.time for s in posthoc.read_snapshots(snaps)] == [1.0]


@needs_gloo
def test_posthoc_out_safetensors_of_dcp_snapshots_keeping_a_complex_tensor_is_refused_first(tmp_path, one_rank,
                                                                                              capsys):
    # a DCP snapshot keeps such a tensor as it is (no "raw" entry): the whole synthesis ran, then a
    # bare KeyError: torch.complex128 from safetensors
    from models import with_complex_buffer
    from posthoc_cli import one_line, run_cli

    net = with_complex_buffer()
    ph = PostHocEMA(net, snapshot_every=5, path=tmp_path / "run", copy=["z"], shard_replicas=True)
    for _ in range(10):
        _step(net, 0)
        ph.update()
    out = tmp_path / "ema.safetensors"
    rc, _, err = run_cli(capsys, tmp_path / "run", "--sigma-rel", "0.07", "--max-error", "1", "--out", out)
    assert rc == 1 and not out.exists()
    one_line(err, "--out", "'z' is complex128", "ema.pt")
