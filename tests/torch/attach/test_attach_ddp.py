"""``ema.attach(optimizer)`` under DistributedDataParallel (2 gloo ranks of the shared world): HF
Trainer calls ``optimizer.state_dict()`` on the saving rank only, so the state-dict hook makes no
collective (counted on the rank that saves while the other waits at no call); every rank loads
rank 0's file and holds rank 0's average."""
import os

import pytest
import torch
import torch.distributed as dist
from dist import Counted, run_ranks
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")


def _save_on_rank_0_load_everywhere(rank, world, folder):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    ema = EMA(model, 0.9).attach(opt)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ddp(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    path = os.path.join(folder, "optimizer.pt")
    calls: list = []
    if rank == 0:                                  # the saving rank alone, as HF Trainer
        with Counted() as counted:
            torch.save(opt.state_dict(), path)
        calls = counted.calls
    dist.barrier()
    model2 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = EMA(model2, 0.9).attach(opt2)
    opt2.load_state_dict(torch.load(path, weights_only=True))
    dist.barrier()
    mine = ema.state_dict()["averaged"]
    loaded = ema2.state_dict()["averaged"]
    return {"collectives": torch.tensor(len(calls)), "updates": torch.tensor(ema2.updates),
            **{f"mine.{k}": v for k, v in mine.items()},
            **{f"loaded.{k}": v for k, v in loaded.items()}}


def test_the_state_dict_hook_makes_no_collective_and_every_rank_loads_rank_0s_file(tmp_path):
    r0, r1 = run_ranks(_save_on_rank_0_load_everywhere, tmp_path, 2, str(tmp_path),
                       pg_timeout=30.0)
    assert int(r0["collectives"]) == 0
    assert int(r0["updates"]) == int(r1["updates"]) == 3
    for k in (k for k in r0 if k.startswith("mine.")):
        name = k[len("mine."):]
        assert torch.equal(r0[k], r1[k])           # DDP: one average on every rank
        assert torch.equal(r0["loaded." + name], r0[k]) and torch.equal(r1["loaded." + name], r0[k])
