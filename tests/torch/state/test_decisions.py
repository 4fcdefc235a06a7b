"""The ranks' decisions that are no read (``fastema/torch/_state/agree.py``: ``findings``,
``refuse_together``, ``decided``; issue 72): a rank that refuses makes every rank raise the same
error, in a refused read's words, of the type the caller's callers catch, and the next decision of
every rank works (no rank left in a collective)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks

from fastema.torch._state.agree import Disagreement, decided, findings, refuse_together


def test_refuse_together_names_the_lowest_refusing_rank_in_a_refused_reads_words():
    refuse_together("the check", [None, None, None])              # nobody refused: nothing raised
    with pytest.raises(Disagreement) as got:
        refuse_together("the check", [None, "disk full", "gone"])
    assert str(got.value) == ("the check refused on rank 1 (its global rank), so on every rank: "
                              "disk full")
    assert isinstance(got.value, ValueError)                      # except ValueError catches it
    with pytest.raises(OSError, match="refused on rank 0 .*: no space"):
        refuse_together("the DCP snapshot", ["no space"], OSError)


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
