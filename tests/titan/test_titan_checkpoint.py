"""fastema.torchtitan.EMA in torchtitan's checkpoints: main's keys (``ema.state.<fqn>.ema_params.<key>``,
padding hidden) written through DCP and read by main's EMA (``titan_upstream.MainEMA``), main's read by
fastema's, bit for bit; a cold start from a checkpoint without the EMA; a load that is refused writes
nothing; one copy exported to a Hugging Face folder by key (as main's convert_ema_to_hf.py)."""
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

pytest.importorskip("torchtitan")

from titan_upstream import MainEMA, PaddedLinear  # noqa: E402

from fastema.torchtitan import EMA, STATE_KEY, export_hf  # noqa: E402

CFG = dict(decays=[0.9], half_life_fractions=[0.25], start_step=1, buffer_patterns=["scale$"])
KEYS = ["decay_0p9", "half_life_0p25"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.qkv = PaddedLinear(5, num_real=6, num_padded=8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


# a load refused for inf or NaN alone says how to load it all the same and repair it: the torch face's words
ADVICE = re.escape("To load it all the same and repair it, pass allow_nonfinite=True (or set ema.allow_nonfinite = "
                   "True before a load another library makes: dcp.load, torchtitan's CheckpointManager), then "
                   "call repair_nonfinite(), which resets those tensors from the live weights.") + "$"

def _trained(make, steps=6):
    """A model and its EMA (``make(model)``) after ``steps`` deterministic steps (padding rows left at 0)."""
    model = Net()
    ema = make(model)
    with torch.no_grad():
        for step in range(1, steps + 1):
            model.qkv.weight[:6].add_(0.1 * step)
            model.out.weight.mul_(0.9).add_(0.01 * step)
            model.out.bias.sub_(0.05)
            model.scale.mul_(1.1)
            ema.step(step)
    return model, ema


def _ours(model, offload=False):
    return EMA.Config(**CFG, offload_to_cpu=offload).build(model_parts=[model])


def _mains(model):
    return MainEMA([model], **CFG)


def _rows(ema: EMA) -> dict:
    return {(t.fqn, k): ema.shadow.view(t.fqn, r).clone() for t in ema.tracked for r, k in enumerate(ema.keys)}


@pytest.mark.parametrize("offload", [False, True])
def test_fastemas_checkpoint_has_mains_keys_and_resumes_in_mains_ema_bit_for_bit(tmp_path, offload):
    _, ours = _trained(lambda m: _ours(m, offload))
    sd = ours.state_dict()
    assert set(sd) == {f"state.{n}.ema_params.{k}" for n in ("qkv.weight", "out.weight", "out.bias", "scale")
                       for k in KEYS}
    assert sd["state.qkv.weight.ema_params.decay_0p9"].shape == (6, 5)      # the padding hidden
    dcp.save({STATE_KEY: ours}, checkpoint_id=str(tmp_path))
    keys = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert set(keys) == {f"ema.{k}" for k in sd}
    main = _mains(Net())
    dcp.load({STATE_KEY: main}, checkpoint_id=str(tmp_path))
    for (fqn, key), value in _rows(ours).items():
        assert torch.equal(main.copy(key)[fqn], value), (fqn, key)      # padding rows: zeros both sides


@pytest.mark.parametrize("offload", [False, True])
def test_mains_checkpoint_resumes_in_fastema_bit_for_bit(tmp_path, offload):
    _, main = _trained(_mains)
    dcp.save({STATE_KEY: main}, checkpoint_id=str(tmp_path))
    assert "ema.state.qkv.weight.ema_params.half_life_0p25" in \
        dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    ours = _ours(Net(), offload)
    dcp.load({STATE_KEY: ours}, checkpoint_id=str(tmp_path))
    for (fqn, key), value in _rows(ours).items():
        assert torch.equal(main.copy(key)[fqn], value), (fqn, key)


def test_a_direct_load_is_checked_whole_and_an_empty_one_cold_starts():
    _, main = _trained(_mains)
    model, ours = _trained(_ours, steps=2)
    before = _rows(ours)
    state = main.state_dict()
    bad = dict(state)
    bad["state.out.bias.ema_params.decay_0p9"] = torch.full((3,), float("nan"))
    del bad["state.scale.ema_params.half_life_0p25"]
    bad["state.out.weight.ema_params.decay_0p9"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"nothing was written\): state.out.weight.ema_params.decay_0p9 has shape "
                                         r"\(2, 2\), expected \(3, 8\); state.out.bias.ema_params.decay_0p9 holds inf "
                                         r"or NaN; state.scale.ema_params.half_life_0p25 is missing"):
        ours.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in _rows(ours).items())
    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}      # (torch's bare .item() error)
    with pytest.raises(ValueError, match="decay_0p9 is a meta tensor, which holds no values"):
        ours.load_state_dict(meta)
    for not_a_dict in (None, []):                 # (taken for a checkpoint without the EMA: a cold start)
        with pytest.raises(ValueError, match=f"takes the dict state_dict\\(\\) gave.*got {type(not_a_dict).__name__}"):
            ours.load_state_dict(not_a_dict)
        assert all(torch.equal(v, before[k]) for k, v in _rows(ours).items())
    ours.load_state_dict({**state, "state.other.ema_params.decay_0p5": torch.zeros(1)})   # another's key: ignored
    assert all(torch.equal(v, main.copy(k)[n]) for (n, k), v in _rows(ours).items())
    ours.load_state_dict({})                                                              # cold start
    for t in ours.tracked:
        for r in range(2):
            assert torch.equal(ours.shadow.view(t.fqn, r), t.local)


@pytest.mark.parametrize("offload", [False, True])
def test_an_inf_or_nan_dcp_load_wrote_in_place_is_refused_by_name_saying_the_copies_hold_it(tmp_path, offload):
    """review 9 L-7: dcp.load fills state_dict()'s views in place, then calls load_state_dict, which skipped the
    check for those entries. They are checked now; the error says what the copies hold (the checkpoint's
    values, NaN included: dcp.load wrote them) and what to do."""
    _, saved = _trained(lambda m: _ours(m, offload))
    with torch.no_grad():
        saved.shadow.view("out.bias", 0)[1] = float("nan")
        saved.shadow.view("scale", 1)[0] = float("inf")
        saved.shadow.view("qkv.weight", 0)[2, 3] = float("nan")     # padded: dcp.load fills the stripped view
    dcp.save({STATE_KEY: saved}, checkpoint_id=str(tmp_path))
    _, ours = _trained(lambda m: _ours(m, offload), steps=2)
    with pytest.raises(ValueError, match=r"not loaded: state.qkv.weight.ema_params.decay_0p9; "
                                         r"state.out.bias.ema_params.decay_0p9; "
                                         r"state.scale.ema_params.half_life_0p25 hold inf or NaN, and they are "
                                         r"this EMA's copies, which dcp.load had already written in place .* "
                                         r"the copies now hold the checkpoint's values .* inf and NaN included"
                                         r".*: load a checkpoint whose EMA is finite, or call "
                                         r"load_state_dict\(\{\}\) to start every copy afresh from the weights\. "
                                         + ADVICE):
        dcp.load({STATE_KEY: ours}, checkpoint_id=str(tmp_path))
    for k, v in _rows(ours).items():                  # what the error says: the checkpoint's values
        torch.testing.assert_close(v, _rows(saved)[k], rtol=0, atol=0, equal_nan=True)
    ours.load_state_dict({})                           # the way out it names
    assert all(bool(torch.isfinite(v).all()) for v in _rows(ours).values())
    own = ours.state_dict()                            # its own views, one entry replaced: that one not written
    own["state.out.bias.ema_params.decay_0p9"] = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match=r"\(nothing was written; 7 entries are this EMA's copies, which hold what "
                                         r"was written into them before this call, as dcp.load does\): "
                                         r"state.out.bias.ema_params.decay_0p9 holds inf or NaN\. " + ADVICE):
        ours.load_state_dict(own)
    assert all(bool(torch.isfinite(v).all()) for v in _rows(ours).values())


def test_one_copy_exported_to_a_hugging_face_folder_by_key(tmp_path):
    """From a live EMA, and from a checkpoint main's EMA wrote (rebuilt with that key alone, loaded beside
    the model's weights, as convert_ema_to_hf.py does)."""
    from safetensors.torch import load_file

    model, ours = _trained(_ours)
    path = export_hf(ours, tmp_path / "live", "half_life_0p25")
    got = load_file(path)
    assert set(got) == set(model.state_dict())
    for t in ours.tracked:
        assert torch.equal(got[t.fqn], ours.shadow.view(t.fqn, 1))
    assert torch.equal(got["steps"], model.steps)
    with pytest.raises(ValueError, match=r"holds 2 copies \['decay_0p9', 'half_life_0p25'\]: name the one"):
        export_hf(ours, tmp_path / "x")

    trained, main = _trained(_mains)
    dcp.save({STATE_KEY: main, **trained.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    fresh = Net()
    one = EMA.Config(decays=[0.9], buffer_patterns=["scale$"]).build(model_parts=[fresh])
    dcp.load({STATE_KEY: one, **fresh.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    got = load_file(export_hf(one, tmp_path / "hf", export_dtype=torch.bfloat16))
    want = main.copy("decay_0p9")
    for name, value in got.items():
        expected = want.get(name, trained.state_dict()[name])
        expected = expected.to(torch.bfloat16) if expected.is_floating_point() else expected
        assert value.dtype == expected.dtype and torch.equal(value, expected), name


@pytest.mark.parametrize("copy_dtype, entry", [(torch.float32, torch.full((3,), 1e300, dtype=torch.float64)),
                                               (torch.float16, torch.full((3,), 1e5, dtype=torch.float32))])
def test_a_load_checks_finiteness_in_the_copys_dtype(copy_dtype, entry):
    """Issue 85 M4: an entry finite in its own dtype but beyond the copy's range (float64 1e300 into a float32
    copy, float32 1e5 into a float16 one) landed as inf; it is refused by name, nothing written. An entry of
    another dtype that fits loads, rounded once as ``copy_`` rounds."""
    model = nn.Linear(2, 3).to(copy_dtype)
    ema = EMA.Config(decays=[0.5]).build(model_parts=[model])
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    state["state.bias.ema_params.decay_0p5"] = entry
    with pytest.raises(ValueError, match=rf"nothing was written\): state.bias.ema_params.decay_0p5 holds values "
                                         rf"beyond {copy_dtype}'s range \(its copy's dtype\), which would land as "
                                         rf"inf\. " + ADVICE):
        ema.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    fits = torch.tensor([0.1, -2.5, 3e3], dtype=entry.dtype)
    ema.load_state_dict({**state, "state.bias.ema_params.decay_0p5": fits})
    assert torch.equal(ema.shadow.view("bias", 0), fits.to(copy_dtype))


def test_a_tied_embedding_and_head_are_exported_as_the_average_under_both_names(tmp_path):
    """Issue 85 H2: the head's weight is the embedding's (``head.weight = emb.weight``): the state dict holds
    both names, the EMA tracks the first; both are written as the average (a2c5924 wrote the trained weights
    under the second), as is a buffer viewing the same memory in the same layout."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    m = nn.Module()
    m.emb, m.head = nn.Embedding(8, 4), nn.Linear(4, 8, bias=False)
    m.head.weight = m.emb.weight
    m.register_buffer("alias", m.emb.weight.detach())
    ema = EMA.Config(decays=[0.5]).build(model_parts=[m])
    assert [t.fqn for t in ema.tracked] == ["emb.weight"]
    start = m.emb.weight.detach().double().clone()
    with torch.no_grad():
        m.emb.weight.add_(1.0)
    ema.step(1)
    got = load_file(export_hf(ema, tmp_path))
    assert set(got) == {"emb.weight", "head.weight", "alias"}
    for name, value in got.items():
        torch.testing.assert_close(value.double(), start + 0.5, rtol=0, atol=1e-6, msg=name)


def test_an_averaged_non_persistent_buffer_is_left_out_of_the_export(tmp_path):
    """A buffer_patterns match on a non-persistent buffer (a rope cache) made export_hf refuse every
    export, saying it would write the trained weights: such a buffer is in no state dict and no file."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    m = nn.Module()
    m.lin = nn.Linear(4, 3)
    m.register_buffer("rope", torch.randn(5), persistent=False)
    ema = EMA.Config(decays=[0.5], buffer_patterns=["rope"]).build(model_parts=[m])
    start = m.lin.weight.detach().double().clone()
    with torch.no_grad():
        m.lin.weight.add_(1.0)
    ema.step(1)
    got = load_file(export_hf(ema, tmp_path))
    assert set(got) == {"lin.weight", "lin.bias"}
    torch.testing.assert_close(got["lin.weight"].double(), start + 0.5, rtol=0, atol=1e-6)
