"""Every GPU entry point besides the array functions runs in the fake GPU of ``testkit`` (issue
70 item 1): ``Smoother.update`` / ``Tracker.update``, ``TargetNetwork`` (made, updated, hard-updated)
and the swap (``average_parameters()``), each launching on torch's current stream with no host sync;
and the fake GPU is an adapter of its own (``testkit.fake_backend``) given through the boundary's seam
(``fastema._backends.using``), assigning none of fastema's attributes (issue 72 item 4, issue 80 item 4).
"""
import collections
import copy
import gc
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":      # the fake stands in for the real numba-cuda
    pytest.skip("the fake launcher stands in for the real numba-cuda, not the simulator", allow_module_level=True)
pytest.importorskip("numba.cuda.dispatcher")

import fastema  # noqa: E402
from fastema import _backends  # noqa: E402
from fastema._backends import torch as torch_backend  # noqa: E402
from fastema.torch import EMA, TargetNetwork  # noqa: E402
from testkit.fake_backend import FakeGpuBackend  # noqa: E402
from testkit.fake_gpu import TORCH_STREAM, fake_gpu, rl_mlp  # noqa: E402


def _launches(fake) -> list:
    return [e for e in fake.launches if e[0] in ("launch", "dispatcher")]


def _streams(fake) -> set:
    return {e[1] if e[0] == "launch" else e[2][2] for e in _launches(fake)}


def _calls(fn) -> collections.Counter:
    """The Python functions ``fn`` runs and the C functions its Python code calls, by name."""
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[frame.f_code.co_qualname] += 1
        elif event == "c_call":
            calls[getattr(arg, "__qualname__", repr(arg))] += 1

    gc.collect()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_the_fake_gpu_assigns_no_attribute_of_the_torch_backend():
    """It stood in by replacing the backend class's methods and ``_backends.stream_getter`` for the
    block (``setattr``): now an adapter of its own given through ``_backends.using``, and every
    attribute is the one it was."""
    cls = type(_backends.TORCH)
    before = dict(vars(cls)), dict(vars(_backends)), dict(vars(torch_backend))
    with fake_gpu(record=False):
        during = dict(vars(cls)), dict(vars(_backends)), dict(vars(torch_backend))
        assert isinstance(_backends.backend_of(torch.zeros(3)), FakeGpuBackend)
        assert _backends.describe(torch.zeros(3), "x").device == "cuda:0"
        assert _backends.stream_getter("torch", "cuda:0")() == TORCH_STREAM
    for b, d in zip(before, during):
        assert {k for k in b if b[k] is not d.get(k)} == set()
    assert _backends.stream_getter.cache_info().currsize == 0   # the fake's getters not kept past the block
    assert _backends.backend_of(torch.zeros(3)) is _backends.TORCH
    assert _backends.describe(torch.zeros(3), "x").device == "cpu"


def test_the_fake_backend_is_given_back_however_the_block_ends():
    with pytest.raises(KeyError):
        with fake_gpu(record=False):
            assert _backends.backend_named("torch") is not _backends.TORCH
            raise KeyError("inside")
    assert _backends.backend_of(torch.zeros(1)) is _backends.TORCH
    assert _backends.backend_named("torch") is _backends.TORCH
    assert _backends.location(torch.zeros(1)) == ("torch", "cpu")
    assert _backends.device_of(torch.zeros(1)) == "cpu"
    assert not _backends.capturing("torch", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("weight", ["none", "scalar", "per stream"])
def test_smoother_update_runs_in_the_fake_gpu(dtype, weight):
    """It raised ``KeyError: 'uint32'`` (the fake's dtype table knew no bits dtype)."""
    kw = {"none": {}, "scalar": {"sample_weight": 3.0},
          "per stream": {"sample_weight": torch.full((4,), 2.0, dtype=torch.float64)}}[weight]
    with fake_gpu() as fake:
        s = fastema.Smoother(span=10, window=5)
        for i in range(7):
            s.update(torch.full((4,), float(i), dtype=dtype), **kw)
        assert s.count == 7
        assert len(_launches(fake)) == 7                     # the EMA and the SMA in one launch an update
        assert _streams(fake) == {TORCH_STREAM}
        assert fake.counters["host_syncs"] == 0
        assert s.state_dict()["state"]["ab"].device.type == "cpu"   # the fake's device memory


def test_a_smoother_binds_its_launches_once():
    """``Smoother.update`` on CUDA made its launches afresh at every call (numba ``typeof`` of 14
    arguments, a ctypes block: 304 us on an H100). Now prepared once (``_launch.prepare``) per values
    view (the backend keeps a view per address): per update no block is packed, no kernel view made
    and no numba type made (the ring slot, an int that changes at every update, is checked against
    its bound C type by the block itself)."""
    from fastema._launch.cuda import abi

    with fake_gpu(record=False):
        s = fastema.Smoother(decay=0.9, window=50)
        a, b = torch.ones(3), torch.full((3,), 2.0)          # a training loop's values: a few addresses
        for v in (a, b, a, b):
            s.update(v)
        calls = _calls(lambda: (s.update(a), s.update(b)))
    assert calls[abi.Block.__init__.__qualname__] == 0
    assert calls["FakeDeviceArray.__init__"] == 0
    assert calls["_typeof"] == 0


def test_a_smoother_under_the_fake_gpu_refuses_values_of_another_device():
    with fake_gpu(record=False):
        s = fastema.Smoother(decay=0.9)
        s.update(torch.ones(2))
    with pytest.raises(ValueError, match="cuda:0"):
        s.update(torch.ones(2))                               # the CPU now: another device


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_kept_launch_in_a_child_forked_after_cuda_is_refused_naming_spawn():
    """Launches bound in the parent (an EMA's, a TargetNetwork's, a smoother's, ``ema_update_``'s cached
    pair's) are called again in the child: each meets the launch path's fork refusal (CUDA does not survive
    a fork), not the driver, and launches nothing; the parent goes on."""
    with fake_gpu(record=True) as fake:
        model = rl_mlp(hidden=16)
        ema = EMA(model, 0.99)
        target = TargetNetwork(model, copy.deepcopy(model).requires_grad_(False), tau=0.005)
        s = fastema.Smoother(decay=0.9, window=3)
        a, x, v = torch.zeros(64), torch.ones(64), torch.ones(2)
        calls = {"EMA.update": ema.update, "TargetNetwork.update": target.update,
                 "Smoother.update": lambda: s.update(v), "ema_update_": lambda: fastema.ema_update_(a, x, 0.5)}
        for call in calls.values():                       # bound, then kept
            call()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                      # the child: report, then leave at once
            said = {}
            try:
                before = len(_launches(fake))
                for name, call in calls.items():
                    try:
                        call()
                        said[name] = "ran"
                    except RuntimeError as err:
                        said[name] = str(err)[:500]
                said["launches"] = str(len(_launches(fake)) - before)
                said["counts"] = str((ema.updates, target.updates, s.count))
            finally:
                os.write(write, json.dumps(said).encode())
                os._exit(0)
        os.close(write)
        said = json.loads(os.read(read, 1 << 16).decode())
        os.waitpid(pid, 0)
        for call in calls.values():                       # the parent goes on
            call()
    assert said.pop("launches") == "0" and said.pop("counts") == "(1, 1, 1)", said
    assert set(said) == set(calls), said
    for name, message in said.items():
        assert "forked" in message and "'spawn'" in message, (name, message)
    assert (ema.updates, target.updates, s.count) == (2, 2, 2)


def test_tracker_update_runs_in_the_fake_gpu():
    with fake_gpu() as fake:
        tr = fastema.Tracker(("loss", "acc"), ema=0.9, sma=5)
        for i in range(4):
            tr.update(loss=torch.tensor(float(i)), acc=torch.tensor(0.5))
        assert tr.count == 4
        assert len(_launches(fake)) == 4 and _streams(fake) == {TORCH_STREAM}   # the EMA and SMA in one
        assert fake.counters["host_syncs"] == 0


@pytest.mark.parametrize("device_step", [True, False])
def test_target_network_runs_in_the_fake_gpu(device_step):
    """``TargetNetwork(...)`` asked torch for CUDA (its flags were ``torch.zeros(device="cuda:0")``):
    ``Torch not compiled with CUDA enabled``."""
    with fake_gpu() as fake:
        online = rl_mlp()
        target = copy.deepcopy(online).requires_grad_(False)
        tn = TargetNetwork(online, target, tau=0.01, device_step=device_step)
        assert tn.device_step is device_step
        with torch.no_grad():
            tn.update()                                       # the first binds
            fake.launches.clear()
            syncs = fake.counters["host_syncs"]
            for _ in range(3):
                tn.update()
            tn.hard_update()
        assert tn.updates == 4
        assert _launches(fake) and _streams(fake) == {TORCH_STREAM}
        assert fake.counters["host_syncs"] == syncs


@pytest.mark.parametrize("device_step", [True, False])
def test_a_target_network_update_types_and_packs_nothing(device_step):
    """The target network's launches are bound once (the engine's, as ``EMA.update()``'s): per update
    no numba type is made and no argument block packed."""
    from fastema._launch.cuda import abi

    with fake_gpu(record=False):
        online = rl_mlp()
        tn = TargetNetwork(online, copy.deepcopy(online).requires_grad_(False), device_step=device_step)
        with torch.no_grad():
            for _ in range(3):
                tn.update()
            calls = _calls(lambda: (tn.update(), tn.update()))
    assert calls[abi.Block.__init__.__qualname__] == 0 and calls["_typeof"] == 0, calls
    assert calls["StepLaunches.update_checked"] == 2                 # the engine's bound launches


def test_the_swap_runs_in_the_fake_gpu():
    with fake_gpu() as fake:
        net = rl_mlp()
        ema = EMA(net, 0.99)
        with torch.no_grad():
            ema.update()
            with ema.average_parameters():                    # the first makes its tables
                pass
            fake.launches.clear()
            syncs = fake.counters["host_syncs"]
            before = [p.detach().clone() for p in net.parameters()]
            for _ in range(2):
                with ema.average_parameters():
                    pass
        # twice: the scan for inf or NaN the swap in refuses (issue 85 item 2), in and out; one group
        assert len(_launches(fake)) == 6
        assert _streams(fake) == {TORCH_STREAM}
        assert fake.counters["host_syncs"] == syncs
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))   # nothing ran on a device


def test_kernel_views_of_the_fake_backend_have_the_bits_dtypes():
    """What the fake's view maker is asked for: the tensor's address, elements and a NumPy dtype
    (bfloat16's bits as uint16); its device, stream and arrays are the ones it was given."""
    asked = []

    def view(address, numel, dtype, owner):
        asked.append((address, numel, np.dtype(dtype)))
        return asked[-1]

    t = torch.zeros(6, dtype=torch.bfloat16)
    with _backends.using(FakeGpuBackend(view=view, device="cuda:3", stream=5)):
        assert _backends.kernel_view(t) == (t.data_ptr(), 6, np.dtype(np.uint16))
        assert _backends.location(t) == ("torch", "cuda:3")
        assert _backends.stream_getter("torch", "cuda:3")() == 5
        flag = _backends.zeros(("torch", "cuda:3"), 1, np.int32)
        assert flag.device.type == "cpu" and flag.dtype == torch.int32
        assert _backends.location(flag) == ("torch", "cuda:3")
        assert not _backends.capturing("torch", "cuda:3")          # no driver: never capturing
    assert _backends.location(t) == ("torch", "cpu")


def test_clear_caches_after_the_fake_gpu_asks_no_other_driver_about_its_streams():
    """The streams tables were made for under a stand-in driver are not the real driver's to answer:
    ``fastema.clear_caches()`` after the fake GPU asked the real driver whether the fake's streams
    were capturing, which on a machine without a CUDA driver raised from loading it (a test order of
    CI's workers)."""
    import torch

    with fake_gpu():
        fastema.ema_update_(torch.zeros(16), torch.ones(16), 0.5)   # CUDA tables: its streams kept
    fastema.clear_caches()
