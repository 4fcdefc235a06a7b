"""Ranks of a split (``shard_replicas``) average that passed different ``update(step=)``: each folded
its slice with another decay (a schedule over training time), so a gathered read would hand out one
weight made of two different averages. The reads' agreement compares a digest of each rank's host
plan counters (updates, first and last update's step, the schedules) besides the calls: every read is
refused on every rank, at once, naming ``update(step=)``, nothing read or changed. On 2 gloo ranks,
each collective timing out after 30 s; ``update()`` still makes no collective call. The same steps on
every rank read the unsplit average bit for bit."""
from __future__ import annotations

import torch
from dist import Counted, run_ranks
from support import faults
from test_faults_agree import _BOUND_S, _COLLECTIVE_S


def _steps(rank, world, root):
    from fastema.schedules import HalfLife
    from fastema.torch import EMA

    out = {}
    for case in ("same", "constant", "different"):
        m = faults.model()
        decay = 0.9 if case == "constant" else HalfLife(2.0)     # a constant decay reads no step
        ema, ref = EMA(m, decay, shard_replicas=True), EMA(m, decay)
        for s in range(1, 4):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.5 * s)
            step = 10 * s if case == "same" or rank == 0 else s      # "constant": per-rank steps too
            with Counted() as c:
                ema.update(step=step)
            assert not c.calls, c.calls                 # a step stays free of collectives
            ref.update(step=step)
        raw = faults.raw(m)
        if case in ("same", "constant"):          # one average on every rank: read (the review: refused)
            out[case] = (faults.same(ema.full_state_dict(), ref.full_state_dict()),
                         faults.same(dict(ema.iter_weights()), ref.full_state_dict()))
            continue

        def in_block():
            with ema.average_parameters():
                pass

        reads = {"full_state_dict": ema.full_state_dict, "averaged_state_dict": ema.averaged_state_dict,
                 "average_parameters": in_block, "copy_to": ema.copy_to,
                 "iter_weights": lambda: list(ema.iter_weights()),
                 "save": lambda: ema.save(f"{root}/mixed.safetensors")}
        for name, read in reads.items():
            out[name] = (*faults.outcome(read), faults.same(raw, faults.raw(m)) and not ema.swapped)
    return {"cases": out}


def test_ranks_that_passed_different_update_steps_are_refused_at_every_read(tmp_path):
    ranks = run_ranks(_steps, tmp_path, 2, str(tmp_path), timeout=200, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        c = ranks[r]["cases"]
        assert c.pop("same") == (True, True) and c.pop("constant") == (True, True), r
        assert len(c) == 6, (r, c)
        for name, (kind, msg, s, intact) in c.items():
            assert kind == "Disagreement" and "not of one state" in msg, (r, name, kind, msg)
            assert "3 update() calls on every rank" in msg and "different update(step=)" in msg, (r, name, msg)
            assert s < _BOUND_S and intact, (r, name, s)
    assert not (tmp_path / "mixed.safetensors").exists()
