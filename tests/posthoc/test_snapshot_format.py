"""The post-hoc snapshot format (version 2) as a format fastema owns: one run per folder (a run id in
every snapshot, kept in the checkpoint, refused folders), version-1 snapshots read as one legacy
run, every tensor's shape and checksum, the profiles described by the plan's schedules (H3), values
beyond float16 (L6), dtypes safetensors has no name for (M5). Corrupt files, planted pickles and
failed writes are in tests/faults/test_faults_posthoc.py."""
import json
import os
import warnings
import zlib

import pytest

torch = pytest.importorskip("torch")
from models import mlp  # noqa: E402
from support.calls import watching  # noqa: E402
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema.posthoc import SnapshotError  # noqa: E402
from fastema.schedules import PowerFunction, sigma_rel_to_gamma  # noqa: E402
from fastema.torch import EMA, PostHocEMA  # noqa: E402


def _net(seed=0):
    return mlp(4, 8, 2, norm=nn.BatchNorm1d, seed=seed)


def _move(net, step):
    """Deterministic weights for each step: the same trajectory for every run that replays it."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


def _run(ph, net, start, stop):
    for step in range(start, stop):
        _move(net, step)
        ph.update()


def _folder(path):
    """name -> bytes of every file in a snapshot folder (what a refusal must leave as it was)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _v1(path, time, tensors, gammas, averaged, others=()):
    """A version-1 snapshot, as fastema wrote them before run ids (safetensors' own writer)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={
        "format": "fastema.posthoc", "version": "1", "time": repr(float(time)), "updates": str(int(time)),
        "gammas": json.dumps(gammas), "averaged": json.dumps(list(averaged)), "others": json.dumps(list(others)),
        "dtype": "float32", "shapes": "{}"})


GAMMAS = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]


# --------------------------------------------------------------------------- run ids (H2)

def test_every_snapshot_names_its_run_and_every_tensors_shape_and_checksum(tmp_path):
    net = _net()
    ph = PostHocEMA(net, snapshot_every=5, path=tmp_path)
    _run(ph, net, 0, 10)
    files = sorted(tmp_path.glob("snapshot-*.safetensors"))
    assert [f.name for f in files] == ["snapshot-000000000005.safetensors", "snapshot-000000000010.safetensors"]
    from safetensors import safe_open

    for f in files:
        meta = _metadata(f)
        assert meta["version"] == "2" and meta["run_id"] == ph.run_id and len(ph.run_id) == 32
        shapes = json.loads(meta["shapes"])
        assert shapes == {n: list(t.shape) for n, t in net.state_dict().items()}
        crcs = json.loads(meta["checksums"])
        with safe_open(str(f), framework="pt") as h:
            assert sorted(crcs) == sorted(h.keys())
            for key in h.keys():
                t = h.get_tensor(key)
                assert crcs[key] == f"{zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy()):08x}", key
    assert {s.run_id for s in posthoc.read_snapshots(tmp_path)} == {ph.run_id}
    assert PostHocEMA(_net(), snapshot_every=5, path=tmp_path / "other").run_id != ph.run_id


@pytest.mark.parametrize("drop", ["all", "one"])
def test_a_snapshot_whose_checksums_are_gone_is_refused_so_no_flipped_bit_goes_unseen(tmp_path, drop):
    # a version-2 file without its checksums (or without one) was read unchecked: a flipped data bit then
    # went into the synthesis
    from safetensors.torch import load_file, save_file

    net = _net()
    ph = PostHocEMA(net, snapshot_every=5, path=tmp_path)
    _run(ph, net, 0, 10)
    f = tmp_path / "snapshot-000000000010.safetensors"
    meta, tensors = _metadata(f), load_file(str(f))
    crcs = json.loads(meta.pop("checksums"))
    if drop == "one":
        gone = sorted(crcs)[0]
        del crcs[gone]
        meta["checksums"] = json.dumps(crcs)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] += 1.0                          # the bit flipped
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(ValueError, match=r"snapshot-000000000010.safetensors' has no checksum of tensor '.*' in "
                                         r"its metadata, where fastema writes one of every tensor"):
        posthoc.synthesize(tmp_path, 0.07, max_error=1.0)


def test_a_new_run_is_refused_in_a_folder_that_holds_another_runs_snapshots(tmp_path):
    """reliability H2: a second run in the same folder overwrote the first's snapshots and
    synthesised 0.9998 from weights it never saw; now its first update is refused, and nothing
    changes (its state, the folder)."""
    m = nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.fill_(1.0)
    run1 = PostHocEMA(m, snapshot_every=10, path=tmp_path)
    for _ in range(60):
        run1.update()
    before = _folder(tmp_path)
    with torch.no_grad():
        m.weight.fill_(2.0)
    run2 = PostHocEMA(m, snapshot_every=10, path=tmp_path)
    shadow = {k: v.clone() for k, v in run2.averaged_state_dict().items()}
    with pytest.raises(ValueError, match=r"another run, run [0-9a-f]{32} \(snapshot-000000000010.safetensors.*"
                                         r"new folder \(path=\).*load its checkpoint first") as err:
        run2.update()
    assert str(tmp_path) in str(err.value) and "changed nothing" in str(err.value)
    assert run2.updates == 0 and run2.calls == 0
    assert all(torch.equal(v, shadow[k]) for k, v in run2.averaged_state_dict().items())
    assert _folder(tmp_path) == before
    assert posthoc.synthesize(tmp_path, 0.07).solution.time == 60.0           # run1's, untouched

    # two runs started on one empty folder: the second is refused at its first update after the first wrote
    a, b = PostHocEMA(m, snapshot_every=2, path=tmp_path / "shared"), PostHocEMA(m, snapshot_every=2,
                                                                                path=tmp_path / "shared")
    b.update()
    a.update()
    a.update()
    with pytest.raises(ValueError, match="another run"):
        b.update()
    assert b.updates == 1


def test_version_1_snapshots_are_read_as_one_legacy_run_and_never_mixed(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    w = {t: torch.full((2, 3), float(t)) for t in (10, 20)}
    for t in (10, 20):
        _v1(old / f"snapshot-{t:012d}.safetensors", t, {"0:w": w[t], "1:w": w[t] + 1, "model:n": torch.tensor(t)},
            GAMMAS, ["w"], ["n"])
    snaps = posthoc.read_snapshots(old)
    assert [s.run_id for s in snaps] == [None, None] and snaps[0].meta.version == 1
    got = posthoc.synthesize(old, 0.07, max_error=1.0)
    x = got.solution.coefficients
    torch.testing.assert_close(got["w"].double(), x[0] * w[10].double() + x[1] * (w[10].double() + 1) +
                               x[2] * w[20].double() + x[3] * (w[20].double() + 1))
    assert int(got["n"]) == 20

    net = _net()
    ph = PostHocEMA(net, snapshot_every=5, path=old)            # a new run into the old folder: refused
    with pytest.raises(ValueError, match="version-1 snapshots, written before run ids"):
        ph.update()

    mixed = tmp_path / "mixed"                                  # a version-2 run beside them: never mixed
    fresh = PostHocEMA(nn.Linear(3, 2, bias=False), snapshot_every=1, path=mixed)
    fresh.update()
    (mixed / "snapshot-000000000010.safetensors").write_bytes((old / "snapshot-000000000010.safetensors")
                                                               .read_bytes())
    with pytest.raises(ValueError, match=r"2 runs \(run [0-9a-f]{32}: snapshot-000000000001.*version-1 snapshots "
                                         r"\(no run id\): snapshot-000000000010"):
        posthoc.synthesize(mixed, 0.07, max_error=1.0)

    legacy = tmp_path / "legacy"                               # H2's other half: (1,) and (8,) under one name
    legacy.mkdir()
    _v1(legacy / "snapshot-000000000010.safetensors", 10, {"0:w": torch.ones(1), "1:w": torch.ones(1)}, GAMMAS, ["w"])
    _v1(legacy / "snapshot-000000000020.safetensors", 20, {"0:w": torch.ones(8), "1:w": torch.ones(8)}, GAMMAS, ["w"])
    with pytest.raises(ValueError, match=r"with shape \[(1|8)\].*with shape \[(1|8)\]: snapshots of different models"):
        posthoc.synthesize(legacy, 0.07, max_error=1.0)


def test_synthesis_refuses_a_folder_that_mixes_runs_or_shapes(tmp_path):
    """Two runs' snapshots (models of equal names, other shapes) copied into one folder are refused,
    naming both runs and their files; so are shapes that differ within one run's metadata."""
    a_net, b_net = nn.Sequential(nn.Linear(1, 1)), nn.Sequential(nn.Linear(8, 8))
    a = PostHocEMA(a_net, snapshot_every=None, path=tmp_path / "a")
    b = PostHocEMA(b_net, snapshot_every=None, path=tmp_path / "b")
    for t in (10, 20, 30, 40):
        a.update(step=t)
        a.snapshot()
    for t in (15, 25):
        b.update(step=t)
        b.snapshot()
    for f in (tmp_path / "b").iterdir():
        (tmp_path / "a" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=rf"2 runs \(run {a.run_id}: .*; run {b.run_id}: "
                                         rf"snapshot-000000000015.safetensors, snapshot-000000000025.safetensors\)"):
        posthoc.synthesize(tmp_path / "a", 0.07, max_error=1.0)

    one = tmp_path / "one"                                    # one run id, two shapes: a forged or broken folder
    one.mkdir()
    for t, n in ((10, 1), (20, 8)):
        meta = posthoc.SnapshotMeta(time=t, updates=t, gammas=GAMMAS, averaged=["w"], others=[], shapes={"w": [n]},
                                    run_id="r1", dtype="float32")
        posthoc.write_snapshot(str(one), t, {f"{k}:w": (torch.ones(n), torch.float32) for k in (0, 1)}, meta)
    with pytest.raises(ValueError, match=r"stores 'w' with shape \[1\].*with shape \[8\]"):
        posthoc.read_snapshots(one)


# --------------------------------------------------------------------------- resume

def test_a_resumed_run_takes_its_checkpoints_run_id_and_writes_on_in_its_folder(tmp_path):
    """A resume adopts the checkpoint's run id (no refusal for its own snapshots) and the folder it
    completes synthesises exactly what an uninterrupted run's does."""
    import copy

    net, ref_net = _net(), _net()
    a = PostHocEMA(net, snapshot_every=10, path=tmp_path / "run")
    ref = PostHocEMA(ref_net, snapshot_every=10, path=tmp_path / "ref")
    _run(a, net, 0, 20)
    _run(ref, ref_net, 0, 40)
    state = copy.deepcopy(a.state_dict())
    assert state["run_id"] == a.run_id
    b = PostHocEMA(net, snapshot_every=10, path=tmp_path / "run")          # the restarted process
    assert b.run_id != a.run_id
    b.load_state_dict(state)
    assert b.run_id == a.run_id
    _run(b, net, 20, 40)
    assert {s.run_id for s in posthoc.read_snapshots(tmp_path / "run")} == {a.run_id}
    got, want = b.synthesize(0.07), ref.synthesize(0.07)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_resume_after_preemption_moves_its_later_snapshots_aside_and_goes_on(tmp_path):
    """Review 1e: a run checkpointed at t=20 whose snapshots went on to t=40 before it was preempted was
    refused at its first update after the resume, until the user moved files by hand. Now those later
    snapshots (the abandoned trajectory's) move into superseded-<time>/, named in a warning, byte for
    byte; the run goes on, and its folder synthesises what an uninterrupted run's does. A second
    preemption from the same checkpoint keeps both abandoned sets."""
    import copy

    net, ref_net = _net(), _net()
    a = PostHocEMA(net, snapshot_every=10, path=tmp_path / "run")
    ref = PostHocEMA(ref_net, snapshot_every=10, path=tmp_path / "ref")
    _run(ref, ref_net, 0, 40)
    _run(a, net, 0, 20)
    state, weights = copy.deepcopy(a.state_dict()), copy.deepcopy(net.state_dict())     # the checkpoint at 20
    _run(a, net, 20, 40)                                          # then preempted
    abandoned = {k: v for k, v in _folder(tmp_path / "run").items() if k.startswith("snapshot-00000000003")
                 or k.startswith("snapshot-00000000004")}
    assert sorted(abandoned) == ["snapshot-000000000030.safetensors", "snapshot-000000000040.safetensors"]
    for attempt in (1, 2):
        model = _net()
        model.load_state_dict(weights)
        b = PostHocEMA(model, snapshot_every=10, path=tmp_path / "run")
        b.load_state_dict(state)
        aside = tmp_path / "run" / ("superseded-000000000020" + ("" if attempt == 1 else "-2"))
        with pytest.warns(UserWarning, match=r"resumed at time 20 found 2 snapshot\(s\) of its own run later than "
                                             r"that \(snapshot-000000000030.safetensors, snapshot-000000000040."
                                             rf"safetensors\).*moved into '{aside}', which synthesis does not read"):
            _move(b.model, 20)
            b.update()
        assert _folder(aside) == abandoned and b.updates == 21
        _run(b, b.model, 21, 40)
        assert [s.time for s in posthoc.read_snapshots(tmp_path / "run")] == [10.0, 20.0, 30.0, 40.0]
    got, want = b.synthesize(0.07), ref.synthesize(0.07)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == [
        "superseded-000000000020", "superseded-000000000020-2"]


def test_a_fastema_0_1_checkpoint_goes_on_beside_its_version_1_snapshots(tmp_path):
    """Review 1e (upgrade): a 0.1 checkpoint (no run id) resumed into its folder of version-1 snapshots
    was refused. It now continues the legacy run (run id 'legacy'): its new snapshots are read as one run
    with the version-1 ones, and the folder synthesises what an uninterrupted run's does. A new run is
    still refused there, and the legacy run refuses a folder of another run."""
    import copy

    from safetensors.torch import load_file

    net, ref_net = _net(), _net()
    ref = PostHocEMA(ref_net, snapshot_every=10, path=tmp_path / "ref")
    _run(ref, ref_net, 0, 20)
    old_state = copy.deepcopy(ref.state_dict())
    del old_state["run_id"]                                       # what fastema 0.1 saved
    _run(ref, ref_net, 20, 40)
    old = tmp_path / "old"                                        # 0.1's folder: version-1 snapshots at 10 and 20
    old.mkdir()
    for t in (10, 20):
        name = f"snapshot-{t:012d}.safetensors"
        snap = posthoc.read_snapshots(tmp_path / "ref")[t // 10 - 1]
        _v1(old / name, t, load_file(str(tmp_path / "ref" / name)), snap.gammas, snap.averaged, snap.others)
    for step in range(20):                                        # the model's weights at 20 (its checkpoint)
        _move(net, step)
    resumed = PostHocEMA(net, snapshot_every=10, path=old)
    resumed.load_state_dict(old_state)
    assert resumed.run_id == posthoc.LEGACY_RUN_ID == "legacy"
    _run(resumed, net, 20, 40)
    snaps = posthoc.read_snapshots(old)
    assert [(s.time, s.run_id, s.meta.version) for s in snaps] == [(10.0, None, 1), (20.0, None, 1),
                                                                   (30.0, "legacy", 2), (40.0, "legacy", 2)]
    got, want = posthoc.synthesize(old, 0.07), ref.synthesize(0.07)
    assert all(torch.equal(got[k], want[k]) for k in want)

    fresh = PostHocEMA(_net(), snapshot_every=10, path=old)        # a new run there: still refused
    with pytest.raises(ValueError, match="version-1 snapshots, written before run ids.*fastema 0.1 checkpoint"):
        fresh.update()
    legacy_elsewhere = PostHocEMA(_net(), snapshot_every=10, path=tmp_path / "ref")
    legacy_elsewhere.load_state_dict(old_state)
    with pytest.raises(ValueError, match=rf"another run, run {ref.run_id}"):
        legacy_elsewhere.update()


# --------------------------------------------------------------------------- two writers (the claim)

def test_two_runs_whose_checks_both_precede_the_first_write_do_not_collide(tmp_path):
    """Review 1f: run b checked the folder and wrote while run a was between its own check and its write:
    both wrote snapshot-000000000001 (a's overwrote b's). The first check before a write now claims the
    folder (O_EXCL), so b is refused, naming a's claim, before anything is applied or written."""
    import fastema.torch.posthoc as P  # where PostHocEMA finds write_snapshot

    shared = tmp_path / "shared"
    m = nn.Linear(3, 3)
    a, b = PostHocEMA(m, snapshot_every=1, path=shared), PostHocEMA(m, snapshot_every=1, path=shared)
    refused = []

    def racing(args):                                             # b runs between a's check and a's write
        if not refused:
            refused.append(None)
            try:
                b.update()
            except ValueError as err:
                refused.append(str(err))

    with watching(P.write_snapshot, on_call=racing):
        a.update()
    assert len(refused) == 2 and f"claimed by another run, run {a.run_id}" in refused[1], refused
    assert "process" in refused[1] and "still running" in refused[1] and ".fastema-run" in refused[1]
    assert (b.updates, b.calls) == (0, 0)
    assert {s.run_id for s in posthoc.read_snapshots(shared)} == {a.run_id}
    claim = json.loads((shared / ".fastema-run").read_text())
    assert claim["run_id"] == a.run_id and claim["pid"] == os.getpid()


def test_a_claim_of_a_run_that_is_gone_is_taken_and_others_are_refused_naming_the_fix(tmp_path):
    """A claim whose process is gone on this host, by a run that wrote no snapshot (a crash before its
    first write), is taken with a warning; another host's claim, or an unreadable one, is refused naming
    the file and what to do, and nothing changes."""
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()                                                  # a process id that is gone
    folder = tmp_path / "f"
    folder.mkdir()
    claim = folder / ".fastema-run"
    claim.write_text(json.dumps({"run_id": "crashed", "host": socket.gethostname(), "pid": child.pid}))
    ph = PostHocEMA(_net(), snapshot_every=1, path=folder)
    with pytest.warns(UserWarning, match=r"was claimed by run crashed \(process \d+ on this host\), which is gone "
                                         rf"and wrote no snapshot there: run {ph.run_id} takes the folder"):
        _run(ph, ph.model, 0, 1)
    assert json.loads(claim.read_text())["run_id"] == ph.run_id and ph.updates == 1

    for text, match in ((json.dumps({"run_id": "elsewhere", "host": "node-7", "pid": 1}),
                         r"claimed by another run, run elsewhere \(.*process 1 on host 'node-7'\).*load its "
                         r"checkpoint first.*if run elsewhere is over, remove .*\.fastema-run"),
                        ("garbage", r"claim file .*\.fastema-run' cannot be read .*remove it if no other run")):
        other = tmp_path / f"g{len(text)}"
        other.mkdir()
        (other / ".fastema-run").write_text(text)
        before = _folder(other)
        late = PostHocEMA(_net(), snapshot_every=1, path=other)
        with pytest.raises(ValueError, match=match):
            late.update()
        assert late.updates == 0 and _folder(other) == before


def test_a_second_process_of_a_live_run_is_refused_before_anything_moves(tmp_path):
    """Second review of 1e/1f: an evaluation job that loaded the training checkpoint into a PostHocEMA on
    the same path (the same run id, another process) moved the live run's later snapshots aside at its
    first update, then took its claim. While the claiming process runs on this host, such a process is now
    refused naming the claim and the fix (another folder), and nothing moves; once that process is gone,
    the same load is a resume. The same run's claim from another host is taken as a resume, with a warning."""
    import copy
    import subprocess
    import sys

    folder = tmp_path / "run"
    live = PostHocEMA(nn.Linear(4, 4), snapshot_every=10, path=folder)
    _run(live, live.model, 0, 30)
    checkpoint = copy.deepcopy(live.state_dict())
    _run(live, live.model, 30, 60)                               # the live run goes on: snapshots 40, 50, 60
    claim = json.loads((folder / ".fastema-run").read_text())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        claim["pid"] = other.pid                                  # as if the live run were that process
        (folder / ".fastema-run").write_text(json.dumps(claim))
        before = _folder(folder)
        evaluation = PostHocEMA(nn.Linear(4, 4), snapshot_every=10, path=folder)
        evaluation.load_state_dict(checkpoint)
        with pytest.raises(ValueError, match=rf"claimed by this run, run {live.run_id}, from another process that "
                                             rf"still runs \(.*\.fastema-run: process {other.pid} on this host\).*"
                                             rf"Give this PostHocEMA another folder \(path=\); if process "
                                             rf"{other.pid} is not run {live.run_id} .*remove .*\.fastema-run"):
            evaluation.update()
        assert _folder(folder) == before and not [p for p in folder.iterdir() if p.is_dir()]
        assert evaluation.updates == 30
        elsewhere = PostHocEMA(nn.Linear(4, 4), snapshot_every=10, path=tmp_path / "eval")    # the fix
        elsewhere.load_state_dict(checkpoint)
        elsewhere.update()
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match=r"resumed at time 30 found 3 snapshot\(s\) of its own run"):
        evaluation.update()                                       # that process is gone: a resume
    _run(evaluation, evaluation.model, 31, 40)                    # its first write (40) claims the folder
    claim = json.loads((folder / ".fastema-run").read_text())
    assert claim["pid"] == os.getpid()
    claim.update(host="node-7", pid=1)                            # the same run, from another host
    (folder / ".fastema-run").write_text(json.dumps(claim))
    resumed = PostHocEMA(nn.Linear(4, 4), snapshot_every=10, path=folder)
    resumed.load_state_dict(copy.deepcopy(evaluation.state_dict()))
    with pytest.warns(UserWarning, match=r"claimed by this run, run \w+, from process 1 on host 'node-7', which "
                                         r"this host cannot see: taken as a resume"):
        _run(resumed, resumed.model, 40, 50)
    assert json.loads((folder / ".fastema-run").read_text())["host"] != "node-7"


def test_of_runs_that_find_one_stale_claim_one_takes_it(tmp_path):
    """Second review of 1f: two runs that both read the same stale claim both wrote theirs (the last one
    won the file, both wrote snapshots). The takeover is exclusive now (a lock named after that claim,
    created with O_EXCL, then the claim read again): one run takes the folder, the others are refused,
    and nothing but the claim is left."""
    import socket
    import threading

    from fastema.posthoc import _folder as F

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / F.CLAIM).write_text(json.dumps({"run_id": "gone", "host": socket.gethostname(), "pid": 1 << 22}))
    barrier = threading.Barrier(3)
    refusals = {}

    def run(run_id):                                              # each claim waits: every run has read
        with warnings.catch_warnings(), watching(F._claim, on_call=lambda args: barrier.wait()):   # the stale one
            warnings.simplefilter("ignore")
            refusals[run_id] = F.check_folder(str(shared), run_id, 0.0, writing=True)

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, refused in refusals.items() if refused is None]
    assert len(winners) == 1, refusals
    assert json.loads((shared / F.CLAIM).read_text())["run_id"] == winners[0]
    assert all(f"claimed by another run, run {winners[0]}" in refused for refused in refusals.values() if refused)
    assert os.listdir(shared) == [F.CLAIM]


@pytest.mark.parametrize("target", ["nowhere", "a_claim"])
def test_a_claim_that_is_a_symbolic_link_is_refused_naming_it(tmp_path, target):
    """Second review of 1f: a dangling symbolic link named .fastema-run made the claim loop and give up
    silently, and the run wrote unclaimed. A claim is a regular file fastema writes: a symbolic link,
    dangling or not, is refused naming it, and nothing is written."""
    folder = tmp_path / "run"
    folder.mkdir()
    ph = PostHocEMA(nn.Linear(3, 3), snapshot_every=1, path=folder)
    real = tmp_path / "real-claim"
    if target == "a_claim":
        real.write_text(json.dumps({"run_id": ph.run_id, "host": "h", "pid": os.getpid()}))
    (folder / ".fastema-run").symlink_to(real)
    with pytest.raises(ValueError, match=r"claim file .*\.fastema-run' cannot be read \(ValueError: it is a "
                                         rf"symbolic link to {'nothing' if target == 'nowhere' else 'another file'}"
                                         r", not a claim fastema writes.*remove it"):
        ph.update()
    assert ph.updates == 0 and os.listdir(folder) == [".fastema-run"] and (folder / ".fastema-run").is_symlink()


def test_a_dcp_snapshots_metadata_is_parsed_once_for_all_its_tensors(tmp_path):
    """Second review (performance): synthesis parsed a DCP snapshot's .metadata again for every tensor it
    read (every dcp.load asked the reader for it), through the pure-Python allow-list unpickler: 2 snapshots
    of 600 tensors made 1202 parses, 54 s of a 60 s synthesis. It is parsed and checked once per snapshot
    now, and every read of that snapshot uses it."""
    import torch.distributed.checkpoint as dcp

    from fastema._io.dcp_unpickler import DcpMetadataUnpickler

    run = tmp_path / "run"
    run.mkdir()
    names = [f"w{i}" for i in range(6)]
    for t in (10, 20):
        base = run / f"snapshot-{t:012d}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({f"{k}:{n}": torch.full((3,), float(t + k)) for k in range(2) for n in names},
                     checkpoint_id=str(base), no_dist=True)
        (run / f"snapshot-{t:012d}.json").write_text(json.dumps({
            "format": "fastema.posthoc", "version": "2", "run_id": "r", "time": str(t), "updates": str(t),
            "gammas": json.dumps(GAMMAS), "averaged": json.dumps(names), "others": "[]", "kind": "dcp",
            "shapes": json.dumps({n: [3] for n in names})}))
    parses: list = []
    with watching(DcpMetadataUnpickler.load, on_call=lambda args: parses.append(1)):
        out = posthoc.synthesize(run, 0.07, max_error=1.0)
    assert sorted(out) == names and len(parses) == 2
    coefficients = out.solution.coefficients                      # rows: (10, k=0), (10, 1), (20, 0), (20, 1)
    want = sum(c * (t + k) for c, (t, k) in zip(coefficients, [(10, 0), (10, 1), (20, 0), (20, 1)]))
    assert all(torch.allclose(v, torch.full((3,), want, dtype=torch.float32)) for v in out.values())


# --------------------------------------------------------------------------- the profiles (H3)

@pytest.mark.parametrize("other", ["sigma_rels", "plain_ema"])
def test_a_checkpoint_of_other_profiles_is_refused_before_anything_is_loaded(tmp_path, other):
    """reliability H3: the checkpoint's schedules replaced the plan's while the snapshots went on
    labelling the rows with the constructor's exponents."""
    net = _net()
    if other == "sigma_rels":
        old = PostHocEMA(net, sigma_rels=(0.15, 0.25), snapshot_every=None, path=tmp_path / "old")
        match = (r"its profiles are sigma_rels=\[0.15, 0.25\].*this PostHocEMA tracks sigma_rels=\[0.05, 0.1\].*"
                 r"sigma_rels=\(0.15, 0.25\) to resume that run.*Nothing was loaded")
    else:
        old = EMA(net, [0.9, 0.99])
        match = r"constant decay 0.9, a constant decay 0.99, not power-function profiles.*Nothing was loaded"
    _run(old, net, 0, 5)
    new = PostHocEMA(net, sigma_rels=(0.05, 0.10), snapshot_every=2, path=tmp_path / "new")
    _run(new, net, 5, 8)
    rows = [{k: v.clone() for k, v in new.averaged_state_dict(r).items()} for r in (0, 1)]
    counters = (new.updates, new.calls, new.plan.last_time, new.run_id, new.gammas)
    with pytest.raises(ValueError, match=match):
        new.load_state_dict(old.state_dict())
    assert (new.updates, new.calls, new.plan.last_time, new.run_id, new.gammas) == counters
    for r in (0, 1):
        assert all(torch.equal(v, rows[r][k]) for k, v in new.averaged_state_dict(r).items())


def test_snapshot_metadata_describes_the_rows_from_the_plans_schedules(tmp_path):
    net = _net()
    ph = PostHocEMA(net, sigma_rels=(0.05, 0.10), snapshot_every=None, path=tmp_path)
    _run(ph, net, 0, 3)
    meta = _metadata(ph.snapshot())
    assert json.loads(meta["gammas"]) == [s.gamma for s in ph.plan.schedules] == ph.gammas
    assert json.loads(meta["sigma_rels"]) == pytest.approx([0.05, 0.10], rel=1e-12)
    assert ph.sigma_rels == (0.05, 0.10)
    ph.plan.schedules = [PowerFunction.of(0.15), PowerFunction.of(0.25)]       # whatever the rows hold now
    _run(ph, net, 3, 4)
    meta = _metadata(ph.snapshot())
    assert json.loads(meta["gammas"]) == [s.gamma for s in ph.plan.schedules] == ph.gammas
    assert json.loads(meta["sigma_rels"]) == pytest.approx([0.15, 0.25], rel=1e-9)
    assert ph.sigma_rels == pytest.approx((0.15, 0.25), rel=1e-9)


# --------------------------------------------------------------------------- dtypes

def test_float16_snapshots_refuse_values_beyond_their_range(tmp_path):
    """reliability L6: weights beyond +-65504 became inf in float16 snapshots and synthesis returned
    NaN. Now the snapshot is refused (the update stays applied), naming the tensor and the fix."""
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(1e5)
    ph = PostHocEMA(net, snapshot_every=1, path=tmp_path / "f16", snapshot_dtype="float16")
    with pytest.raises(SnapshotError, match=r"update 1 was applied.*0.weight holds 4 finite value\(s\) beyond the "
                                            r"range of float16.*snapshot_dtype='float32'") as err:
        ph.update()
    assert err.value.applied and ph.updates == 1
    assert [p.name for p in (tmp_path / "f16").iterdir()] == [".fastema-run"]   # the claim: no snapshot, no temporary
    wide = PostHocEMA(net, snapshot_every=1, path=tmp_path / "f32")
    wide.update()
    assert float(wide.synthesize(0.07, max_error=1.0)["0.weight"][0, 0]) == 1e5
    with pytest.raises(ValueError, match=r"synthesised '0.weight' does not fit in torch.float16.*dtype=torch.float32"):
        wide.synthesize(0.07, max_error=1.0, dtype=torch.float16)

    old = tmp_path / "v1"                                   # a float16 snapshot written before the check: inf
    old.mkdir()
    inf = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    _v1(old / "snapshot-000000000010.safetensors", 10, {"0:w": inf, "1:w": inf.clone()}, GAMMAS, ["w"])
    with pytest.raises(ValueError, match=r"snapshot-000000000010.safetensors': the profile 0:w holds inf or NaN"):
        posthoc.synthesize(old, 0.07, max_error=1.0)


def test_tensors_of_dtypes_safetensors_has_no_name_for_are_stored_as_their_bytes(tmp_path):
    """reliability M5: a complex64 or uint16 buffer made every snapshot fail ("has no safetensors
    name") out of update(); they are stored as bytes and synthesised back bit for bit."""
    net = _net()
    net.register_buffer("phase", torch.randn(3, 2, dtype=torch.complex64))       # copied
    net.register_buffer("spectrum", torch.randn(4, dtype=torch.complex128))      # excluded: kept as it is
    net.register_buffer("ids", torch.arange(5).to(torch.uint16).reshape(5, 1))   # integer buffers: copied
    net.register_buffer("scalar", torch.tensor(7, dtype=torch.uint32))
    ph = PostHocEMA(net, snapshot_every=2, path=tmp_path, copy=["phase"], exclude=["spectrum"])
    _run(ph, net, 0, 4)
    got = ph.synthesize(0.07, max_error=1.0)
    for name in ("phase", "spectrum", "ids", "scalar"):
        want = getattr(net, name)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
