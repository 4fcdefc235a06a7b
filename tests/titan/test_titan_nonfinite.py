"""fastema.torchtitan.EMA with a copy that NaN reached (issue 85 item 2): named at every save (a
warning, the state dict's ``"nonfinite"`` entry), refused by ``export_hf`` and
``averaged_state_dict()`` by name unless allowed, loaded only when allowed, repaired from the live
weights by ``repair_nonfinite()`` (the repaired copies equal the live weights in the copy's dtype,
every other copy bit for bit), a rollback by ``dcp.load`` into it; on 2 FSDP2 ranks with the NaN in
one rank's shard, every rank refuses alike and the repair is agreed."""
import logging
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("torchtitan")

from test_titan_checkpoint import _ours, _rows, _trained  # noqa: E402

from fastema.torchtitan import STATE_KEY, export_hf  # noqa: E402

NAN = float("nan")


def _poisoned(offload=False):
    """A trained EMA whose firing at step 7 read a NaN in ``out.bias`` (put back after it)."""
    model, ema = _trained(lambda m: _ours(m, offload))
    kept = model.out.bias.detach().clone()
    with torch.no_grad():
        model.out.bias[1] = NAN
        ema.step(7)
        model.out.bias.copy_(kept)
    return model, ema


@pytest.mark.parametrize("offload", [False, True])
def test_a_nan_copy_is_named_at_save_refused_at_export_and_repaired_from_the_live_weights(tmp_path, offload):
    model, ema = _poisoned(offload)
    with pytest.warns(RuntimeWarning, match=r"copies \['decay_0p9', 'half_life_0p25'\] hold inf or NaN in "
                                            r"'out.bias'.*repair_nonfinite"):
        state = ema.state_dict()
    assert state["nonfinite"] == ["out.bias"]
    for read in (lambda: export_hf(ema, tmp_path / "hf", "decay_0p9"),
                 lambda: ema.averaged_state_dict("half_life_0p25")):
        with pytest.raises(ValueError, match=r"holds inf or NaN in 'out.bias'.*repair_nonfinite\(\).*"
                                             r"allow_nonfinite=True.*Nothing was written"):
            read()
    assert not (tmp_path / "hf").exists()
    assert os.path.isfile(export_hf(ema, tmp_path / "hf", "decay_0p9", allow_nonfinite=True))
    ema.averaged_state_dict("half_life_0p25", allow_nonfinite=True)
    before = _rows(ema)
    with torch.no_grad():
        model.out.bias.add_(2.0)                       # the live weights the repair takes
    assert ema.repair_nonfinite() == ["out.bias"]
    after = _rows(ema)
    for (name, key), value in after.items():
        if name == "out.bias":
            assert torch.equal(value, model.out.bias.double().to(value.dtype)), key
        else:
            assert torch.equal(value, before[(name, key)]), (name, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "nonfinite" not in ema.state_dict()
    export_hf(ema, tmp_path / "fine", "decay_0p9")


def test_a_load_of_a_nan_copy_is_refused_unless_allowed_and_a_rollback_loads_into_one(tmp_path, caplog):
    _, good = _trained(_ours)
    dcp.save({STATE_KEY: good}, checkpoint_id=str(tmp_path / "good"))
    _, ema = _poisoned()
    with pytest.warns(RuntimeWarning):
        state = {k: v for k, v in ema.state_dict().items() if k != "nonfinite"}
    _, fresh = _trained(_ours, steps=2)
    kept = _rows(fresh)
    with pytest.raises(ValueError, match=r"out.bias.ema_params.half_life_0p25 holds inf or NaN\. To load it all the "
                                         r"same and repair it, pass allow_nonfinite=True .*then call "
                                         r"repair_nonfinite\(\)"):
        fresh.load_state_dict(state)
    assert all(torch.equal(kept[k], v) for k, v in _rows(fresh).items())
    with caplog.at_level(logging.WARNING, "fastema.torchtitan._ema"):
        fresh.load_state_dict(state, allow_nonfinite=True)
    assert "allow_nonfinite" in caplog.text and "repair_nonfinite" in caplog.text
    dcp.load({STATE_KEY: ema}, checkpoint_id=str(tmp_path / "good"))    # the rollback: its template has
    assert all(torch.equal(_rows(good)[k], v) for k, v in _rows(ema).items())   # no key the checkpoint lacks
    ema.allow_nonfinite = True                         # dcp.load's own load: the face's setting
    dcp.save({STATE_KEY: fresh}, checkpoint_id=str(tmp_path / "bad"))
    dcp.load({STATE_KEY: ema}, checkpoint_id=str(tmp_path / "bad"))
    assert ema.repair_nonfinite() == ["out.bias"]


def _one_rank(rank: int, world: int, folder: str) -> dict:
    """FSDP2: a NaN in rank 1's shard of the norm's weight, read by a firing: export_hf and
    averaged_state_dict refused on both ranks alike; the repair agreed (the same names on both)."""
    from titan_train import Tiny
    from torch.distributed.fsdp import fully_shard

    from fastema.torchtitan import EMA

    model = Tiny()
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    ema = EMA.Config(decays=[0.5]).build(model_parts=[model])
    local = model.norm.weight._local_tensor
    kept = local.detach().clone()
    with torch.no_grad():
        if rank == 1:
            local[0] = NAN
        ema.step(1)
        local.copy_(kept)
    for read in (lambda: export_hf(ema, folder), ema.averaged_state_dict):
        with pytest.raises(ValueError, match="holds inf or NaN in 'norm.weight'"):
            read()
    assert ema.repair_nonfinite() == ["norm.weight"]
    export_hf(ema, folder)
    full = ema.averaged_state_dict()["norm.weight"].full_tensor()
    return {"norm": full, "live": model.norm.weight.full_tensor().detach()}


def test_fsdp2_a_nan_in_one_ranks_shard_is_refused_on_every_rank_and_repaired_on_each(tmp_path):
    from dist import run_ranks

    for r in run_ranks(_one_rank, tmp_path, 2, str(tmp_path / "hf"), pg_timeout=60.0):
        assert torch.equal(r["norm"], r["live"])
