"""``EMA(model, shard_replicas=True, offload="cpu")``: each rank stages and folds only its slice of the
average, in host memory through its two chunks (issue 44 item 3). Two gloo ranks (tests/dist.py): the
split offloaded average equals an unsplit synchronous one bit for bit (averages, swaps, exports,
checkpoints both ways), ``update()`` makes no collective call, and each rank holds half the shadow."""
from __future__ import annotations

import pytest
import torch
from dist import run_ranks
from test_replicas import CASES, Counted, _model, _same


def _offloaded_split(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.torch import EMA, Offload, ShardReplicas
    from fastema.torch._placement.offload import OffloadedShadow
    from fastema.torch._placement.split import Split

    out = {}
    for case, (dtype, kwargs) in enumerate(CASES):
        if kwargs.get("skip_nonfinite"):
            continue                                          # not with offload (refused by name)
        model = _model(dtype)
        trained = DDP(model)
        ema = EMA(trained, **kwargs, shard_replicas=ShardReplicas(True, bucket=96), offload=Offload(chunk=64))
        ref = EMA(trained, **kwargs)
        avg = ema._avg                                        # a split of an offloaded storage
        assert type(avg) is Split and isinstance(avg.storage, OffloadedShadow)
        assert len(avg.storage.src.windows) > 4
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)
        for _ in range(9):
            trained(torch.randn(8, 9, generator=data).to(dtype)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
            with Counted() as c:
                ema.update()
            assert not c.calls, f"update() made collective calls: {c.calls[:5]}"
            ref.update()
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        with ema.average_parameters():
            got = {k: v.clone() for k, v in model.state_dict().items()}
        with ref.average_parameters():
            want = {k: v.clone() for k, v in model.state_dict().items()}
        _same(got, want, f"case {case}: swapped-in average")
        _same(dict(model.state_dict()), raw, f"case {case}: raw weights after the swap")
        _same(ema.full_state_dict(0), ref.full_state_dict(0), f"case {case}: full_state_dict")
        again = EMA(trained, **kwargs, shard_replicas=True, offload=Offload(chunk=4096))
        again.load_state_dict(ref.state_dict())              # unsplit -> split offloaded: cut with no collective
        plain = EMA(trained, **kwargs, shard_replicas=True)
        plain.load_state_dict(ema.state_dict())              # split offloaded -> split: this rank's pieces
        _same(again.averaged_state_dict(0), ref.averaged_state_dict(0), f"case {case}: unsplit -> split offloaded")
        _same(plain.averaged_state_dict(0), ref.averaged_state_dict(0), f"case {case}: split offloaded -> split")
        parts = ema.memory(parts=True)["cpu"]
        out[f"shadow{case}"] = torch.tensor([parts["shadow"], ref.memory(parts=True)["cpu"]["shadow"]])
        dist.barrier()
    return out


@pytest.mark.slow
def test_each_rank_offloads_its_slice_and_the_whole_equals_the_unsplit_average(tmp_path):
    results = run_ranks(_offloaded_split, tmp_path, 2)
    for key in results[0]:
        mine = [int(r[key][0]) for r in results]
        whole = int(results[0][key][1])
        assert sum(mine) == whole and max(mine) <= whole // 2 + 16 * 2, (key, mine, whole)   # + a unit a row
