"""``CudaCoreDriver``'s device work through cuda-bindings alone (issue 70, item 3;
``fastema/_launch/cuda/memory.py``): on the driver emulator (``testkit/emulator.py``: device memory is host
memory, the copies memcpy, the driver's rules kept), with fastema's real ``CudaCoreDriver`` doing everything
(no ``FakeDriver``), the entry points import no ``numba.cuda``, what was uploaded reads back, and no call
broke a rule of the driver's; a failing ``CUresult`` is raised naming the call and the result."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _on_the_stub(body: str) -> str:
    from testkit.fake_gpu import stub_driver_dir

    stub = stub_driver_dir()
    if stub is None:
        pytest.skip("no C compiler for the stub driver")
    environ = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (stub, os.environ.get("LD_LIBRARY_PATH")) if p)}
    environ.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow                                           # a fresh process importing torch (~3-8 s)
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="a process on the stub driver")
def test_the_real_driver_uploads_stages_and_launches_without_numba_cuda():
    """Every entry point on the real ``CudaCoreDriver`` (torch's CPU tensors on ``cuda:0`` by the fake
    GPU's adapter, its views ``memory.DeviceArray``), ``numba.cuda`` checked after each; an
    uploaded table and a table rewritten through pinned staging read back equal."""
    pytest.importorskip("torch")
    out = _on_the_stub("""
        import copy, gc, sys
        import numpy as np
        import torch, fastema
        from fastema import _backends
        from fastema._launch import config
        from fastema._launch.cuda import drivers, memory
        from fastema._launch.cuda import tables as launch_tables
        from fastema.torch import EMA, TargetNetwork
        from testkit.emulator import Emulator
        from testkit.fake_backend import FakeGpuBackend
        from testkit.fake_gpu import rl_mlp

        on_gpu = FakeGpuBackend(view=memory.DeviceArray.view)   # torch's cuda:0: views of fastema's own type

        freed = []                                          # a finalizer's error (cuMemFree, cuMemFreeHost, ...)
        sys.unraisablehook = lambda u: freed.append(repr(u.exc_value))

        def imported(where):
            assert "numba.cuda" not in sys.modules, where

        d = drivers.current()
        assert type(d) is drivers.CudaCoreDriver, d
        table = d.upload(np.arange(10, dtype=np.int64) * 3, 0)
        imported("upload")
        assert np.array_equal(table.copy_to_host(), np.arange(10) * 3)
        assert np.array_equal(table[2:5].copy_to_host(), [6, 9, 12])
        first = np.array([11, 12, 13], np.int64)
        tables = launch_tables.AddressTables(launch_tables.to_device(first, "cuda:0"), first, 1, "cuda:0")
        for k in range(config.CUDA_STAGING_SLOTS + 2):      # more rewrites than staging slots: one reused
            new = first + 100 * (k + 1)
            assert tables.point(new, "cuda:0", 77).copy_to_host().tolist() == new.tolist()
        imported("staging")
        del table, tables                                   # device tables, pinned slots, events freed
        gc.collect()
        assert not freed, freed
        assert d.compute_capability(0) == (9, 0) and d.sm_count(0) == 132
        assert d.current_context() == 0                     # a thread with none (torch not here)
        with d.activate(0):
            assert d.primary_context(0) == d.current_context() == 0xC0C0
        with _backends.using(on_gpu), torch.no_grad():
            model = rl_mlp()
            ema = EMA(model, 0.99)
            ema.update()
            imported("EMA.update")
            fastema.ema_update_(torch.randn(64), torch.randn(64), 0.9)
            imported("ema_update_")
            with ema.average_parameters():
                pass
            imported("swap")
            next(model.parameters()).data = torch.randn_like(next(model.parameters()))
            ema.update()                                    # a moved source: its table rewritten
            imported("EMA.update after a source moved")
            net = rl_mlp()
            tn = TargetNetwork(net, copy.deepcopy(net).requires_grad_(False), tau=0.005)
            tn.update()
            imported("TargetNetwork.update")
            sm = fastema.Smoother(decay=0.9, window=5)
            for i in range(3):
                sm.update(torch.full((4,), float(i)))
            imported("Smoother.update")
        del ema, tn, sm
        gc.collect()
        assert not freed, freed
        loaded = [v for v in d.images.values() if v is not None]
        print(len(loaded) >= 4, len(loaded) == len(d.images), sorted({v.source.split("/")[1] for v in loaded}))
        e = Emulator()                                      # no call broke a rule; a staging slot waited once
        seen = e.counters()
        print({k: seen[k] for k in ("no_context", "errors", "unknown_calls")}, e.depth(), seen["not_ready"] > 0,
              seen["host_waits"] > 0, e.flags())
        launches = e.launches()                             # as the driver took them: geometry, parameters
        print(len(launches) >= 8, {(r.block, r.grid[1:], r.shared, r.packed, r.extra) for r in launches},
              all(r.grid[0] >= 1 and r.context == 0xC0C0 for r in launches))
    """)
    assert out.splitlines()[0] == "True True ['sm_90']", out               # the shipped code, none dispatched
    assert out.splitlines()[1] == ("{'no_context': 0, 'errors': 0, 'unknown_calls': 0} 0 True True "
                                   "{'stream': 1, 'event': 2, 'host_alloc': 1}"), out
    assert out.splitlines()[2] == "True {((256, 1, 1), (1, 1), 0, True, False)} True", out   # the bank is fastema's


class _Failing:
    """cuda-bindings' ``driver`` with one call answering ``result`` (the others the real module's)."""

    def __init__(self, call: str, result: str):
        from cuda.bindings import driver

        self._d, self._call, self._result = driver, call, getattr(driver.CUresult, result)

    def __getattr__(self, name):
        if name == self._call:
            return lambda *a: (self._result, None)
        return getattr(self._d, name)


@pytest.mark.parametrize("call,result", [("cuInit", "CUDA_ERROR_NO_DEVICE"),
                                         ("cuMemHostAlloc", "CUDA_ERROR_OUT_OF_MEMORY")])
def test_a_failing_result_is_raised_naming_the_call(call, result):
    from fastema._launch.cuda import memory

    with pytest.raises(memory.CudaDriverError, match=f"{call} failed: {result}") as info:
        if call == "cuInit":
            memory.Device(0, _Failing(call, result))
        else:
            memory.pinned(4, np.float32, _Failing(call, result))
    assert (info.value.call, info.value.result) == (call, result)


def test_check_passes_the_values_on_and_raises_on_an_error():
    from cuda.bindings import driver

    from fastema._launch.cuda.memory import CudaDriverError, check

    ok = driver.CUresult.CUDA_SUCCESS
    assert check("cuA", (ok,)) is None and check("cuB", (ok, 5)) == 5 and check("cuC", (ok, 1, 2)) == (1, 2)
    with pytest.raises(CudaDriverError, match="cuEventQuery failed: CUDA_ERROR_INVALID_HANDLE"):
        check("cuEventQuery", (driver.CUresult.CUDA_ERROR_INVALID_HANDLE,))


def test_a_device_array_view_reads_as_the_launch_path_reads_it():
    """``__cuda_array_interface__`` v3, contiguous slices at their offset, the owner kept; any other
    index refused."""
    from fastema._launch.cuda import abi, argtypes
    from fastema._launch.cuda.memory import DeviceArray

    owner = object()
    a = DeviceArray.view(0x10000, 10, np.float32, owner)
    assert a.__cuda_array_interface__ == {"shape": (10,), "typestr": "<f4", "data": (0x10000, False),
                                          "strides": None, "version": 3}
    s = a[3:7]
    assert (s.ptr, s.size, s.owner, len(a[8:2])) == (0x10000 + 12, 4, owner, 0)
    assert str(argtypes.typeof(a)) == "array(float32, 1d, C)"
    assert abi._array_values(1, s) == (0, 0, 4, 4, 0x10000 + 12, 4, 4)
    with pytest.raises(TypeError, match="contiguous slices"):
        a[::2]
    with pytest.raises(TypeError, match="contiguous slices"):
        a[3]


def test_the_stub_driver_is_built_whole_by_processes_at_once_and_only_in_a_folder_of_ones_own(tmp_path):
    """Four processes on an empty temp folder build the stub at once: each gets the folder, and the
    library there is whole (``cc -o`` made it at 0 bytes first, and another process loaded that: "file
    too short"); a folder others can write, where a planted library would be loaded, is refused."""
    import ctypes
    import stat

    if not any(os.access(os.path.join(d, c), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)
               for c in ("cc", "gcc")):
        pytest.skip("no C compiler for the stub driver")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    probe = ("import os, sys; from testkit.fake_gpu import stub_driver_dir; d = stub_driver_dir(); "
             "print(d, os.path.getsize(os.path.join(d, 'libcuda.so.1')))")
    children = [subprocess.Popen([sys.executable, "-c", probe], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    said = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in said]
    folders = {out.split()[0] for out, _ in said}
    assert len(folders) == 1 and all(int(out.split()[1]) > 0 for out, _ in said), said
    folder = folders.pop()
    assert sorted(os.listdir(folder)) == ["libcuda.so.1"]           # no half-built files left
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    ctypes.CDLL(os.path.join(folder, "libcuda.so.1"))
    os.chmod(folder, 0o777)                                        # others could plant a library there
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "only it can write" in done.stderr, done.stderr[-2000:]


class _Contexts:
    """cuda-bindings' ``driver`` answering the context, pinned-memory and copy calls with success (the
    real ``CUresult`` and ``CUcontext`` types; every name checked against the real module), keeping
    the stack of pushed contexts and, for each free and copy, whether a context was current then."""

    def __init__(self):
        from cuda.bindings import driver

        self._d, self.stack, self.calls, self._blocks = driver, [], [], {}
        self.ok = driver.CUresult.CUDA_SUCCESS
        self.mode = self.mode_at_free = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL
        for name in ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxGetCurrent", "cuCtxPushCurrent",
                     "cuCtxPopCurrent", "cuMemHostAlloc", "cuMemFreeHost", "cuMemcpyDtoH", "cuMemcpyHtoDAsync",
                     "cuThreadExchangeStreamCaptureMode"):
            assert hasattr(driver, name), name

    def __getattr__(self, name):
        return getattr(self._d, name)

    def cuInit(self, flags):
        return (self.ok,)

    def cuDeviceGet(self, index):
        return self.ok, self._d.CUdevice(index)

    def cuDevicePrimaryCtxRetain(self, device):
        return self.ok, self._d.CUcontext(0xC0C0)

    def cuCtxGetCurrent(self):
        return self.ok, self.stack[-1] if self.stack else self._d.CUcontext(0)

    def cuCtxPushCurrent(self, context):
        self.stack.append(context)
        return (self.ok,)

    def cuCtxPopCurrent(self):
        return self.ok, self.stack.pop()

    def cuMemHostAlloc(self, nbytes, flags):
        block = np.zeros(nbytes, np.uint8)
        self._blocks[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def _current(self, call):
        self.calls.append((call, bool(self.stack)))
        return (self.ok,)

    def cuThreadExchangeStreamCaptureMode(self, mode):
        before, self.mode = self.mode, self._d.CUstreamCaptureMode(mode)
        return self.ok, before

    def cuMemFreeHost(self, ptr):
        self._blocks.pop(ptr)
        self.mode_at_free = self.mode
        return self._current("cuMemFreeHost")

    def cuMemcpyDtoH(self, dst, src, nbytes):
        return self._current("cuMemcpyDtoH")

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        return self._current("cuMemcpyHtoDAsync")


def test_frees_and_copies_run_in_a_context_wherever_no_context_is_current():
    """A pinned block freed by the collector on a thread where no context is current (a JAX process's
    Python thread) is freed in the context it was made in (at the next safe point: ``frees``), and a
    device array's copies push its device's context: each of these calls asks for a current context
    (``CUDA_ERROR_INVALID_CONTEXT``); the finalizer's free ran bare and leaked the pinned slots."""
    import gc

    from fastema._launch.cuda import frees, memory

    d = _Contexts()
    device = memory.Device(0, d)
    with device:
        block = memory.pinned(16, np.float32, d)
    a = memory.DeviceArray(0x10000, 4, np.float32, object(), device)
    assert not d.stack                                              # nothing current from here on
    del block
    gc.collect()
    assert not d.calls                                              # deferred: nothing freed by the collector
    frees.free_pending()
    a.copy_to_host()
    a.copy_to_device(np.zeros(4, np.float32), stream=0)
    assert d.calls == [("cuMemFreeHost", True), ("cuMemcpyDtoH", True), ("cuMemcpyHtoDAsync", True)]
    assert not d.stack and not d._blocks
    M = d.CUstreamCaptureMode                       # freed in relaxed mode (another thread's capture), restored
    assert (d.mode_at_free, d.mode) == (M.CU_STREAM_CAPTURE_MODE_RELAXED, M.CU_STREAM_CAPTURE_MODE_GLOBAL)
