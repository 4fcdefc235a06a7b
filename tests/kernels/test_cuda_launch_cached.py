"""The CUDA lerp launch bound once (``fastema._launch.cuda.LerpLaunch``, issue #23 item 1), on the
CPU with a fake launcher: numba's dispatcher makes the first launch and its overload is kept; every
later call marshals its arguments with numba-cuda's own ``_Kernel._prepare_args`` (each object once)
and goes to ``cuda.core.launch``, here a recorder. The recorded argument blocks must be exactly the
ones numba's ``_Kernel.launch`` would build for the same arguments; no later call may reach the
dispatcher unless an argument's numba type changes. The real launch runs in the GPU plan."""
import contextlib
import ctypes
import os
import types

import numpy as np
import pytest

from fastema import _launch
from fastema._launch import config
from fastema.kernels._bits import F32

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":      # the simulator has no _Kernel (nor a launch to bind)
    pytest.skip("the fake launcher stands in for the real numba-cuda, not the simulator", allow_module_level=True)

C = pytest.importorskip("fastema._launch.cuda")
D = pytest.importorskip("numba.cuda.dispatcher")
nb = pytest.importorskip("numba.cuda.types")
numpy_support = pytest.importorskip("numba.cuda.np.numpy_support")


class FakeDeviceArray:
    """What ``_prepare_args`` reads of a device array (and ``wrap_arg(...).to_device`` gives back)."""

    def __init__(self, ptr, n, dtype):
        self.ptr, self.size, self.dtype, self.shape = ptr, n, np.dtype(dtype), (n,)
        self._layout = types.SimpleNamespace(strides_in_bytes=(np.dtype(dtype).itemsize,))
        self.nbtype = nb.Array(numpy_support.from_dtype(np.dtype(dtype)), 1, "C")

    def to_device(self, retr, stream):
        return self


class FakeDispatcher:
    """``K.lerp_kernel(...)``: configured with ``[blocks, threads(, stream)]`` (one shared configuration
    per launch shape, as numba-cuda's lru-cached ``configure``), calls the pre-launch callbacks with
    the overload it picked, and records each launch."""

    def __init__(self, log):
        self.log, self.configs = log, {}

    def __getitem__(self, shape):
        if shape not in self.configs:
            self.configs[shape] = FakeConfigured(self, shape)
        return self.configs[shape]


class FakeConfigured:
    def __init__(self, dispatcher, shape):
        self.dispatcher, self.shape, self.pre_launch_callbacks = dispatcher, shape, []

    def __call__(self, *args):
        types_ = tuple(a.nbtype if isinstance(a, FakeDeviceArray) else C._typeof(a) for a in args)
        kernel = FakeKernel(types_)
        for cb in self.pre_launch_callbacks:
            cb(kernel, self)
        self.dispatcher.log.append(("dispatcher", self.shape, args))


class FakeKernel:
    extensions: list = []
    debug = cooperative = False
    _prepare_args = D._Kernel._prepare_args               # numba-cuda's own marshalling

    def __init__(self, argument_types):
        self.argument_types = argument_types
        self._codelibrary = types.SimpleNamespace(get_cufunc=lambda: types.SimpleNamespace(kernel="LERP-CUFUNC"))


def _reference_block(args, argument_types):
    """What numba-cuda's ``_Kernel.launch`` passes to ``cuda.core.launch`` for ``args``."""
    out, retr = [], []
    for t, v in zip(argument_types, args):
        FakeKernel._prepare_args(FakeKernel(argument_types), t, v, 0, retr, out)
    return out


def _values(block):
    return [v.value if isinstance(v, ctypes._SimpleCData) else v for v in block]


@pytest.fixture
def fake(monkeypatch):
    log = []
    dispatcher = FakeDispatcher(log)
    flag = FakeDeviceArray(0x9000, 1, np.int32)
    monkeypatch.setattr(C, "cached_launch_available", lambda: True)
    monkeypatch.setattr(C.K, "lerp_kernel", lambda *kinds: dispatcher)
    monkeypatch.setattr(C.K, "plan_lerp_kernel", lambda *kinds: dispatcher)
    monkeypatch.setattr(C.K, "copy_kernel", lambda *kinds: dispatcher)
    monkeypatch.setattr(C, "cuda", types.SimpleNamespace(gpus={0: contextlib.nullcontext()}))
    monkeypatch.setattr(C, "_zero_flag", lambda device: flag)
    monkeypatch.setattr(C, "external_stream", lambda raw: ("numba stream", raw))
    monkeypatch.setattr(C, "_core_stream", lambda raw: ("core stream", raw))
    monkeypatch.setattr(C, "_core_config", lambda blocks, threads: ("config", blocks, threads))
    monkeypatch.setattr(C, "_core_launch", lambda stream, cfg, kernel, *args: log.append(("launch", stream, cfg,
                                                                                          kernel, args)))
    monkeypatch.setattr(C, "_same_type", lambda kernel, value, ty: (
        value.nbtype if isinstance(value, FakeDeviceArray) else C._typeof(value)) == ty)
    monkeypatch.setattr(D, "wrap_arg", lambda v: v)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 3)
    tables = _launch.Tables(*(FakeDeviceArray(0x1000 * (i + 1), 8, np.int64) for i in range(3)),
                            FakeDeviceArray(0x5000, 8, np.int32), FakeDeviceArray(0x6000, 9, np.int64), n=4096,
                            chunks=8)
    group = _launch.Group("cuda:0", F32, F32, tables, current_stream=lambda: 77)
    return types.SimpleNamespace(log=log, dispatcher=dispatcher, group=group, flag=flag)


def test_first_call_through_the_dispatcher_then_numbas_own_argument_blocks(fake):
    run = _launch.lerp_launcher(fake.group)
    assert isinstance(run, C.LerpLaunch)
    run((0.1,))
    assert [e[0] for e in fake.log] == ["dispatcher"]
    first_args = fake.log[0][2]
    argument_types = tuple(a.nbtype if isinstance(a, FakeDeviceArray) else C._typeof(a) for a in first_args)
    for w, key in [((0.1,), 0), ((0.1,), 0), ((0.25,), 0), ((0.25,), 7), ((0.25,), 0)]:
        run(w, key)
        kind, stream, cfg, kernel, block = fake.log[-1]
        assert kind == "launch" and stream == ("core stream", 77) and kernel == "LERP-CUFUNC"
        assert cfg == ("config", 3, config.CUDA_THREADS)            # min(chunks, CUDA_MAX_BLOCKS) blocks
        args = (*fake.group.tables.args(), (np.float32(w[0]),), fake.flag, np.uint32(key))
        want = _reference_block(args, argument_types)
        assert _values(block) == _values(want)
        assert [type(v) for v in block] == [type(v) for v in want]
    assert sum(e[0] == "dispatcher" for e in fake.log) == 1        # no later call reached the dispatcher
    assert all(not c.pre_launch_callbacks for c in fake.dispatcher.configs.values())   # the keeper was removed


def test_an_argument_of_another_type_goes_through_the_dispatcher_again(fake):
    run = _launch.lerp_launcher(fake.group)
    run((0.1,))
    run((0.1,))
    weights = FakeDeviceArray(0x7000, 1, np.float32)                 # a device plan's weights: another overload
    run(weights)
    assert [e[0] for e in fake.log] == ["dispatcher", "launch", "dispatcher"]
    run(weights)                                                     # and that overload is kept now
    assert fake.log[-1][0] == "launch"
    assert _values(fake.log[-1][4])[-15:-10] == [0, 0, 1, 4, 0x7000]  # meminfo, parent, size, itemsize, ptr


def test_the_same_objects_after_another_kernel_are_marshalled_for_that_kernel(fake):
    """Device weights, then host weights (another overload kept), then the same device weights again:
    the last call must not reuse the first overload's argument block with the second overload (the
    last-call memo is dropped when the kept kernel changes): it goes through the dispatcher."""
    weights = FakeDeviceArray(0x7000, 1, np.float32)
    run = _launch.lerp_launcher(fake.group)
    run(weights)
    run(weights)
    run((0.1,))
    run(weights)
    assert [e[0] for e in fake.log] == ["dispatcher", "launch", "dispatcher", "dispatcher"]
    run(weights)
    assert fake.log[-1][0] == "launch"
    assert _values(fake.log[-1][4])[-15:-10] == [0, 0, 1, 4, 0x7000]


def test_the_plan_and_lerp_launch_is_bound_the_same_way(fake):
    """``plan_lerp_launcher`` (issue #23 item 2: the plan step in the lerp launch): the plan arrays and
    the group index bound once, the step ``given`` the only argument that changes; numba's own argument
    blocks, one dispatcher call."""
    plan = {name: FakeDeviceArray(0x20000 + 0x100 * i, n, dt) for i, (name, n, dt) in enumerate(
        [("state", 5, np.float64), ("params", 40, np.float64), ("decays", 2, np.float64), ("w32", 2, np.float32),
         ("w64", 2, np.float64), ("flag", 1, np.int32), ("keys", 3, np.int64), ("done", 1, np.int32)])}
    run = _launch.plan_lerp_launcher(fake.group, plan, 1)
    assert isinstance(run, C.BoundLaunch)
    run(-1)
    first_args = fake.log[0][2]
    argument_types = tuple(a.nbtype if isinstance(a, FakeDeviceArray) else C._typeof(a) for a in first_args)
    for given in (-1, -1, 12, 13, -1):
        run(given)
        kind, stream, cfg, kernel, block = fake.log[-1]
        assert kind == "launch" and stream == ("core stream", 77) and cfg == ("config", 3, config.CUDA_THREADS)
        args = (*fake.group.tables.args(), plan["state"], plan["params"], plan["decays"], np.int64(given), plan["w32"],
                plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(1))
        want = _reference_block(args, argument_types)
        assert _values(block) == _values(want)
    assert sum(e[0] == "dispatcher" for e in fake.log) == 1


def test_the_buffer_copy_launch_is_bound_once(fake):
    """``copy_launcher``: a model average's buffer copy behind its plan's flag, every argument bound."""
    flag = FakeDeviceArray(0x30000, 1, np.int32)
    run = _launch.copy_launcher(fake.group, to_shadow=True, row_lo=0, row_hi=2, flag=flag)
    for _ in range(4):
        run()
    assert [e[0] for e in fake.log] == ["dispatcher"] + ["launch"] * 3
    args = (*fake.group.tables.args(), 0, 2, flag)
    types_ = tuple(a.nbtype if isinstance(a, FakeDeviceArray) else C._typeof(a) for a in args)
    assert _values(fake.log[-1][4]) == _values(_reference_block(args, types_))


def test_without_the_internals_every_launch_is_the_dispatchers(fake, monkeypatch):
    monkeypatch.setattr(C, "cached_launch_available", lambda: False)
    ran = []
    monkeypatch.setattr(C, "_run", lambda kernel, device, stream, blocks, *args: ran.append((stream, blocks)))
    run = _launch.lerp_launcher(fake.group)
    for _ in range(3):
        run((0.1,))
    assert ran == [(("numba stream", 77), 3)] * 3 and not fake.log


def test_an_unknown_numba_cuda_warns_once_and_uses_the_dispatcher(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(C, "SIMULATOR", False)
    monkeypatch.setattr(md, "version", lambda name: "0.99.0" if name == "numba-cuda" else real(name))
    with pytest.warns(RuntimeWarning, match="numba-cuda 0.99.0's launch internals are not the ones fastema knows"):
        assert C.cached_launch_available.__wrapped__() is False
    monkeypatch.setenv("FASTEMA_CUDA_LAUNCH", "dispatcher")
    assert C.cached_launch_available.__wrapped__() is False
