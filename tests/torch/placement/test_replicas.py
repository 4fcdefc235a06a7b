"""``EMA(model, shard_replicas=...)``: the average split over data-parallel replicas (issue 43).

Each test runs its ranks in spawned processes on gloo (tests/dist.py: FileStore, one thread per
rank). Every rank makes a split average and an unsplit one of the same DDP model, trains it, and
checks on its own rank that the two agree bit for bit (swap, averaged_state_dict, copy_to,
checkpoints both ways), that the raw weights come back bit for bit, and that ``update()`` makes
no collective call (counted); the parent checks what needs every rank (memory per rank).
"""
from __future__ import annotations

import pytest
import torch
from dist import Counted, run_ranks

from fastema.schedules import PowerWarmup


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: dict, b: dict, what: str) -> None:
    assert list(a) == list(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k].contiguous()), _bits(b[k].contiguous())), \
            f"{what}: {k}"


def _model(dtype):
    torch.manual_seed(0)                           # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.LayerNorm(33), torch.nn.ReLU(),
                               torch.nn.Linear(33, 5)).to(dtype)


CASES = [  # (model dtype, EMA arguments)
    (torch.float32, dict(decay=[0.9, 0.5])),
    (torch.bfloat16, dict(decay=0.99, skip_nonfinite=True)),
    (torch.bfloat16, dict(decay=[0.9, 0.99], shadow_dtype="bfloat16", rounding="stochastic", seed=5)),
    (torch.float16, dict(decay=PowerWarmup(0.8), update_every=2)),
]


def _train_and_compare(rank, world, ddp: bool, bucket: int, steps: int):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.torch import EMA, ShardReplicas

    out = {}
    for case, (dtype, kwargs) in enumerate(CASES):
        model = _model(dtype)
        trained = DDP(model) if ddp else model
        ema = EMA(trained, **kwargs, shard_replicas=ShardReplicas(True, bucket=bucket))
        ref = EMA(trained, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)      # each rank its own batches, as under DDP
        counted = 0
        for _ in range(steps):
            x = torch.randn(8, 9, generator=data).to(dtype)
            if ddp:
                loss = trained(x).float().square().mean()
                loss.backward()
            else:                                             # a replicated model kept equal by hand
                with torch.no_grad():
                    for p in model.parameters():
                        p.grad = torch.full_like(p, 0.01)
            opt.step()
            opt.zero_grad()
            with Counted() as c:
                ema.update()
            counted += len(c.calls)
            ref.update()
        assert counted == 0, f"update() made collective calls: {c.calls[:5]}"
        assert ema.nbytes < ref.nbytes and sum(ema.memory().values()) == ema.nbytes
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        rows = len(kwargs["decay"]) if isinstance(kwargs["decay"], list) else 1
        for row in range(rows):
            with Counted() as c, ema.average_parameters(row):
                got = {k: v.clone() for k, v in model.state_dict().items()}
            assert c.calls, "the swap gathers: the counter must see it"
            with ref.average_parameters(row):
                want = {k: v.clone() for k, v in model.state_dict().items()}
            _same(got, want, f"case {case} row {row}: swapped-in average")
            _same(dict(model.state_dict()), raw, f"case {case}: raw weights after the swap")
            _same(ema.averaged_state_dict(row), ref.averaged_state_dict(row), f"case {case} averaged_state_dict")
            _same(ema.full_state_dict(row), ref.full_state_dict(row), f"case {case} full_state_dict")
        # checkpoints: split -> split (this rank's pieces), unsplit -> split (full tensors, cut with no
        # collective); split -> unsplit needs every rank's pieces: torch.distributed.checkpoint (below)
        mine = ema.state_dict()
        again = EMA(trained, **kwargs, shard_replicas=True)
        again.load_state_dict(mine)
        _same(again.averaged_state_dict(0), ref.averaged_state_dict(0), f"case {case}: split -> split")
        fresh = EMA(trained, **kwargs)
        before = fresh.averaged_state_dict(0)
        with pytest.raises(ValueError, match="dcp.load"):
            fresh.load_state_dict(mine)
        _same(fresh.averaged_state_dict(0), before, f"case {case}: a refused load changes nothing")
        with pytest.raises(TypeError, match="this rank's pieces only"):
            torch.save(mine, __import__("io").BytesIO())
        fresh_split = EMA(trained, **kwargs, shard_replicas=True)
        fresh_split.load_state_dict(ref.state_dict())
        _same(fresh_split.averaged_state_dict(0), ref.averaged_state_dict(0), f"case {case}: unsplit -> split")
        assert (fresh_split.updates, fresh_split.calls) == (ref.updates, ref.calls)
        ema.copy_to()
        copied = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(raw)
        ref.copy_to()
        _same(copied, dict(model.state_dict()), f"case {case}: copy_to")
        groups = [(g.n, g.whole, g.buffer.element_size()) for g in ema._avg.layout.groups]
        out[f"groups{case}"] = torch.tensor(groups, dtype=torch.int64)
        out[f"nbytes{case}"] = torch.tensor([ema._avg.nbytes, ref._avg.nbytes])
        dist.barrier()
    return out


def _check_memory(results, world):
    for case in range(len(CASES)):
        per_rank = [r[f"nbytes{case}"] for r in results]
        assert sum(int(n[0]) for n in per_rank) == int(per_rank[0][1])         # the slices add up to the shadow
        for r in results:
            for n, whole, size in r[f"groups{case}"].tolist():
                assert n <= -(-whole // world) + 16 // size                     # ceil(P / N) + one unit a group


@pytest.mark.slow
def test_ddp_split_average_equals_the_unsplit_one_bit_for_bit_on_2_ranks(tmp_path):
    results = run_ranks(_train_and_compare, tmp_path, 2, True, 96, 21)
    _check_memory(results, 2)


@pytest.mark.slow
def test_a_replicated_model_in_the_default_group_splits_over_4_ranks(tmp_path):
    results = run_ranks(_train_and_compare, tmp_path, 4, False, 64 << 20, 12)
    _check_memory(results, 4)


def _refusals(rank, world):
    import torch.distributed as dist

    from fastema.torch import EMA, ShardReplicas

    def refused(make, match):
        with pytest.raises((ValueError, TypeError), match=match):
            make()

    torch.manual_seed(rank)                                   # no broadcast: each rank its own initialisation
    differ = torch.nn.Linear(4, 4)
    refused(lambda: EMA(differ, shard_replicas=True), "weights differ")
    other = torch.nn.Linear(4, 4 + rank)                      # another model on each rank
    refused(lambda: EMA(other, shard_replicas=True), "different models")
    torch.manual_seed(0)
    same = torch.nn.Linear(4, 4)
    refused(lambda: EMA(same, shard_replicas="yes"), "shard_replicas must be")
    refused(lambda: EMA(same, shard_replicas=ShardReplicas(True, bucket=1024 * (rank + 1))), "split them differently")
    refused(lambda: EMA(same, 0.9 + rank / 100, shard_replicas=True), "split them differently")
    refused(lambda: EMA(same, shard_replicas=ShardReplicas(True, bucket=8)), r"ShardReplicas\(bucket=\.\.\.\) must be")
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    refused(lambda: EMA(conv, shard_replicas=True), "not C-contiguous")
    with torch.no_grad():
        odd = torch.nn.Linear(4, 4)
        torch.nn.init.constant_(odd.weight, 0.5)
        odd.weight[0, 0] = float("nan")                       # the same NaN on every rank: replicas all the same
    EMA(odd, shard_replicas=True)
    alone = dist.new_group([0])                               # every rank makes it; rank 1 is not in it
    if rank == 1:
        refused(lambda: EMA(same, shard_replicas=alone), "not in the group")
    else:
        EMA(same, shard_replicas=alone).update()             # a group of one: the whole average, no split
    ok = EMA(same, shard_replicas=True)                       # after all of that the ranks still agree
    ok.update()
    dist.barrier()
    return {"rank": torch.tensor(rank)}


@pytest.mark.slow
def test_ranks_that_differ_are_refused_on_every_rank_and_nothing_hangs(tmp_path):
    results = run_ranks(_refusals, tmp_path, 2, timeout=120)
    assert [int(r["rank"]) for r in results] == [0, 1]


def test_shard_replicas_needs_a_process_group():
    from fastema.torch import EMA

    with pytest.raises(ValueError, match="init_process_group"):
        EMA(torch.nn.Linear(2, 2), shard_replicas=True)
    EMA(torch.nn.Linear(2, 2), shard_replicas=False).update()


# ---------------------------------------------------------------- checkpoints that reshard (item 3)

def _dcp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5),
                               torch.nn.Linear(5, 1, bias=False))


def _dcp_trained(split: bool):
    """The same 12 updates on every rank and world size (the replicas' weights do not depend on it)."""
    from fastema.torch import EMA

    model = _dcp_model()
    ema = EMA(model, [0.9, 0.5], shard_replicas=split)
    for step in range(12):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).view_as(p) * 0.1)
        ema.update()
    return model, ema


def _dcp_save(rank, world, folder):
    import torch.distributed.checkpoint as dcp

    _, ema = _dcp_trained(True)
    state = ema.state_dict()
    held = sum(t.numel() for v in state["averaged"].values() for _, t in v._pieces)
    whole = sum(2 * p.numel() for p in _dcp_model().parameters())
    assert held <= whole // world + 2 * 4 * len(state["averaged"]), (held, whole)   # this rank's pieces only
    dcp.async_save({"ema": ema}, checkpoint_id=folder).result()
    return {"full0": torch.cat([v.flatten() for v in ema.full_state_dict(0).values()]),
            "full1": torch.cat([v.flatten() for v in ema.full_state_dict(1).values()]),
            "held": torch.tensor(held)}


def _dcp_load(rank, world, folder):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import EMA

    out = {}
    for split in (True, False):
        ema = EMA(_dcp_model(), [0.9, 0.5], shard_replicas=split)
        dcp.load({"ema": ema}, checkpoint_id=folder)
        assert ema.updates == 12
        for row in (0, 1):
            out[f"{split}{row}"] = torch.cat([v.flatten() for v in ema.full_state_dict(row).values()])
    return out


@pytest.mark.slow
def test_a_checkpoint_of_the_slices_saved_on_4_ranks_loads_on_2_and_1_split_or_not(tmp_path):
    folder = str(tmp_path / "ckpt")
    saved = run_ranks(_dcp_save, tmp_path / "save", 4, folder)
    for r in saved:
        assert torch.equal(r["full0"], saved[0]["full0"]) and torch.equal(r["full1"], saved[0]["full1"])
    for world in (2, 1):
        for r in run_ranks(_dcp_load, tmp_path / f"load{world}", world, folder):
            for split in (True, False):
                assert torch.equal(r[f"{split}0"], saved[0]["full0"]) and torch.equal(r[f"{split}1"], saved[0]["full1"])
    # and into a plain torch file, then a plain model: DCP's own converter
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, str(tmp_path / "ema.pt"))
    plain = torch.load(tmp_path / "ema.pt", weights_only=True)["ema"]["averaged"]
    assert torch.equal(torch.cat([v[0].flatten() for v in plain.values()]), saved[0]["full0"])


# ---------------------------------------------------------------- HSDP: the replicate dimension (item 1)

def _hsdp_split(rank, world, folder):
    """4 ranks, an HSDP mesh (2 replicas x 2 shards): the split average (each local shard cut over the
    replicate dimension) against the unsplit one, bit for bit; swap; DCP both ways; the 2-D TP+FSDP
    layout (no replicate dimension) refused by name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastema.torch import EMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.ReLU(), torch.nn.Linear(33, 6))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    split = EMA(model, [0.9, 0.5], shard_replicas=True)
    whole = EMA(model, [0.9, 0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    for _ in range(6):
        model(torch.randn(4, 9, generator=data)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with Counted() as c:
            split.update()
        assert not c.calls, c.calls
        whole.update()
    assert split._avg.nbytes * 2 <= whole._avg.nbytes + 64
    for row in (0, 1):
        _same(split.full_state_dict(row), whole.full_state_dict(row), f"HSDP full_state_dict row {row}")
    raw = {n: p.to_local().clone() for n, p in model.named_parameters()}
    with split.average_parameters(1):
        got = {n: p.to_local().clone() for n, p in model.named_parameters()}
    with whole.average_parameters(1):
        want = {n: p.to_local().clone() for n, p in model.named_parameters()}
    _same(got, want, "HSDP swapped-in local shards")
    _same({n: p.to_local() for n, p in model.named_parameters()}, raw, "HSDP raw weights back")
    dcp.save({"ema": split}, checkpoint_id=folder)
    into = EMA(model, [0.9, 0.5])
    dcp.load({"ema": into}, checkpoint_id=folder)
    _same(into.full_state_dict(0), whole.full_state_dict(0), "HSDP split -> unsplit through DCP")
    back = EMA(model, [0.9, 0.5], shard_replicas=True)
    dcp.load({"ema": back}, checkpoint_id=folder)
    _same(back.full_state_dict(1), whole.full_state_dict(1), "HSDP split -> split through DCP")
    tp = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    flat = fully_shard(torch.nn.Linear(4, 8), mesh=tp)
    with pytest.raises(ValueError, match="already split like the model"):
        EMA(flat, 0.9, shard_replicas=True)
    return {"full": torch.cat([v.flatten() for v in split.full_state_dict(0).values()])}


@pytest.mark.slow
def test_hsdp_splits_each_local_shard_over_the_replicate_dimension(tmp_path):
    results = run_ranks(_hsdp_split, tmp_path / "run", 4, str(tmp_path / "ckpt"), timeout=300)
    assert all(torch.equal(r["full"], results[0]["full"]) for r in results)


def _compiled_and_device_plan(rank, world):
    """torch.compile and the plan on the device work as without the split (2 ranks)."""
    from fastema.torch import EMA

    out = {}
    for kwargs in (dict(decay=PowerWarmup(0.9), device_step=True), dict(decay=[0.9, 0.99])):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        split, whole = EMA(model, **kwargs, shard_replicas=True), EMA(model, **kwargs)

        @torch.compile(backend="eager", fullgraph=True)
        def step(k):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9).add_(k)
            split.update()

        for k in range(5):
            step(torch.tensor(0.01 * k))
            whole.update()
        assert split.updates == whole.updates == 5
        _same(split.full_state_dict(0), whole.full_state_dict(0), f"compiled {kwargs}")
        out[str(len(out))] = torch.tensor(split.device_step)
    return out


@pytest.mark.slow
def test_torch_compile_and_the_device_plan_work_split(tmp_path):
    results = run_ranks(_compiled_and_device_plan, tmp_path, 2)
    assert bool(results[0]["0"]) and not bool(results[0]["1"])
