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


def _counting(idt, fdt):
    m = nn.Module()
    m.w = nn.Parameter(torch.ones(2))
    m.register_buffer("count", torch.zeros((), dtype=idt))
    m.register_buffer("stat", torch.ones(2, dtype=fdt))
    return m


@pytest.mark.parametrize("count, stat, named", [
    (2 ** 40 + 7, 2.0, r"int_buffers 'count' holds 1099511627783, outside int32's range \(it would wrap\)"),
    (-1, 2.0, r"int_buffers 'count' holds -1, outside uint8's range"),
    (5, 1e300, r"copied 'stat' holds values beyond float16's range \(they would load as inf\)"),
    (5, [float("nan"), 1e300], r"copied 'stat' holds values beyond float16's range"),    # its NaN aside
])
def test_a_buffer_that_would_not_land_as_saved_is_refused_with_nothing_written(count, stat, named):
    """Integer and copied buffers were checked for their dtype's kind only: an int64 count of 2**40 + 7
    loaded into an int32 buffer as 7, a float64 statistic of 1e300 into a float16 one as inf, without a
    word (torch's copy_ converts). Each is refused, naming it; what fits loads."""
    src = _counting(torch.int64, torch.float64)
    saved = EMA(src, 0.9, copy=["stat"])
    src.count.fill_(count)
    src.stat.copy_(torch.tensor(stat, dtype=torch.float64).expand(2))
    saved.update()
    dst = _counting(torch.uint8 if count < 0 else torch.int32, torch.float16)
    ema = EMA(dst, 0.9, copy=["stat"])
    before = {k: v.clone() for k, v in ema.state_dict()["int_buffers"].items()}
    with pytest.raises(ValueError, match=named):
        ema.load_state_dict(saved.state_dict())
    assert ema.updates == 0 and all(torch.equal(v, before[k]) for k, v in ema.state_dict()["int_buffers"].items())
    src.count.fill_(3)
    src.stat.fill_(2.0)
    saved.update()
    ema.load_state_dict(saved.state_dict())
    assert int(ema.state_dict()["int_buffers"]["count"]) == 3 and ema.updates == 2
