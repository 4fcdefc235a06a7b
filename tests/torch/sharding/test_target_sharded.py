"""TargetNetwork over sharded networks (FSDP2 fully_shard; DINOv3's student and teacher) in spawned
gloo processes on the CPU: each rank averages its own local shards with no collective; the test
gathers the full weights (test-side collectives) after every step into a lerp reference and
compares the gathered teacher with it bit for bit. Teacher forwards under ``reshard_after_forward=
False`` leave unsharded copies on the modules; update() reshards them first, as EMA does."""
import copy

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from models import mlp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TAU = 0.25


@pytest.fixture(scope="module", autouse=True)
def warm_kernels():
    """Compile (or load) the lerp kernels once here, so the ranks load them rather than compile them at once."""
    from fastema.torch import TargetNetwork

    online = mlp(8, 16, 1)
    TargetNetwork(online, copy.deepcopy(online), tau=TAU).update()


def _shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _ranks(rank, world):
    from fastema.torch import TargetNetwork

    out = {}
    for policy, kw in (("default", {}), ("no_reshard", {"reshard_after_forward": False})):
        student = mlp(8, 16, 16, 1, seed=3)
        teacher = copy.deepcopy(student).requires_grad_(False)
        _shard(student, **kw)
        _shard(teacher, **kw)
        tn = TargetNetwork(student, teacher, momentum=1 - TAU)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        ref = _full(teacher)
        for n, t in ref.items():
            out[f"{policy}/{n}/init"] = t
        for step in range(4):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(6, 8, generator=g), torch.randn(6, 1, generator=g)
            with torch.no_grad():
                target = teacher(x) + y                  # unsharded copies left here under no_reshard
            (student(x) - target).square().mean().backward()
            opt.step()
            opt.zero_grad()
            tn.update()
            full = _full(student)
            ref = {n: r.lerp(full[n], TAU) for n, r in ref.items()}
        got = _full(teacher)
        for n in ref:
            out[f"{policy}/{n}/got"], out[f"{policy}/{n}/ref"] = got[n], ref[n]
        out[f"{policy}/local"] = torch.tensor([p.to_local().numel() for p in teacher.parameters()])
        if rank == 0:                                    # one rank alone: no collective in update()
            before = {n: p.to_local().clone() for n, p in teacher.named_parameters()}
            tn.update()
            out[f"{policy}/alone"] = torch.tensor(
                [not torch.equal(p.to_local(), before[n]) for n, p in teacher.named_parameters()])
        dist.barrier()
    plain = mlp(8, 16, 16, 1, seed=3)                    # a sharded online network, a plain target: refused
    try:
        TargetNetwork(_shard(mlp(8, 16, 16, 1, seed=3)), plain)
        out["mixed"] = torch.tensor(0)
    except ValueError as err:
        out["mixed"] = torch.tensor(int("sharded (a DTensor) in the online network but not in the target" in str(err)))
    return out


def test_fsdp2_teacher_is_the_lerp_of_the_student_bit_for_bit(tmp_path):
    results = run_ranks(_ranks, tmp_path, 2)
    for rank, r in enumerate(results):
        for policy in ("default", "no_reshard"):
            names = [k[len(policy) + 1:-4] for k in r if k.startswith(f"{policy}/") and k.endswith("/got")]
            assert len(names) == 6, names
            for n in names:
                got, ref, init = r[f"{policy}/{n}/got"], r[f"{policy}/{n}/ref"], r[f"{policy}/{n}/init"]
                assert torch.equal(got, ref), (rank, policy, n, (got - ref).abs().max())
                assert not torch.equal(got, init), (policy, n)              # the teacher moved
            assert int(r[f"{policy}/local"].sum()) < sum(r[f"{policy}/{n}/got"].numel() for n in names)   # shards
            if rank == 0:
                assert bool(r[f"{policy}/alone"].any())
        assert int(r["mixed"]) == 1
