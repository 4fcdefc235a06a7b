"""Post-hoc reads over a folder that changes while it is read (reliability round 7, H5: P01).

Each snapshot's tensors are read with ``pread`` from a descriptor held open: a snapshot truncated
in place mid-stream is a ValueError naming it, where the memory-mapped read died of SIGBUS (return
code -7); rewritten in place at the same size it fails its checksum; removed, renamed over, or
beside an added one, it is read whole, the same tensors as an untouched synthesis. The cases run in
ONE child process (a regression kills it, not pytest), each test asserting its own case's line.
Beside them, in this process: no snapshot is memory-mapped while it is read, and the descriptors
go when a stream ends.
"""
import errno
import glob
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema.torch import PostHocEMA  # noqa: E402

_CHILD = r"""
import glob, json, os, shutil, sys
import torch
from fastema import posthoc
from fastema.posthoc import _synthesis

torch.set_num_threads(1)        # small tensors: a 2nd thread only waits for a core on a busy host
root, run = sys.argv[1], sys.argv[2]
ref = posthoc.synthesize(run, 0.08)

def folder(case):
    d = os.path.join(root, case)
    shutil.copytree(run, d, ignore=shutil.ignore_patterns(".fastema-run*"))
    return d, sorted(glob.glob(os.path.join(d, "snapshot-*.safetensors")))

def truncate(path):
    os.truncate(path, 4096)

def overwrite(path):                     # in place, same size: the data area rewritten
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x5a" * (os.path.getsize(path) // 2))

def rename_over(path):
    shutil.copyfile(path, path + ".new")
    os.replace(path + ".new", path)

def add(path):
    shutil.copyfile(path, os.path.join(os.path.dirname(path), "snapshot-000000099999.safetensors"))

def report(case, victim, stream):
    try:
        got = dict(stream())
    except ValueError as err:
        print(json.dumps([case, "ValueError", str(err), os.path.basename(victim)]), flush=True)
        return
    same = sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    outcome = "same" if same else "different"
    print(json.dumps([case, outcome, "", os.path.basename(victim)]), flush=True)

def iterated(case, change):
    d, snaps = folder(case)
    def stream():
        it = posthoc.synthesize_iter(d, 0.08)
        first = [next(it)]
        change(snaps[1])
        return first + list(it)
    report(case, snaps[1], stream)

def whole(case, change):
    # synthesize()'s window: the second snapshot changed after its first tensor was combined
    d, snaps = folder(case)
    changed = []
    def once(name, tensor):
        if not changed:
            changed.append(name)
            change(snaps[1])
    with _synthesis.watched(once):
        report(case, snaps[1], lambda: posthoc.synthesize(d, 0.08).items())

iterated("iter truncated", truncate)
whole("synthesize truncated", truncate)
iterated("iter overwritten", overwrite)
iterated("iter removed", os.remove)
iterated("iter renamed over", rename_over)
iterated("iter added", add)
d, snaps = folder("kept after synthesize")
got = posthoc.synthesize(d, 0.08)     # its kept tensors (BatchNorm's buffers): the last snapshot's
truncate(snaps[-1])
report("kept after synthesize", snaps[-1], lambda: {k: v.clone() for k, v in got.items()}.items())
print(json.dumps(["done", "", "", ""]), flush=True)
"""


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    """``case -> (outcome, message, victim's name)`` of the child's cases, and its return code."""
    root = tmp_path_factory.mktemp("changing")
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(256, 256) for _ in range(8)]                    # 2.1 MB of float32 weights
    model = nn.Sequential(*layers, nn.BatchNorm1d(256))
    ema = PostHocEMA(model, (0.05, 0.1), snapshot_every=1, path=root / "run")
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        ema.update()
    res = subprocess.run([sys.executable, "-c", _CHILD, str(root), ema.path], capture_output=True,
                         text=True, timeout=300)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("[")]
    return {case: rest for case, *rest in lines}, res.returncode, res.stderr[-2000:]


def _case(changed, case):
    cases, rc, err = changed
    assert case in cases, f"the child died before {case!r}: return code {rc} (-7: SIGBUS) {err}"
    return cases[case]


@pytest.mark.parametrize("case", ["iter truncated", "synthesize truncated"])
def test_a_snapshot_truncated_while_it_is_read_is_a_value_error_naming_it(changed, case):
    """H5: ``synthesize_iter`` (which ``iter_weights(sigma_rel=)`` streams), and ``synthesize()``
    inside its own loop, died of SIGBUS (return code -7) when the second snapshot was truncated to 4
    KiB in place after the first tensor was read (``cp``, ``rsync --inplace``, a cleanup). Now a
    ValueError naming it."""
    outcome, message, victim = _case(changed, case)
    assert outcome == "ValueError" and victim in message, (outcome, message)
    assert "was truncated while it was read: it has 4096 bytes now" in message, message


def test_a_snapshot_rewritten_in_place_at_the_same_size_fails_its_checksum_by_name(changed):
    outcome, message, victim = _case(changed, "iter overwritten")
    assert outcome == "ValueError" and victim in message, (outcome, message)
    assert "fails its checksum" in message, message


@pytest.mark.parametrize("case", ["iter removed", "iter renamed over", "iter added",
                                  "kept after synthesize"])
def test_a_snapshot_removed_renamed_over_or_joined_mid_stream_is_read_whole(changed, case):
    """The descriptor keeps the file it opened: the stream's tensors are bit for bit an untouched
    synthesis's. And what a synthesis returned is its own memory: the tensors it keeps as they are
    (``model:`` keys, BatchNorm's buffers) were views of the last snapshot's map (safetensors'
    ``get_tensor`` copies nothing), so truncating that snapshot after ``synthesize()`` returned made
    touching them SIGBUS."""
    assert _case(changed, case)[0] == "same"
    assert _case(changed, "done") is not None and changed[1] == 0, changed[2]


def _run(tmp_path):
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    ema = PostHocEMA(net, (0.05, 0.1), snapshot_every=1, path=tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        ema.update()
    return ema, sorted(glob.glob(str(tmp_path / "run" / "snapshot-*.safetensors")))


def _opened(paths) -> tuple:
    """(mappings, descriptors) of this process that name one of ``paths`` (Linux's /proc)."""
    real = {os.path.realpath(p) for p in paths}
    with open("/proc/self/maps") as f:
        maps = [line.split(maxsplit=5)[-1].strip() for line in f if len(line.split()) >= 6]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [m for m in maps if m in real], [d for d in fds if d in real]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and fd: Linux")
def test_no_snapshot_is_memory_mapped_and_every_descriptor_goes_when_the_stream_ends(tmp_path):
    """While a stream reads them, the snapshots are open (one descriptor each) and mapped nowhere
    (the old reader kept each memory-mapped for the whole stream); the descriptors are closed when
    the stream ends, is closed early, or a synthesis or a merge is done."""
    from fastema.merge import merge_checkpoints

    ema, snaps = _run(tmp_path)
    posthoc.read_snapshots(ema.path)
    assert _opened(snaps) == ([], [])
    it = posthoc.synthesize_iter(ema.path, 0.08)
    next(it)
    maps, fds = _opened(snaps)
    assert maps == [] and sorted(fds) == snaps, (maps, fds)
    list(it)
    assert _opened(snaps) == ([], [])
    it = ema.iter_weights(sigma_rel=0.08)
    next(it)
    assert _opened(snaps)[0] == [] and len(_opened(snaps)[1]) == len(snaps)
    it.close()                                            # stopped early: the descriptors go too
    assert _opened(snaps) == ([], [])
    posthoc.synthesize(ema.path, 0.08)
    merge_checkpoints([ema.path], str(tmp_path / "merged.safetensors"), weights="sigma_rel:0.08",
                      allow_negative=True)
    assert _opened(snaps) == ([], [])


def test_more_snapshots_than_the_limit_on_open_files_is_an_error_saying_so(tmp_path, monkeypatch):
    """A synthesis holds one descriptor per snapshot: where the process runs out of them
    (``os.open`` raising EMFILE, as it does at ``ulimit -n``), an OSError naming the snapshot and
    the fix, and the descriptors already opened are closed."""
    ema, snaps = _run(tmp_path)
    real, seen = os.open, []

    def limited(path, flags, *args, **kwargs):
        seen.append(os.fspath(path))
        if seen.count(snaps[2]) == 2:         # read_snapshots opened it once (and closed it)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", limited)
    with pytest.raises(OSError, match=r"snapshot-000000000003.safetensors' cannot be opened: too "
                                      r"many open files .*ulimit -n.*time=") as err:
        posthoc.synthesize(ema.path, 0.08)
    monkeypatch.undo()
    assert err.value.errno == errno.EMFILE and _opened(snaps) == ([], [])
