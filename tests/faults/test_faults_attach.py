"""Faults of an attached average's load on 2 FSDP2 ranks (gloo, the shared world), round 8:
- a rank whose counter record is damaged as deeply nested JSON (``RecursionError`` escaped the
  load's agreement: the other rank waited the whole process-group timeout): every rank raises at
  once, nothing is loaded, and the world goes on;
- a rank whose optimizer load torch refuses after fastema's checks (``KeyError: 'step'``): that
  rank raises torch's error and keeps its average as it was (it was written before torch refused),
  the other rank loads, no collective is left waiting;
- a flattened DCP load without a get first and a per-rank ``optimizer.state_dict()`` with
  averaged buffers (H1 / H2 on FSDP2: D06, D10): the average comes back whole."""
import time

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from support.attach import rank_step
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")


def _make(seed, bn=False):
    from torch.distributed.fsdp import fully_shard

    from fastema.torch import EMA

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if bn else nn.Tanh(),
                          nn.Linear(8, 3))
    for i in (0, 2):
        fully_shard(model[i])
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.5, **({"buffers": "average"} if bn else {})).attach(opt)
    return model, opt, ema




def _rows(ema):
    state = ema.state_dict()
    out = {"calls": torch.tensor(state["calls"])}
    for n, v in state["averaged"].items():
        out[n] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def _deep(state_dict):
    from fastema.torch._state.attached import META_BYTES

    record = torch.zeros(META_BYTES, dtype=torch.uint8)
    record[:50000] = ord("[")
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    for v in state.values():
        if "meta" in v.get("fastema", {}):
            v["fastema"] = {**v["fastema"], "meta": record}
    return {**state_dict, "state": state}


def _no_step(state_dict):
    state = {k: {kk: vv for kk, vv in v.items() if kk != "step"}
             for k, v in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _faults(rank, world):
    import torch.distributed.checkpoint.state_dict as dsd

    out = {}
    model, opt, ema = _make(0)
    for s in range(3):
        rank_step(model, opt, s, width=6, dtype=torch.float32)
    saved = opt.state_dict()
    rank_step(model, opt, 3, width=6, dtype=torch.float32)
    before = _rows(ema)
    t0 = time.monotonic()
    try:                                           # rank 1's record: 50000 nested lists
        opt.load_state_dict(_deep(saved) if rank == 1 else saved)
    except ValueError as err:
        out["deep"] = torch.tensor(list(str(err).encode()))
    out["deep_s"] = torch.tensor(time.monotonic() - t0)
    after = _rows(ema)
    out["deep_kept"] = torch.tensor(all(torch.equal(before[k], after[k]) for k in before))
    try:                                           # torch refuses rank 1's (no 'step')
        opt.load_state_dict(_no_step(saved) if rank == 1 else saved)
        out["torch"] = torch.tensor(0)
    except KeyError:
        out["torch"] = torch.tensor(1)
    out["torch_calls"] = torch.tensor(ema.updates)
    flat = dsd.StateDictOptions(flatten_optimizer_state_dict=True)
    model, opt, ema = _make(0, bn=True)
    for s in range(3):
        rank_step(model, opt, s, width=6, dtype=torch.float32)
    got = dsd.get_optimizer_state_dict(model, opt, options=flat)
    per_rank = opt.state_dict()                    # H2: the averaged buffers ride it too
    ref = _rows(ema)
    model2, opt2, ema2 = _make(5, bn=True)
    dsd.set_optimizer_state_dict(model2, opt2, got, options=flat)     # no get first (H1, D06)
    out["flat_same"] = torch.tensor(all(torch.equal(ref[k], v) for k, v in _rows(ema2).items()))
    model3, opt3, ema3 = _make(6, bn=True)
    opt3.load_state_dict(per_rank)                 # D10
    out["rank_same"] = torch.tensor(all(torch.equal(ref[k], v) for k, v in _rows(ema3).items()))
    out["buffers"] = torch.tensor(sum("running" in k for k in ref))
    return out


def test_a_damaged_record_or_a_refusing_torch_on_one_rank_never_hangs(tmp_path):
    r = run_ranks(_faults, tmp_path, 2, pg_timeout=60.0)
    text = [bytes(x["deep"].tolist()).decode() for x in r]
    assert "damaged" in text[1] and "RecursionError" in text[1]
    assert "refused on rank 1 (its global rank), so on every rank" in text[0]
    assert "RecursionError" in text[0]             # rank 1's reason, named on rank 0 too
    assert all(float(x["deep_s"]) < 30 for x in r)     # not the 60 s group timeout
    assert all(bool(x["deep_kept"]) for x in r)
    assert int(r[0]["torch"]) == 0 and int(r[1]["torch"]) == 1
    assert int(r[0]["torch_calls"]) == 3 and int(r[1]["torch_calls"]) == 4   # rank 1's kept
    for x in r:
        assert int(x["buffers"]) == 2
        assert bool(x["flat_same"]) and bool(x["rank_same"])
