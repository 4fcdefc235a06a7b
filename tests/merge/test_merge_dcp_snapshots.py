"""DCP checkpoint folders and fastema's post-hoc snapshot folders as merge inputs: a DCP checkpoint
in several files and one sharded over two ranks (DTensors) equal the float64 reference and the
same merge of safetensors inputs bit for bit; a damaged DCP .metadata runs nothing; sigma_rel:
over a PostHocEMA run's snapshots equals fastema.posthoc.synthesize."""
import os
import pickle

import pytest
import torch
from merge_helpers import NAMES, assert_float32_close, checkpoints, fingerprint, leftovers, model_state, reference
from safetensors.torch import load_file

from fastema.merge import MergeError, merge_checkpoints

dcp = pytest.importorskip("torch.distributed.checkpoint")


def save_dcp(state: dict, path, threads: int = 1):
    writer = dcp.FileSystemWriter(str(path), thread_count=threads)
    dcp.save({"model": dict(state), "optimizer": {"state": {"exp_avg": torch.ones(3)}}}, storage_writer=writer,
             no_dist=True)
    return str(path)


def bytes_of(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_folders_in_several_files_merge_as_safetensors_do(tmp_path):
    states = [model_state(i) for i in range(3)]
    paths = [save_dcp(s, tmp_path / f"step-{100 * (i + 1)}", threads=3) for i, s in enumerate(states)]
    assert len([f for f in os.listdir(paths[0]) if f.endswith(".distcp")]) > 1
    report = merge_checkpoints(paths, tmp_path / "dcp.safetensors", weights="ema:150")
    assert report.formats == ["dcp"] * 3 and report.steps == [100, 200, 300]
    assert report.dropped == ["optimizer.state.exp_avg"]
    got = load_file(tmp_path / "dcp.safetensors")
    for name in NAMES:
        assert_float32_close(got[name], reference(states, report.weights, name), 3, got[name].dtype)
    st, _ = checkpoints(tmp_path / "st", "safetensors")
    merge_checkpoints(st, tmp_path / "st.safetensors", weights="ema:150")
    other = load_file(tmp_path / "st.safetensors")
    assert all(bytes_of(got[n]).equal(bytes_of(other[n])) for n in other)


def _save_sharded(rank, world, folder):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for i in range(2):
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() and v.shape[0] >= world else v
                 for k, v in model_state(i).items()}
        dcp.save({"model": state}, checkpoint_id=os.path.join(folder, f"step-{i + 1}"))
    return {}


@pytest.mark.slow
def test_dcp_sharded_over_two_ranks(tmp_path):
    import torch.distributed as dist
    from dist import run_ranks

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    run_ranks(_save_sharded, tmp_path / "ranks", 2, str(tmp_path))
    paths = [str(tmp_path / "step-1"), str(tmp_path / "step-2")]
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", weights="0.25,0.75")
    got = load_file(tmp_path / "out.safetensors")
    states = [model_state(i) for i in range(2)]
    for name in NAMES:
        assert_float32_close(got[name], reference(states, report.weights, name), 2, got[name].dtype)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_planted_dcp_metadata_runs_nothing_and_a_truncated_shard_is_named(tmp_path):
    states = [model_state(i) for i in range(2)]
    paths = [save_dcp(s, tmp_path / f"step-{i}") for i, s in enumerate(states)]
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    meta = os.path.join(paths[1], ".metadata")
    saved = open(meta, "rb").read()
    with open(meta, "wb") as f:
        pickle.dump(Payload(), f)
    before = fingerprint(paths)
    with pytest.raises(MergeError, match=r"input 1 .*\.metadata' was not loaded: .*Nothing of it ran"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    assert fingerprint(paths) == before
    with open(meta, "wb") as f:
        f.write(saved)
    data = [os.path.join(paths[1], f) for f in os.listdir(paths[1]) if f.endswith(".distcp")][0]
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    before = fingerprint(paths)
    with pytest.raises(MergeError, match=r"input 1 .*truncated"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    assert fingerprint(paths) == before


def _posthoc_run(folder):
    from fastema.torch import PostHocEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    model.register_buffer("seen", torch.zeros((), dtype=torch.long))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=20, path=str(folder))
    for _ in range(200):
        x = torch.randn(32, 6)
        loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.seen += 1
        ph.update()
    return model


def test_sigma_rel_over_a_snapshot_folder_is_posthoc_synthesis(tmp_path):
    from fastema.posthoc import synthesize

    _posthoc_run(tmp_path / "run")
    report = merge_checkpoints([tmp_path / "run"], tmp_path / "out.safetensors", weights="sigma_rel:0.07",
                               allow_negative=True, accumulate="float64")
    assert report.formats == ["snapshot"] * 20 and "sigma_rel=0.07" in report.formula
    ref = synthesize(tmp_path / "run", 0.07)
    got = load_file(tmp_path / "out.safetensors")
    assert set(got) == set(ref)
    for name, t in ref.items():
        if t.is_floating_point():
            assert torch.allclose(got[name].double(), t.double(), rtol=1e-6, atol=1e-7), name
        else:
            assert torch.equal(got[name], t), name                     # kept tensors: the last snapshot's
    with pytest.raises(MergeError, match="negative weights"):
        merge_checkpoints([tmp_path / "run"], tmp_path / "again.safetensors", weights="sigma_rel:0.07")
    uniform = merge_checkpoints([tmp_path / "run"], tmp_path / "u.safetensors")        # any style works too
    assert len(uniform.weights) == 20


def test_pread_with_a_dcp_input_keeps_the_copied_entries_intact(tmp_path):
    """With read="pread" and an input read whole (DCP), the whole-tensor sums read through the same
    buffers the helper thread was filling with the next copied entry's bytes: an integer entry after
    two floats came out as the floats' bytes, with no error (and --verify passed, reading them back)."""
    from safetensors.torch import save_file

    def state(s):
        return {"a": torch.full((1000,), 1.0 + s), "b": torch.full((1000,), 7.0 + s),
                "c": torch.arange(16, dtype=torch.int64) + 100}

    save_dcp(state(0), tmp_path / "dcp")
    save_file(state(1), tmp_path / "m1.safetensors")
    for read in ("mmap", "pread"):
        out = tmp_path / f"out-{read}.safetensors"
        merge_checkpoints([tmp_path / "dcp", tmp_path / "m1.safetensors"], out, read=read, verify=True)
        got = load_file(out)
        assert torch.equal(got["c"], torch.arange(16, dtype=torch.int64) + 100), read
        assert torch.equal(got["a"], torch.full((1000,), 1.5)) and torch.equal(got["b"], torch.full((1000,), 7.5))


def test_a_dcp_tensor_its_chunks_do_not_cover_is_refused_before_anything_is_written(tmp_path):
    """DCP's load leaves what no chunk covers as it was: a .metadata whose size claims more than its
    chunks hold merged uninitialised memory into the output. Now refused by name at the check."""
    from safetensors.torch import save_file

    from fastema._io.dcp import load_dcp_metadata

    save_dcp({"a": torch.full((1000,), 1.0)}, tmp_path / "dcp")
    md = load_dcp_metadata(str(tmp_path / "dcp" / ".metadata"))
    md.state_dict_metadata["model.a"].size = torch.Size([2000])      # its one chunk still covers [0, 1000)
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    save_file({"a": torch.full((2000,), 3.0)}, tmp_path / "m1.safetensors")
    paths = [tmp_path / "dcp", tmp_path / "m1.safetensors"]
    before = fingerprint(paths)
    with pytest.raises(MergeError, match=r"input 0 .*'model.a': its chunks hold 1000 values where its shape \[2000\]"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    assert fingerprint(paths) == before
