"""Replicated models under DistributedDataParallel (2 spawned gloo processes): the average is the
same on every rank, and exact against lerp_ of the replicated weights, whether the average was
made before or after DDP(model) (DDP broadcasts rank 0's weights into the model in place)."""
import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _ddp_training(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.torch import EMA, WindowAverage
    from fastema.torch.compat import ModelEmaV3

    torch.manual_seed(100 + rank)                      # every rank starts from its own weights
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    before = EMA(model, [0.9, 0.5])                    # made before the wrap: restarts from rank 0's
    window = WindowAverage(model, 3)
    timm = ModelEmaV3(model, decay=0.9)
    ddp = DDP(model)
    after = EMA(model, [0.9, 0.5])                     # made after the wrap: the usual order
    refs = [{k: v.detach().clone() for k, v in model.named_parameters()} for _ in range(2)]
    snaps = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(16, 8, generator=g)
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for ema in (before, after, window):
            ema.update()
        timm.update(model)
        for ref, d in zip(refs, (0.9, 0.5)):
            for k, v in model.named_parameters():
                ref[k].lerp_(v.detach(), 1 - d)
        snaps.append({k: v.detach().clone() for k, v in model.named_parameters()})
    out = {}
    for name, ema in (("before", before), ("after", after)):
        for row in (0, 1):
            for k, v in ema.averaged_state_dict(row).items():
                out[f"{name}/{row}/{k}"] = v
    for k, v in window.averaged_state_dict().items():
        out[f"window/{k}"] = v
    for k, v in timm.module.state_dict().items():
        out[f"timm/{k}"] = v
    for row, ref in enumerate(refs):
        for k, v in ref.items():
            out[f"ref/{row}/{k}"] = v
    for k in refs[0]:
        out[f"ref_window/{k}"] = torch.stack([s[k] for s in snaps[-3:]]).mean(0)
    with before.average_parameters():
        out["swapped/0.weight"] = model[0].weight.detach().clone()
    return out


def test_ddp_averages_are_equal_on_every_rank_whatever_the_order_of_construction(tmp_path):
    r0, r1 = run_ranks(_ddp_training, tmp_path, 2)
    assert r0.keys() == r1.keys()
    for k in r0:                                        # the replicated average: the same on both ranks
        if "running_" in k or "num_batches" in k:
            continue                                    # BatchNorm statistics are per rank under DDP, as in the model
        assert torch.equal(r0[k], r1[k]), k
    for row in (0, 1):
        for k in ("0.weight", "0.bias", "3.weight", "3.bias"):
            ref = r0[f"ref/{row}/{k}"]
            assert torch.equal(r0[f"before/{row}/{k}"], ref), (row, k)
            assert torch.equal(r0[f"after/{row}/{k}"], ref), (row, k)
    for k in ("0.weight", "3.weight"):
        assert torch.allclose(r0[f"window/{k}"], r0[f"ref_window/{k}"], rtol=1e-6, atol=1e-7)
        assert torch.allclose(r0[f"timm/{k}"], r0[f"ref/0/{k}"], rtol=1e-6, atol=1e-7)
    assert torch.equal(r0["swapped/0.weight"], r0["ref/0/0.weight"])
