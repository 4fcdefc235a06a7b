"""A merge at the process level, when the world changes under it: something appears at ``out`` while
it runs, another merge (in this process or another) publishes to the same ``out`` first, descriptors
run out, SIGTERM / SIGHUP / Ctrl-C arrive, the donor folder's small files link out of it, an ``out``
that is a link is overwritten, an input has weight 0. Every fault leaves no temporary folder and
changes no input; whatever could crash or hang runs in a child process."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from merge_helpers import System, checkpoints, fingerprint, leftovers, run_python, tree_state
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file
from support.calls import watching

from fastema._io import files
from fastema.cli import merge as cli
from fastema.merge import MergeError, _core, _writer, merge_checkpoints

CLI = "import sys\nfrom fastema.cli import merge as cli\nsys.exit(cli.main(sys.argv[1:]))\n"
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/: a child imports its support


def _payload(out) -> bytes:
    """The merged tensors' file of ``out`` (a file, or a folder's model.safetensors)."""
    path = os.path.join(out, "model.safetensors") if os.path.isdir(out) else out
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------ M1, L2: publishing re-checks out


@pytest.mark.parametrize("way", ["renameat2", "link", "claim"])
@pytest.mark.parametrize("out_name, appears", [
    ("out.safetensors", "file"), ("merged", "empty folder"), ("merged", "folder"), ("merged", "file")])
def test_something_that_appears_at_out_during_the_merge_is_kept_and_the_merge_says_out_exists(
        tmp_path, out_name, appears, way):
    """Publishing on this system, on one without ``renameat2`` (``link``) and on one without hard
    links either (``claim``: the name claimed first)."""
    paths, _ = checkpoints(tmp_path / "in", "hf")
    before = fingerprint(paths)
    with files.using(System(way)):
        merge_checkpoints(paths, tmp_path / ("clean" + out_name))      # with nothing there: published
    assert _payload(tmp_path / ("clean" + out_name))
    out = tmp_path / out_name

    def appearing_first(folder):            # the other writer wins the race, deterministically
        if appears == "file":
            out.write_bytes(b"precious")
        else:
            out.mkdir()
            if appears == "folder":
                (out / "mine.txt").write_bytes(b"precious")

    with files.using(System(way, at_publish=appearing_first)), \
            pytest.raises(MergeError, match=r"out '[^']+' exists"):
        merge_checkpoints(paths, out)
    if appears == "file":
        assert out.read_bytes() == b"precious"
    else:
        assert sorted(os.listdir(out)) == ([] if appears == "empty folder" else ["mine.txt"])
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


@pytest.mark.parametrize("out_name", ["out.safetensors", "merged"])
def test_a_second_merge_into_the_same_new_out_from_one_process_wins_or_says_out_exists(
        tmp_path, out_name):
    """L2: the temporary name was per process, so a merge started while another to the same out ran
    failed with "not writable (File exists)"; now the one that publishes first wins, the other says
    out exists and removes only its own temporary folder."""
    paths, _ = checkpoints(tmp_path / "in", "hf", count=2)
    before = fingerprint(paths)
    out = tmp_path / out_name
    alone = tmp_path / "alone" / out_name
    alone.parent.mkdir()
    merge_checkpoints(paths, alone, weights="3,1")

    def another_merge_first(folder):        # merge 1 is about to publish: merge 2 runs whole, publishes
        merge_checkpoints(paths, out, weights="3,1")

    with files.using(System(at_publish=another_merge_first)), \
            pytest.raises(MergeError, match=r"out '[^']+' exists"):
        merge_checkpoints(paths, out, weights="1,3")
    assert _payload(out) == _payload(alone)              # merge 2's, whole
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


def test_temporary_folders_of_dead_merges_are_removed_and_those_of_running_ones_kept(tmp_path):
    """The per-merge name (<pid>-<token>@<host>) still tells a dead process's folder from a live one's."""
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    host = os.uname().nodename
    dead = f".out.safetensors.fastema-merge-999999999-0badc0de@{host}.tmp"
    running = f".out.safetensors.fastema-merge-{os.getpid()}-12345678@{host}.tmp"
    for name in (dead, running):
        (tmp_path / name).mkdir()
        (tmp_path / name / "out.safetensors").write_bytes(b"partial")
    merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert leftovers(tmp_path) == [running]
    assert fingerprint(paths) == before


_RACING = """
import os, sys, time
from fastema._io import files
from fastema.cli import merge as cli
sync = os.environ["FASTEMA_TEST_SYNC"]
class Racing(files.FileSystem):
    first = True
    def sync_folder(self, folder):  # a publish begins: both merges past their checks, their folders made
        if self.first and folder.endswith(".tmp"):
            self.first = False
            open(os.path.join(sync, str(os.getpid())), "w").close()
            end = time.monotonic() + 30
            while len(os.listdir(sync)) < 2 and time.monotonic() < end:
                time.sleep(0.005)
        super().sync_folder(folder)
with files.using(Racing()):
    code = cli.main(sys.argv[1:])
sys.exit(code)
"""


@pytest.mark.parametrize("out_name", ["out.safetensors", "merged"])
def test_two_merge_processes_into_the_same_new_out_one_wins_the_other_says_out_exists(tmp_path, out_name):
    paths, _ = checkpoints(tmp_path / "in", "hf", count=2)
    before = fingerprint(paths)
    out = tmp_path / out_name
    (tmp_path / "sync").mkdir()
    env = dict(os.environ, FASTEMA_TEST_SYNC=str(tmp_path / "sync"))
    runs = {w: subprocess.Popen([sys.executable, "-c", _RACING, str(out), *paths, "--weights", w, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for w in ("1,3", "3,1")}
    done = {w: (p.wait(timeout=60), p.communicate()[1]) for w, p in runs.items()}
    assert sorted(rc for rc, _ in done.values()) == [0, 1], done
    winner = next(w for w, (rc, _) in done.items() if rc == 0)
    loser_err = next(err for rc, err in done.values() if rc == 1)
    assert re.match(r"error: out '[^']+' exists", loser_err) and loser_err.count("\n") == 1
    alone = tmp_path / "alone" / out_name
    alone.parent.mkdir()
    merge_checkpoints(paths, alone, weights=winner)
    assert _payload(out) == _payload(alone)              # the winner's merge, whole; nothing lost
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


# ------------------------------------------------------------ M5: cleanup after a descriptor shortage


_NO_DESCRIPTORS_LEFT = """
import os, resource, sys
from fastema.merge import _core
sys.path.insert(0, os.environ["FASTEMA_TEST_TESTS"])
from support.calls import watching
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
last = len(sys.argv) - 3
def hoarding(args, sources):            # the last input holds every descriptor left, until it is closed
    if args["index"] == last:
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        close = sources[-1].close
        def closing():
            close()
            while held:
                os.close(held.pop())
        sources[-1].close = closing
try:
    with watching(_core.open_input, on_return=hoarding):
        _core.merge_checkpoints(sys.argv[2:], sys.argv[1])
except Exception as err:
    print("failed:", type(err).__name__, err)
else:
    print("written")
"""


@pytest.mark.parametrize("out_name", ["out.safetensors", "merged"])
def test_a_merge_that_runs_out_of_descriptors_leaves_no_temporary_folder(tmp_path, out_name):
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    r = run_python(_NO_DESCRIPTORS_LEFT, tmp_path / out_name, *paths, env={"FASTEMA_TEST_TESTS": _TESTS})
    assert r.returncode == 0 and r.stdout.startswith("failed:"), (r.stdout, r.stderr)
    assert not (tmp_path / out_name).exists()
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


# ------------------------------------------------------------ M9: SIGTERM, SIGHUP, Ctrl-C


_SLOW = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)    # as in a shell's foreground job
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import os
from fastema.cli import merge as cli
from fastema._io import safetensors as writer
sys.path.insert(0, os.environ["FASTEMA_TEST_TESTS"])
from support.calls import watching
with watching(writer.SafetensorsWriter.__init__,         # mid-merge: the temporary folder and its first
              on_return=lambda args, value: time.sleep(60)):   # file exist
    code = cli.main(sys.argv[1:])
sys.exit(code)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("out_name", ["out.safetensors", "merged"])
def test_sigterm_sighup_or_ctrl_c_mid_merge_removes_the_temporary_folder_and_exits_128_plus_the_signal(
        tmp_path, sig, out_name):
    paths, _ = checkpoints(tmp_path / "in", "hf", count=2)
    before = fingerprint(paths)
    out = tmp_path / out_name
    p = subprocess.Popen([sys.executable, "-c", _SLOW, str(out), *paths, "--no-progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, FASTEMA_TEST_TESTS=_TESTS))
    try:
        end = time.monotonic() + 30
        while not any(os.listdir(tmp_path / t) for t in leftovers(tmp_path)) and time.monotonic() < end:
            time.sleep(0.01)
        assert leftovers(tmp_path), "the merge never made its temporary folder"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)            # a loaded 2-core CI machine once took over 30 s
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert err.count("\n") == 1 and "nothing was written" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == [] and fingerprint(paths) == before


def test_the_merge_command_handles_sigterm_and_sighup_only_while_it_runs(tmp_path):
    seen = {}

    def merge(args):                        # the merge begins: what handles the signals now, then stop
        seen.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)})
        raise MergeError("stop here")

    def mine(signum, frame):
        raise AssertionError("not called")

    old = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with watching(merge_checkpoints, on_call=merge):
            assert cli.main([str(tmp_path / "out.safetensors"), str(tmp_path / "a.safetensors")]) == 1
        after = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert all(callable(h) and h is not mine for h in seen.values()) and len(seen) == 2
    assert after == {signal.SIGTERM: mine, signal.SIGHUP: mine}


def test_the_merge_command_leaves_an_ignored_sighup_ignored(tmp_path):
    """nohup's SIGHUP stays ignored while the command runs."""
    seen = []

    def merge(args):
        seen.append(signal.getsignal(signal.SIGHUP))
        raise MergeError("stop here")

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with watching(merge_checkpoints, on_call=merge):
            assert cli.main([str(tmp_path / "out.safetensors"), str(tmp_path / "a.safetensors")]) == 1
    finally:
        signal.signal(signal.SIGHUP, old)
    assert seen == [signal.SIG_IGN]


# ------------------------------------------------------------ M7: small files linked out of the donor folder


def test_small_files_that_link_out_of_the_donor_folder_are_not_copied_and_are_reported(tmp_path):
    """A tokenizer_config.json linked to /proc/self/environ copied the merging process's environment
    (a SECRET_TOKEN) into the merged folder; one linked to a file outside copied that file."""
    paths, _ = checkpoints(tmp_path / "in", "hf", count=2)
    donor = paths[-1]
    (tmp_path / "secret.txt").write_text("hf_outside_secret")
    os.symlink("/proc/self/environ", os.path.join(donor, "tokenizer_config.json"))
    os.symlink(os.path.join("..", "..", "secret.txt"), os.path.join(donor, "special_tokens_map.json"))
    os.symlink("/dev/zero", os.path.join(donor, "generation_config.json"))
    os.mkfifo(os.path.join(donor, "chat_template.jinja"))
    os.symlink("tokenizer.json", os.path.join(donor, "vocab.json"))           # inside: copied
    before = tree_state(paths)
    out = tmp_path / "merged"
    r = run_python(CLI, out, *paths, "--no-progress", env={"SECRET_TOKEN": "hf_environment_secret"})
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "vocab.json"]
    assert not os.path.islink(out / "vocab.json")
    assert (out / "vocab.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    for name in os.listdir(out):
        data = (out / name).read_bytes()
        assert b"hf_environment_secret" not in data and b"hf_outside_secret" not in data, name
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        assert name in r.stdout, r.stdout
    assert leftovers(tmp_path) == [] and tree_state(paths) == before


def test_the_small_files_of_a_hugging_face_cache_snapshot_are_copied_through_its_blob_links(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    tensors = {"w": torch.arange(6, dtype=torch.float32)}
    save_file(tensors, repo / "blobs" / "b1", metadata={"format": "pt"})
    (repo / "blobs" / "b2").write_text('{"model_type": "tiny"}')
    (repo / "blobs" / "b3").write_text('{"vocab": {}}')
    for name, blob in (("model.safetensors", "b1"), ("config.json", "b2"), ("tokenizer.json", "b3")):
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
    save_file({"w": torch.zeros(6)}, tmp_path / "first.safetensors")
    before = tree_state([tmp_path / "hub", tmp_path / "first.safetensors"])
    report = merge_checkpoints([tmp_path / "first.safetensors", snap], tmp_path / "merged")
    got = tmp_path / "merged"
    assert sorted(os.listdir(got)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (got / "config.json").read_text() == '{"model_type": "tiny"}' and not os.path.islink(got / "config.json")
    assert not report.not_copied
    assert leftovers(tmp_path) == [] and tree_state([tmp_path / "hub", tmp_path / "first.safetensors"]) == before


# ------------------------------------------------------------ M8: tied in one input, apart in another


def test_a_tensor_tied_in_one_input_and_stored_apart_in_another_is_refused_in_either_order(tmp_path):
    """Input 0 a .pt whose lm_head.weight is its embed.weight, input 1 a safetensors file with both:
    input 1's lm_head was never read (the result 2.0, tied); in the other order it was averaged
    apart (150.5). Either order is refused now, naming the tensor."""
    embed = torch.ones(4, 3)
    torch.save({"embed.weight": embed, "lm_head.weight": embed}, tmp_path / "tied.pt")
    save_file({"embed.weight": torch.full((4, 3), 3.0), "lm_head.weight": torch.full((4, 3), 300.0)},
              tmp_path / "apart.safetensors")
    paths = [tmp_path / "tied.pt", tmp_path / "apart.safetensors"]
    before = fingerprint(paths)
    for order in (paths, paths[::-1]):
        out = tmp_path / "out.safetensors"
        with pytest.raises(MergeError, match=r"tensor 'lm_head\.weight': .* stores it apart from 'embed\.weight'"):
            merge_checkpoints(order, out)
        assert not out.exists()
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


# ------------------------------------------------------------ L1: overwrite of an out that is a link


def test_overwriting_an_out_that_links_to_a_folder_replaces_the_link_and_leaves_no_old_link(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("kept")
    os.symlink("target", tmp_path / "merged")
    merge_checkpoints(paths, tmp_path / "merged", overwrite=True)
    assert not os.path.islink(tmp_path / "merged") and (tmp_path / "merged" / "model.safetensors").is_file()
    assert os.listdir(tmp_path / "target") == ["keep.txt"]
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


def test_a_stale_old_link_of_a_dead_merge_is_removed_and_its_target_kept(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("kept")
    os.symlink("target", tmp_path / f".merged.fastema-merge-999999999-0badc0de@{os.uname().nodename}.old")
    merge_checkpoints(paths, tmp_path / "merged")
    assert os.listdir(tmp_path / "target") == ["keep.txt"]
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


# ------------------------------------------------------------ L3: inputs of weight 0


@pytest.mark.parametrize("zero", [0, 1])
def test_an_input_of_weight_0_is_not_read_and_does_not_enter_the_sums(tmp_path, zero):
    """weights=[0, 1] where input 0 holds inf and nan gave nan (0 x inf); now exactly input 1."""
    bad = {"w": torch.tensor([np.inf, np.nan, -np.inf, 1.0]), "h": torch.tensor([np.nan, 2.0]).half(),
           "n": torch.tensor([5, 6])}
    good = {"w": torch.tensor([1.5, -2.25, 3.0, 4.0]), "h": torch.tensor([0.5, 8.0]).half(), "n": torch.tensor([1, 2])}
    states = [bad, good] if zero == 0 else [good, bad]
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for s, p in zip(states, paths):
        save_file(s, p)
    before = fingerprint(paths)
    pieces = []

    def opened(args, sources):              # each input's pieces read, counted
        for s in sources:
            piece = s.piece
            s.piece = lambda name, *a, _piece=piece, _i=args["index"]: pieces.append(_i) or _piece(name, *a)

    weights = [0, 1] if zero == 0 else [1, 0]
    with watching(_core.open_input, on_return=opened):
        report = merge_checkpoints(paths, tmp_path / "out.safetensors", weights=weights)
    got = load_numpy(tmp_path / "out.safetensors")
    assert got["w"].tobytes() == good["w"].numpy().tobytes() and got["h"].tobytes() == good["h"].numpy().tobytes()
    assert got["n"].tolist() == states[-1]["n"].tolist()                     # copied from the last, as ever
    assert zero not in pieces and pieces
    assert report.bytes_read == 4 * 4 + 2 * 2 + 2 * 8                        # the one input's, and the copy
    assert leftovers(tmp_path) == [] and fingerprint(paths) == before


def test_a_temporary_folder_rmtree_cannot_remove_is_removed_by_path(tmp_path):
    """M5: shutil.rmtree needs two descriptors (the folder's and its scandir's); a merge that ran out of
    them left its temporary folder. discard() then removes it by path, one descriptor at a time."""
    out = _writer.Output(str(tmp_path / "out"), True, False, 0)
    os.mkdir(os.path.join(out.folder, "sub"))
    for name in ("model.safetensors", os.path.join("sub", "config.json")):
        with open(os.path.join(out.folder, name), "wb") as f:
            f.write(b"x")
    class OneDescriptorFree(files.FileSystem):
        def rmtree(self, path):                                         # it needs two
            pass

    with files.using(OneDescriptorFree()):
        out.discard()
    assert leftovers(tmp_path) == [] and not os.path.exists(out.folder)
