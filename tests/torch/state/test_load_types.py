"""A checkpoint's fields of the wrong kind are refused at load, nothing written: a version that
is a bool or a float (``True == 1`` and ``2.0 == 2`` passed the header's check), and an integer
buffer saved as a bool tensor (a batch norm's ``num_batches_tracked`` of 3 loaded as 1)."""
import pytest
import torch
from torch import nn

from fastema.torch import EMA


def _ema():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, 0.9)
    for _ in range(3):
        model(torch.randn(8, 3))
        ema.update()
    return ema


@pytest.mark.parametrize("version", [True, 2.0, "2"])
def test_a_version_that_is_no_int_is_refused(version):
    ema = _ema()
    state = ema.state_dict()
    assert isinstance(state["version"], int)
    with pytest.raises(ValueError, match=rf"checkpoint version {version!r} is not supported"):
        ema.load_state_dict({**state, "version": version})
    assert ema.updates == 3


def test_an_integer_buffer_saved_as_a_bool_is_refused_with_nothing_written():
    ema = _ema()
    state = ema.state_dict()
    (name, value), = state["int_buffers"].items()
    assert int(value) == 3 and not value.is_floating_point()
    bad = {**state, "int_buffers": {name: value.bool()}, "calls": 7, "updates": 7}
    with pytest.raises(ValueError, match=rf"int_buffers '{name}' has dtype torch.bool, expected torch.int64"):
        ema.load_state_dict(bad)
    assert ema.updates == 3 and int(ema.state_dict()["int_buffers"][name]) == 3
