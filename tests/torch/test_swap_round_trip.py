"""The swap's host work (issue 70 item 4): a round trip of ``average_parameters()`` reads each
tensor's address once on the way in (the model side's per-step check, as ``EMA.update()``) and once
on the way back, not three or four passes (the check, then the shadow's own refresh at each swap);
what moved is still followed, on the CPU and in the fake GPU.
"""
import contextlib
import os

import pytest

torch = pytest.importorskip("torch")
from support.torch_calls import TorchCalls  # noqa: E402

from fastema.torch import EMA  # noqa: E402

FAKE = os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"   # the fake GPU stands in for numba-cuda, not the simulator


def _where(where: str):
    if where == "cpu":
        return contextlib.nullcontext()
    pytest.importorskip("numba.cuda.dispatcher")
    if not FAKE:
        pytest.skip("the fake GPU stands in for the real numba-cuda, not the simulator")
    from testkit.fake_gpu import fake_gpu

    return fake_gpu(record=False)


def _net(n: int, norm: bool = False):
    torch.manual_seed(n)
    layers = [torch.nn.Linear(4, 4) for _ in range(n // 2)]
    return torch.nn.Sequential(*layers, *([torch.nn.BatchNorm1d(4)] if norm else []))


WHERE = ["cpu", "fake gpu"]


def _round_trip_calls(ema) -> dict:
    """The torch functions an ``average_parameters()`` round trip calls, after an update and a first
    round trip (what is made once is made)."""
    with torch.no_grad():
        ema.update()
        with ema.average_parameters():
            pass
        mode = TorchCalls()
        with mode, ema.average_parameters():
            pass
    return mode.calls


@pytest.mark.parametrize("where", WHERE)
def test_a_round_trip_reads_each_address_twice(where):
    """Was 3 a tensor: the model side's check on the way in, then the shadow's refresh inside each
    swap (issue 70: ``addresses`` twice a round trip, ``unchanged``, ``refresh``)."""
    with _where(where):
        for n in (6, 40):
            calls = _round_trip_calls(EMA(_net(n), 0.9))
            assert calls["TensorBase.data_ptr"] == 2 * n, (n, dict(calls))


@pytest.mark.parametrize("where", WHERE)
def test_buffers_are_read_once_a_way_too(where):
    """The copied buffers (BatchNorm's): their refresh ran before their swap and again inside it."""
    with _where(where):
        net = _net(6, norm=True)
        ema = EMA(net, 0.9, buffers="average")
        floating = sum(1 for _ in net.parameters()) + sum(1 for b in net.buffers() if b.is_floating_point())
        every = floating + sum(1 for b in net.buffers() if not b.is_floating_point())   # num_batches_tracked
        calls = _round_trip_calls(ema)
        # in: the model side's check of every tensor it tracks; back: the averaged and copied ones
        assert calls["TensorBase.data_ptr"] == every + floating, dict(calls)


def test_a_tensor_moved_before_the_swap_is_followed():
    """The swap in trusts the model side's check: a parameter whose storage was replaced (``p.data =``,
    no hook) is followed by it, so the average goes into the new storage and the raw weights come back
    into it."""
    net = _net(6)
    ema = EMA(net, 0.5)
    w = net[1].weight
    with torch.no_grad():
        ema.update()
        w.data = torch.full_like(w, 3.0)                 # new storage, another address
        ema.update()
        avg = ema.averaged_state_dict()["1.weight"].clone()
        raw = torch.full_like(w, 7.0)
        w.data = raw                                     # moved again, between the update and the swap
        with ema.average_parameters():
            assert net[1].weight.data_ptr() == raw.data_ptr()
            assert torch.equal(net[1].weight, avg)
        assert torch.equal(net[1].weight, torch.full_like(w, 7.0))
        assert torch.equal(ema.averaged_state_dict()["1.weight"], avg)


def test_a_tensor_moved_inside_the_block_is_followed_on_the_way_back():
    """The way back reads every address (one pass): a storage replaced while the average was in is
    followed (as before: the raw weights go into the tensor the model holds then)."""
    net = _net(6)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        ema.update()
        raw = net[0].weight.clone()
        with ema.average_parameters():
            avg = net[0].weight.clone()
            net[0].weight.data = avg.clone()             # the average, in new storage
        assert torch.equal(net[0].weight, raw)
        assert torch.equal(ema.averaged_state_dict()["0.weight"], avg)


def test_a_refused_change_found_on_the_way_in_writes_nothing():
    net = _net(6)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        ema.update()
        before = [p.clone() for p in net.parameters()]
        net[0].weight.data = torch.zeros(4, 5)           # another shape
        with pytest.raises(ValueError, match="0.weight"):
            with ema.average_parameters():
                pass
        assert all(torch.equal(p, q) for p, q in zip(list(net.parameters())[1:], before[1:]))
        net[0].weight.data = before[0].clone()
        with ema.average_parameters():                   # nothing held: the next swap goes in
            pass


@pytest.mark.parametrize("where", WHERE)
def test_the_swap_and_the_copy_out_are_prepared_once(where):
    """Each way's launch (and ``copy_to_sources``'s) was prepared afresh at every call (a one-off
    ``_launch.launch``: on CUDA the variant looked up and an argument block packed, per group, per way).
    Now each group keeps its prepared launch: a second round trip prepares nothing; and a source moved
    (the group's tables replaced) prepares nothing either (issue 80: a launch reads its group's tables at
    each call), while the swap reads the moved source: the average goes into the new storage and the
    raw weights come back."""
    from support.calls import watching

    from fastema import _launch

    prepared: list = []
    with _where(where), watching(_launch.prepare, on_call=lambda args: prepared.append(args["op"])):
        net = _net(6)
        ema = EMA(net, 0.9)
        with torch.no_grad():
            ema.update()
            for _ in range(2):
                with ema.average_parameters():
                    pass
            ema.copy_to(net)
            ema.copy_to(net)
            prepared.clear()
            with ema.average_parameters():
                pass
            ema.copy_to(net)
            assert prepared == []
            net[0].weight.data = net[0].weight.data.clone()      # new storage: new tables
            ema.update()
            prepared.clear()
            raw = net[0].weight.clone()
            with ema.average_parameters():
                inside = net[0].weight.clone()
            with ema.average_parameters():
                pass
            after = net[0].weight.clone()
        assert prepared == [], prepared                           # the kept launch follows the new tables
    if where == "cpu":                                            # (the fake GPU writes nothing)
        assert torch.equal(inside, ema.averaged_state_dict()["0.weight"]) and torch.equal(after, raw)
