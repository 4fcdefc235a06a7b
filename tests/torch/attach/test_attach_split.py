"""``ema.attach(optimizer)`` of an average split over replicas (``shard_replicas``) under DDP (2
gloo ranks of the shared world): DCP carries each rank's pieces in the per-parameter entries
(``SplitEntry`` values), a float32 average of bfloat16 weights resumes bit for bit, with the
default options and ``flatten_optimizer_state_dict=True``, offloaded (``offload=``) or not, a
``PostHocEMA``'s snapshots written after the resume too; ranks
that load different saves raise alike. Outside DCP (HF Trainer's rank-0 ``optimizer.state_dict()``)
the hook makes no collective: it carries the copy ``gather_attached()`` made on every rank, or
raises naming what to do; that copy loads at another world size (2 -> 4, 4 -> 2)."""
import glob
import importlib.util
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from dist import Counted, run_ranks
from support.attach import rank_step, rows, same_rows
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")

F32 = torch.float32                                # the average of bfloat16 weights: float32
STEPS, MORE = 3, 2


def _make(seed, kind="EMA", folder=None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA, Offload, PostHocEMA, WindowAverage

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    if kind == "offload":                           # host memory, fed by the CPU ring
        ema = EMA(ddp, 0.9, shadow_dtype="float32", shard_replicas=True,
                  offload=Offload(chunk=32))
        assert "staging chunks" in ema.memory(parts=True)["cpu"]    # type: ignore[index]
    elif kind in ("EMA", "unsplit"):
        ema = EMA(ddp, [PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2,
                  shadow_dtype="float32", shard_replicas=kind == "EMA")
    elif kind == "PostHocEMA":                      # snapshots every 2 updates, into folder
        ema = PostHocEMA(ddp, (0.05, 0.1), snapshot_every=2, path=folder, shard_replicas=True)
    else:
        ema = WindowAverage(ddp, 3, shard_replicas=True)
    assert ema.split == (kind != "unsplit")
    return ddp, opt, ema.attach(opt)




def _options(flat):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _dcp_resume(rank, world, folder, kind):
    """Train, save through DCP (default, flattened), train on; fresh runs load each save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from fastema.torch import SplitEntry

    snaps = os.path.join(folder, "snapshots")
    model, opt, ema = _make(0, kind, os.path.join(snaps, "ref"))
    for s in range(STEPS):
        rank_step(model, opt, s, rank)
    out = rows(ema, "saved", F32)
    if kind == "PostHocEMA":
        out["run_id"] = torch.tensor(list(ema.run_id.encode()))
    for flat in (False, True):
        msd, osd = get_state_dict(model, opt, options=_options(flat))
        entries = [v for v in (osd["state"].values() if not flat else ()) if "fastema" in v]
        if not flat:                                # each rank's pieces: SplitEntry values
            assert entries and isinstance(entries[0]["fastema"]["averaged"], SplitEntry)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, f"{flat}"))
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, rank)
    out.update(rows(ema, "ref", F32))
    out.update(_last_snapshot(os.path.join(snaps, "ref"), "ref"))
    kinds = [(kind, False), (kind, True)] + [("unsplit", False)] * (kind == "EMA")
    for made, flat in kinds:                       # unsplit: the split's save, read whole
        name = "unsplit" if made == "unsplit" else int(flat)
        if kind == "PostHocEMA" and rank == 0:     # the run's folder, written on past the save
            shutil.copytree(os.path.join(snaps, "ref"), os.path.join(snaps, f"{name}"))
        dist.barrier()
        model, opt, ema = _make(1, made, os.path.join(snaps, f"{name}"))
        msd, osd = get_state_dict(model, opt, options=_options(flat))
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(folder, f"{flat}"))
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_options(flat))
        out.update(rows(ema, f"loaded{name}", F32))
        if kind == "PostHocEMA":                   # the saved run goes on: its id, its folder
            out[f"run_id{name}"] = torch.tensor(list(ema.run_id.encode()))
        for s in range(STEPS, STEPS + MORE):
            rank_step(model, opt, s, rank)
        out.update(rows(ema, f"resumed{name}", F32))
        out.update(_last_snapshot(os.path.join(snaps, f"{name}"), f"resumed{name}"))
    return out


def _last_snapshot(folder, prefix):
    """A PostHocEMA's last snapshot (one collective DCP save of the ranks' pieces), read whole:
    ``{prefix}/snapshot/{key}``; nothing for the other faces."""
    from fastema.posthoc import read_snapshots, tensor_reader

    if not os.path.isdir(folder):
        return {}
    snaps = read_snapshots(folder)     # a resumed run's: the one after its save moved aside
    moved = glob.glob(f"{folder}/superseded-*/*")           # (a DCP folder and its .json)
    assert [s.time for s in snaps] == [2, 4], (prefix, os.listdir(folder))
    assert len(moved) == 2 * (prefix != "ref"), (prefix, moved)
    snap = snaps[-1]
    assert snap.kind == "dcp" and snap.time == STEPS + MORE - 1, snap
    read = tensor_reader(snap)
    try:
        keys = [f"{k}:{n}" for k in range(len(snap.gammas)) for n in snap.averaged]
        return {f"{prefix}/snapshot/{k}": read(k).clone() for k in keys}
    finally:
        read.close()


@pytest.mark.parametrize("kind", ["EMA", "WindowAverage", "offload", "PostHocEMA"])
def test_a_split_float32_average_rides_dcp_bit_for_bit(tmp_path, kind):
    r = run_ranks(_dcp_resume, tmp_path, 2, str(tmp_path), kind, pg_timeout=30.0)
    for x in r:
        for flat in (0, 1, "unsplit") if kind == "EMA" else (0, 1):
            same_rows(x, "saved", f"loaded{flat}")
            same_rows(x, "ref", f"resumed{flat}")      # bit for bit against the uninterrupted run
    same_rows({**{"a/" + k: v for k, v in r[0].items()}, **{"b/" + k: v for k, v in r[1].items()}},
          "a", "b")                                 # one average: every rank gathers the same
    assert int(r[0]["saved/calls"]) == STEPS        # DCP's dummy step is no update
    ids = {bytes(x[k].tolist()) for x in r for k in x if k.startswith("run_id")}
    assert len(ids) == (kind == "PostHocEMA"), ids   # one run: rank 0's id, saved, loaded
    snapshots = [k for k in r[0] if k.startswith("ref/snapshot/")]
    assert len(snapshots) == (4 * 2 if kind == "PostHocEMA" else 0)   # 4 tensors x 2 profiles


def _strip(osd):
    return {**osd, "state": {k: {kk: vv for kk, vv in v.items() if kk != "fastema"}
                             for k, v in osd["state"].items()}}


def _dcp_disagree(rank, world):
    """Ranks that set different saves, or the entries on one rank only: every rank raises the
    same error, nothing is loaded, the world still works."""
    from torch.distributed.checkpoint import state_dict as dcp_sd

    model, opt, ema = _make(0)
    rank_step(model, opt, 0, rank)
    early = dcp_sd.get_optimizer_state_dict(model, opt)
    rank_step(model, opt, 1, rank)
    late = dcp_sd.get_optimizer_state_dict(model, opt)
    before = rows(ema, "before", F32)
    out = {}
    for case, sd in {"other_save": early if rank == 0 else late,
                     "mixed": late if rank == 0 else _strip(late)}.items():
        try:
            dcp_sd.set_optimizer_state_dict(model, opt, sd)
        except ValueError as err:
            out[case] = torch.tensor(list(str(err).encode()))
        same_rows({**before, **rows(ema, "after", F32)}, "before", "after")   # nothing was loaded
    dcp_sd.set_optimizer_state_dict(model, opt, late)
    same_rows({**before, **rows(ema, "after", F32)}, "before", "after")
    return out


def test_ranks_that_load_different_saves_raise_alike(tmp_path):
    r = run_ranks(_dcp_disagree, tmp_path, 2, pg_timeout=30.0)
    text = [{k: bytes(v.tolist()).decode() for k, v in x.items()} for x in r]
    for t in text:
        assert "another save" in t["other_save"], t["other_save"]
        assert "some ranks and not of others" in t["mixed"], t["mixed"]


def _rank0_save(rank, world, folder):
    """HF Trainer's flow: ``optimizer.state_dict()`` on rank 0 alone. Not gathered: a clear error,
    no collective, no file. Gathered on every rank first: rank 0's file holds the whole average,
    which every rank loads (weights_only) and resumes bit for bit."""
    model, opt, ema = _make(0)
    for s in range(STEPS):
        rank_step(model, opt, s, rank)
    path = os.path.join(folder, "optimizer.pt")
    out = {}
    if rank == 0:
        with Counted() as counted:
            try:
                torch.save(opt.state_dict(), path)
            except RuntimeError as err:
                out["refused"] = torch.tensor(list(str(err).encode()))
        out["refused_calls"] = torch.tensor(len(counted.calls))
        out["no_file"] = torch.tensor(not os.path.exists(path))
    dist.barrier()
    ema.gather_attached()                          # every rank, after the last step
    if rank == 0:
        with Counted() as counted:
            torch.save(opt.state_dict(), path)
        out["saved_calls"] = torch.tensor(len(counted.calls))
        torch.save(model.module.state_dict(), path + ".model")
    dist.barrier()
    out.update(rows(ema, "saved", F32))
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, rank)
    out.update(rows(ema, "ref", F32))
    if rank == 0:                                  # a step drops the gathered copy
        try:
            opt.state_dict()
        except RuntimeError as err:
            out["stale"] = torch.tensor(list(str(err).encode()))
    model, opt, ema = _make(1)
    model.module.load_state_dict(torch.load(path + ".model", weights_only=True))
    whole = torch.load(path, weights_only=True)
    try:                                           # the average in rank 0's dict only: both raise
        opt.load_state_dict(whole if rank == 0 else {k: v for k, v in whole.items()
                                                     if k != "fastema"})
    except ValueError as err:
        out["mixed"] = torch.tensor(list(str(err).encode()))
    opt.load_state_dict(whole)
    out.update(rows(ema, "loaded", F32))
    _, opt2, ema2 = _make(1, "unsplit")            # the whole copy loads unsplit too
    opt2.load_state_dict(whole)
    out.update(rows(ema2, "unsplit", F32))
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, rank)
    out.update(rows(ema, "resumed", F32))
    return out


def test_outside_dcp_the_hook_carries_the_gathered_copy_or_says_what_to_do(tmp_path):
    r0, r1 = run_ranks(_rank0_save, tmp_path, 2, str(tmp_path), pg_timeout=30.0)
    said = bytes(r0["refused"].tolist()).decode()
    assert "gather_attached()" in said and "DCP" in said and "shard_replicas" in said, said
    assert "was not gathered" in said
    assert "gather_attached()" in bytes(r0["stale"].tolist()).decode()
    assert int(r0["refused_calls"]) == int(r0["saved_calls"]) == 0   # no collective in the hook
    assert bool(r0["no_file"])                     # never a file of rank 0's pieces
    for x in (r0, r1):
        assert "some ranks and not of others" in bytes(x["mixed"].tolist()).decode()
    for x in (r0, r1):
        same_rows(x, "saved", "loaded")
        same_rows(x, "saved", "unsplit")
        same_rows(x, "ref", "resumed")                 # bit for bit against the uninterrupted run


def _trainer_flows(rank, world, folder):
    """HF Trainer's flow, its own callback handler: the flow callback decides a save at step 2 in
    ``on_step_end``, ``GatherAttached`` gathers on every rank, the saving rank alone writes
    ``optimizer.state_dict()``. Lightning's: every callback's ``state_dict()``, then the
    optimizer's, on every rank. Both files hold the whole average, loaded bit for bit."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from fastema.lightning import GatherAttached as LightningGather
    from fastema.transformers import GatherAttached

    model, opt, ema = _make(0)
    args = TrainingArguments(os.path.join(folder, "hf"), save_strategy="steps", save_steps=2,
                             logging_strategy="no", report_to=[], use_cpu=True)
    handler = CallbackHandler([DefaultFlowCallback(), GatherAttached(ema)], model, None, opt, None)
    state, control = TrainerState(max_steps=STEPS, save_steps=2), TrainerControl()
    out, saves = rows(ema, "start", F32), []
    control = handler.on_init_end(args, state, control)   # every rank builds the Trainer; then
    opt.load_state_dict(opt.state_dict())       # train()'s prepare: accelerate's
    out.update(rows(ema, "prepared", F32))          # AcceleratedOptimizer round trip, every rank
    for s in range(STEPS):
        control = handler.on_step_begin(args, state, control)
        rank_step(model, opt, s, rank)
        state.global_step = s + 1
        control = handler.on_step_end(args, state, control)
        if control.should_save:                    # steps 2 and 3 (the last)
            saves.append(state.global_step)
            if rank == 0:                          # under DDP the Trainer's saving rank, alone
                with Counted() as counted:
                    torch.save(opt.state_dict(), os.path.join(folder, f"opt{s + 1}.pt"))
                out[f"hf_calls{s + 1}"] = torch.tensor(len(counted.calls))
            control = handler.on_save(args, state, control)
            out.update(rows(ema, f"at{s + 1}", F32))
    dist.barrier()
    out["saves"] = torch.tensor(saves)
    best = TrainingArguments(os.path.join(folder, "best"), eval_strategy="steps", eval_steps=2,
                             save_strategy="best", metric_for_best_model="loss",
                             logging_strategy="no", report_to=[], use_cpu=True)
    handler = CallbackHandler([DefaultFlowCallback(), GatherAttached(ema)], model, None, opt, None)
    state, control = TrainerState(max_steps=9, eval_steps=2), TrainerControl()
    for s in (4, 5):                               # "best": the save is decided after evaluating
        control = handler.on_step_begin(best, state, control)
        rank_step(model, opt, s - 1, rank)
        state.global_step = s
        control = handler.on_step_end(best, state, control)
        if rank == 0:
            try:
                opt.state_dict()
                out[f"best{s}"] = torch.tensor(1)
            except RuntimeError:
                out[f"best{s}"] = torch.tensor(0)
    out.update(rows(ema, "now", F32))
    lightning = LightningGather("ema")
    lightning.setup(None, nn.Module(), "fit")
    lightning.module.ema = ema                     # the LightningModule's attribute
    assert lightning.state_dict() == {}            # every rank: the gather, before the optimizer
    whole = opt.state_dict()                       # every rank (Lightning's optimizer_state)
    files = {f"hf{k}": torch.load(os.path.join(folder, f"opt{k}.pt"), weights_only=True)
             for k in saves}
    for name, sd in (*files.items(), ("lightning", whole)):
        _, opt2, ema2 = _make(1)
        opt2.load_state_dict(sd)
        out.update(rows(ema2, name, F32))
    return out


def test_the_trainers_callbacks_gather_before_the_saving_rank_writes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")              # transformers' TrainingArguments asks for it
    if not any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning")):
        pytest.skip("needs PyTorch Lightning (lightning or pytorch_lightning)")
    r = run_ranks(_trainer_flows, tmp_path, 2, str(tmp_path), pg_timeout=30.0)
    assert r[0]["saves"].tolist() == r[1]["saves"].tolist() == [2, STEPS]
    assert int(r[0]["hf_calls2"]) == int(r[0]["hf_calls3"]) == 0    # rank 0 alone, no collective
    assert int(r[0]["best4"]) == 1 and int(r[0]["best5"]) == 0   # gathered at each evaluation
    for x in r:
        same_rows(x, "start", "prepared")              # it raised "was not gathered" at prepare
        same_rows(x, "at2", "hf2")
        same_rows(x, "at3", "hf3")
        same_rows(x, "now", "lightning")


def test_gather_attached_is_a_no_op_unsplit_and_refused_unattached():
    from fastema.torch import EMA

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9)
    with pytest.raises(RuntimeError, match="not attached"):
        ema.gather_attached()
    ema.attach(opt)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    before = opt.state_dict()["fastema"]
    ema.gather_attached()                          # unsplit: nothing gathered, nothing changed
    after = opt.state_dict()["fastema"]
    assert ema._attachment.gathered is None
    assert all(torch.equal(before["averaged"][n], after["averaged"][n]) for n in before["averaged"])


def _gathered_save(rank, world, folder):
    """``gather_attached()`` then rank 0's ``torch.save`` of the optimizer's and the model's state
    dicts; every rank trains on the same batches (so any world size trains alike) and goes on."""
    model, opt, ema = _make(0)
    for s in range(STEPS):
        rank_step(model, opt, s, 0)
    ema.gather_attached()
    if rank == 0:
        torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
        torch.save(model.module.state_dict(), os.path.join(folder, "model.pt"))
    dist.barrier()
    out = rows(ema, "saved", F32)
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, 0)
    out.update(rows(ema, "ref", F32))
    return out


def _gathered_load(rank, world, folder):
    """The gathered copy of another world size, loaded on every rank (``weights_only``)."""
    model, opt, ema = _make(1)
    model.module.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True))
    opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    out = rows(ema, "loaded", F32)
    for s in range(STEPS, STEPS + MORE):
        rank_step(model, opt, s, 0)
    out.update(rows(ema, "resumed", F32))
    return out


@pytest.mark.parametrize("sizes", [(2, 4), (4, 2)], ids=["2->4", "4->2"])
def test_the_gathered_copy_loads_at_another_world_size(tmp_path, sizes):
    folder = str(tmp_path)
    saved = run_ranks(_gathered_save, tmp_path / "save", sizes[0], folder, pg_timeout=30.0)
    loaded = run_ranks(_gathered_load, tmp_path / "load", sizes[1], folder, pg_timeout=30.0)
    for x in loaded:
        r = {**saved[0], **x}
        same_rows(r, "saved", "loaded")
        same_rows(r, "ref", "resumed")                 # bit for bit against the uninterrupted run
