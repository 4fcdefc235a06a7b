"""The host work of ``EMA.update()`` on CUDA's launch path, counted per tensor (issue 45 item 4).

An update's only per-tensor work is the check that refuses a moved or freed tensor before any launch:
one address read (``data_ptr()``) a tensor. Everything else (the plan, the launches, the skip flag's
scan) costs the same at 6 tensors as at 40: counted by the torch functions an update calls (a
``TorchFunctionMode`` sees every ``Tensor`` method, also those called from C through ``map``) and by
the Python and C functions its Python code calls (``sys.setprofile``). On the CPU with the fake GPU of
``testkit`` (a launch driver that launches nothing, fake device arrays), and for the same
reason on the CPU kernels' path. Also: with ``skip_nonfinite`` the scan reads the tensors the check
followed (a moved tensor's NaN still skips the update).
"""
import collections
import copy
import gc
import os
import sys

import pytest

torch = pytest.importorskip("torch")
from support.torch_calls import TorchCalls  # noqa: E402

from fastema.torch import EMA, TargetNetwork  # noqa: E402

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":      # the fake stands in for the real numba-cuda
    pytest.skip("the fake launcher stands in for the real numba-cuda, not the simulator", allow_module_level=True)

pytest.importorskip("numba.cuda.dispatcher")
from testkit.fake_gpu import fake_gpu  # noqa: E402

SIZES = (6, 40)


def _python_calls(fn) -> collections.Counter:
    """The Python functions ``fn`` runs and the C functions its Python code calls, by name."""
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[f"py {frame.f_code.co_filename}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            calls[f"c {getattr(arg, '__qualname__', repr(arg))}"] += 1

    gc.collect()
    gc.disable()                                        # a collection's callbacks are no work of the update's
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def _counted(update) -> tuple[collections.Counter, collections.Counter]:
    with torch.no_grad():
        for _ in range(3):                              # binds, first launches, memos
            update()
        mode = TorchCalls()
        with mode:
            update()
        return mode.calls, _python_calls(update)


def _net(n: int):
    torch.manual_seed(n)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n // 2)])


def _assert_one_address_read_a_tensor(make, tensors_per_net=1):
    counts = {}
    for n in SIZES:
        counts[n] = _counted(make(_net(n)))
    (torch6, py6), (torch40, py40) = counts[SIZES[0]], counts[SIZES[1]]
    for n, (calls, _) in counts.items():
        assert calls["TensorBase.data_ptr"] == tensors_per_net * n, (n, dict(calls))
    rest6 = {k: v for k, v in torch6.items() if k != "TensorBase.data_ptr"}
    rest40 = {k: v for k, v in torch40.items() if k != "TensorBase.data_ptr"}
    assert rest6 == rest40, (rest6, rest40)              # no other torch call per tensor
    assert py6 == py40, {k: (py6[k], py40[k]) for k in set(py6) | set(py40) if py6[k] != py40[k]}


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("device_step", [True, False], ids=["plan on the device", "plan on the host"])
def test_an_ema_update_on_cuda_reads_one_address_a_tensor_and_nothing_else_per_tensor(device_step, skip_nonfinite):
    """With ``skip_nonfinite`` the scan once read every address again (``FlatShadow.scan_nonfinite``'s
    refresh): 2 reads a tensor."""
    with fake_gpu(record=False):
        _assert_one_address_read_a_tensor(
            lambda net: EMA(net, 0.99, device_step=device_step, skip_nonfinite=skip_nonfinite).update)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["plain", "skip_nonfinite"])
def test_the_cpu_path_reads_one_address_a_tensor_too(skip_nonfinite):
    _assert_one_address_read_a_tensor(lambda net: EMA(net, 0.99, skip_nonfinite=skip_nonfinite).update)
    _assert_one_address_read_a_tensor(
        lambda net: TargetNetwork(net, copy.deepcopy(net).requires_grad_(False), tau=0.01,
                                  skip_nonfinite=skip_nonfinite).update, tensors_per_net=2)   # online + target


def test_skip_nonfinite_scans_the_tensor_a_moved_source_now_is():
    """The scan reads the addresses the per-step check followed in the same call: a parameter whose
    storage was replaced (``p.data = ...``, no hook) by one holding a NaN skips the update; replaced
    again by finite values, the update folds them in."""
    net = _net(6)
    ema = EMA(net, 0.5, skip_nonfinite=True)
    w = net[0].weight
    with torch.no_grad():
        ema.update()
        avg = ema.averaged_state_dict()["0.weight"].clone()
        bad = torch.full_like(w, 2.0)
        bad[1, 2] = float("nan")
        w.data = bad                                     # a new storage, at another address
        ema.update()
        assert torch.equal(ema.averaged_state_dict()["0.weight"], avg)            # skipped
        w.data = torch.full_like(w, 2.0)
        ema.update()
        assert torch.allclose(ema.averaged_state_dict()["0.weight"], 0.5 * avg + 0.5 * 2.0)
