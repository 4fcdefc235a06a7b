"""``ema.attach(optimizer)`` of a sharded average (FSDP2, HSDP) carried by DCP: the average rides
the optimizer's per-parameter entries through ``get_state_dict`` / ``set_state_dict`` and
``dcp.save`` / ``dcp.load``, with the default options and ``flatten_optimizer_state_dict=True``;
a float32 average of bfloat16 weights comes back float32 and bit for bit against an uninterrupted
run, and at another world size (4 -> 2 -> 4), with size-0 and uneven local shards (gloo, CPU)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from support.attach import dcp_load, dcp_options, dcp_save, rank_step, rows, same_rows
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")

STEPS, MORE = 3, 2
F32 = torch.float32                                # the average of bfloat16 weights: float32


def _model(seed, mesh=None):
    """bf16; Linear(8, 5) is uneven over 2 or 4 ranks, Linear(3, 1) leaves size-0 local shards."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 1))
    model.to(torch.bfloat16)
    for i in (0, 2, 3):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _make(seed, mesh=None, kind="EMA"):
    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA, WindowAverage

    model = _model(seed, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if kind in ("EMA", "split"):                  # split: over HSDP's replicas (shard_replicas)
        ema = EMA(model, [PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2,
                  shard_replicas=kind == "split")
    else:
        ema = WindowAverage(model, 3)
    return model, opt, ema.attach(opt)




def _resume(rank, world, folder, kind, hsdp=False):
    """Train, save (default and flattened; ``dcp.async_save`` too), train on: the uninterrupted
    run; then fresh runs (other initial weights) load one save each and train on alike. ``hsdp``:
    a 2 x 2 mesh (replicate, shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
    name = f"{kind}{world}{'hsdp' if hsdp else ''}"
    model, opt, ema = _make(0, mesh, kind)
    out = {"local_rows": torch.tensor([p.to_local().shape[0] for p in model.parameters()])}
    for s in range(STEPS):
        rank_step(model, opt, s, rank)
    out.update(rows(ema, "saved", F32))
    for flat in (False, True):
        dcp_save(model, opt, os.path.join(folder, f"{name}-{int(flat)}"), dcp_options(flat))
    dcp_save(model, opt, os.path.join(folder, f"{name}-2"), dcp_options(), "async_save")
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, rank)
    out.update(rows(ema, "ref", F32))
    for flat in (0, 1, 2):                         # 2: the async save, default options
        model, opt, ema = _make(1, mesh, kind)
        dcp_load(model, opt, os.path.join(folder, f"{name}-{flat}"), dcp_options(flat == 1))
        out.update(rows(ema, f"loaded{flat}", F32))
        for s in range(STEPS, STEPS + MORE):
            rank_step(model, opt, s, rank)
        out.update(rows(ema, f"resumed{flat}", F32))
    if hsdp and kind == "EMA":                     # rank 3's state dict without the average: the
        late = opt.state_dict()                    # agreement crosses both mesh dimensions
        try:
            opt.load_state_dict(_strip(late) if rank == 3 else late)
        except ValueError as err:
            out["mixed"] = torch.tensor(list(str(err).encode()))
    return out


def _reshard(rank, world, folder, kind, saved_world, flats):
    """A save of ``saved_world`` ranks loaded here (``flats``: the options); then this world saves
    its own (default options)."""
    out = {}
    for flat in flats:
        model, opt, ema = _make(2, kind=kind)
        dcp_load(model, opt, os.path.join(folder, f"{kind}{saved_world}-{int(flat)}"),
                 dcp_options(flat))
        out.update(rows(ema, f"loaded{int(flat)}", F32))
        if not flat:
            dcp_save(model, opt, os.path.join(folder, f"{kind}{world}-0"), dcp_options())
    return out


@pytest.mark.parametrize("kind", ["EMA", "WindowAverage"])
def test_a_sharded_float32_average_rides_dcp_bit_for_bit_and_across_world_sizes(tmp_path, kind):
    folder = str(tmp_path)
    r4 = run_ranks(_resume, tmp_path / "r4", 4, folder, kind, pg_timeout=60.0)
    assert [r["local_rows"].tolist() for r in r4] == [[2, 2, 1, 1, 1, 1], [2, 2, 1, 1, 0, 0],
                                                      [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    for r in r4:                                   # uneven and size-0 local shards
        for flat in (0, 1, 2):
            same_rows(r, "saved", f"loaded{flat}")
            same_rows(r, "ref", f"resumed{flat}")       # bit for bit against the uninterrupted run
    assert int(r4[0]["saved/calls"]) == STEPS      # DCP's dummy step is no update
    if kind != "EMA":
        return                                     # the world sizes: EMA's alone (CI time)
    r2 = run_ranks(_reshard, tmp_path / "r2", 2, folder, kind, 4, (False, True),  # 4 -> 2
                   pg_timeout=60.0)
    for r in r2:
        for flat in (0, 1):
            for k in (k for k in r4[0] if k.startswith("saved/")):
                assert torch.equal(r[f"loaded{flat}/" + k[6:]], r4[0][k]), k
    back = run_ranks(_reshard, tmp_path / "b4", 4, folder, kind, 2, (False,),  # 2 -> 4
                     pg_timeout=60.0)
    for r in back:
        for k in (k for k in r4[0] if k.startswith("saved/")):
            assert torch.equal(r["loaded0/" + k[6:]], r4[0][k]), k


@pytest.mark.parametrize("kind", ["EMA", "split"])
def test_hsdp_a_2d_mesh(tmp_path, kind):
    """``split``: the average split over the mesh's replicas too (``shard_replicas=True``): each
    rank's pieces of its shard ride its entries (SplitEntry), bit for bit."""
    r4 = run_ranks(_resume, tmp_path, 4, str(tmp_path), kind, True, pg_timeout=60.0)
    for r in r4:
        for flat in (0, 1, 2):
            same_rows(r, "saved", f"loaded{flat}")
            same_rows(r, "ref", f"resumed{flat}")
        if kind == "EMA":                          # every rank, rank 3 heard over 2 dimensions
            said = bytes(r["mixed"].tolist()).decode()
            assert "in: ranks [0, 1, 2], not in: ranks [3], global ranks" in said, said


def _strip(state_dict):
    return {**state_dict, "state": {k: {kk: vv for kk, vv in v.items() if kk != "fastema"}
                                    for k, v in state_dict["state"].items()}}


def _damage(state_dict):
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    for v in state.values():
        if "meta" in v.get("fastema", {}):
            v["fastema"] = {**v["fastema"], "meta": torch.zeros_like(v["fastema"]["meta"])}
    return {**state_dict, "state": state}


def _disagree(rank, world):
    """Ranks that load different saves, some with the average and some without, or one refusing
    its entries: every rank raises, nothing is loaded; the state-dict hook makes no collective."""
    import warnings

    from dist import Counted

    from fastema.torch import EMA

    model, opt, ema = _make(0)
    for s in range(STEPS):
        rank_step(model, opt, s, rank)
    with Counted() as counted:
        early = opt.state_dict()                   # each rank alone: no collective
    out = {"collectives": torch.tensor(len(counted.calls))}
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, rank)
    late = opt.state_dict()
    before = rows(ema, "before", F32)
    cases = {"other_save": early if rank == 0 else late,
             "mixed": late if rank == 0 else _strip(late),
             "damaged": late if rank == 0 else _damage(late)}
    for case, sd in cases.items():
        try:
            opt.load_state_dict(sd)
        except ValueError as err:
            out[case] = torch.tensor(list(str(err).encode()))
        same_rows({**before, **rows(ema, "after", F32)}, "before", "after")   # nothing was loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(_strip(late))          # none has it: every rank starts over
    out["warned"] = torch.tensor(sum("starts over" in str(w.message) for w in caught))
    opt.load_state_dict(late)                      # the world still works
    same_rows({**before, **rows(ema, "after", F32)}, "before", "after")
    plain = nn.Linear(4, 4)                        # a split attaches; outside DCP it says why
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    EMA(plain, 0.9, shard_replicas=True).attach(sgd)
    try:
        sgd.state_dict()                           # not gathered: refused, no collective
    except RuntimeError as err:
        out["split"] = torch.tensor(list(str(err).encode()))
    return out


def test_ranks_that_disagree_raise_alike_and_an_ungathered_split_says_what_to_do(tmp_path):
    r = run_ranks(_disagree, tmp_path, 2, pg_timeout=30.0)
    text = [{k: bytes(v.tolist()).decode() for k, v in x.items() if v.dtype == torch.int64
             and v.dim() == 1} for x in r]
    assert int(r[0]["collectives"]) == int(r[1]["collectives"]) == 0
    for t in text:
        assert "loaded another save" in t["other_save"], t["other_save"]
        assert "some ranks and not of others" in t["mixed"]
        assert "split over replicas" in t["split"] and "gather_attached()" in t["split"]
    for t in text:                                 # the same words on every rank
        assert "in: ranks [0], not in: ranks [1], global ranks" in t["mixed"], t["mixed"]
    assert "this rank: in it)" in text[0]["mixed"] and "this rank: not in it" in text[1]["mixed"]
    assert "damaged" in text[1]["damaged"]         # rank 1: its own error; rank 0: rank 1's, named
    assert "refused on rank 1 (its global rank), so on every rank" in text[0]["damaged"]
    assert "damaged" in text[0]["damaged"].split("so on every rank")[1]
    assert int(r[0]["warned"]) == int(r[1]["warned"]) == 1


def _one_not_attached(rank, world):
    """Rank 1's optimizer has no average attached: rank 0 times out in the load's agreement and
    says why (rank 1 loads the entries as plain optimizer state: nothing runs there to say so)."""
    model, opt, ema = _make(0)
    rank_step(model, opt, 0, rank)
    saved = opt.state_dict()
    if rank == 1:
        ema.detach()
    dist.barrier()                                 # then a short timeout: the load's alone
    from torch.distributed import distributed_c10d as c10d

    c10d._set_pg_timeout(datetime.timedelta(seconds=1.0), None)
    try:
        opt.load_state_dict(saved)
    except RuntimeError as err:
        return {"error": torch.tensor(list(str(err).encode()))}
    return {}


@pytest.mark.slow        # a fresh world (the timed-out collective breaks it): ~8 s on 2 cores
def test_a_rank_without_the_average_attached_times_out_the_load_with_the_reason(tmp_path):
    r = run_ranks(_one_not_attached, tmp_path, 2, pg_timeout=60.0, fresh=True)
    said = bytes(r[0]["error"].tolist()).decode()
    assert "agreement failed" in said and "a rank did not join it" in said
    assert "optimizer.load_state_dict() of the attached EMA" in said
    assert "must have the average attached" in said
    assert "error" not in r[1]
