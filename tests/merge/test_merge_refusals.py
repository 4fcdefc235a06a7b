"""Every bad input of a merge is refused with a clear error naming the input (and the tensor),
leaves no output and no temporary file behind, and changes no input: missing or extra tensors,
shape or dtype mismatches, truncated or damaged files, pickles that are not state dicts, a
symbolic-link loop, a FIFO, too little disk, a failing write and a Ctrl-C midway."""
import errno
import os
import re

import pytest
import torch
from merge_helpers import checkpoints, fingerprint, leftovers, model_state, write
from support.calls import watching

from fastema._io import files
from fastema.cli import merge as cli
from fastema.merge import MergeError, _engine, merge_checkpoints


def refused(tmp_path, paths, match, **kwargs):
    """merge_checkpoints refuses with ``match``; no output, no leftovers, no input changed."""
    before = fingerprint(paths)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=match):
        merge_checkpoints(paths, out, **kwargs)
    assert not out.exists() and leftovers(tmp_path) == []
    assert fingerprint(paths) == before


def three(tmp_path, fmt="safetensors", change=None):
    """Three checkpoints, the second changed by ``change(state)``."""
    os.makedirs(tmp_path, exist_ok=True)
    states = [model_state(i) for i in range(3)]
    if change is not None:
        change(states[1])
    return [write(s, tmp_path, fmt, i) for i, s in enumerate(states)]


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "hf"])
def test_a_missing_or_extra_tensor_names_it_and_the_input(tmp_path, fmt):
    paths = three(tmp_path / "a", fmt, lambda s: s.pop("block.0.mlp.bias"))
    refused(tmp_path, paths, r"'block\.0\.mlp\.bias' of input 0 .* is missing from input 1")
    paths = three(tmp_path / "b", fmt, lambda s: s.update(extra=torch.ones(2)))
    refused(tmp_path, paths, r"tensor 'extra' of input 1 .* is not in input 0")


@pytest.mark.parametrize("nested, key", [({"layer": {"weight": torch.full((2,), 100.0)}}, "layer.weight"),
                                         ({0: torch.ones(2)}, "0")], ids=["dotted and nested", "int and str"])
def test_two_torch_file_keys_that_flatten_to_one_name_are_refused(tmp_path, nested, key):
    """A torch file whose {"layer.weight": t, "layer": {"weight": u}} (or {0: t, "0": u}) flattened to
    one name twice: the merge kept the last and dropped the other without a word (safetensors inputs
    already refuse a name stored twice)."""
    def twice(state):
        state[key] = torch.ones(2)
        state.update(nested)
    paths = []
    for i in range(2):
        state = {"embed.weight": torch.full((3,), float(i))}
        twice(state)
        path = str(tmp_path / f"ckpt-{i}.pt")
        torch.save(state, path)
        paths.append(path)
    refused(tmp_path, paths, rf"entry '{key}' is stored twice .*rename one in the checkpoint")


def test_a_shape_or_dtype_mismatch_names_the_tensor_and_both_values(tmp_path):
    paths = three(tmp_path / "a", change=lambda s: s.update({"embed.weight": torch.zeros(60, 17)}))
    refused(tmp_path, paths, r"tensor 'embed\.weight' has shape \[60, 17\] in input 1 .* but \[61, 17\] in input 0")
    paths = three(tmp_path / "b", change=lambda s: s.update({"embed.weight": s["embed.weight"].half()}))
    refused(tmp_path, paths, r"tensor 'embed\.weight' is float16 in input 1 .* but float32 in input 0")


def test_a_truncated_or_damaged_safetensors_file(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[:-100])
    refused(tmp_path, paths, r"input 1 .* is truncated: tensor '.*' ends at byte")
    with open(paths[1], "wb") as f:
        f.write(data[:8] + b"not json" + data[16:])
    refused(tmp_path, paths, r"input 1 .*: its header is not JSON \(JSONDecodeError\); the file is damaged")
    with open(paths[1], "wb") as f:
        f.write(b"\xff" * 8 + data[8:])
    refused(tmp_path, paths, r"input 1 .* is not a safetensors file, or is truncated")


def test_a_truncated_torch_file_and_a_sharded_folder_missing_a_shard(tmp_path):
    paths, _ = checkpoints(tmp_path / "pt", "pt")
    data = open(paths[2], "rb").read()
    with open(paths[2], "wb") as f:
        f.write(data[:len(data) // 2])
    refused(tmp_path, paths, r"input 2 .* is not a readable torch checkpoint .* truncated or damaged")
    paths, _ = checkpoints(tmp_path / "hf", "hf-sharded")
    os.remove(os.path.join(paths[0], "model-00002-of-00002.safetensors"))
    refused(tmp_path, paths, r"input 0 .*model-00002-of-00002\.safetensors' does not exist")


def test_a_pickle_that_is_not_a_state_dict_runs_nothing(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "pt")
    torch.save([torch.ones(2), 3], paths[1])
    refused(tmp_path, paths, r"input 1 .* holds a list, not a state dict")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {"w": torch.ones(2)}, "x": Payload()}, paths[1])
    refused(tmp_path, paths, r"input 1 .* holds a pickle that is not plain tensor data: .*nothing of it ran")
    assert not marker.exists()


def test_a_symlink_loop_and_a_fifo_are_refused_by_name(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    loop = tmp_path / "in" / "loop.safetensors"
    os.symlink(tmp_path / "in" / "other", loop)
    os.symlink(loop, tmp_path / "in" / "other")
    refused(tmp_path, [paths[0], str(loop)], r"input 1: .*loop\.safetensors' is a loop of symbolic links")
    fifo = tmp_path / "in" / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(tmp_path, [paths[0], str(fifo)], r"input 1 .* is not a regular file")


def test_too_little_disk_is_refused_before_writing(tmp_path):
    class Small(files.FileSystem):                 # a disk with 1000 bytes free
        def free_bytes(self, folder):
            return 1000

    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    with files.using(Small()):
        refused(tmp_path, paths, r"the merge writes \d+ bytes, and .* has 1000 free")


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_ctrl_c_or_a_failed_write_midway_leaves_nothing(tmp_path, fault):
    paths, _ = checkpoints(tmp_path / "in", "hf")
    before = fingerprint(paths)
    calls = []

    def interrupted(args):                 # the third tensor's first piece: raised as it begins
        if args["job"].item.name not in calls:
            calls.append(args["job"].item.name)
        if len(calls) == 3:
            raise fault(errno.ENOSPC, "No space left on device") if fault is OSError else fault()

    for out in (tmp_path / "out.safetensors", tmp_path / "folder"):
        calls.clear()
        with watching(_engine.Engine._run, on_call=interrupted), pytest.raises(fault):
            merge_checkpoints(paths, out)
        assert not out.exists() and leftovers(tmp_path) == [] and len(calls) == 3
    assert fingerprint(paths) == before


def test_a_write_that_fails_names_the_output_and_the_free_space_and_keeps_the_old_one(tmp_path, capsys):
    # "error: [Errno 28] No space left on device": no path, no free space (the output's temporary file failed)
    paths, _ = checkpoints(tmp_path / "in", "safetensors")

    class Full(files.FileSystem):
        def sync_file(self, fd, path):
            raise OSError(errno.ENOSPC, "No space left on device")

    for out in (tmp_path / "out.safetensors", tmp_path / "folder"):
        merge_checkpoints(paths, out)
        before = fingerprint([out])
        with files.using(Full()):
            rc = cli.main([str(out), *map(str, paths), "--overwrite", "--weights", "0.2,0.3,0.5"])
        err = capsys.readouterr().err.strip()
        shown = repr(str(out / "model.safetensors") if out.name == "folder" else str(out))
        assert rc == 1 and len(err.splitlines()) == 1, err
        assert f"could not write {shown} (" in err and "bytes free on its disk): No space left on device" in err
        assert fingerprint([out]) == before and leftovers(tmp_path) == []


def test_a_killed_merge_leaves_a_temporary_folder_the_next_one_removes(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    stale = tmp_path / f".out.safetensors.fastema-merge-999999999@{os.uname().nodename}.tmp"
    stale.mkdir()
    merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert leftovers(tmp_path) == [] and (tmp_path / "out.safetensors").exists()


def test_an_existing_output_or_an_input_as_output(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"mine")
    with pytest.raises(MergeError, match="exists; remove it, or pass overwrite=True"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"mine"
    merge_checkpoints(paths, tmp_path / "out.safetensors", overwrite=True)
    assert (tmp_path / "out.safetensors").stat().st_size > 4
    before = fingerprint(paths)
    with pytest.raises(MergeError, match="is input 1: the merge never writes over an input"):
        merge_checkpoints(paths, paths[1], overwrite=True)
    assert fingerprint(paths) == before


@pytest.mark.parametrize("weights, match", [
    ("1,-1,1", r"negative weights \(input 1: -1\).*allow_negative=True"),
    ("0,0,0", "sum to 0"),
    ("1,2", r"gives 2 number\(s\) for 3 input\(s\)"),
    ("cosine", "unknown weights 'cosine'; the styles are"),
    ("sigma_rel:0.1", "every input must be a snapshot folder"),
])
def test_bad_weights(tmp_path, weights, match):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    refused(tmp_path, paths, match, weights=weights)


def test_ema_needs_increasing_steps(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    refused(tmp_path, paths[::-1], r"the steps \[300, 200, 100\] must be finite and increase: list the inputs "
                                   r"oldest first", weights="ema:100")
    report = merge_checkpoints(paths[::-1], tmp_path / "o.safetensors", weights="ema:100", steps=[1, 2, 3])
    assert report.steps == [1, 2, 3]


def test_negative_weights_when_asked(tmp_path):
    paths, states = checkpoints(tmp_path / "in", "safetensors")
    report = merge_checkpoints(paths, tmp_path / "o.safetensors", weights="-1,1,1", allow_negative=True)
    assert report.weights == (-1.0, 1.0, 1.0)


def test_cli_prints_one_line_and_exit_status(tmp_path, capsys):
    paths = three(tmp_path / "a", change=lambda s: s.pop("block.0.mlp.bias"))
    assert cli.main([str(tmp_path / "out.safetensors"), *paths]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tensor 'block.0.mlp.bias'") and err.count("\n") == 1 and "Traceback" not in err
    assert cli.main([str(tmp_path / "out.safetensors"), *paths, "--dtype", "int8"]) == 2
    good, _ = checkpoints(tmp_path / "b", "safetensors")
    assert cli.main([str(tmp_path / "out.safetensors"), *good, "--weights", "minus-sqrt__reverse", "--verify",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"weights \(minus-sqrt__reverse\)", out) and "verified" in out


def test_negative_weights_that_overflow_the_inputs_own_dtype_are_refused(tmp_path):
    """With allow_negative, a sum may leave even the inputs' own range: two float16 inputs of +-60000
    at weights 2, -1 were written as inf with no error (the overflow check assumed a convex sum)."""
    from safetensors.torch import save_file

    save_file({"a": torch.full((4,), 60000.0, dtype=torch.float16)}, tmp_path / "a.safetensors")
    save_file({"a": torch.full((4,), -60000.0, dtype=torch.float16)}, tmp_path / "b.safetensors")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for dtype in ("same", "float16"):
        refused(tmp_path, paths, r"tensor 'a': merged values reach 180000, beyond the range of float16",
                weights=[2, -1], allow_negative=True, dtype=dtype)
    merge_checkpoints(paths, tmp_path / "wide.safetensors", weights=[2, -1], allow_negative=True, dtype="float32")


def test_an_out_inside_an_input_folder_or_holding_an_input_is_refused(tmp_path):
    """overwrite=True replaced an input: an out inside an input's folder (its model.safetensors), or an out
    folder that holds an input (the folder is replaced whole). Both are refused, nothing changed."""
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "merged")
    os.makedirs(tmp_path / "hf")
    save_file({"a": torch.ones(4)}, tmp_path / "merged" / "model.safetensors")
    save_file({"a": torch.ones(4)}, tmp_path / "hf" / "model.safetensors")
    save_file({"a": torch.zeros(4)}, tmp_path / "ckpt.safetensors")
    cases = [([tmp_path / "merged" / "model.safetensors", tmp_path / "ckpt.safetensors"], tmp_path / "merged",
              "holds input 0"),
             ([tmp_path / "hf", tmp_path / "ckpt.safetensors"], tmp_path / "hf" / "model.safetensors",
              "lies inside input 0")]
    for inputs, out, words in cases:
        before = fingerprint(inputs)
        with pytest.raises(MergeError, match=words):
            merge_checkpoints(inputs, out, overwrite=True)
        assert fingerprint(inputs) == before


def _posthoc_run(folder, seed):
    from torch import nn

    from fastema.torch import PostHocEMA

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ph = PostHocEMA(net, snapshot_every=5, path=folder)
    for _ in range(15):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ph.update()
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def test_sigma_rel_weights_of_two_runs_or_one_snapshot_twice_are_refused(tmp_path):
    # taken: two runs' snapshots were solved as one trajectory's, and a snapshot given twice made the
    # least squares singular (condition 1e19), its weights noise
    a, b = _posthoc_run(tmp_path / "a", 0), _posthoc_run(tmp_path / "b", 1)
    refused(tmp_path, [tmp_path / "a", tmp_path / "b"], r"inputs hold the snapshots of 2 runs \(run [0-9a-f]{32}, "
            r"run [0-9a-f]{32}\): give one run's snapshots", weights="sigma_rel:0.07", allow_negative=True)
    refused(tmp_path, a + b[-1:], "snapshots of 2 runs", weights="sigma_rel:0.07", allow_negative=True)
    refused(tmp_path, a + a[-1:], r"two stored profiles are one \(time 15, gamma .*\): the snapshot of time 15 is "
            r"given twice; give each snapshot once", weights="sigma_rel:0.07", allow_negative=True)
    report = merge_checkpoints(a, tmp_path / "o.safetensors", weights="sigma_rel:0.07", allow_negative=True)
    assert len(report.weights) == len(a) * 2                 # one run's files, each once: taken
    assert "1.num_batches_tracked" in report.copied                          # the kept ones: said so (it said
    assert set(report.copied.values()) == {"kept as it is by the snapshots"}  # "optimizer state")
