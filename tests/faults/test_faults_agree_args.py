"""A bad argument or another row on one rank of a split (``shard_replicas``) average: refused inside the
read's agreement, so every rank raises at once, naming it (never the other ranks left in the
agreement's all-gather until the process group's timeout). On 2 gloo ranks, each collective timing
out after 30 s and each refusal bounded far below that:

- ``swap(1)`` on rank 0 while row 0 is in, ``swap(0)`` (back) on rank 1;
- ``allow_nonfinite="no"`` on rank 0, every read that takes it (``NonFinite.allowing``);
- ``copy_to("not a model")`` on rank 0, ``copy_to(model)`` on rank 1.

Nothing is read or changed, and the same read on both ranks works afterwards, bit for bit against the
unsplit average. Where the average has no group the same refusals are raised at once, as before.
"""
from __future__ import annotations

import pytest
from dist import run_ranks
from support import faults
from test_faults_agree import _BOUND_S, _COLLECTIVE_S, _trained


def _one_rank_refuses(rank, world, root):
    m, ema, ref = _trained()
    raw, state = faults.raw(m), ema.state_dict()
    with ref.average_parameters(0):
        averaged = faults.raw(m)
    out = {}
    ema.swap(0)
    out["swap row"] = (*faults.outcome(lambda: ema.swap(1 if rank == 0 else 0), causes=True),
                       faults.same(averaged, faults.raw(m)))
    ema.swap(0)                                          # every rank: the raw weights back
    out["back"] = (faults.same(raw, faults.raw(m)), ema.swapped)

    def in_block():
        with ema.average_parameters(allow_nonfinite=bad):
            pass

    bad = "no" if rank == 0 else None
    reads = {"full_state_dict": lambda: ema.full_state_dict(allow_nonfinite=bad),
             "averaged_state_dict": lambda: ema.averaged_state_dict(allow_nonfinite=bad),
             "copy_to": lambda: ema.copy_to(allow_nonfinite=bad),
             "swap": lambda: ema.swap(allow_nonfinite=bad),
             "average_parameters": in_block,
             "save": lambda: ema.save(f"{root}/allow.safetensors", allow_nonfinite=bad),
             "load_state_dict": lambda: ema.load_state_dict(state, allow_nonfinite=bad)}
    for name, read in reads.items():
        out[f"allow {name}"] = (*faults.outcome(read), faults.same(raw, faults.raw(m)) and not ema.swapped)
    export = faults.model()
    exported = faults.raw(export)
    out["copy_to model"] = (*faults.outcome(lambda: ema.copy_to("not a model" if rank == 0 else export)),
                            faults.same(exported, faults.raw(export)))
    return {"cases": out, "after": (faults.same(ema.full_state_dict(1), ref.full_state_dict(1)),
                                    ema._checkpoint.agreement.sequence.count)}


def test_a_bad_argument_or_another_row_on_one_rank_is_refused_on_every_rank_at_once(tmp_path):
    ranks = run_ranks(_one_rank_refuses, tmp_path, 2, str(tmp_path), timeout=200, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        c = ranks[r]["cases"]
        kind, msg, s, intact = c["swap row"]
        assert s < _BOUND_S and intact, (r, s, msg)
        assert "average 0 is swapped in; swap it back first (swap(0))" in msg, (r, msg)
        assert kind == "RuntimeError", (r, kind)
        assert r == 0 or ("different reads" in msg and "EMA.swap() back of row 1 on rank 0" in msg), (r, msg)
        assert c["back"] == (True, False), r
        for name in [k for k in c if k.startswith("allow ")] + ["copy_to model"]:
            kind, msg, s, intact = c[name]
            want = "allow_nonfinite must be True, False or None, got 'no'" if name.startswith("allow") \
                else "model must be a torch.nn.Module, got str"
            assert kind == ("TypeError" if r == 0 else "Disagreement"), (r, name, kind, msg)
            assert want in msg and (r == 0 or "refused on rank 0" in msg), (r, name, msg)
            assert s < _BOUND_S and intact, (r, name, s)
        assert ranks[r]["after"][0], r
    assert ranks[0]["after"][1] == ranks[1]["after"][1]       # the sequence numbers advanced alike
    assert not (tmp_path / "allow.safetensors").exists()


def test_without_a_group_the_same_refusals_are_raised_at_once():
    from fastema.torch import EMA

    m = faults.model()
    ema = EMA(m, [0.5, 0.9])
    ema.update()
    raw = faults.raw(m)
    for read in (lambda: ema.swap(allow_nonfinite="no"), lambda: ema.full_state_dict(allow_nonfinite=1),
                 lambda: ema.copy_to(allow_nonfinite="no")):
        with pytest.raises(TypeError, match="allow_nonfinite must be True, False or None"):
            read()
        assert faults.same(raw, faults.raw(m)) and not ema.swapped
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        ema.copy_to("not a model")
    ema.swap(0)
    with pytest.raises(RuntimeError, match=r"average 0 is swapped in; swap it back first \(swap\(0\)\)"):
        ema.swap(1)
    ema.swap(0)
    assert faults.same(raw, faults.raw(m)) and not ema.swapped


def _sharded_refuses(rank, world, root):
    from models import fsdp_mlp

    from fastema.torch import EMA

    m = fsdp_mlp(6, 8, 3)
    ema = EMA(m, 0.5)
    ema.update()
    ema.allow_nonfinite = True                 # no check of its own: rank 0's bad argument made no agreement,
    raw = faults.raw(m)                        # while rank 1's False checked over the mesh, and waited
    bad = "no" if rank == 0 else False
    return {"swap": (*faults.outcome(lambda: ema.swap(allow_nonfinite=bad)),
                     faults.same(raw, faults.raw(m)) and not ema.swapped)}


def test_a_bad_argument_on_one_rank_of_a_sharded_average_that_allows_nonfinite_is_refused_on_every_rank(tmp_path):
    ranks = run_ranks(_sharded_refuses, tmp_path, 2, str(tmp_path), timeout=200, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        kind, msg, s, intact = ranks[r]["swap"]
        assert kind == ("TypeError" if r == 0 else "Disagreement"), (r, kind, msg)
        assert "allow_nonfinite must be True, False or None, got 'no'" in msg, (r, msg)
        assert s < _BOUND_S and intact, (r, s)
