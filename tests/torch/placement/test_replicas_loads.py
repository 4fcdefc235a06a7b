"""``dcp.load`` into a split (``shard_replicas=True``) average of a checkpoint saved by an average that
is not split: an unsplit one, an offloaded one, an FSDP2 one (docs/guides/large_models.md, "dcp.load
fills them from a checkpoint saved on any number of ranks, split or not (or from an FSDP2 one)"). On 2
gloo ranks (tests/dist.py): the split average loaded reads the saved average bit for bit, both rows,
and goes on as it does; ranks loading different saves still refuse alike, at once (the counters'
digest: a split average's ``dcp.load`` template has no ``split_id``, which such saves lack)."""
from __future__ import annotations

import os

import torch
from dist import run_ranks
from support import faults

_COLLECTIVE_S = 30.0       # every collective's timeout here: a hang is an error, fast
_BOUND_S = 10.0            # a refusal reaches every rank within this


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.ReLU(), torch.nn.Linear(13, 3))


def _step(model, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.37 + step + i).view_as(p) * 0.1)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.detach().flatten().float() for v in state.values()])


def _into_split(rank, world, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from fastema.torch import EMA

    out = {}
    for case in ("unsplit", "offloaded", "fsdp2"):
        model = _model()
        if case == "fsdp2":
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        saved = EMA(model, [0.9, 0.5], offload="cpu" if case == "offloaded" else None)
        for s in range(5):
            if case == "fsdp2":
                model(torch.ones(2, 7)).square().mean().backward()
                torch.optim.SGD(model.parameters(), lr=0.1).step()
                model.zero_grad()
            else:
                _step(model, s)
            saved.update()
        path = os.path.join(folder, case)
        dcp.save({"ema": saved}, checkpoint_id=path)
        split = EMA(_model(), [0.9, 0.5], shard_replicas=True)
        kind, msg, _ = faults.outcome(lambda: dcp.load({"ema": split}, checkpoint_id=path))
        out[case] = (kind, msg[:300], split.updates == saved.updates == 5)
        if kind == "ok":
            for row in (0, 1):
                out[f"{case} {row}"] = _flat(split.full_state_dict(row))
                out[f"{case} {row} want"] = _flat(saved.full_state_dict(row))
    # ranks loading different saves (the same update() count, other decays): refused on every rank
    model = _model()
    for case, decay in (("a", [0.9, 0.5]), ("b", [0.9, 0.6])):
        saved = EMA(model, decay)
        for s in range(3):
            _step(model, s)
            saved.update()
        dcp.save({"ema": saved}, checkpoint_id=os.path.join(folder, f"other_{case}"))
    split = EMA(_model(), [0.9, 0.5], shard_replicas=True)
    before = _flat(split.full_state_dict())
    out["different saves"] = faults.outcome(
        lambda: dcp.load({"ema": split}, checkpoint_id=os.path.join(folder, "other_" + "ab"[rank])))
    out["nothing loaded"] = (split.updates == 0 and torch.equal(_flat(split.full_state_dict()), before),)
    return out


def test_dcp_load_fills_a_split_average_from_an_unsplit_offloaded_or_fsdp2_save(tmp_path):
    ranks = run_ranks(_into_split, tmp_path / "run", 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        got = ranks[r]
        for case in ("unsplit", "offloaded", "fsdp2"):
            assert got[case] == ("ok", "", True), (r, case, got[case])
            for row in (0, 1):
                assert torch.equal(got[f"{case} {row}"], got[f"{case} {row} want"]), (r, case, row)
        kind, msg, s = got["different saves"]
        assert kind == "Disagreement" and "other counters differ" in msg, (r, kind, msg)
        assert s < _BOUND_S, (r, s)
        assert got["nothing loaded"] == (True,), r
