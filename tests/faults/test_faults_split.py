"""The multi-rank fault suite: a split (``shard_replicas``) average when one rank breaks.

For every public read, export, save and load of a split average (EMA, WindowAverage, PostHocEMA, the
Hugging Face callback's per-rank files; Lightning's checkpoint is in tests/bridges/test_lightning.py),
the cases a rank can break: it raises inside the read, skipped an ``update()``, holds a file of another
save or none, is in another group, a gather fails on every rank. Each case ends in the correct result or
the same clear error on every rank, within a bounded time (every collective times out after 30 s, the
world after its wall-clock limit: a hang fails the test), with the model's raw weights intact.

Each test is one world of 2 spawned ranks (gloo, one thread a rank) running its cases in turn, each
case on a fresh average: the ranks report what each case gave and the parent asserts, so a failure
names the case. Defects of round 6 (../shared/design/reliability.md): H2, H3, H4, H5, H7, M1, L2.
"""
from __future__ import annotations

import torch
from dist import run_ranks
from support import faults

_COLLECTIVE_S = 30.0       # every collective's timeout in these worlds: a hang is an error, fast
_BOUND_S = 10.0            # a refusal reaches every rank within this (far below the collective timeout)


def _step(model, k: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(k / 10)


def _reads(ema, path):
    return {
        "full_state_dict": lambda: ema.full_state_dict(),
        "average_parameters": lambda: ema.average_parameters().__enter__(),
        "copy_to": lambda: ema.copy_to(),
        "averaged_state_dict": lambda: ema.averaged_state_dict(),
        "save": lambda: ema.save(path),
        "state_dict(gathered)": lambda: ema.gathered_state_dict(),
    }


def _skipped_update(rank, world, root):
    """EMA, WindowAverage and PostHocEMA split over 2 ranks; rank 1 skips its third update(). Every
    gathering read refuses on every rank, naming the counts (H4); the model is untouched."""
    from fastema.torch import EMA, PostHocEMA, WindowAverage

    out = {}
    faces = {
        "EMA": lambda m: EMA(m, 0.5, shard_replicas=True),
        "WindowAverage": lambda m: WindowAverage(m, 3, shard_replicas=True),
        "PostHocEMA": lambda m: PostHocEMA(m, sigma_rels=(0.05, 0.1), snapshot_every=None, path=f"{root}/ph",
                                           shard_replicas=True),
    }
    for face, make in faces.items():
        m = faults.model()
        avg = make(m)
        for i in range(3):
            _step(m, i)
            if not (rank == 1 and i == 2):
                avg.update()
        raw = faults.raw(m)
        reads = _reads(avg, f"{root}/{face}.safetensors")
        if face == "PostHocEMA":
            del reads["state_dict(gathered)"]                               # Lightning's (WeightEMA is an EMA)
            reads["snapshot"] = avg.snapshot                                # a DCP save of every rank's slices
        for read, fn in reads.items():
            kind, msg, s = faults.outcome(fn)
            named = "update() calls" in msg and "rank 1" in msg
            out[f"{face}.{read}"] = (kind, named, s, faults.same(raw, faults.raw(m)), avg.swapped)
        avg.update() if rank == 1 else None         # caught up: the reads are right again
        out[f"{face}.caught_up"] = faults.outcome(lambda: avg.full_state_dict())[0]
    return {"cases": out}


def test_a_rank_that_skipped_an_update_makes_every_read_refuse_on_every_rank(tmp_path):
    ranks = run_ranks(_skipped_update, tmp_path, 2, str(tmp_path), timeout=600, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        cases = ranks[r]["cases"]
        for name, got in cases.items():
            if name.endswith("caught_up"):
                assert got == "ok", (r, name, got)
                continue
            kind, names_counts, s, intact, swapped = got
            assert kind == "Disagreement" and names_counts, (r, name, got)
            assert s < _BOUND_S and intact and not swapped, (r, name, got)
    assert not (tmp_path / "EMA.safetensors").exists()


def _one_rank_refuses(rank, world, root):
    """A bad argument or a changed model on rank 1 only: every rank refuses at once, naming rank 1, and
    the model is untouched; then the same reads with good arguments work."""
    from fastema.torch import EMA

    m = faults.model()
    ema = EMA(m, 0.5, shard_replicas=True)
    _step(m, 1)
    ema.update()
    raw = faults.raw(m)
    bad = 7 if rank == 1 else 0
    cases = {
        "copy_to(row)": lambda: ema.copy_to(row=bad),
        "full_state_dict(row)": lambda: ema.full_state_dict(row=bad),
        "save(row)": lambda: ema.save(f"{root}/bad.safetensors", row=bad),
        "swap(row)": lambda: ema.swap(row=bad),
    }
    out = {}
    for name, fn in cases.items():
        kind, msg, s = faults.outcome(fn)
        out[name] = (kind, "rank 1" in msg or rank == 1, s, faults.same(raw, faults.raw(m)), ema.swapped)
    with ema.average_parameters():
        inside = faults.raw(m)
    out["after"] = (faults.same(raw, faults.raw(m)), not faults.same(raw, inside))
    return {"cases": out}


def test_a_rank_that_refuses_a_read_makes_every_rank_refuse_at_once(tmp_path):
    ranks = run_ranks(_one_rank_refuses, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        cases = ranks[r]["cases"]
        assert cases.pop("after") == (True, True), r
        for name, (kind, names_rank, s, intact, swapped) in cases.items():
            want = "IndexError" if r == 1 else "Disagreement"
            assert kind == want and names_rank and s < _BOUND_S and intact and not swapped, (r, name, kind)
    assert not (tmp_path / "bad.safetensors").exists()


def _failed_gathers(rank, world, root):
    """H7: the swap-in's first gather fails on every rank (a simulated out-of-memory): nothing went in,
    so the state says "not swapped" and a retry evaluates the average. A failure after the first
    bucket (ShardReplicas(bucket=16)): part went in, so swap() leaves the state "swapped" and swap() again
    restores the raw weights; inside average_parameters() the block's exit restores them at once.
    M1: the way back fails: the error says the raw weights were not restored, and swap() again
    restores them."""
    from support.calls import watching

    from fastema.torch import EMA, ShardReplicas
    from fastema.torch._placement import gather as _gather

    out = {}
    for case, fail_at, block in (("first", 1, True), ("later", 2, False), ("later in a block", 2, True)):
        m = faults.model()
        ema = EMA(m, 0.5, shard_replicas=ShardReplicas(True, bucket=16))
        unsplit = EMA(m, 0.5)
        for i in range(2):
            _step(m, i)
            ema.update()
            unsplit.update()
        raw = faults.raw(m)
        calls = [0]

        def failing(args, _at=fail_at, _calls=calls):               # noqa: B023 (bound per case)
            _calls[0] += 1
            if _calls[0] == _at:
                raise torch.OutOfMemoryError("simulated: no memory for the gather's bucket")

        with watching(_gather.all_gather, on_call=failing):
            kind, _, _ = faults.outcome(lambda: ema.average_parameters().__enter__() if block else ema.swap())
        state = (ema.swapped, faults.same(raw, faults.raw(m)))
        if ema.swapped:
            ema.swap()                                   # the way back, as average_parameters' exit would
        with ema.average_parameters():                   # the retry: the average, not the raw weights
            inside = faults.raw(m)
        with unsplit.average_parameters():
            want = faults.raw(m)
        out[case] = (kind, state, faults.same(inside, want), faults.same(raw, faults.raw(m)))
    # M1: the swap back fails on every rank
    m = faults.model()
    ema = EMA(m, 0.5, shard_replicas=True)
    _step(m, 1)
    ema.update()
    raw = faults.raw(m)
    ema.swap()
    timed_out = RuntimeError("simulated: gloo timed out")
    with watching(_gather.all_gather, on_call=lambda args: (_ for _ in ()).throw(timed_out)):
        kind, msg, _ = faults.outcome(ema.swap)
    still = ema.swapped
    ema.swap()
    out["back"] = (kind, "raw weights could not be restored" in msg, still, ema.swapped,
                   faults.same(raw, faults.raw(m)))
    return {"cases": out}


def test_a_failed_gather_leaves_the_swap_state_true_and_the_raw_weights_recoverable(tmp_path):
    ranks = run_ranks(_failed_gathers, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        cases = ranks[r]["cases"]
        assert cases["first"] == ("OutOfMemoryError", (False, True), True, True), (r, cases["first"])
        kind, (swapped, intact), avg_ok, back = cases["later"]            # swap(): part went in, the state says so
        assert kind == "OutOfMemoryError" and swapped and not intact and avg_ok and back, (r, cases["later"])
        assert cases["later in a block"] == ("OutOfMemoryError", (False, True), True, True), r   # the exit restored
        assert cases["back"] == ("RuntimeError", True, True, False, True), (r, cases["back"])


def _loads(rank, world, root):
    """H2: ranks loading state dicts of different saves refuse on every rank; one rank's damaged state
    refuses on every rank at once (never a hang). The average is unchanged either way."""
    from fastema.torch import EMA

    m = faults.model()
    ema = EMA(m, 0.5, shard_replicas=True)
    saves = {}
    for i in range(4):
        _step(m, i)
        ema.update()
        saves[i + 1] = ema.state_dict()
    before = ema.full_state_dict()
    out = {}
    out["two steps"] = faults.outcome(lambda: ema.load_state_dict(saves[4] if rank == 0 else saves[2]))[:2]
    damaged = dict(saves[3])
    damaged["calls"] = -1
    out["one damaged"] = faults.outcome(lambda: ema.load_state_dict(damaged if rank == 1 else saves[3]))[:2]
    out["unchanged"] = faults.same(before, ema.full_state_dict())
    out["same save"] = faults.outcome(lambda: ema.load_state_dict(saves[2]))[0]
    out["calls"] = ema.calls
    return {"cases": out}


def test_ranks_loading_different_saves_refuse_on_every_rank(tmp_path):
    ranks = run_ranks(_loads, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        c = ranks[r]["cases"]
        kind, msg = c["two steps"]
        assert kind == "Disagreement" and "4 update() calls" in msg and "2 update() calls" in msg, (r, c)
        kind, msg = c["one damaged"]
        assert (kind == "ValueError" if r == 1 else kind == "Disagreement" and "rank 1" in msg), (r, c)
        assert c["unchanged"] and c["same save"] == "ok" and c["calls"] == 2, (r, c)


def _groups(rank, world, root):
    """H5: each rank its own group of one (pipeline stages, each replicated over its group): save()
    and full_state_dict(rank0_only=True) write and keep on each group's first rank, not global rank 0."""
    import torch.distributed as dist

    from fastema.torch import EMA

    groups = [dist.new_group([0]), dist.new_group([1])]
    m = faults.model()
    with torch.no_grad():
        m[0].weight.add_(rank)                             # each stage its own model
    ema = EMA(m, 0.5, shard_replicas=groups[rank])
    _step(m, 1)
    ema.update()
    ema.save(f"{root}/stage{rank}.safetensors")
    kept = ema.full_state_dict(rank0_only=True)
    return {"kept": torch.tensor(len(kept))}


def test_a_group_that_is_not_the_default_one_saves_its_own_average(tmp_path):
    ranks = run_ranks(_groups, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    assert [int(r["kept"]) for r in ranks] == [4, 4]
    from safetensors.torch import load_file

    stages = [load_file(str(tmp_path / f"stage{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(stages[0]["0.weight"], stages[1]["0.weight"])


def _exchanged(rank, world, root):
    """L2: two equal-shaped layers exchanged on rank 1: the construction refuses on every rank."""
    from fastema.torch import EMA

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    torch.manual_seed(0)
    for p in m.parameters():
        torch.nn.init.normal_(p)
    if rank == 1:
        with torch.no_grad():
            a, b = m[0].weight.clone(), m[1].weight.clone()
            m[0].weight.copy_(b)
            m[1].weight.copy_(a)
    kind, msg, _ = faults.outcome(lambda: EMA(m, 0.5, shard_replicas=True))
    return {"refused": torch.tensor(kind == "ValueError" and "weights differ" in msg)}


def test_two_equal_shaped_tensors_exchanged_on_one_rank_are_refused(tmp_path):
    ranks = run_ranks(_exchanged, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    assert all(bool(r["refused"]) for r in ranks)


def _callback_files(rank, world, root):
    """EMACallback(shard_replicas=True)'s per-rank files: files of two saves in one folder (a re-save
    that failed on one rank) refuse on every rank, on the same world size and on another (H2); rank 1's
    file missing or truncated refuses on every rank at once, naming it (H3)."""
    import os
    import shutil
    import types

    import torch.distributed as dist

    from fastema.torch import EMA
    from fastema.transformers import EMACallback

    m = faults.model()
    ema = EMA(m, 0.5, shard_replicas=True)
    cb = EMACallback.__new__(EMACallback)
    cb.ema = ema
    args = types.SimpleNamespace(output_dir=root, should_save=rank == 0)
    for step in (2, 4):
        for i in range(2):
            _step(m, i)
            ema.update()
        os.makedirs(f"{root}/checkpoint-{step}", exist_ok=True)
        dist.barrier()
        cb.on_save(args, types.SimpleNamespace(global_step=step), None)
    dist.barrier()
    name = "fastema_ema-rank1-of-2.safetensors"
    if rank == 0:
        shutil.copytree(f"{root}/checkpoint-4", f"{root}/mixed")
        shutil.copy(f"{root}/checkpoint-2/{name}", f"{root}/mixed/{name}")       # rank 1's file of step 2
        shutil.copytree(f"{root}/checkpoint-4", f"{root}/missing")
        os.remove(f"{root}/missing/{name}")
        shutil.copytree(f"{root}/checkpoint-4", f"{root}/cut")
        with open(f"{root}/cut/{name}", "r+b") as f:
            f.truncate(os.path.getsize(f"{root}/cut/{name}") - 40)
    dist.barrier()
    before = ema.full_state_dict()
    out = {}
    for case in ("mixed", "missing", "cut"):
        kind, msg, s = faults.outcome(lambda c=case: EMACallback._load(ema, f"{root}/{c}"))
        out[case] = (kind, msg[:400], s)
    out["unchanged"] = faults.same(before, ema.full_state_dict())
    from fastema import _callback_files  # what a resume on another world size reads them through
    files = [f"{root}/mixed/fastema_ema-rank{r}-of-2.safetensors" for r in (0, 1)]
    out["one_save"] = faults.outcome(lambda: _callback_files._one_save(files))[:2]
    out["good"] = faults.outcome(lambda: EMACallback._load(ema, f"{root}/checkpoint-2"))[0]
    out["calls"] = ema.calls
    return {"cases": out}


def test_per_rank_files_of_two_saves_or_one_missing_refuse_on_every_rank_and_world_size(tmp_path):
    ranks = run_ranks(_callback_files, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        c = ranks[r]["cases"]
        kind, msg, s = c["mixed"]
        assert kind == "Disagreement" and "update() calls" in msg and s < _BOUND_S, (r, c["mixed"])
        for case in ("missing", "cut"):
            kind, msg, s = c[case]
            assert s < _BOUND_S and "rank1" in msg, (r, case, c[case])
            assert kind != "Disagreement" if r == 1 else (kind == "Disagreement" and "rank 1" in msg), (r, case, kind)
        kind, msg = c["one_save"]
        assert kind == "ValueError" and "not of one" in msg and "calls=4" in msg and "calls=2" in msg, (r, msg)
        assert c["unchanged"] and c["good"] == "ok" and c["calls"] == 2, (r, c)
    (one,) = run_ranks(_resume_on_one, tmp_path / "one", 1, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    assert bool(one["mixed"]) and bool(one["good"])         # on another world size too (resharded)



def _resume_on_one(rank, world, root):
    """The 2 ranks' folders resumed on 1 rank (another world size: the files are resharded): the mixed
    one (rank 1's file of another save) is refused naming both counts (H2); the whole one loads."""
    from fastema.torch import EMA
    from fastema.transformers import EMACallback

    m = faults.model()
    ema = EMA(m, 0.5, shard_replicas=True)
    kind, msg, _ = faults.outcome(lambda: EMACallback._load(ema, f"{root}/mixed"))
    good = faults.outcome(lambda: EMACallback._load(ema, f"{root}/checkpoint-4"))[0]
    return {"mixed": torch.tensor(kind == "ValueError" and "calls=4" in msg and "calls=2" in msg),
            "good": torch.tensor(good == "ok" and ema.calls == 4)}



def _mesh_agreement(rank, world, root):
    """The agreement over a 2 x 2 mesh's two dimensions (HSDP, FSDP with tensor parallel): one rank's
    refusal, or one rank's count, reaches all 4 ranks, each of which raises at once (none is left in an
    exchange another has left)."""
    import torch.distributed as dist

    from fastema.torch._state.agree import Read, Sequence, Stamp, agree

    rows = [dist.new_group([0, 2]), dist.new_group([1, 3])]       # dimension 0 (the replicas: run ids agreed)
    cols = [dist.new_group([0, 1]), dist.new_group([2, 3])]       # dimension 1
    groups = [(rows[rank % 2], "cpu", True), (cols[rank // 2], "cpu", False)]
    out = {}
    read, seq = Read("copy_to()"), Sequence()
    cases = {
        "refused": lambda: agree(groups, read, Stamp(5, 7), seq, "no file here" if rank == 0 else
                                 None),
        "skipped": lambda: agree(groups, read, Stamp(4 if rank == 3 else 5, 7), seq),
        "runs": lambda: agree(groups, read, Stamp(5, 7 + rank % 2), seq),   # each group's own run
        "agreed": lambda: agree(groups, read, Stamp(5, 7), seq),
    }
    for name, fn in cases.items():
        kind, msg, s = faults.outcome(fn)
        out[name] = (kind, msg, s)
    return {"cases": out}


def test_the_agreement_reaches_every_rank_of_a_2d_mesh(tmp_path):
    ranks = run_ranks(_mesh_agreement, tmp_path, 4, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in range(4):
        c = ranks[r]["cases"]
        kind, msg, s = c["refused"]
        assert kind == "Disagreement" and "refused on rank 0" in msg and "no file here" in msg and s < _BOUND_S, r
        kind, msg, s = c["skipped"]
        assert kind == "Disagreement" and "rank 3: 4 update() calls" in msg and s < _BOUND_S, (r, msg)
        assert c["runs"][0] == "ok" and c["agreed"][0] == "ok", (r, c["runs"])
