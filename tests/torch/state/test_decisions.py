"""The ranks' decisions that are no read (``fastema/torch/_state/decisions.py``: ``findings``,
``refuse_together``, ``decided``; issue 72): a rank that refuses makes every rank raise the same
error, in a refused read's words, of the type the caller's callers catch, and the next decision of
every rank works (no rank left in a collective)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks

from fastema.torch._state import decisions as agree
from fastema.torch._state.agree import Disagreement
from fastema.torch._state.decisions import decided, findings, refuse_together


def test_refuse_together_names_the_lowest_refusing_rank_in_a_refused_reads_words():
    refuse_together("the check", [None, None, None])              # nobody refused: nothing raised
    with pytest.raises(Disagreement) as got:
        refuse_together("the check", [None, "disk full", "gone"])
    assert str(got.value) == ("the check refused on rank 1 (its global rank), so on every rank: "
                              "disk full")
    assert isinstance(got.value, ValueError)                      # except ValueError catches it
    with pytest.raises(OSError, match="refused on rank 0 .*: no space"):
        refuse_together("the DCP snapshot", ["no space"], OSError)


def test_refuse_together_takes_findings_by_global_rank_and_timed_out_words_a_missing_rank():
    refuse_together("the load", {0: None, 3: None})
    with pytest.raises(Disagreement, match=r"^the load refused on rank 5 \(its global rank\), so "
                                           r"on every rank: damaged$"):
        refuse_together("the load", {2: None, 5: "damaged", 7: "gone"}, group=object())
    assert agree.mesh_findings("mine", []) == {0: "mine"}               # no group: this rank's alone
    with pytest.raises(Disagreement, match=r"agreement failed on this rank \(Timed out\): where "
                                           r"it timed out, a rank did not join it: attach it"):
        with agree.timed_out("attach it"):
            raise RuntimeError("Timed out")                       # gloo's timeout
    for waiting, error in ((None, RuntimeError), ("attach it", ValueError)):
        with pytest.raises(error) as got:                         # torch's own, or not a wait's
            with agree.timed_out(waiting):
                raise error("other")
        assert type(got.value) is error


def _decisions(rank, world):
    out = {"found": torch.tensor(findings(10 * rank + 1))}
    messages = []
    for error in (Disagreement, OSError):
        try:
            decided("the folder's check", "moved away" if rank == 1 else None, error)
        except error as err:
            messages.append(str(err))
    out["same"] = torch.tensor([len(messages) == 2 and messages[0] == messages[1]
                                and "refused on rank 1 (its global rank), so on every rank: "
                                    "moved away" in messages[0]])
    decided("the next check", None)                               # every rank goes on, together
    dist.barrier()
    out["after"] = torch.tensor(findings(rank))
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_a_rank_that_refuses_a_decision_makes_every_rank_raise_the_same_error(tmp_path):
    ranks = run_ranks(_decisions, tmp_path, 2, timeout=120, pg_timeout=60)
    for r in ranks:
        assert r["found"].tolist() == [1, 11]
        assert bool(r["same"])
        assert r["after"].tolist() == [0, 1]


def _overflow_on_one_rank(rank, world, snaps):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from fastema.posthoc import SnapshotError
    from fastema.torch import PostHocEMA

    torch.manual_seed(0)
    model = fully_shard(nn.Linear(4, 8))                # weight rows 0-3 on rank 0, 4-7 on rank 1
    ph = PostHocEMA(model, snapshot_every=None, snapshot_dtype="float16", path=snaps)
    if rank == 1:                                       # beyond float16's range on this rank alone
        with torch.no_grad():
            model.weight.to_local()[0, 0] = 1e6
    ph.update()
    try:
        ph.snapshot()
        said = ""
    except SnapshotError as err:
        said = str(err)
    return {"refused": torch.tensor(["finite values beyond the range of float16" in said
                                     and "weight" in said]),
            "said": torch.tensor(list(said.encode()), dtype=torch.uint8),
            "updates": torch.tensor(ph.updates)}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_a_sharded_snapshot_one_rank_cannot_cast_is_refused_on_every_rank(tmp_path):
    """The casts each rank made for a sharded snapshot are one decision (``findings``): the rank
    whose shard overflows float16 and the one whose shard fits raise the same SnapshotError, and
    no rank enters DCP's save alone."""
    snaps = str(tmp_path / "snaps")
    r0, r1 = run_ranks(_overflow_on_one_rank, tmp_path / "run", 2, snaps, timeout=120, pg_timeout=60)
    assert bool(r0["refused"]) and bool(r1["refused"])
    assert torch.equal(r0["said"], r1["said"])
    assert int(r0["updates"]) == int(r1["updates"]) == 1
    assert not [f for f in os.listdir(snaps) if f.startswith(("snapshot-", ".snapshot-"))]
