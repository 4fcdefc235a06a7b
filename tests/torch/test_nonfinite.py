"""An average that NaN or inf reached (issue 85 item 2): named at save (a warning, the checkpoint's
``"nonfinite"`` record), refused by name wherever it would be shipped or evaluated (swap, copy_to,
the exports) unless allowed, loaded only when allowed, and reset on the device by
``repair_nonfinite()`` from the live weights: the repaired rows equal a float64 reference of the
live weights in the shadow's dtype, every other tensor and row is untouched bit for bit. The NaN
is planted by an update with the guard off, by a load, and by a real training loop (attached);
``update()`` and an attached ``opt.step()`` make no scan and no host read."""
import io
import os
import re
import warnings

import pytest
import torch
from reference import no_host_reads
from support.attach import batches, net, step
from support.calls import watching
from torch import nn

from fastema._checkpoint_format import to_parts
from fastema.torch import ATTACH_KEY, EMA
from fastema.torch._state.nonfinite import NonFinite
from testkit.fake_gpu import OnAGpu, on_a_gpu_params

NAN = float("nan")


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def moved(m: nn.Module, by: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(by * (i + 1))


def bits(ema) -> dict:
    """Every shadow row of every averaged tensor, as the checkpoint holds it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: t.clone() for n, t in ema.state_dict()["averaged"].items()}


def poisoned(ema, where: dict) -> dict:
    """``ema``'s state with NaN / inf planted at ``where`` (``name -> (row, value)``)."""
    state = ema.state_dict()
    for n, (row, value) in where.items():
        state["averaged"][n][row].view(-1)[1] = value
    return state


PLACEMENTS = {"flat": {}, "two decays": {"decay": [0.9, 0.5]}, "offload": {"offload": "cpu"},
              "bfloat16 shadow": {"shadow_dtype": "bfloat16"}}


def made(placement: str, m=None):
    kw = dict(PLACEMENTS[placement])
    return EMA(model() if m is None else m, kw.pop("decay", 0.9), **kw)


def test_an_update_with_the_guard_off_poisons_the_average_and_every_save_names_it():
    m = model()
    ema = EMA(m, [0.9, 0.5])
    ema.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a clean average: no warning, an empty record
        assert "nonfinite" not in ema.state_dict()     # the checkpoint as it always was
    with torch.no_grad():
        m[2].bias[1] = NAN                             # a diverged step, skip_nonfinite off
    ema.update()
    with pytest.warns(RuntimeWarning, match=r"holds inf or NaN in '2.bias' \(rows 0, 1\).*repair_nonfinite"):
        state = ema.state_dict()
    assert state["nonfinite"] == ["2.bias"]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["nonfinite"] == ["2.bias"]      # in the file
    header, _ = to_parts(state)                        # the one codec: Keras's, the HF callback's files
    assert header["nonfinite"] == ["2.bias"]


READS = {
    "swap": lambda e, tmp, a: e.swap(allow_nonfinite=a),
    "average_parameters": lambda e, tmp, a: e.average_parameters(allow_nonfinite=a).__enter__(),
    "copy_to": lambda e, tmp, a: e.copy_to(allow_nonfinite=a),
    "copy_to another": lambda e, tmp, a: e.copy_to(model(), allow_nonfinite=a),
    "averaged_state_dict": lambda e, tmp, a: e.averaged_state_dict(allow_nonfinite=a),
    "full_state_dict": lambda e, tmp, a: e.full_state_dict(allow_nonfinite=a),
    "save": lambda e, tmp, a: e.save(tmp / "ema.safetensors", allow_nonfinite=a),
}


@pytest.mark.parametrize("placement", ["flat", "offload"])
@pytest.mark.parametrize("read", sorted(READS))
def test_every_read_that_hands_it_out_refuses_it_by_name_until_allowed(tmp_path, read, placement):
    m = model()
    ema = made(placement, m)
    moved(m, 0.5)
    ema.update()
    with pytest.warns(RuntimeWarning, match="allow_nonfinite"):
        ema.load_state_dict(poisoned(ema, {"0.weight": (0, float("inf"))}), allow_nonfinite=True)
    raw = {n: p.clone() for n, p in m.state_dict().items()}
    before = bits(ema)
    with pytest.raises(ValueError, match=r"holds inf or NaN in '0.weight'.*repair_nonfinite\(\).*"
                                         r"allow_nonfinite=True.*Nothing was written"):
        READS[read](ema, tmp_path, None)
    assert not ema.swapped and not os.listdir(tmp_path)
    assert all(torch.equal(raw[n], p) for n, p in m.state_dict().items())
    assert all(torch.equal(before[n], t) for n, t in bits(ema).items())
    READS[read](ema, tmp_path, True)                   # explicitly allowed: it goes on
    if ema.swapped:
        assert torch.isinf(m[0].weight).any()
        ema.swap()
    ema.allow_nonfinite = True                         # the face's setting: every call
    ema.averaged_state_dict()
    ema.allow_nonfinite = False
    with pytest.raises(ValueError, match="'0.weight'"):
        ema.iter_weights()


def test_a_row_that_holds_none_is_handed_out_and_the_module_copy_and_stream_refuse_the_other():
    m = model()
    ema = EMA(m, [0.9, 0.5])
    ema.load_state_dict(poisoned(ema, {"2.weight": (1, NAN)}), allow_nonfinite=True)
    with ema.average_parameters(0):                    # row 0 is finite
        pass
    assert torch.isfinite(ema.averaged_state_dict(0)["2.weight"]).all()
    for read in (lambda: ema.module(1), lambda: list(ema.iter_weights(1)), lambda: ema.swap(1)):
        with pytest.raises(ValueError, match=r"average 1 holds inf or NaN in '2.weight'"):
            read()


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_repair_resets_the_poisoned_rows_from_the_live_weights_and_nothing_else(placement):
    m = model()
    ema = made(placement, m)
    for by in (0.25, -0.5):
        moved(m, by)
        ema.update()
    assert ema.repair_nonfinite() == []                # nothing to repair: nothing changes
    last = ema.rows - 1
    with pytest.warns(RuntimeWarning):
        ema.load_state_dict(poisoned(ema, {"0.bias": (last, NAN), "2.weight": (0, float("-inf"))}),
                            allow_nonfinite=True)
    before = bits(ema)
    moved(m, 3.0)                                      # the live weights: what the repair takes
    live = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    assert ema.repair_nonfinite() == ["0.bias", "2.weight"]
    after = bits(ema)
    dtype = before["0.bias"].dtype
    for n in after:
        for r in range(ema.rows):
            if (n, r) in (("0.bias", last), ("2.weight", 0)):
                assert torch.equal(after[n][r], live[n].to(dtype)), (n, r)     # float64 -> the shadow's dtype
            else:
                assert torch.equal(after[n][r], before[n][r]), (n, r)        # bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "nonfinite" not in ema.state_dict()
    with ema.average_parameters():                     # repaired: handed out again
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_load_refuses_a_poisoned_average_by_name_writes_nothing_and_offers_the_repair():
    m = model()
    ema = EMA(m, 0.9)
    state = poisoned(ema, {"2.bias": (0, NAN)})
    moved(m, 1.0)
    ema.update()
    before, calls = bits(ema), ema.calls
    with pytest.raises(ValueError, match=r"averaged '2.bias' holds inf or NaN\. To load it all the same "
                                         r"and repair it, pass allow_nonfinite=True.*repair_nonfinite\(\).*"
                                         r"Nothing was loaded"):
        ema.load_state_dict(state)
    assert ema.calls == calls and all(torch.equal(before[n], t) for n, t in bits(ema).items())
    ema.allow_nonfinite = True                         # a load another library makes (dcp.load, callbacks)
    with pytest.warns(RuntimeWarning, match=r"'2.bias'.*repair_nonfinite"):
        ema.load_state_dict(state)
    assert not torch.isfinite(bits(ema)["2.bias"]).all()
    assert ema.repair_nonfinite() == ["2.bias"]


@pytest.mark.parametrize("skip", [False, True], ids=["default", "skip_nonfinite"])
def test_a_load_refuses_a_copied_buffer_holding_nan_by_name_and_writes_nothing(skip):
    """A checkpoint's copied buffer (a batch norm's running_var) holding NaN loaded: average_parameters()
    then put it in the model and save() wrote it, where skip_nonfinite skips such a buffer at every
    update. Refused as a poisoned average is; allowed, it loads, and an update copies the model's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    m(torch.randn(8, 5))                                # running stats of their own
    ema = EMA(m, 0.9, skip_nonfinite=skip)
    ema.update()
    state = ema.state_dict()
    state["copied"] = {k: v.clone() for k, v in state["copied"].items()}
    state["copied"]["1.running_var"].fill_(NAN)
    before = {k: v.clone() for k, v in ema.state_dict()["copied"].items()}
    with pytest.raises(ValueError, match=r"copied '1.running_var' holds inf or NaN where the model's is finite\. "
                                         r"To load it all the same, pass allow_nonfinite=True .*the next update\(\) "
                                         r"copies the model's buffer over it\. Nothing was loaded"):
        ema.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict()["copied"].items())
    ema.load_state_dict(state, allow_nonfinite=True)
    assert ema.state_dict()["copied"]["1.running_var"].isnan().all()
    ema.update()
    assert torch.equal(ema.state_dict()["copied"]["1.running_var"], m[1].running_var)


def test_a_copied_buffer_that_holds_inf_by_design_saves_and_loads():
    """A buffer that holds -inf where the model's does (a causal mask) is the model's, not poison:
    the checkpoint fastema wrote of it loads."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3))
    m.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), diagonal=1))
    ema = EMA(m, 0.9)
    ema.update()
    state = ema.state_dict()
    assert state["copied"]["mask"].isinf().any()
    EMA(m, 0.9).load_state_dict(state)
    state["copied"] = {"mask": torch.zeros(3, 3).fill_(NAN)}
    with pytest.raises(ValueError, match=r"copied 'mask' holds inf or NaN where the model's is finite"):
        EMA(m, 0.9).load_state_dict(state)


def test_update_makes_no_scan_and_no_host_read_with_a_poisoned_average():
    m = model()
    ema = EMA(m, 0.9)
    ema.load_state_dict(poisoned(ema, {"0.weight": (0, NAN)}), allow_nonfinite=True)

    def scanned(_):
        raise AssertionError("a non-finite scan in update()")

    with no_host_reads(), watching(NonFinite.local, on_call=scanned):
        for _ in range(3):
            ema.update()
    assert ema.updates == 3


@pytest.mark.parametrize("where", on_a_gpu_params())
def test_on_a_gpu_the_attached_step_syncs_nothing_with_a_poisoned_average(where):
    with OnAGpu(where) as gpu:
        a = net().to(gpu.device)
        opt = torch.optim.SGD(a.parameters(), lr=0.1)
        ema = EMA(a, 0.9).attach(opt)
        step(a, opt, batches(1)[0].to(gpu.device))
        ema.load_state_dict(poisoned(ema, {"0.weight": (0, NAN)}), allow_nonfinite=True)
        xs = [x.to(gpu.device) for x in batches(3)]
        calls = ema.calls
        with gpu.no_sync(), no_host_reads(), watching(NonFinite.local, on_call=lambda _: 1 / 0):
            for x in xs:
                step(a, opt, x)
        assert ema.calls == calls + 3


def test_a_training_loop_that_diverges_poisons_the_attached_average_and_is_repaired():
    """A real loop: SGD with the average attached (guard off); a NaN batch diverges the weights and
    the average; every save names it, the resume refuses it until allowed, and the repair after the
    weights are restored gives an average that the next steps keep finite."""
    a = net()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    ema = EMA(a, 0.8).attach(opt)
    xs = batches(6)
    for x in xs[:3]:
        step(a, opt, x)
    good = {n: p.clone() for n, p in a.state_dict().items()}
    with no_host_reads(), watching(NonFinite.local, on_call=lambda _: 1 / 0):
        step(a, opt, torch.full_like(xs[3], NAN))     # the step and its update: no scan, no host read
    assert ema.calls == 4 and not all(torch.isfinite(p).all() for p in a.parameters())
    with pytest.warns(RuntimeWarning, match="holds inf or NaN in '0.weight', '0.bias', '2.weight', '2.bias'"):
        saved = opt.state_dict()
    assert saved[ATTACH_KEY]["nonfinite"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    b = net(seed=1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    ema_b = EMA(b, 0.8).attach(opt_b)
    with pytest.raises(ValueError, match="allow_nonfinite=True.*repair_nonfinite"):
        opt_b.load_state_dict(saved)                   # the resume: refused, nothing loaded
    assert ema_b.calls == 0
    ema_b.allow_nonfinite = True
    with pytest.warns(RuntimeWarning, match="allow_nonfinite"):
        opt_b.load_state_dict(saved)
    b.load_state_dict(good)                            # the last good weights back
    assert ema_b.repair_nonfinite() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    ema_b.allow_nonfinite = False
    ref = {n: good[n].double() for n in good}
    for x in xs[4:]:
        step(b, opt_b, x)
        for n, p in b.named_parameters():
            ref[n] = 0.8 * ref[n] + 0.2 * p.detach().double()
    for n, t in ema_b.averaged_state_dict().items():
        torch.testing.assert_close(t.double(), ref[n], rtol=0, atol=1e-6)


def _one_rank_poisoned(rank, world):
    """A split average (shard_replicas) and an FSDP2 one, each with inf/NaN in rank 1's part only:
    every read that hands it out is refused on every rank (never on one alone: the other would go on
    into its next collective), and the repair is agreed: every rank returns the same names and
    resets its part of them."""
    from torch.distributed.fsdp import fully_shard

    out = {}

    def refused_everywhere(ema, reads, name):
        for read in reads:
            with pytest.raises(ValueError, match=f"inf or NaN in '{name}'"):
                read()
        assert not ema.swapped

    torch.manual_seed(0)
    m = nn.Linear(4, 4)                      # 20 float32: rank 0 keeps weight[:8], rank 1 the rest and the bias
    ema = EMA(m, 0.5, shard_replicas=True)
    kept = m.bias.detach().clone()
    with torch.no_grad():
        m.bias[2] = NAN if rank == 1 else m.bias[2]
    ema.update()                             # rank 1's slice holds the NaN, rank 0's none
    with torch.no_grad():
        m.bias.copy_(kept - 1.0)             # the live weights, alike on every rank
    refused_everywhere(ema, (ema.swap, ema.averaged_state_dict, ema.full_state_dict, ema.copy_to), "bias")
    assert ema.repair_nonfinite() == ["bias"]
    full = ema.full_state_dict()
    out["split bias"], out["split live"] = full["bias"], m.bias.detach().clone()

    torch.manual_seed(1)
    sharded = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(sharded)
    ema = EMA(sharded, 0.5)
    local = sharded[0].weight.to_local()     # rows 0-1 on rank 0, rows 2-3 on rank 1
    kept = local.detach().clone()
    with torch.no_grad():
        local[0, 0] = float("inf") if rank == 1 else local[0, 0]
    ema.update()
    with torch.no_grad():
        local.copy_(kept + 1.0)
    refused_everywhere(ema, (ema.swap, ema.averaged_state_dict, ema.full_state_dict), "0.weight")
    assert ema.repair_nonfinite() == ["0.weight"]
    full = ema.full_state_dict()
    out["fsdp2 weight"], out["fsdp2 live"] = full["0.weight"], sharded[0].weight.full_tensor().detach()
    with ema.average_parameters():
        pass
    return out


def test_a_nan_on_one_rank_is_refused_on_every_rank_and_the_repair_is_agreed(tmp_path):
    from dist import run_ranks

    for r in run_ranks(_one_rank_poisoned, tmp_path, 2, pg_timeout=60.0):
        assert torch.equal(r["split bias"], r["split live"])
        assert torch.equal(r["fsdp2 weight"][2:], r["fsdp2 live"][2:])       # rank 1's rows: the live weights
        assert torch.isfinite(r["fsdp2 weight"]).all()


def test_the_guide_example_runs(capsys):
    import pathlib

    text = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "nonfinite.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "nonfinite.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("['0.bias']") == 2 and "EMA.average_parameters(): the average holds inf or NaN in '0.bias'" in out


def test_a_poisoned_average_rolls_back_to_a_finite_dcp_checkpoint(tmp_path):
    """The rollback after a loss spike: dcp.load of the last good checkpoint into the average NaN
    reached. DCP fills the template state_dict() gives it and refuses a key the checkpoint lacks:
    the record of the poisoned average is no key of that template."""
    import torch.distributed.checkpoint as dcp

    m = model()
    ema = EMA(m, 0.9)
    ema.update()
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    good = bits(ema)
    ema.load_state_dict(poisoned(ema, {"2.bias": (0, NAN)}), allow_nonfinite=True)
    with pytest.warns(RuntimeWarning, match="'2.bias'"):         # named all the same
        dcp.load({"ema": ema}, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    assert all(torch.equal(good[n], t) for n, t in bits(ema).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "nonfinite" not in ema.state_dict()


@pytest.mark.parametrize("shadow, entry", [("float32", torch.full((3,), 1e300, dtype=torch.float64)),
                                           ("float16", torch.full((3,), 1e5))])
def test_a_load_checks_finiteness_as_the_value_lands_in_the_average(shadow, entry):
    """An entry finite in its own dtype but past the average's (float64 1e300 into a float32 average,
    float32 1e5 into a float16 one) landed as inf, unnamed: it is refused by name as what it is, nothing
    written, with the way to load it and repair it; allowed, it loads with the warning."""
    ema = EMA(model(), 0.9, shadow_dtype=shadow)
    state = ema.state_dict()
    state["averaged"]["2.bias"] = entry.reshape(1, 3)
    before = bits(ema)
    with pytest.raises(ValueError, match=r"checkpoint's averaged '2.bias' holds inf or NaN as it lands "
                                         rf"\('2.bias' finite in the checkpoint but past the range of the "
                                         rf"average's {shadow}: inf once converted\)\. To load it all the "
                                         r"same and repair it, pass allow_nonfinite=True .*repair_nonfinite"):
        ema.load_state_dict(state)
    assert all(torch.equal(before[n], t) for n, t in bits(ema).items())
    with pytest.warns(RuntimeWarning, match="'2.bias' \\(allow_nonfinite\\)"):
        ema.load_state_dict(state, allow_nonfinite=True)
    assert ema.repair_nonfinite() == ["2.bias"]


def test_a_refusal_names_the_call_the_user_made():
    """A refused average_parameters() said swap() (the call it makes inside)."""
    m = model()
    ema = EMA(m, 0.9)
    with torch.no_grad():
        m[0].bias[0] = NAN
    ema.update()
    for call, refused in (("average_parameters()", lambda: ema.average_parameters().__enter__()),
                          ("swap()", ema.swap), ("copy_to()", ema.copy_to)):
        with pytest.raises(ValueError, match=rf"^EMA\.{re.escape(call)}: the average holds inf or NaN in "
                                             r"'0.bias'"):
            refused()
        assert not ema.swapped
