"""Faults around post-hoc snapshots: a pickle planted in every file the reader opens (H1), a disk
that fills, a file size limit, a folder that goes away (M5), truncated, empty, garbage, edited or
bit-flipped snapshots and DCP shards (L1), and on 2 gloo ranks a refused folder and a failed
metadata write on rank 0. Each asserts that nothing ran, that the error names the file (one line on
the command line, no traceback) and that nothing the user had changed."""
import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema.cli import posthoc as cli  # noqa: E402
from fastema.posthoc import SnapshotError  # noqa: E402
from fastema.schedules import sigma_rel_to_gamma  # noqa: E402
from fastema.torch import PostHocEMA  # noqa: E402

GAMMAS = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]


class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cli(capsys, *argv):
    """``python -m fastema posthoc`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as stop:                     # argparse usage errors
        rc = stop.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def _dcp_run(tmp_path):
    """A folder with one DCP snapshot (kind dcp, as a sharded PostHocEMA writes it): its directory."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "dcp"
    run.mkdir()
    base = run / "snapshot-000000000010"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"0:w": torch.ones(4), "1:w": torch.full((4,), 2.0)}, checkpoint_id=str(base), no_dist=True)
    meta = {"format": "fastema.posthoc", "version": "1", "time": "10", "updates": "10", "gammas": json.dumps(GAMMAS),
            "averaged": "[\"w\"]", "others": "[]", "kind": "dcp"}      # as in the report (a version-1 snapshot)
    (run / "snapshot-000000000010.json").write_text(json.dumps(meta))
    return run, base


def _plain_run(tmp_path, every=10, updates=30):
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ph = PostHocEMA(net, snapshot_every=every, path=tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    for _ in range(updates):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        ph.update()
    return ph, tmp_path / "run"


# --------------------------------------------------------------------------- planted pickles (H1)

@pytest.mark.parametrize("target", [".metadata", ".distcp", ".json", ".safetensors"])
def test_a_pickle_planted_in_any_file_the_reader_opens_never_runs(tmp_path, capsys, target):
    """reliability H1: synthesize() and the CLI unpickled a DCP snapshot's .metadata (os.system ran).
    A planted pickle in each file the post-hoc reader opens is refused, naming the file; nothing runs."""
    marker = tmp_path / "PWNED"
    if target == ".safetensors":
        _, run = _plain_run(tmp_path)
        victim = run / "snapshot-000000000020.safetensors"
    else:
        run, base = _dcp_run(tmp_path)
        victim = {".metadata": base / ".metadata", ".distcp": base / "__0_0.distcp",
                  ".json": run / "snapshot-000000000010.json"}[target]
    assert posthoc.synthesize(run, 0.07, max_error=1.0)                # intact: it reads
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != victim}
    victim.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ValueError) as err:
        posthoc.synthesize(run, 0.07, max_error=1.0)
    assert victim.name in str(err.value) and not marker.exists()
    rc, out, err_text = _cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
    assert rc == 1 and not marker.exists() and not (tmp_path / "o.pt").exists()
    _one_line(err_text, victim.name)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != victim} == before


def test_the_command_line_never_runs_a_planted_dcp_metadata_pickle(tmp_path):
    """H1 as reported: ``python -m fastema posthoc`` on a DCP snapshot whose .metadata is a pickle
    that runs os.system. One line naming the file, exit status 1, nothing run."""
    run, base = _dcp_run(tmp_path)
    marker = tmp_path / "PWNED"
    (base / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    res = subprocess.run([sys.executable, "-m", "fastema", "posthoc", str(run), "--sigma-rel", "0.07",
                          "--max-error", "1", "--out", str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and not marker.exists() and not (tmp_path / "o.safetensors").exists()
    _one_line(res.stderr, ".metadata", "never runs code")


# --------------------------------------------------------------------------- corrupt files (L1)

def _rewrite_metadata(path, edit):
    """Rewrite a safetensors file's metadata with ``edit(meta)`` (the data as it was)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header["__metadata__"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def _flip_a_data_bit(path):
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n + 5] ^= 0x10
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-9]), "not a readable safetensors snapshot"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors snapshot"),
    "garbage": (lambda p: p.write_bytes(os.urandom(300)), "not a readable safetensors snapshot"),
    "bit_flip": (_flip_a_data_bit, "fails its checksum"),
    "no_time": (lambda p: _rewrite_metadata(p, lambda m: m.pop("time")), "has no 'time'"),
    "nan_time": (lambda p: _rewrite_metadata(p, lambda m: m.update(time="nan")), "'time' is 'nan'"),
    "bad_gammas": (lambda p: _rewrite_metadata(p, lambda m: m.update(gammas="[-0.5, 5]")), "'gammas'"),
    "wrong_shapes": (lambda p: _rewrite_metadata(p, lambda m: m.update(shapes=json.dumps(
        {**json.loads(m["shapes"]), "0.weight": [3, 3]}))), "with shape [3, 3]: snapshots of different models"),
    "ghost_other": (lambda p: _rewrite_metadata(p, lambda m: m.update(
        others=json.dumps(json.loads(m["others"]) + ["ghost"]), shapes=json.dumps(
            {**json.loads(m["shapes"]), "ghost": [1]}))), "no tensor 'model:ghost'"),
    "foreign_run": (lambda p: _rewrite_metadata(p, lambda m: m.update(run_id="someone-else")), "2 runs"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_snapshot_is_refused_naming_it(tmp_path, capsys, kind):
    """reliability L1: truncated, empty or garbage files, metadata without time, wrong shapes,
    ``others`` naming a missing tensor and bad stored gammas gave raw errors (tracebacks on the
    command line) or wrong numbers; a flipped data bit was read silently. Each is now refused,
    naming the file; one corrupt file refuses the folder (move it out to synthesise from the rest)."""
    corrupt, match = CORRUPTIONS[kind]
    ph, run = _plain_run(tmp_path)
    victim = run / "snapshot-000000000030.safetensors"          # the last: others are read from it
    corrupt(victim)
    with pytest.raises(ValueError) as refused:
        posthoc.synthesize(run, 0.07, max_error=1.0)
    assert "snapshot-000000000030" in str(refused.value) and match in str(refused.value), str(refused.value)
    rc, _, err = _cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.safetensors")
    assert rc == 1 and not (tmp_path / "o.safetensors").exists()
    _one_line(err, "snapshot-000000000030")
    victim.rename(tmp_path / "moved-away")                       # the fix the message gives
    assert posthoc.synthesize(run, 0.07, max_error=1.0).solution.time == 20.0


def test_a_snapshot_whose_tensor_disagrees_with_its_metadata_is_refused(tmp_path):
    """One snapshot, its metadata edited to another shape of the same size: the tensor read is checked."""
    _, run = _plain_run(tmp_path, every=30)
    victim = run / "snapshot-000000000030.safetensors"
    _rewrite_metadata(victim, lambda m: m.update(shapes=json.dumps({**json.loads(m["shapes"]), "0.weight": [4, 3]})))
    with pytest.raises(ValueError, match=r"snapshot-000000000030.safetensors': '0:0.weight' has shape \[3, 4\], but "
                                         r"the metadata gives \[4, 3\]"):
        posthoc.synthesize(run, 0.07, max_error=1.0)


def test_a_truncated_dcp_shard_is_refused_naming_the_snapshot(tmp_path, capsys):
    run, base = _dcp_run(tmp_path)
    shard = base / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"DCP snapshot .*snapshot-000000000010': its data file '__0_0.distcp' "
                                         r"has 40 bytes, fewer than the .* its metadata describes: the snapshot is "
                                         r"truncated"):
        posthoc.synthesize(run, 0.07, max_error=1.0)
    rc, _, err = _cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.safetensors")
    assert rc == 1
    _one_line(err, "snapshot-000000000010")


def test_a_dcp_metadata_that_claims_a_huge_tensor_is_refused_before_allocating_it(tmp_path):
    """A .metadata edited (no code in it) to give '0:w' a terabyte shape: refused from the bytes its
    data files hold, before torch.empty() is asked for it."""
    run, base = _dcp_run(tmp_path)
    with open(base / ".metadata", "rb") as f:
        md = pickle.load(f)                                    # written by this test: trusted here
    md.state_dict_metadata["0:w"].size = torch.Size([1 << 40])
    with open(base / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"'0:w' claims shape \[1099511627776\].*data files hold \d+ bytes of it"):
        posthoc.synthesize(run, 0.07, max_error=1.0)


# --------------------------------------------------------------------------- writes that fail (M5)

class _FullDisk:
    """Makes every write of a snapshot file fail with ENOSPC (the way a full disk does)."""

    def __init__(self, monkeypatch):
        real = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def tell(self):
                return 0

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real(fd, mode)))


def test_a_snapshot_that_cannot_be_written_keeps_the_update_and_is_retried(tmp_path, monkeypatch):
    """reliability M5: on a full disk update() raised after the update was counted and the snapshot
    was lost for good (a caller that retried double-counted). Now: SnapshotError (an OSError) saying
    the update was applied and counted; the counters are right; no file or temporary is left; the
    snapshot stays due and the next update writes it once there is space."""
    net = nn.Linear(8, 8)
    ph = PostHocEMA(net, snapshot_every=2, path=tmp_path)
    ph.update()
    disk = monkeypatch.context()
    with disk as m:
        _FullDisk(m)
        with pytest.raises(SnapshotError, match=r"update 2 was applied and counted; do not repeat it\. The snapshot "
                                                r"at time 2 was not written .*No space left.*retried at the next "
                                                r"update\(\)") as err:
            ph.update()
        assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
        assert (err.value.applied, err.value.updates, err.value.time) == (True, 2, 2.0)
        assert (ph.updates, ph.calls) == (2, 2)
        with pytest.raises(SnapshotError, match=r"update 3 was applied.*time 3 \(due since time 2, update 2\)"):
            ph.update()                                         # still full: retried, reported again
        with pytest.raises(SnapshotError, match=r"^The snapshot at time 3 .*retried at the next update"):
            ph.snapshot()                                       # an explicit call counts nothing
        assert (ph.updates, ph.calls) == (3, 3)
        assert list(tmp_path.iterdir()) == []                   # no snapshot, no temporary
    ph.update()                                                 # space again: the due snapshot is written
    after_4 = {k: v.clone() for k, v in ph.averaged_state_dict(0).items()}
    ph.update()
    ph.update()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-000000000004.safetensors",
                                                          "snapshot-000000000006.safetensors"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "snapshot-000000000004.safetensors"))
    assert all(torch.equal(stored[f"0:{k}"], v) for k, v in after_4.items())

    shutil.rmtree(tmp_path)                                     # the folder goes away (unmounted, deleted)
    ph.update()
    with pytest.raises(SnapshotError, match=r"update 8 was applied.*could not be written|update 8 was applied"):
        ph.update()
    os.makedirs(tmp_path)
    ph.update()
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot-000000000009.safetensors"]


def test_a_file_size_limit_is_a_snapshot_error_and_the_next_update_writes_it(tmp_path):
    """RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ): the same contract as a full disk."""
    resource = pytest.importorskip("resource")
    net = nn.Linear(64, 64)
    warm = PostHocEMA(net, snapshot_every=None, path=tmp_path / "warm")    # kernels compiled and cached first
    warm.update()
    warm.update()
    ph = PostHocEMA(net, snapshot_every=1, path=tmp_path / "run")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(SnapshotError, match="update 1 was applied and counted") as err:
            ph.update()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and ph.updates == 1 and list((tmp_path / "run").iterdir()) == []
    ph.update()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["snapshot-000000000002.safetensors"]


# --------------------------------------------------------------------------- 2 ranks (DCP snapshots)

def _sharded_faults(rank, world, snaps):
    from torch.distributed.fsdp import fully_shard

    import fastema.posthoc.snapshots as S

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    for i in (0, 2):
        fully_shard(model[i])
    fully_shard(model)
    out = {}
    if rank == 0:                                     # another run's snapshot, seen by rank 0 only
        os.makedirs(snaps, exist_ok=True)
        posthoc.write_snapshot(snaps, 1, {f"{k}:0.weight": (torch.ones(6, 8), torch.float32) for k in (0, 1)},
                               posthoc.SnapshotMeta(time=1, updates=1, gammas=GAMMAS, averaged=["0.weight"],
                                                    others=[], shapes={"0.weight": [6, 8]}, run_id="other"))
    dist.barrier()
    ph = PostHocEMA(model, snapshot_every=2, path=snaps)
    try:
        ph.update()
    except ValueError as err:
        out["refused"] = torch.tensor("another run, run other" in str(err))
    out["updates_after_refusal"] = torch.tensor(ph.updates)
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(snaps, "snapshot-000000000001.safetensors"))
    dist.barrier()
    ph.update()
    real = S.atomic_write

    def full(path, write):                            # rank 0 cannot write the .json (the last step)
        raise OSError(errno.ENOSPC, f"could not write {path!r}: No space left on device")

    S.atomic_write = full if rank == 0 else real
    try:
        ph.update()
    except SnapshotError as err:
        out["lost"] = torch.tensor([err.applied, err.updates, "do not repeat it" in str(err)])
    finally:
        S.atomic_write = real
    out["counters"] = torch.tensor([ph.updates, ph.calls])
    ph.update()                                       # the due snapshot, on both ranks
    out["final"] = torch.tensor([ph.updates])
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_sharded_snapshots_refuse_and_fail_together_on_every_rank(tmp_path):
    """A DCP snapshot is a collective: a folder only rank 0 looks into is refused on every rank, and a
    metadata write that fails on rank 0 raises SnapshotError on every rank (no rank left waiting in a
    collective); the counters agree and the next update writes the snapshot."""
    from dist import run_ranks

    snaps = str(tmp_path / "snaps")
    ranks = run_ranks(_sharded_faults, tmp_path / "ranks", 2, snaps, timeout=240)
    for r in ranks:
        assert bool(r["refused"]) and int(r["updates_after_refusal"]) == 0
        assert r["lost"].tolist() == [1, 2, 1] and r["counters"].tolist() == [2, 2] and r["final"].tolist() == [3]
    found = posthoc.read_snapshots(snaps)
    assert [(s.kind, s.time) for s in found] == [("dcp", 3.0)]
    assert posthoc.synthesize(snaps, 0.1, max_error=1.0)["0.weight"].shape == (6, 8)
