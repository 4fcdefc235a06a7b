"""Sharded models (FSDP2 fully_shard, tensor parallel, HSDP) in spawned gloo processes on the CPU.

Every rank averages its own local shards, with no collective in update(); the tests gather the
full weights (test-side collectives) after every optimizer step into a lerp_ reference and
compare the gathered averages with it bit for bit. Checkpoints go through
torch.distributed.checkpoint (DCP) across world sizes, meshes and into a process with no
process group."""
import os

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from models import mlp
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

DECAYS = (0.9, 0.5)


@pytest.fixture(scope="module", autouse=True)
def warm_kernels():
    """Compile (or load) the kernels once here, so the ranks load them rather than compile them at once."""
    from fastema.torch import EMA, WindowAverage

    for dtype in (torch.float32, torch.bfloat16):
        m = nn.Linear(4, 4).to(dtype)
        e = EMA(m, list(DECAYS))
        e.update()
        with e.average_parameters():
            pass
        WindowAverage(m, 3).update()


def _model(seed=0):
    # Linear(8, 5): 5 rows on 2 ranks (3 / 2); Linear(16, 1): rank 1 holds (0, 16) and (0,) shards
    return mlp(8, 5, 16, 1, norm=(None, nn.LayerNorm), seed=seed)


def _shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for i in (0, 2, 5):
        fully_shard(model[i], **kw)
    fully_shard(model, **kw)
    return model


def _full(model):
    """name -> full tensor of every parameter (a test-side gather)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 1, generator=g)


def _train_step(model, opt, rank, step):
    x, y = _batch(rank, step)
    (model(x) - y).square().mean().backward()
    opt.step()
    opt.zero_grad()


POLICIES = ("default", "no_reshard", "bf16_compute", "cpu_offload")


def _policy(name):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    return {"default": {}, "no_reshard": {"reshard_after_forward": False},
            "bf16_compute": {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)},
            "cpu_offload": {"offload_policy": CPUOffloadPolicy(pin_memory=False)}}[name]


def _fsdp2_policies(rank, world, out_dir):
    from fastema.torch import EMA, WindowAverage

    out = {}
    for policy in POLICIES:
        model = _shard(_model(), **_policy(policy))
        ema = EMA(model, list(DECAYS))
        window = WindowAverage(model, 3) if policy == "default" else None
        offloaded = EMA(model, list(DECAYS), offload="cpu") if policy == "default" else None
        assert ema.sharded
        locals_before = [p._local_tensor for p in model.parameters()]
        refs = [_full(model) for _ in DECAYS]
        snaps = [_full(model)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            _train_step(model, opt, rank, step)
            ema.update()
            if window is not None:
                window.update()
                offloaded.update()
            snaps.append(_full(model))
            _lerp_into(refs, snaps[-1])
        # the shadow reads the shards FSDP2 keeps (no rebind happened), and holds 1/world of the model
        out[f"{policy}/same_shards"] = torch.tensor(
            [a is b for a, b in zip(locals_before, [p._local_tensor for p in model.parameters()])] +
            [a is b for a, b in zip(locals_before, ema._avg.sources)])
        out[f"{policy}/local_numel"] = torch.tensor(sum(s.numel() for s in ema._avg.sources))
        for row in (0, 1):
            for n, v in ema.full_state_dict(row).items():
                out[f"{policy}/ema/{row}/{n}"] = v
            for n, v in refs[row].items():
                out[f"{policy}/ref/{row}/{n}"] = v
        if window is not None:
            for row in (0, 1):
                for n, v in offloaded.full_state_dict(row).items():
                    out[f"{policy}/offloaded/{row}/{n}"] = v
            for n, v in window.full_state_dict().items():
                out[f"{policy}/window/{n}"] = v
            for n in refs[0]:
                out[f"{policy}/ref_window/{n}"] = torch.stack([s[n] for s in snaps[-3:]]).mean(0)
        # the swap trap: an evaluation forward with no backward leaves FSDP2 modules unsharded
        x, _ = _batch(99, 0)
        model.eval()
        with torch.no_grad():
            out[f"{policy}/raw_before"] = model(x)
            with ema.average_parameters():
                out[f"{policy}/swapped"] = model(x)
            out[f"{policy}/raw_after"] = model(x)
        model.train()
        out[f"{policy}/x"] = x
        if policy == "default":
            ema.save(os.path.join(out_dir, "ema.safetensors"))   # collective; rank 0 writes
            ema.save(os.path.join(out_dir, "ema.pt"), row=1)       # gathered one tensor at a time, then saved
            try:
                ema.module()
            except TypeError as err:
                out["module_refused"] = torch.tensor("full_state_dict" in str(err))
            out["rank0_only_empty"] = torch.tensor(len(ema.full_state_dict(rank0_only=True)) == 0)
    out.update(_tied(rank))
    return out


class _Tied(nn.Module):
    """An embedding tied to the output head (GPT-2's wte / lm_head): one parameter, two names."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.emb(i))


def _tied(rank):
    from torch.distributed.fsdp import fully_shard

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = fully_shard(_Tied())
    ema = EMA(model, 0.5)
    before = _full(model)["emb.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.arange(10)).square().mean().backward()
    opt.step()
    ema.update()
    full = ema.full_state_dict()
    try:                                     # copy= by the tie's second name: its only weight copied, none left
        EMA(model, 0.5, copy=["head.weight"])   # (a shard stood for it, and only its first name was read)
        by_alias = "averaged"
    except ValueError as err:
        by_alias = str(err)
    return {"tied/emb": full["emb.weight"], "tied/head": full["head.weight"],
            "tied/ref": before.lerp(_full(model)["emb.weight"], 0.5), "tied/count": torch.tensor(len(ema._avg)),
            "tied/copied_by_alias": torch.tensor("no floating-point parameters to average" in by_alias)}


def test_fsdp2_update_swap_and_export_exact_under_every_policy(tmp_path):
    ranks = run_ranks(_fsdp2_policies, tmp_path, 2, str(tmp_path))
    r0, r1 = ranks
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    for policy in POLICIES:
        for r in ranks:
            assert r[f"{policy}/same_shards"].all(), policy
        assert int(r0[f"{policy}/local_numel"]) + int(r1[f"{policy}/local_numel"]) == total
        assert int(r1[f"{policy}/local_numel"]) < total
        for row in (0, 1):
            for n, _ in model.named_parameters():
                ref = r0[f"{policy}/ref/{row}/{n}"]
                for r in ranks:
                    assert torch.equal(r[f"{policy}/ema/{row}/{n}"], ref), (policy, row, n)
        for r in ranks:
            # the swap put the EMA in and took it out again: outputs before and after are the raw model's
            assert torch.equal(r[f"{policy}/raw_before"], r[f"{policy}/raw_after"]), policy
            assert not torch.equal(r[f"{policy}/swapped"], r[f"{policy}/raw_before"]), policy
        # the swapped forward is the model holding the reference average
        plain = _model()
        plain.load_state_dict({n: r0[f"{policy}/ref/0/{n}"] for n, _ in plain.named_parameters()})
        plain.eval()
        with torch.no_grad():
            want = plain(r0[f"{policy}/x"])
        tol = dict(rtol=2e-2, atol=2e-2) if policy == "bf16_compute" else dict(rtol=1e-5, atol=1e-6)
        assert torch.allclose(r0[f"{policy}/swapped"].float(), want, **tol), policy
    for n, _ in model.named_parameters():
        for row in (0, 1):
            assert torch.equal(r0[f"default/offloaded/{row}/{n}"], r0[f"default/ref/{row}/{n}"]), (row, n)
        assert torch.allclose(r0[f"default/window/{n}"], r0[f"default/ref_window/{n}"], rtol=1e-6, atol=1e-7)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ema.safetensors"))
    model.load_state_dict(saved)                          # a plain model takes the file as it is
    for n, v in model.named_parameters():
        assert torch.equal(v.detach(), r0[f"default/ref/0/{n}"]), n
    model.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    for n, v in model.named_parameters():
        assert torch.equal(v.detach(), r0[f"default/ref/1/{n}"]), n
    assert r0["module_refused"] and r1["module_refused"]
    for r in ranks:                                       # a tied weight: averaged once, exported under both names
        assert int(r["tied/count"]) == 1
        assert torch.equal(r["tied/emb"], r0["tied/ref"]) and torch.equal(r["tied/head"], r0["tied/ref"])
        assert r["tied/copied_by_alias"]
    assert not r0["rank0_only_empty"] and r1["rank0_only_empty"]


# ------------------------------------------------------------ checkpoints


def _make(seed, sharded=True):
    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA

    model = _model(seed)
    if sharded:
        _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, [PowerWarmup(d) for d in DECAYS], update_every=2)
    return model, opt, ema


def _train(model, opt, ema, rank, steps):
    for step in steps:
        _train_step(model, opt, rank, step)
        ema.update()


def _results(prefix, model, ema):
    out = {f"{prefix}/updates": torch.tensor([ema.updates, ema.calls])}
    for row in (0, 1):
        for n, v in ema.full_state_dict(row).items():
            out[f"{prefix}/ema/{row}/{n}"] = v
    for n, v in _full(model).items():
        out[f"{prefix}/model/{n}"] = v
    return out


def _dcp_resume(rank, world, ckpt, plain_ckpt, v1_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt, ema = _make(0)
    _train(model, opt, ema, rank, range(4))
    out = _results("saved", model, ema)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "ema": ema},
             checkpoint_id=ckpt)
    _train(model, opt, ema, rank, range(4, 7))
    out.update(_results("A", model, ema))

    model, opt, ema = _make(1)                              # other initial weights: all of it must come back
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "ema": ema}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    out.update(_results("loaded", model, ema))
    _train(model, opt, ema, rank, range(4, 7))
    out.update(_results("B", model, ema))

    # reliability round 3, M1: a load refused on one rank only (NaN in rank 1's shard) or failed on one
    # rank (rank 1's .distcp truncated: CheckpointException, load_state_dict never called) changes
    # nothing on either rank: dcp.load fills state_dict()'s host copies, never the shadow
    from torch.distributed.checkpoint.api import CheckpointException

    good = ema.state_dict()
    if rank == 1:
        good["averaged"]["0.weight"].to_local().fill_(float("nan"))    # 2 of 5 rows of 0.weight
    dcp.save({"ema": good}, checkpoint_id=ckpt + "_nan")
    dcp.save({"ema": ema}, checkpoint_id=ckpt + "_cut")
    dist.barrier()
    if rank == 1:
        for f in os.listdir(ckpt + "_cut"):
            if f.startswith("__1_") and f.endswith(".distcp"):
                path = os.path.join(ckpt + "_cut", f)
                os.truncate(path, os.path.getsize(path) // 2)
    dist.barrier()
    _train(model, opt, ema, rank, range(7, 9))              # the checkpoints are older than the average now
    out.update(_results("kept", model, ema))
    try:
        dcp.load({"ema": ema}, checkpoint_id=ckpt + "_nan")
    except ValueError as err:
        out["nan_refused"] = torch.tensor("NaN" in str(err) and (rank == 1 or "refused on rank 1" in str(err)) and
                                          "Nothing was loaded" in str(err))       # every rank names the reason
    out.update(_results("after_nan", model, ema))
    try:
        dcp.load({"ema": ema}, checkpoint_id=ckpt + "_cut")
    except CheckpointException:
        out["cut_failed"] = torch.tensor(True)
    out.update(_results("after_cut", model, ema))

    # 1 -> 2: a checkpoint of an unsharded EMA (DCP, and a version-1 state dict) into a sharded one
    model, opt, ema = _make(2)
    dcp.load({"ema": ema}, checkpoint_id=plain_ckpt)
    out.update(_results("from_plain_dcp", model, ema))
    model, opt, ema = _make(3)
    ema.load_state_dict(torch.load(v1_path, weights_only=False))
    out.update(_results("from_v1", model, ema))
    return out


def _dcp_one_rank(rank, world, ckpt):
    import torch.distributed.checkpoint as dcp

    model, opt, ema = _make(5)                              # 2 -> 1: the same checkpoint on one rank
    dcp.load({"ema": ema}, checkpoint_id=ckpt)
    return _results("one_rank", model, ema)


def _same(a: dict, b: dict, prefix_a: str, prefix_b: str):
    keys = [k[len(prefix_a):] for k in a if k.startswith(prefix_a)]
    assert keys
    for k in keys:
        assert torch.equal(a[prefix_a + k], b[prefix_b + k]), (prefix_a, prefix_b, k)


def test_fsdp2_dcp_resume_bit_exact_and_reshard_across_world_sizes(tmp_path):
    import torch.distributed.checkpoint as dcp

    # an unsharded run made here, in a process with no process group
    model, opt, plain = _make(7, sharded=False)
    _train(model, opt, plain, 0, range(3))
    plain_ckpt = str(tmp_path / "plain")
    dcp.save({"ema": plain}, checkpoint_id=plain_ckpt)
    v1 = plain.state_dict()
    v1 = {**{k: v for k, v in v1.items() if k != "layout"}, "version": 1}
    torch.save(v1, tmp_path / "v1.pt")
    want_plain = {f"{row}/{n}": v for row in (0, 1) for n, v in plain.averaged_state_dict(row).items()}

    ckpt = str(tmp_path / "ckpt")
    r0, r1 = run_ranks(_dcp_resume, tmp_path / "run2", 2, ckpt, plain_ckpt, str(tmp_path / "v1.pt"))
    for r in (r0, r1):
        _same(r, r, "A/", "B/")                             # resume is bit-exact: EMA, counts and weights
        _same(r, r, "saved/", "loaded/")
        for row in (0, 1):
            for n, v in _model().named_parameters():
                for src in ("from_plain_dcp", "from_v1"):
                    assert torch.equal(r[f"{src}/ema/{row}/{n}"], want_plain[f"{row}/{n}"]), (src, row, n)
        assert r["from_v1/updates"].tolist() == [plain.updates, plain.calls]
        assert r["nan_refused"] and r["cut_failed"]         # both ranks refuse, both fail: nothing changed
        _same(r, r, "kept/", "after_nan/")
        _same(r, r, "kept/", "after_cut/")
    _same(r0, r1, "A/", "A/")

    (one,) = run_ranks(_dcp_one_rank, tmp_path / "run1", 1, ckpt)    # 2 -> 1
    _same(one, r0, "one_rank/ema/", "saved/ema/")
    assert one["one_rank/updates"].tolist() == r0["saved/updates"].tolist()

    model, opt, ema = _make(9, sharded=False)                # 2 -> a plain model here, no process group
    dcp.load({"ema": ema}, checkpoint_id=ckpt)
    assert [ema.updates, ema.calls] == r0["saved/updates"].tolist()
    for row in (0, 1):
        for n, v in ema.averaged_state_dict(row).items():
            assert torch.equal(v, r0[f"saved/ema/{row}/{n}"]), (row, n)


# ------------------------------------------------------------ tensor parallel and HSDP


def _tp(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    placements = {n: str(p.placements) for n, p in model.named_parameters()}

    def step(model, opt, i):
        x, _ = _batch(0, i)                                # tensor parallel: every rank sees the same batch
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    out = _train_save_and_export(model, step, ckpt)
    out["placements"] = placements
    return out


def _lerp_into(refs: list, full: dict) -> None:
    for ref, d in zip(refs, DECAYS):
        for n, v in full.items():
            ref[n].lerp_(v, 1 - d)


def _train_save_and_export(model, step, ckpt) -> dict:
    """3 steps with an EMA and a lerp_ reference of the gathered weights; the EMA saved with DCP;
    the reference and the EMA's full_state_dict() of both rows."""
    import torch.distributed.checkpoint as dcp

    from fastema.torch import EMA

    ema = EMA(model, list(DECAYS))
    refs = [_full(model) for _ in DECAYS]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        step(model, opt, i)
        ema.update()
        _lerp_into(refs, _full(model))
    dcp.save({"ema": ema}, checkpoint_id=ckpt)
    out = {f"ref/{row}/{n}": v for row in (0, 1) for n, v in refs[row].items()}
    out.update({f"ema/{row}/{n}": v for row in (0, 1) for n, v in ema.full_state_dict(row).items()})
    return out


def _check_into_plain(tmp_path, ckpt, r0, model):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import EMA

    plain = EMA(model, list(DECAYS))
    dcp.load({"ema": plain}, checkpoint_id=ckpt)
    for row in (0, 1):
        for n, v in plain.averaged_state_dict(row).items():
            assert torch.equal(v, r0[f"ref/{row}/{n}"]), (row, n)


def test_tensor_parallel_placements_exact_and_to_plain(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r0, r1 = run_ranks(_tp, tmp_path / "run", 2, ckpt)
    assert "Shard(dim=0)" in r0["placements"]["0.weight"] and "Shard(dim=1)" in r0["placements"]["2.weight"]
    assert "Replicate" in r0["placements"]["2.bias"]
    for r in (r0, r1):
        for k, v in r.items():
            if k.startswith("ema/"):
                assert torch.equal(v, r0["ref/" + k[4:]]), k
    _check_into_plain(tmp_path, ckpt, r0, nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))


def _hsdp(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _model()
    for i in (0, 2, 5):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = _train_save_and_export(model, lambda model, opt, i: _train_step(model, opt, rank, i), ckpt)
    out["placements"] = str(next(model.parameters()).placements)
    out.update(_fsdp_tp(rank, ckpt + "-2d"))
    return out


def _fsdp_tp(rank, ckpt):
    """2-D parallelism on the same 4 ranks: tensor parallel inside, FSDP2 across (_StridedShard);
    its checkpoint read back into another EMA of the same layout and into a plain one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from fastema.torch import EMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return fully_shard(model, mesh=mesh["dp"])

    model = make(0)
    ema = EMA(model, list(DECAYS))
    refs = [_full(model) for _ in DECAYS]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        x, _ = _batch(rank // 2, i)                        # the same batch within a tensor-parallel pair
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        _lerp_into(refs, _full(model))
    out = {f"2d/ref/{row}/{n}": v for row in (0, 1) for n, v in refs[row].items()}
    out.update({f"2d/ema/{row}/{n}": v for row in (0, 1) for n, v in ema.full_state_dict(row).items()})
    out["2d/placements"] = str({n: p.placements for n, p in model.named_parameters()})
    dcp.save({"ema": ema}, checkpoint_id=ckpt)
    other = EMA(make(1), list(DECAYS))
    dcp.load({"ema": other}, checkpoint_id=ckpt)
    out.update({f"2d/loaded/{row}/{n}": v for row in (0, 1) for n, v in other.full_state_dict(row).items()})
    return out


@pytest.mark.slow
def test_hsdp_2x2_and_fsdp_over_tensor_parallel_exact(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    ranks = run_ranks(_hsdp, tmp_path / "run", 4, ckpt, timeout=300)
    r0 = ranks[0]
    assert "Replicate" in r0["placements"] and "Shard(dim=0)" in r0["placements"]
    for r in ranks:
        for k, v in r.items():
            if k.startswith("ema/"):
                assert torch.equal(v, r0["ref/" + k[4:]]), k
            if k.startswith("2d/ema/") or k.startswith("2d/loaded/"):
                assert torch.equal(v, r0["2d/ref/" + k.split("/", 2)[2]]), k
    assert "_StridedShard" in r0["2d/placements"] or "_S(" in r0["2d/placements"], r0["2d/placements"]
    _check_into_plain(tmp_path, ckpt, r0, _model())
    two_d = {k[3:]: v for k, v in r0.items() if k.startswith("2d/ref/")}
    _check_into_plain(tmp_path, ckpt + "-2d", two_d, nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))


# ------------------------------------------------------------ post-hoc EMA snapshots (DCP)


def _posthoc(rank, world, snaps):
    from fastema.torch import PostHocEMA

    model = _shard(_model(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ph = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=snaps)
    out = {}
    for step in range(6):
        _train_step(model, opt, rank, step)
        ph.update()                                       # a collective DCP save every 2nd update
        if ph.updates % 2 == 0:
            for row in (0, 1):
                for n, v in ph.full_state_dict(row).items():
                    out[f"{ph.updates}/{row}/{n}"] = v
    if rank == 1:                                         # one rank alone: no collective in synthesis
        for n, v in ph.synthesize(0.07, max_error=1.0).items():
            out[f"synth/{n}"] = v
    dist.barrier()
    target = _shard(_model(9))
    ph.synthesize(0.07, max_error=1.0, into=target)
    for n, v in _full(target).items():
        out[f"into/{n}"] = v
    return out


def test_post_hoc_ema_of_an_fsdp2_model_snapshots_dcp_and_synthesises_anywhere(tmp_path):
    """Each snapshot of a sharded PostHocEMA is one DCP checkpoint written from the ranks' own
    shards; it holds the gathered profiles bit for bit, and synthesis from it is the same in the
    ranks, in a process with no process group, and from the gathered profiles by hand."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from fastema import posthoc

    snaps = str(tmp_path / "snaps")
    r0, r1 = run_ranks(_posthoc, tmp_path / "run", 2, snaps)
    found = posthoc.read_snapshots(snaps)
    assert [(s.kind, s.time) for s in found] == [("dcp", 2.0), ("dcp", 4.0), ("dcp", 6.0)]
    names = found[-1].averaged
    assert names == [n for n, _ in _model().named_parameters()]
    for s in found:
        for row in (0, 1):
            with pytest.warns(UserWarning, match="single process"):
                got = _load_state_dict_from_keys({f"{row}:{n}" for n in names}, checkpoint_id=s.path)
            for n in names:
                assert torch.equal(got[f"{row}:{n}"], r0[f"{int(s.time)}/{row}/{n}"]), (s.time, row, n)
    here = posthoc.synthesize(snaps, 0.07, max_error=1.0)
    sol = here.solution
    terms = [(int(s.time), k) for s in found for k in (0, 1)]
    for n in names:
        by_hand = sum(float(x) * r0[f"{t}/{k}/{n}"].double() for (t, k), x in zip(terms, sol.coefficients))
        torch.testing.assert_close(here[n], by_hand.float(), rtol=1e-6, atol=1e-7)
        assert torch.equal(r1[f"synth/{n}"], here[n])
        for r in (r0, r1):
            assert torch.equal(r[f"into/{n}"], here[n])
