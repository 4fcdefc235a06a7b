"""A Smoother's checkpoint loads: from arrays of any framework, whole or not at all, a smoother with no
values included; and its first weighted update, undone where it fails."""
import signal
import sys

import numpy as np
import pytest
import torch

from fastema import Smoother
from fastema.smooth import SCALE

VALUES = ([1.0, 2.0, 3.0], [3.0, np.nan, 5.0], [4.0, -1.0, 2.0], [0.5, 8.0, -3.0])


def _fed(make=np.array, **kw) -> Smoother:
    s = Smoother(span=4, window=3, **kw)
    for v in VALUES:
        s.update(make(v))
    return s


def _bits(s: Smoother) -> dict:
    """Everything a smoother holds: its count, layout and every state array's bits."""
    host = {n: np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a) for n, a in s._state.items()}
    return {"count": s.count, "weighted": s._weighted, "where": s._where,
            **{n: a.view(np.uint8).tobytes() for n, a in host.items()}}


def _as(make, state: dict) -> dict:
    return {**state, "state": {n: make(np.asarray(a)) for n, a in state["state"].items()}}


def _v2_as_torch() -> tuple[dict, dict]:
    """A version 2 checkpoint (tests/array/data/smoother-v2.npz, as a2c5924 wrote it) with NumPy arrays
    and the same with torch tensors: what a torch run of that release saved."""
    import json
    import pathlib

    d = np.load(pathlib.Path(__file__).parent / "data" / "smoother-v2.npz")
    header = json.loads(str(d["ema_sma_skip/header"]))             # span=4, window=5, 3 streams
    prefix = "ema_sma_skip/state/"
    arrays = {k[len(prefix):]: d[k] for k in d.files if k.startswith(prefix)}
    return ({**header, "state": arrays},
            {**header, "state": {n: torch.from_numpy(a.copy()) for n, a in arrays.items()}})


def test_a_version_2_checkpoint_of_torch_tensors_loads_as_its_numpy_twin():
    # A torch run's version 2 checkpoint (torch tensors) was converted to NumPy and then written
    # into the torch state made for it: a TypeError, after the smoother had been reallocated (its
    # values gone, its count kept)
    numpy_ckpt, torch_ckpt = _v2_as_torch()
    for fresh in (True, False):
        want = Smoother(span=4, window=5)
        want.load_state_dict(numpy_ckpt)
        got = Smoother(span=4, window=5)
        if not fresh:
            got.update(torch.tensor([9.0, 9.0, 9.0]))
        got.load_state_dict(torch_ckpt)
        assert got._where == ("torch", "cpu") and got.count == want.count
        for v in ([1.0, 2.0, 3.0], [0.0, 4.0, np.nan]):
            got.update(torch.tensor(v, dtype=torch.float64))
            want.update(np.array(v))
            assert np.array_equal(got.ema.numpy(), want.ema, equal_nan=True)
            assert np.array_equal(got.sma.numpy(), want.sma, equal_nan=True)


@pytest.mark.parametrize("src,dst", [(np.array, torch.tensor), (torch.tensor, np.array)])
def test_a_checkpoint_loads_into_a_smoother_of_another_framework(src, dst):
    # a NumPy smoother's checkpoint into a torch smoother (and back): the state is made where the
    # loading smoother's lives, from arrays of the other framework
    a = _fed(src)
    b = Smoother(span=4, window=3)
    b.update(dst([0.0, 0.0, 0.0]))
    b.load_state_dict(a.state_dict())
    assert b._where[0] == ("torch" if dst is torch.tensor else "numpy") and b.count == a.count
    for n, x in a._state.items():
        assert np.array_equal(np.asarray(b._state[n]), np.asarray(x), equal_nan=True), n


@pytest.mark.parametrize("make", [np.array, torch.tensor])
def test_a_refused_load_leaves_the_smoother_as_it_was(make):
    # a load refused after its checks (an array of another kind) left the state half written: the
    # arrays written before it from the checkpoint, the others zero, the count the old one
    s = _fed(make)
    before = _bits(s)
    good = _fed(np.array, nonfinite="skip").state_dict()
    for name, bad in (("sc", np.array(["x"] * 6)), ("n", np.full(3, 0.5)), ("ab", [object()] * 6)):
        state = {**good, "state": {**good["state"], name: bad}}
        with pytest.raises(ValueError, match="Nothing was loaded"):
            s.load_state_dict(state)
        assert _bits(s) == before, name


def test_the_checkpoint_of_a_smoother_with_no_values_loads_and_starts_over():
    fresh = Smoother(span=4, window=3).state_dict()
    assert fresh["state"] == {} and fresh["shape"] is None
    s = _fed()
    s.load_state_dict(fresh)                                       # was refused: "a dict of arrays"
    assert s.count == 0 and s._state == {} and s._where is None
    t = Smoother(span=4, window=3)
    t.load_state_dict(fresh)
    for x in (s, t):
        x.update(torch.tensor([2.0, 3.0]))                         # another framework and shape: a new start
    assert torch.equal(s.ema, t.ema) and torch.equal(s.sma, t.sma)
    with pytest.raises(ValueError, match="dict of arrays"):
        s.load_state_dict({**fresh, "count": 3})                   # values counted, none kept


def test_a_checkpoint_of_the_other_nonfinite_policy_is_refused():
    # a "propagate" smoother's state loaded into a "skip" one: its NaN sums were taken as its own
    s = _fed(nonfinite="skip")
    before = _bits(s)
    with pytest.raises(ValueError, match=r"nonfinite\) = .*'propagate'"):
        s.load_state_dict(_fed(nonfinite="propagate").state_dict())
    assert _bits(s) == before


def test_a_ctrl_c_while_the_checkpoint_is_read_leaves_the_smoother_as_it_was():
    # every array is read and converted before anything changes: a Ctrl-C there changes nothing
    src = _fed()
    state = src.state_dict()

    class InterruptsWhenRead:
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def __array__(self, dtype=None, copy=None):
            signal.raise_signal(signal.SIGINT)
            return self.a

    last = list(state["state"])[-1]
    planted = {**state, "state": {**state["state"], last: InterruptsWhenRead(state["state"][last])}}
    dst = Smoother(span=4, window=3)
    dst.update(np.array([0.0, 0.0, 0.0]))
    before = _bits(dst)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            dst.load_state_dict(planted)
    finally:
        signal.signal(signal.SIGINT, old)
    assert _bits(dst) == before
    dst.load_state_dict(state)
    assert np.array_equal(dst.ema, src.ema) and np.array_equal(dst.sma, src.sma, equal_nan=True)



def _ctrl_c_at(event: str, name: str, call) -> None:
    """``call()`` with a Ctrl-C delivered at the first ``event`` ("call" or "return") of a function
    named ``name`` (a profile hook: no name of fastema replaced); KeyboardInterrupt expected."""
    def interrupt(frame, ev, arg):
        if ev == event and frame.f_code.co_name == name:
            sys.setprofile(None)
            signal.raise_signal(signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.setprofile(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGINT, old)

@pytest.mark.parametrize("weight", [2.0, np.full(2, 2.0)])
def test_a_first_weighted_update_that_fails_leaves_the_unweighted_layout(weight):
    # The first sample_weight adds the weighted layout's arrays (zeros) for the launch to fill; a
    # Ctrl-C before that launch ran (its kernel compiling) left them zero and the smoother weighted:
    # its SMA read ~5e-19 from then on
    s, ref = Smoother(span=4, window=3), Smoother(span=4, window=3)
    for v in ([1.0, 2.0], [3.0, np.nan], [5.0, 6.0]):
        s.update(np.array(v))
        ref.update(np.array(v))
    before = _bits(s)

    _ctrl_c_at("call", "launch_of", lambda: s.update(np.array([7.0, 8.0]), sample_weight=weight))
    assert _bits(s) == before and not s._weighted
    np.testing.assert_array_equal(s.sma, ref.sma)
    s.update(np.array([7.0, 8.0]), sample_weight=weight)
    ref.update(np.array([7.0, 8.0]), sample_weight=weight)
    assert s._weighted and np.array_equal(s.sma, ref.sma) and np.array_equal(s.ema, ref.ema)
    assert float(s._state["wsc"][0]) == 4 * SCALE          # stream 0 in the window: weights 1, 1 and 2


@pytest.mark.parametrize("weight", [None, 2.0], ids=["unweighted", "first weighted"])
def test_a_ctrl_c_as_the_kernel_returns_leaves_the_update_whole(weight):
    """A Ctrl-C delivered after the kernel wrote (as its call returned) skipped the count: in a window
    not yet full the value stayed in the sums (n one above the count for good: a state_dict() then
    refused at load) and the next value took its slot; a first weighted update's widened state was
    undone under the kernel's writes. The update is now counted with its writes, the Ctrl-C raised
    after them."""
    s, ref = Smoother(span=4, window=3), Smoother(span=4, window=3)
    for v in ([1.0, 2.0], [3.0, np.nan]):
        s.update(np.array(v))
        ref.update(np.array(v))

    _ctrl_c_at("return", "run", lambda: s.update(np.array([5.0, 6.0]), sample_weight=weight))
    ref.update(np.array([5.0, 6.0]), sample_weight=weight)
    assert _bits(s) == _bits(ref)
    again = Smoother(span=4, window=3)
    again.load_state_dict(s.state_dict())
    for x in (s, ref, again):
        x.update(np.array([7.0, 8.0]))
    assert _bits(s) == _bits(ref) == _bits(again)
    np.testing.assert_array_equal(s.sma, ref.sma)


@pytest.mark.parametrize("bad", [2 ** 40, 2 ** 32 + 2, -1, 4, 1.5, np.nan])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_window_count_outside_its_range_is_refused_not_wrapped(bad, weighted):
    """The window's counts are int32 in the kernels: an int64 ``n`` of 2**40 passed NumPy's
    same-kind cast and loaded as 0 (2**32 + 2 as 2), a state this smoother never writes. Counts
    outside [0, min(count, window)] are refused, and nothing changes."""
    s = _fed()
    if weighted:                                 # the weighted layout, with its bad-entry counts
        s.update(np.array([1.0, 2.0, 3.0]), sample_weight=np.array([1.0, 2.0, 0.5]))
    state = s.state_dict()
    before = _bits(s)
    for name in ("n", "bad") if weighted else ("n",):
        a = np.asarray(state["state"][name]).astype(np.float64 if isinstance(bad, float) else np.int64)
        a[1] = bad
        with pytest.raises(ValueError, match=rf"\['{name}'\] hold counts outside \[0, min\(count, window\)\]"):
            s.load_state_dict({**state, "state": {**state["state"], name: a}})
        assert _bits(s) == before
    s.load_state_dict(state)
    assert _bits(s) == before


def test_a_version_2_checkpoint_with_a_wrapping_count_is_refused():
    numpy_ckpt, _ = _v2_as_torch()
    state = {**numpy_ckpt, "state": dict(numpy_ckpt["state"])}
    n = np.asarray(state["state"]["n"]).astype(np.int64)
    n[0] = 2 ** 40
    state["state"]["n"] = n
    with pytest.raises(ValueError, match="hold counts outside"):
        Smoother(span=4, window=5).load_state_dict(state)
