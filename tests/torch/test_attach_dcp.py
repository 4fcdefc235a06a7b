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
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")

STEPS, MORE = 3, 2


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


def _step(model, opt, rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    model(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def _full(ema, prefix):
    """The average's whole state, gathered (a collective): rows of every tensor, and counters."""
    state = ema.gathered_state_dict() if ema.split else ema.state_dict()
    out = {f"{prefix}/calls": torch.tensor(state["calls"])}
    for key in ("averaged", "ring"):
        for n, v in state.get(key, {}).items():
            assert v.dtype == torch.float32, (key, n, v.dtype)
            out[f"{prefix}/{key}/{n}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def _options(flat):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _save(model, opt, path, flat):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt, options=_options(flat))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(model, opt, path, flat):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt, options=_options(flat))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(flat))


def _resume(rank, world, folder, kind, hsdp=False):
    """Train, save (default and flattened; ``dcp.async_save`` too), train on: the uninterrupted
    run; then fresh runs (other initial weights) load one save each and train on alike. ``hsdp``:
    a 2 x 2 mesh (replicate, shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
    name = f"{kind}{world}{'hsdp' if hsdp else ''}"
    model, opt, ema = _make(0, mesh, kind)
    out = {"local_rows": torch.tensor([p.to_local().shape[0] for p in model.parameters()])}
    for s in range(STEPS):
        _step(model, opt, rank, s)
    out.update(_full(ema, "saved"))
    for flat in (False, True):
        _save(model, opt, os.path.join(folder, f"{name}-{int(flat)}"), flat)
    msd, osd = get_state_dict(model, opt)
    dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, f"{name}-2")
                   ).result()
    for s in range(STEPS, STEPS + MORE):
        _step(model, opt, rank, s)
    out.update(_full(ema, "ref"))
    for flat in (0, 1, 2):                         # 2: the async save, default options
        model, opt, ema = _make(1, mesh, kind)
        _load(model, opt, os.path.join(folder, f"{name}-{flat}"), flat == 1)
        out.update(_full(ema, f"loaded{flat}"))
        for s in range(STEPS, STEPS + MORE):
            _step(model, opt, rank, s)
        out.update(_full(ema, f"resumed{flat}"))
    return out


def _reshard(rank, world, folder, kind, saved_world, flats):
    """A save of ``saved_world`` ranks loaded here (``flats``: the options); then this world saves
    its own (default options)."""
    out = {}
    for flat in flats:
        model, opt, ema = _make(2, kind=kind)
        _load(model, opt, os.path.join(folder, f"{kind}{saved_world}-{int(flat)}"), flat)
        out.update(_full(ema, f"loaded{int(flat)}"))
        if not flat:
            _save(model, opt, os.path.join(folder, f"{kind}{world}-0"), False)
    return out


def _same(r, a, b):
    keys = [k[len(a) + 1:] for k in r if k.startswith(a + "/")]
    assert keys
    for k in keys:
        assert torch.equal(r[f"{a}/{k}"], r[f"{b}/{k}"]), (a, b, k)


@pytest.mark.parametrize("kind", ["EMA", "WindowAverage"])
def test_a_sharded_float32_average_rides_dcp_bit_for_bit_and_across_world_sizes(tmp_path, kind):
    folder = str(tmp_path)
    r4 = run_ranks(_resume, tmp_path / "r4", 4, folder, kind, pg_timeout=60.0)
    assert [r["local_rows"].tolist() for r in r4] == [[2, 2, 1, 1, 1, 1], [2, 2, 1, 1, 0, 0],
                                                      [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    for r in r4:                                   # uneven and size-0 local shards
        for flat in (0, 1, 2):
            _same(r, "saved", f"loaded{flat}")
            _same(r, "ref", f"resumed{flat}")       # bit for bit against the uninterrupted run
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
            _same(r, "saved", f"loaded{flat}")
            _same(r, "ref", f"resumed{flat}")


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
        _step(model, opt, rank, s)
    with Counted() as counted:
        early = opt.state_dict()                   # each rank alone: no collective
    out = {"collectives": torch.tensor(len(counted.calls))}
    for s in range(STEPS, STEPS + MORE):
        _step(model, opt, rank, s)
    late = opt.state_dict()
    before = _full(ema, "before")
    cases = {"other_save": early if rank == 0 else late,
             "mixed": late if rank == 0 else _strip(late),
             "damaged": late if rank == 0 else _damage(late)}
    for case, sd in cases.items():
        try:
            opt.load_state_dict(sd)
        except ValueError as err:
            out[case] = torch.tensor(list(str(err).encode()))
        _same({**before, **_full(ema, "after")}, "before", "after")   # nothing was loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(_strip(late))          # none has it: every rank starts over
    out["warned"] = torch.tensor(sum("starts over" in str(w.message) for w in caught))
    opt.load_state_dict(late)                      # the world still works
    _same({**before, **_full(ema, "after")}, "before", "after")
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
    assert "(this rank: in it)" in text[0]["mixed"] and "not in it" in text[1]["mixed"]
    assert "damaged" in text[1]["damaged"] and "another rank refused" in text[0]["damaged"]
    assert int(r[0]["warned"]) == int(r[1]["warned"]) == 1


def _plain(seed):
    from fastema.torch import EMA

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, EMA(model, 0.9).attach(opt)


@pytest.mark.parametrize("flat", [False, True])
def test_an_unsharded_average_rides_dcp_too_in_one_process(tmp_path, flat):
    """No process group: DCP's get_optimizer_state_dict is told by its frame, and gets the
    per-parameter form (plain float32 tensors); optimizer.state_dict() keeps the top-level key."""
    from fastema.torch import ATTACH_KEY

    model, opt, ema = _plain(0)
    for s in range(STEPS):
        _step(model, opt, 0, s)
    plain = opt.state_dict()
    assert set(plain[ATTACH_KEY]) and all(ATTACH_KEY not in v for v in plain["state"].values())
    _save(model, opt, str(tmp_path / "ckpt"), flat)
    for s in range(STEPS, STEPS + MORE):
        _step(model, opt, 0, s)
    ref = ema.state_dict()["averaged"]
    model, opt, ema = _plain(1)
    _load(model, opt, str(tmp_path / "ckpt"), flat)
    assert ema.updates == STEPS
    for s in range(STEPS, STEPS + MORE):
        _step(model, opt, 0, s)
    got = ema.state_dict()["averaged"]
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.float32 and torch.equal(got[n], ref[n]), n


def _one_not_attached(rank, world):
    """Rank 1's optimizer has no average attached: rank 0 times out in the load's agreement and
    says why (rank 1 loads the entries as plain optimizer state: nothing runs there to say so)."""
    model, opt, ema = _make(0)
    _step(model, opt, rank, 0)
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
    assert "agreement failed" in said and "did not join its load" in said
    assert "must have the average attached" in said
    assert "error" not in r[1]
