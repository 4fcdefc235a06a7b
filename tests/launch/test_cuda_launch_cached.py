"""The CUDA launches bound once (``fastema._launch.cuda.launch``, issue 23 item 1, issue 37 D1-D3,
C4, C7, issue 54 item 2), on the CPU with the fake GPU of ``testkit`` (a launch driver,
``FakeDriver``, under fastema's real kernel factories and shipped device code): the first call loads
the variant's device code (the shipped sm_90 code: ``fastema._launch.cuda.device_code``) and packs one
parameter block with fastema's own ABI (``fastema._launch.cuda.abi``), patched in place where an argument
changed, byte for byte what cuda.core's ``ParamHolder`` packs for numba-cuda's own ``_prepare_args``
values. No call reaches numba's dispatcher; a variant's code is loaded again only when an argument's
numba type changes to one not loaded yet; no context push where the device's primary context is
current; every CUDA call of a binding inside its device's context. The real launch runs in the GPU
plan."""
import ctypes
import os

import numpy as np
import pytest

from fastema import _launch
from fastema._launch import config
from fastema.kernels._bits import F32

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":      # the simulator has no _Kernel (nor a launch to bind)
    pytest.skip("the fake launcher stands in for the real numba-cuda, not the simulator", allow_module_level=True)

pytest.importorskip("numba.cuda.dispatcher")
B = pytest.importorskip("fastema._launch.cuda.launch")
from fastema._launch.cuda import tables as C  # noqa: E402
from testkit.fake_driver import FakeDeviceArray, numba_marshalling  # noqa: E402
from testkit.fake_gpu import fake_gpu, rl_mlp  # noqa: E402

ParamHolder = pytest.importorskip("cuda.core._kernel_arg_handler").ParamHolder


def _group(device="cuda:0", chunks=8):
    tables = _launch.Tables(  # type: ignore[call-arg]
        *(FakeDeviceArray(8, np.int64, ptr=0x1000 * (i + 1)) for i in range(3)),
        FakeDeviceArray(8, np.int32, ptr=0x5000), FakeDeviceArray(9, np.int64, ptr=0x6000), n=4096, chunks=chunks)
    return _launch.Group(device, F32, F32, tables, current_stream=lambda: 77)


@pytest.fixture
def fake():
    with config.tuned(CUDA_MAX_BLOCKS=3), fake_gpu(torch_on_gpu=False) as f:
        f.group = _group()
        f.flag = C._zero_flag("cuda:0")
        yield f


def _launches(fake):
    return [e for e in fake.launches if e[0] in ("launch", "dispatcher", "load")]


def _block_bytes(address: int, sizes: list) -> list:
    pointers = (ctypes.c_void_p * len(sizes)).from_address(address)
    return [ctypes.string_at(pointers[i], size) for i, size in enumerate(sizes)]


def assert_packed_like_cuda_core(address: int, run, args):
    """The block at ``address`` holds, value for value and byte for byte, what cuda.core's
    ParamHolder packs for numba's own argument list of ``args`` (what numba-cuda's
    ``_Kernel.launch`` hands it)."""
    with numba_marshalling() as params:
        want = params(run.block.types, args)
    sizes = run.block.sizes
    assert len(sizes) == len(want)
    holder = ParamHolder(want)
    assert _block_bytes(address, sizes) == _block_bytes(holder.ptr, sizes)


def _entry(run) -> str:
    """The entry name of the code ``run`` is bound to (what the fake driver's handles are named by).
    """
    d = run.driver
    return next(e[2] for e in d.launches if e[0] == "load" and d.handle_of(e[2]) == int(run.func))


def test_first_call_loads_the_code_then_one_block_packed_once_and_patched(fake):
    run = _launch.prepare("lerp", fake.group)
    assert isinstance(run, B.CudaLerp)
    run((0.1,))
    assert [e[0] for e in _launches(fake)] == ["load", "launch"]
    addresses = []
    for w, key in [((0.1,), 0), ((0.1,), 0), ((0.25,), 0), ((0.25,), 7), ((0.25,), 0)]:
        run(w, key)
        kind, stream, blocks, func = fake.launches[-1]
        assert kind == "launch" and blocks == 3 and int(stream) == 77      # min(chunks, CUDA_MAX_BLOCKS) blocks
        assert func is run.func and run.loaded.source == "cu13/sm_90" and "lerp" in _entry(run)
        addresses.append(run.block.address)
        args = (*fake.group.tables.args(), (np.float32(w[0]),), fake.flag, np.uint32(key))
        assert_packed_like_cuda_core(run.block.address, run, args)
    assert len(set(addresses)) == 1                                         # one block, patched in place
    assert [e[0] for e in _launches(fake)].count("load") == 1               # loaded once
    assert "dispatcher" not in [e[0] for e in _launches(fake)]              # numba's dispatcher never


def test_the_driver_is_handed_the_packed_block_not_a_list_rebuilt_per_launch(fake, monkeypatch):
    """D2: numba-cuda's launch (and fastema's before issue 37) built every argument list anew and had
    cuda.core pack it into a new ParamHolder at every launch (45 values for a lerp); now the driver gets
    the address of the binding's block, the same at every call."""
    handed = []
    with fake_gpu(torch_on_gpu=False, on_launch=handed.append, record=False):
        run = _launch.prepare("lerp", _group())
        weights = (0.1,)
        for _ in range(4):
            run(weights)
    assert len(handed) == 4
    assert all(isinstance(h, int) for h in handed) and len(set(handed)) == 1


def test_an_argument_of_another_type_binds_again(fake):
    run = _launch.prepare("lerp", fake.group)
    run((0.1,))
    run((0.1,))
    weights = FakeDeviceArray(1, np.float32, ptr=0x7000)          # a device plan's: another type
    run(weights)
    assert [e[0] for e in _launches(fake)] == ["load", "launch", "launch", "load", "launch"]
    run(weights)                                                     # and that variant is bound now
    assert fake.launches[-1][0] == "launch"
    assert run.block.values()[-15:-10] == [0, 0, 1, 4, 0x7000]  # meminfo, parent, size, itemsize, ptr


def test_the_same_objects_after_another_kernel_are_marshalled_for_that_kernel(fake):
    """Device weights, then host weights (another overload kept), then the same device weights again:
    the last call must not reuse the first variant's block with the second variant's code (it binds
    again, to the code loaded already)."""
    weights = FakeDeviceArray(1, np.float32, ptr=0x7000)
    run = _launch.prepare("lerp", fake.group)
    run(weights)
    run(weights)
    run((0.1,))
    run(weights)
    assert [e[0] for e in _launches(fake)] == ["load", "launch", "launch", "load", "launch", "launch"]
    run(weights)
    assert fake.launches[-1][0] == "launch"
    assert run.block.values()[-15:-10] == [0, 0, 1, 4, 0x7000]


def _plan():
    return {name: FakeDeviceArray(n, dt, ptr=0x20000 + 0x100 * i) for i, (name, n, dt) in enumerate(
        [("state", 5, np.float64), ("params", 40, np.float64), ("decays", 2, np.float64), ("w32", 2, np.float32),
         ("w64", 2, np.float64), ("flag", 1, np.int32), ("keys", 3, np.int64), ("done", 1, np.int32)])}


def test_the_plan_and_lerp_launch_is_bound_the_same_way(fake):
    """``prepare("plan_lerp", ...)`` (issue #23 item 2: the plan step in the lerp launch): the plan arrays and
    the group index bound once, the step ``given`` the only argument that changes; numba's own argument
    values, one load."""
    plan = _plan()
    run = _launch.prepare("plan_lerp", fake.group, **plan, gi=1)
    assert isinstance(run, B.CudaLaunch)
    run(-1)
    for given in (-1, -1, 12, 13, -1):
        run(given)
        kind, stream, blocks, func = fake.launches[-1]
        assert kind == "launch" and int(stream) == 77 and blocks == 3
        args = (*fake.group.tables.args(), plan["state"], plan["params"], plan["decays"], np.int64(given), plan["w32"],
                plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(1))
        assert_packed_like_cuda_core(run.block.address, run, args)
    assert [e[0] for e in _launches(fake)].count("load") == 1 and "dispatcher" not in [e[0] for e in fake.launches]


def test_the_plan_and_lerp_grid_is_capped_at_a_few_waves(monkeypatch):
    """D3: every block of the fused kernel runs the plan step before it streams; its grid is at most
    CUDA_PLAN_LERP_BLOCKS_PER_SM blocks per multiprocessor (it grid-strides over the chunks), where a
    block per chunk (up to CUDA_MAX_BLOCKS, 32768) paid the step ~30000 times on GPT-2 sizes. The plain
    lerp keeps a block per chunk."""
    with fake_gpu(torch_on_gpu=False) as fake:
        group = _group(chunks=30000)
        run = _launch.prepare("plan_lerp", group, **_plan(), gi=0)
        for given in (-1, -1):
            run(given)
        per_sm = getattr(config, "CUDA_PLAN_LERP_BLOCKS_PER_SM", 12)
        assert [e[0] for e in fake.launches] == ["load", "launch", "launch"]
        assert fake.launches[1][2] == fake.launches[-1][2] == per_sm * 132
        lerp = _launch.prepare("lerp", group)
        lerp((0.5,))
        lerp((0.5,))
        assert fake.launches[-1][2] == min(30000, config.CUDA_MAX_BLOCKS)
        few = _group(chunks=7)
        small = _launch.prepare("plan_lerp", few, **_plan(), gi=0)
        small(-1)
        small(-1)
        assert fake.launches[-1][2] == 7


def test_the_buffer_copy_launch_is_bound_once(fake):
    """``prepare("copy", ...)``: a model average's buffer copy behind its plan's flag, every argument bound."""
    flag = FakeDeviceArray(1, np.int32, ptr=0x30000)
    run = _launch.prepare("copy", fake.group, to_shadow=True, row_lo=0, row_hi=2, flag=flag)
    for _ in range(4):
        run()
    assert [e[0] for e in _launches(fake)] == ["load"] + ["launch"] * 4
    assert_packed_like_cuda_core(run.block.address, run, (*fake.group.tables.args(), 0, 2, flag))


def test_the_plan_step_and_the_nonfinite_scan_are_bound_the_same_way(fake):
    """D5: ``prepare("plan", ...)`` (a device plan's step where no lerp carries it: one block) and
    ``prepare("nonfinite", ...)`` (skip_nonfinite's scan: the sources' tables only) load their code once,
    then launch their packed blocks, numba's own values."""
    plan = {k: v for k, v in _plan().items() if k != "done"}
    step = _launch.Group("cuda:0", None, 0, None, lambda: 77).launch("plan", **plan)
    flag = FakeDeviceArray(1, np.int32, ptr=0x40000)
    scan = _launch.prepare("nonfinite", fake.group, flag=flag)
    for given in (-1, 5, -1):
        step(given)
        scan()
    assert [e[0] for e in _launches(fake)] == ["load", "launch", "load", "launch"] + ["launch"] * 4
    assert fake.launches[-2][2] == 1 and fake.launches[-1][2] == 3      # one block; a block per chunk (<= 3)
    assert_packed_like_cuda_core(step.block.address, step, (plan["state"], plan["params"], plan["decays"],
                                                            np.int64(-1), plan["w32"], plan["w64"], plan["flag"],
                                                            plan["keys"]))
    t = fake.group.tables
    assert_packed_like_cuda_core(scan.block.address, scan, (t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin,
                                                            flag))


def test_no_context_push_where_the_devices_primary_context_is_current():
    """D1: a push and pop cost 10.2 us on the 11-22 H100 machine, as much as torch's whole lerp_ launch.
    Where the device's primary context is current (torch keeps it so) a bound launch pushes nothing;
    where another context (or none) is current, it pushes the device's."""
    for primary_current, pushes in ((True, 0), (False, 5)):
        with fake_gpu(torch_on_gpu=False, primary_current=primary_current) as fake:
            group = _group()
            runs = [_launch.prepare("lerp", group), _launch.prepare("plan_lerp", group, **_plan(), gi=0),
                    _launch.prepare("copy", group, to_shadow=True, row_lo=0, row_hi=1)]
            runs[0]((0.5,))
            runs[1](-1)
            runs[2]()
            fake.pushes.clear()
            for _ in range(5):
                runs[0]((0.5,))
            assert sum(fake.pushes.values()) == pushes, primary_current
            assert fake.launches[-1][0] == "launch"


def test_every_cuda_call_of_a_group_runs_inside_its_devices_context():
    """C4: a group on cuda:1 while the thread's device is cuda:0: its tables' uploads, the zero flag,
    loading the variant's code and the first launch all run inside ``cuda.gpus[1]``; later launches run
    there or with the device's primary context current."""
    with fake_gpu(torch_on_gpu=False, primary_current=False) as fake:
        host = _launch.Tables(np.array([0x1000], np.int64), np.array([0x2000], np.int64),
                              np.array([0, 100], np.int64), np.zeros(1, np.int32), np.array([0, 100], np.int64), 100, 1)
        tables = C.upload(host, "cuda:1", slots=1)
        group = _launch.Group("cuda:1", F32, F32, tables, current_stream=lambda: 77)
        run = _launch.prepare("lerp", group)
        plan = _launch.prepare("plan_lerp", group, **_plan(), gi=0)
        for _ in range(3):
            run((0.5,))
            plan(-1)
        _launch.update_addresses(tables, [0x3000], "cuda:1", lambda: 77)
        calls = [e for e in fake.log if e[0] in ("to_device", "copy_to_device", "dispatcher", "load", "launch",
                                                  "event.record", "stream.synchronize")]
        assert {e[0] for e in calls} >= {"to_device", "load", "launch", "copy_to_device"}
        assert all(e[1] == 1 for e in calls), [e for e in calls if e[1] != 1]


def test_a_binding_never_goes_through_numbas_dispatcher(fake):
    """C7 and issue 54 item 2: a binding used to keep the overload numba's dispatcher compiled (a
    shared, lru-cached launch configuration, and numba-cuda's private ``overloads``); now the
    dispatcher neither launches nor compiles anything, and the variant's code is found by its
    factory's name and argument types (issue 70 item 3: the dispatcher is not even asked for)."""
    from fastema.kernels import cuda as K

    dispatcher = K.lerp_kernel(F32, F32, False, False)
    run = _launch.prepare("lerp", fake.group)
    run((0.1,))
    run((0.1,))
    assert not dispatcher.overloads                                    # numba compiled nothing
    assert not [e for e in fake.launches if e[0] == "dispatcher"]      # nor launched
    assert run.block.types[6] == B._typeof((np.float32(0.1),))
    assert fake.launches[-1][0] == "launch"


def test_construction_uploads_are_written_when_construction_returns():
    """C1: the tables were copied asynchronously on the stream current at construction, and the zero
    flag on the legacy stream; torch's side streams are non-blocking, so a first launch on another one
    could read a half-written table, or a flag not yet zeroed (cuMemAlloc memory, possibly non-zero:
    the update skipped). Every construction-time copy now goes on fastema's own upload stream, which
    is waited for before the tables are handed out (a wait for those copies only: the stream is
    non-blocking and waits for no other work)."""
    with fake_gpu(torch_on_gpu=False) as fake:
        t = _launch.tables([0x1000, 0x2000], [100, 50], [0x9000, 0x9400], "cuda:0", lambda: 77, handed_over=True)
        events = [(e[0], getattr(e[2], "name", e[2])) for e in fake.log
                  if e[0] in ("to_device", "stream.synchronize", "copy_to_device")]
        copies = [e for e in events if e[0] == "to_device"]
        assert len(copies) == 7 and {s for _, s in copies} == {"upload-0"}   # flag, 5 tables, the second address table
        assert events[-1] == ("stream.synchronize", "upload-0")
        for i, e in enumerate(events):                                       # each copy waited for before the next
            if e[0] == "to_device":
                assert ("stream.synchronize", "upload-0") in events[i + 1:i + 2], events
        assert list(t.seg_addr.copy_to_host()) == [0x1000, 0x2000]


def test_a_replaced_torch_storage_is_kept_until_the_launch_stream_has_passed_it():
    """C2: ``param.data = new`` dropped the old storage at the next update; torch's allocator gives its
    block to the next tensor allocated on the old storage's stream, while a kernel fastema queued on
    another stream (an update under ``torch.cuda.stream(side)``) may still read it. Now the old storage
    is released through an event recorded on the launch stream, and dropped at the first launch
    after that event has passed (no wait, no leak)."""
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    import fastema

    with fake_gpu() as fake:
        params = [torch.randn(n) for n in (300, 7)]
        flat = fastema.FlatShadow(params)
        flat.update(0.5)
        old = weakref.ref(params[0].untyped_storage())
        fake.events_done = False                       # fastema's launches still queued
        fake.log.clear()
        params[0].data = torch.randn(300)              # the model moves the storage under the tensor
        flat.update(0.5)
        gc.collect()
        assert old() is not None                       # held: the event has not passed
        recorded = [e for e in fake.log if e[0] == "event.record"]
        assert recorded and all(e[2] == 77 for e in recorded)   # on the launch stream
        flat.update(0.5)
        gc.collect()
        assert old() is not None
        fake.events_done = True                        # the GPU passed the event
        flat.update(0.5)
        gc.collect()
        assert old() is None                           # dropped at the next launch


def test_where_fastemas_launch_cannot_run_every_launch_is_the_dispatchers():
    """A driver that loads no image (numba's dispatcher: the simulator,
    FASTEMA_CUDA_LAUNCH=dispatcher, no cuda.core) gets every launch of a binding as a dispatch, on
    the stream current at that call."""
    with config.tuned(CUDA_MAX_BLOCKS=3), fake_gpu(torch_on_gpu=False, loads=False) as fake:
        run = _launch.prepare("lerp", _group())
        for _ in range(3):
            run((0.1,))
    shape = (3, config.CUDA_THREADS, 77)
    assert [(e[0], e[2]) for e in fake.launches] == [("dispatcher", shape)] * 3
    assert "lerp_kernel" in fake.launches[0][1]


def test_numba_cudas_version_does_not_decide_the_fast_path(monkeypatch):
    """Issue 54 item 2: the bound path rested on numba-cuda 0.30's private internals and dropped to
    the dispatcher (100-600 us a launch) on any other numba-cuda; now only the simulator,
    FASTEMA_CUDA_LAUNCH=dispatcher and a cuda.core that cannot be imported (one warning) turn it
    off."""
    import importlib.metadata as md
    import sys
    import warnings

    from fastema._launch.cuda import drivers

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "0.99.0" if name == "numba-cuda" else real(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(drivers.default.__wrapped__()) is drivers.CudaCoreDriver
    monkeypatch.setenv("FASTEMA_CUDA_LAUNCH", "dispatcher")
    assert type(drivers.default.__wrapped__()) is drivers.DispatcherDriver
    monkeypatch.delenv("FASTEMA_CUDA_LAUNCH")
    monkeypatch.setitem(sys.modules, "cuda.core", None)                # not importable
    said = "cuda.core cannot launch here .*ModuleNotFoundError.*numba.s dispatcher"
    with pytest.warns(RuntimeWarning, match=said):
        assert type(drivers.default.__wrapped__()) is drivers.DispatcherDriver


def test_an_ema_update_of_a_6_tensor_network_is_one_launch_with_no_context_push():
    """End to end on the fake GPU: ``fastema.torch.EMA.update()`` of the RL network with the plan on the
    device is one launch per call after the first, through the packed block, with no push."""
    torch = pytest.importorskip("torch")
    from fastema.torch import EMA

    with fake_gpu() as fake:
        model = rl_mlp()
        ema = EMA(model, 0.99, device_step=True)
        with torch.no_grad():
            ema.update()
            fake.launches.clear()
            fake.pushes.clear()
            for _ in range(4):
                ema.update()
        assert [e[0] for e in fake.launches] == ["launch"] * 4         # nothing loaded again
        assert not sum(fake.pushes.values())


def test_a_release_every_step_records_again_the_events_that_passed():
    """JAX and TensorFlow hand new sources over every step, so every step releases the old ones
    through an event: each release made a new event (``cuEventCreate``, and ``cuEventDestroy`` when
    it went), a driver allocation a step. A passed event is recorded again; one not yet passed is not."""
    from fastema._launch.cuda import tables as launch_cuda

    with fake_gpu(torch_on_gpu=False) as fake:
        made = []
        event = fake.event
        fake.event = lambda: made.append(event()) or made[-1]      # this driver's events, counted
        retired = launch_cuda.Retired(driver=fake)
        fake.events_done = True
        for step in range(5):
            retired.release([step], "cuda:0", 77)
        assert len(made) == 1 and [e[0] for e in fake.log].count("event.record") == 5
        fake.events_done = False                                   # the GPU behind: none passed
        for step in range(3):
            retired.release([step], "cuda:0", 77)
        assert len(made) == 4 and len(retired.pending) == 4


def _fastema_frames(fn) -> list:
    """The qualified names of fastema's Python frames ``fn()`` runs."""
    import sys

    here = os.sep + "fastema" + os.sep
    seen: list = []

    def profile(frame, event, arg):
        if event == "call" and here in frame.f_code.co_filename:
            seen.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_a_kept_launch_is_one_python_frame_around_the_drivers_two_calls(fake):
    """Issue 86 item 3: a kept launch went through 7 Python frames (the argument tuple, the tables'
    ``args()``, ``_launch``, ``_go``, the driver's ``current_context`` and ``launch``) before its two
    driver calls, as much host time as torch's whole ``lerp_`` on an H200. Now, where the tables and
    its arguments are the ones its block was packed from, it is its own ``__call__`` alone, making the
    driver's calls bound once; the launches are the same (block, stream, grid)."""
    run = _launch.prepare("lerp", fake.group)
    plan = _plan()
    step = _launch.prepare("plan_lerp", fake.group, **plan, gi=1)
    w = (0.1,)
    for _ in range(2):
        run(w)
        step(-1)
    before = list(fake.launches)
    assert _fastema_frames(lambda: run(w)) == ["CudaLerp.__call__"]
    assert _fastema_frames(lambda: step(-1)) == ["CudaLaunch.__call__"]
    assert fake.launches[len(before):] == before[-2:]                   # the same two launches again
    assert_packed_like_cuda_core(run.block.address, run,
                                 (*fake.group.tables.args(), (np.float32(0.1),), fake.flag, np.uint32(0)))


def test_a_kept_launch_packs_again_where_its_tables_weights_or_tunables_moved(fake):
    """What a kept launch holds is dropped where it moved: new tables (moved sources: the owner
    replaces ``group.tables``), other weights, another key, the tunables (``config.tuned``)."""
    run = _launch.prepare("lerp", fake.group)
    w = (0.1,)
    run(w)
    run(w)
    moved = fake.group.tables._replace(seg_addr=FakeDeviceArray(8, np.int64, ptr=0x9000))
    fake.group.tables = moved
    run(w)
    assert run.block.values()[12] == 0x9000                                 # the sources' table's address
    for weights, key in (((0.25,), 0), ((0.25,), 5), ((0.25,), 5)):
        run(weights, key)
        assert_packed_like_cuda_core(run.block.address, run, (*moved.args(), (np.float32(weights[0]),), fake.flag,
                                                              np.uint32(key)))
    with config.tuned(CUDA_MAX_BLOCKS=2):
        run((0.25,), 5)
        assert fake.launches[-1][2] == 2
    run((0.25,), 5)
    assert fake.launches[-1][2] == 3
