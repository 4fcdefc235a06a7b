"""A checkpoint loads into a shadow that holds its values exactly, or is refused with nothing changed.

A float32 average loaded into a bfloat16 shadow (``shadow_dtype="bfloat16"``) was rounded into it
without a word by ``fastema.torch.EMA`` (the TensorFlow, Keras and JAX faces refused it): refused now,
by tensor, in the engine's one check (``fastema._checks.load_dtype_problem``), which compares what
each shadow holds, so a ``"same"`` shadow and a float64 source's float64 shadow compare by dtype, and a
wider shadow (bfloat16 or float16 into float32, float32 into float64) loads every value exactly."""
import pytest
import torch

from fastema.torch import EMA


def _trained(model: torch.nn.Module, **kw) -> EMA:
    ema = EMA(model, decay=0.9, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) / 3)
        ema.update()
    return ema


def test_a_float32_average_into_a_bfloat16_shadow_is_refused_and_nothing_changes():
    saved = _trained(torch.nn.Linear(4, 3)).state_dict()
    dst = EMA(torch.nn.Linear(4, 3), decay=0.9, shadow_dtype="bfloat16")
    before = {k: v.clone() for k, v in dst.state_dict()["averaged"].items()}
    with pytest.raises(ValueError, match=r"averaged 'weight' was saved as float32, this EMA keeps it as "
                                         r"bfloat16 \(shadow_dtype=\).*Nothing was loaded"):
        dst.load_state_dict(saved)
    after = dst.state_dict()
    assert after["updates"] == 0
    for k, v in before.items():
        assert torch.equal(after["averaged"][k].view(torch.int16), v.view(torch.int16)), k


@pytest.mark.parametrize("saved_as, into", [("float32", "float64"), ("bfloat16", "float32"),
                                            ("float16", "float32"), ("bfloat16", "same")])
def test_a_shadow_that_holds_every_value_exactly_loads(saved_as, into):
    model = torch.nn.Linear(4, 3).to(getattr(torch, saved_as))
    src = _trained(model, shadow_dtype="same")
    dst = EMA(model, decay=0.9, shadow_dtype=into)
    dst.load_state_dict(src.state_dict())
    assert dst.updates == src.updates == 3
    for k, v in src.state_dict()["averaged"].items():
        got = dst.state_dict()["averaged"][k]
        assert torch.equal(got.double(), v.double()), k


def test_a_float64_source_keeps_a_float64_shadow_whatever_the_setting():
    # FlatShadow keeps a float64 source's average in float64 under any shadow_dtype: a file of
    # shadow_dtype="float32" loads into shadow_dtype="bfloat16" where both hold float64
    model = torch.nn.Linear(4, 3).double()
    src = _trained(model)
    dst = EMA(model, decay=0.9, shadow_dtype="bfloat16")
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.state_dict()["averaged"]["weight"], src.state_dict()["averaged"]["weight"])


def test_a_dcp_load_is_refused_by_the_files_setting(tmp_path):
    # dcp.load fills the host copies this EMA's state_dict() hands out, in its own dtype: the values
    # reach load_state_dict already rounded, and the file's shadow_dtype is what tells (review)
    import warnings

    import torch.distributed.checkpoint as dcp

    src = _trained(torch.nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # (one process: no process group)
        dcp.save({"ema": src}, checkpoint_id=str(tmp_path))
        dst = EMA(torch.nn.Linear(4, 3), decay=0.9, shadow_dtype="bfloat16")
        before = dst.state_dict()["averaged"]["weight"].clone()
        with pytest.raises(ValueError, match=r"saved as float32, this EMA keeps it as bfloat16"):
            dcp.load({"ema": dst}, checkpoint_id=str(tmp_path))
        assert dst.updates == 0
        after = dst.state_dict()["averaged"]["weight"]
        assert torch.equal(after.view(torch.int16), before.view(torch.int16))
        wide = EMA(torch.nn.Linear(4, 3), decay=0.9, shadow_dtype="float64")
        dcp.load({"ema": wide}, checkpoint_id=str(tmp_path))       # a wider shadow: exact
    saved = src.state_dict()["averaged"]["weight"]
    assert torch.equal(wide.state_dict()["averaged"]["weight"], saved.double())
