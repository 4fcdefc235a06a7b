"""The launch drivers (``fastema._launch.cuda.driver``, ``drivers``) held to what they stand for, without
a GPU.

- fastema's own calls into cuda-bindings (``CudaCoreDriver``: load, launch, the context, capture and
  version queries) pass the real bindings' argument checks, which run before any driver call: the
  first H100 run's ``cuKernelGetFunction(kernel, context)`` fails here;
- what the launch path hands the tests' ``FakeDriver`` (and what the fake hands back: function,
  stream and context handles) is what those real calls and cuda.core take;
- only the driver's "this image cannot run here" results become a refusal (``driver.Refused``), from
  cuda.core's error and from ``cuKernelGetFunction``'s result; every other error propagates as
  raised;
- every driver (the two of ``drivers``, the variant recorder, the fake) has every member of the
  protocol.
"""
from __future__ import annotations

import os
import typing

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator has no driver bindings to check", allow_module_level=True)
bindings = pytest.importorskip("cuda.bindings.driver")
pytest.importorskip("cuda.core")

from fastema import _launch  # noqa: E402
from fastema._launch.cuda import driver as api  # noqa: E402
from fastema._launch.cuda import drivers  # noqa: E402
from fastema._launch.shipped import variants  # noqa: E402
from fastema.kernels._bits import F32  # noqa: E402
from testkit.fake_driver import FakeDeviceArray, FakeDriver  # noqa: E402
from testkit.fake_gpu import fake_gpu  # noqa: E402


def _driver_installed() -> bool:
    from cuda.pathfinder import DynamicLibNotFoundError

    try:
        bindings.cuDriverGetVersion()
    except DynamicLibNotFoundError:
        return False
    return True


needs_no_driver = pytest.mark.skipif(_driver_installed(), reason="a CUDA driver is installed: the "
                                     "calls would reach it (the GPU plan runs them for real)")


class CheckedBindings:
    """cuda-bindings' ``driver`` module whose functions run for real up to the driver: their
    argument checks raise TypeError on a call of the wrong signature or types; past them, with no
    driver installed, they fail to load it, and ``results[name]`` comes back instead. Its types
    (``CUstream``, ``CUresult``, ...) are the real ones."""

    def __init__(self, **results):
        from cuda.pathfinder import DynamicLibNotFoundError

        self.results, self.calls, self.unloadable = results, [], DynamicLibNotFoundError

    def __getattr__(self, name):
        real = getattr(bindings, name)
        if not name.startswith("cu"):                   # a type or an enum
            return real

        def call(*args):
            try:
                real(*args)
            except self.unloadable:                     # past the argument checks
                pass
            self.calls.append((name, args))
            return self.results[name]
        return call


class _ObjectCode:
    """cuda.core's ``ObjectCode`` (which needs the driver to load): ``get_kernel`` gives a kernel
    handle, or raises ``error``."""

    error: Exception | None = None

    def __init__(self, kind, code):
        self.kind, self.code = kind, code

    @classmethod
    def from_cubin(cls, code):
        return cls("cubin", code)

    @classmethod
    def from_ptx(cls, code):
        return cls("ptx", code)

    def get_kernel(self, entry):
        if self.error is not None:
            raise self.error
        return type("Kernel", (), {"handle": 0xBEEF})()


class _Core:
    ObjectCode = _ObjectCode


SUCCESS = bindings.CUresult.CUDA_SUCCESS


def _checked(**results) -> drivers.CudaCoreDriver:
    defaults = {"cuCtxGetCurrent": (SUCCESS, bindings.CUcontext(0xC7)),
                "cuKernelGetFunction": (SUCCESS, bindings.CUfunction(0xF00)),
                "cuLaunchKernel": (SUCCESS,),
                "cuStreamIsCapturing": (SUCCESS, bindings.CUstreamCaptureStatus(0)),   # none
                "cuDriverGetVersion": (SUCCESS, 12040)}
    _ObjectCode.error = None
    return drivers.CudaCoreDriver(bindings=CheckedBindings(**{**defaults, **results}), core=_Core())


@needs_no_driver
def test_fastemas_calls_pass_cuda_bindings_own_argument_checks():
    """The GPU run of 2026-11-26 found ``cuKernelGetFunction`` called with the kernel and the
    context; it takes the kernel alone (the current context's function), and the TypeError was taken
    for a refusal, so no shipped kernel was used. Every call of the cuda.core driver now goes
    through the real function's argument checks here (no GPU needed)."""
    d = _checked()
    loaded = d.load("cubin", b"\x7fELF", "entry")               # a context current: its function
    assert int(loaded.func) == 0xF00 and loaded.source == "cubin"
    assert [name for name, _ in d.d.calls] == ["cuCtxGetCurrent", "cuKernelGetFunction"]
    d.launch(loaded.func, 3, 256, d.stream(77), 0x1000)
    assert d.current_context() == 0xC7 and d.capturing(77) is False and d.version() == 12040
    assert [name for name, _ in d.d.calls][2:] == ["cuLaunchKernel", "cuCtxGetCurrent",
                                                   "cuStreamIsCapturing", "cuDriverGetVersion"]
    none = _checked(cuCtxGetCurrent=(SUCCESS, bindings.CUcontext(0)))
    assert int(none.load("ptx", b".version 8.0", "entry").func) == 0xBEEF   # no context: the kernel


@needs_no_driver
def test_a_kept_launchs_calls_are_cuda_bindings_own():
    """What a kept launch calls itself (``CudaCoreDriver.launcher``, issue 86 item 3: one frame
    around the driver's two calls) passes the real bindings' argument checks with the arguments the
    kept launch gives them; the primary context compares with ``cuCtxGetCurrent``'s by value."""
    d = _checked(cuInit=(SUCCESS,), cuDeviceGet=(SUCCESS, bindings.CUdevice(0)),
                 cuDevicePrimaryCtxRetain=(SUCCESS, bindings.CUcontext(0xC7)))
    calls = d.launcher(0)
    err, ctx = calls.context()
    assert not err and ctx == calls.primary and ctx != bindings.CUcontext(0xC8)
    assert calls.streams[77] is d.stream(77)
    err, = calls.launch(bindings.CUfunction(0xF00), 3, 1, 1, 256, 1, 1, 0, calls.streams[77], 0x1000, 0)
    assert not err and [name for name, _ in d.d.calls][-2:] == ["cuCtxGetCurrent", "cuLaunchKernel"]


@needs_no_driver
def test_the_fake_driver_is_given_and_gives_what_the_real_calls_take():
    """A fake-GPU run's loads and launches, as the fake driver saw them, handed to the cuda.core
    driver's real calls (cuda.core's ``ObjectCode`` for the code, cuda-bindings' checks for the
    launch): the launch path gives the fake what the real driver takes, and the fake's handles are
    of the types the real driver gives back."""
    from cuda.core import ObjectCode

    with fake_gpu(torch_on_gpu=False) as fake:
        tables = _launch.Tables(  # type: ignore[call-arg]
            *(FakeDeviceArray(8, np.int64, ptr=0x1000 * i) for i in (1, 2, 3)),
            FakeDeviceArray(8, np.int32, ptr=0x5000), FakeDeviceArray(9, np.int64, ptr=0x6000), n=4096, chunks=2)
        group = _launch.Group("cuda:0", F32, F32, tables, current_stream=lambda: 77)
        run = _launch.prepare("lerp", group)
        for _ in range(2):
            run((0.5,))
        fake_context, fake_primary = fake.current_context(), fake.primary_context(0)
    loads = [e for e in fake.launches if e[0] == "load"]
    launches = [e for e in fake.launches if e[0] == "launch"]
    assert loads and len(launches) == 2
    for _, kind, entry in loads:
        code = _shipped_sm90(entry)
        (ObjectCode.from_cubin if kind == "cubin" else ObjectCode.from_ptx)(code)   # the fake's
    d = _checked()
    real = d.load("cubin", b"\x7fELF", "entry")
    assert type(run.func) is type(real.func)
    for _, stream, blocks, func in launches:
        d.launch(func, blocks, 256, stream, run.block.address)
        assert d.d.calls[-1][0] == "cuLaunchKernel"
    assert type(fake_context) is type(d.current_context()) is int and type(fake_primary) is int


def _shipped_sm90(entry: str) -> bytes:
    """The shipped sm_90 code of the variant whose entry is ``entry``."""
    from fastema._launch.cuda import device_code

    for key in device_code.sets()["cu13"].index["variants"]:
        found = device_code.entry("cu13", key, "sm_90")
        if found.name == entry:
            return found.code
    raise AssertionError(f"no shipped variant has entry {entry}")


def test_the_old_call_fails_the_check():
    """The check above can fail: the first H100 run's call, as it was, raises TypeError at
    cuda-bindings' argument check (before any driver call)."""
    with pytest.raises(TypeError, match="takes exactly 1 positional argument"):
        bindings.cuKernelGetFunction(bindings.CUkernel(0xBEEF), bindings.CUcontext(0xC7))


@pytest.mark.parametrize("result", sorted(api.REFUSALS))
def test_a_refusal_from_cuda_core_or_the_driver_is_a_refusal(result):
    """cuda.core raises ``CUDAError("CUDA_ERROR_...: what it means")`` (its ``_check_driver_error``)
    where the driver refuses to load an image; ``cuKernelGetFunction`` returns the result. Either is
    a ``Refused`` naming the result where it means the image cannot run here."""
    from cuda.core._utils.cuda_utils import CUDAError

    d = _checked()
    _ObjectCode.error = CUDAError(f"{result}: the driver's explanation")
    with pytest.raises(api.Refused) as caught:
        d.load("ptx", b".version 9.0", "entry")
    assert caught.value.result == result and isinstance(caught.value.__cause__, CUDAError)
    d = _checked(cuKernelGetFunction=(getattr(bindings.CUresult, result), bindings.CUfunction(0)))
    with pytest.raises(api.Refused) as caught:
        d.load("cubin", b"\x7fELF", "entry")
    assert caught.value.result == result


@pytest.mark.parametrize("result", ["CUDA_ERROR_OUT_OF_MEMORY", "CUDA_ERROR_INVALID_CONTEXT",
                                    "CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_INVALID_HANDLE"])
def test_any_other_driver_error_propagates(result):
    """Out of memory, no context, a name not in the image, a bad handle: no compile mends these, so
    they are raised as they are (cuda.core's error, or ``memory.CudaDriverError`` naming the call
    for a result).
    """
    from cuda.core._utils.cuda_utils import CUDAError

    from fastema._launch.cuda.memory import CudaDriverError

    d = _checked()
    _ObjectCode.error = CUDAError(f"{result}: the driver's explanation")
    with pytest.raises(CUDAError, match=result):
        d.load("cubin", b"\x7fELF", "entry")
    d = _checked(cuKernelGetFunction=(getattr(bindings.CUresult, result), bindings.CUfunction(0)))
    with pytest.raises(CudaDriverError, match=f"cuKernelGetFunction failed: {result}"):
        d.load("cubin", b"\x7fELF", "entry")


def test_a_type_error_in_the_call_propagates():
    d = _checked()
    _ObjectCode.error = TypeError("get_kernel() argument 'name' must be str")
    with pytest.raises(TypeError, match="must be str"):
        d.load("cubin", b"\x7fELF", "entry")


def _members(protocol) -> set:
    named = {n for n in vars(protocol) if not n.startswith("_")}
    return named | set(typing.get_type_hints(protocol))


@pytest.mark.parametrize("make", [lambda: drivers.CudaCoreDriver(),
                                  lambda: drivers.DispatcherDriver(),
                                  lambda: drivers.DispatcherDriver(simulated=True),
                                  lambda: FakeDriver(), lambda: variants.RecordingDriver({})],
                         ids=["cuda.core", "dispatcher", "simulator", "fake", "recorder"])
def test_every_driver_has_every_member_of_the_protocol(make):
    """mypy holds the drivers to the protocol (``_as_driver`` beside each); this says so at run time
    too."""
    d = make()
    missing = sorted(n for n in _members(api.Driver) if not hasattr(d, n))
    assert not missing, missing


def test_mypy_holds_the_drivers_and_the_fake_to_the_protocol():
    """CI's mypy run checks the files pyproject names: the drivers (each with a function typed to
    return a ``Driver``) and the tests' fake must be among them, else a renamed member goes
    unnoticed."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    root = pathlib.Path(__file__).resolve().parents[2]
    files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    for f in ("fastema/_launch/cuda/driver.py", "fastema/_launch/cuda/drivers.py",
              "fastema/_launch/shipped/variants.py", "fastema/_launch/cuda/compiler.py", "testkit", "tests"):
        assert f in files, f"pyproject's [tool.mypy] files must name {f}"


def _standin_core(tmp_path, name: str, utils: bool, object_code: bool):
    """A stand-in ``cuda.core`` package ``name`` under ``tmp_path``: with or without ``_utils.cuda_utils``
    (0.3.2 and 0.4.2 have none) and ``ObjectCode``."""
    import importlib

    root = tmp_path / name
    (root / "_utils").mkdir(parents=True)
    (root / "__init__.py").write_text("__version__ = '0.3.2'\n" + ("ObjectCode = object\n" if object_code else ""))
    if utils:
        (root / "_utils" / "__init__.py").write_text("")
        (root / "_utils" / "cuda_utils.py").write_text("class CUDAError(Exception):\n    pass\n")
    return importlib.import_module(name)


@pytest.mark.parametrize("utils,object_code,said", [(False, True, "No module named"), (True, False, "no ObjectCode"),
                                                    (False, False, "No module named"), (True, True, None)])
def test_cuda_core_below_its_floor_is_said_unavailable(tmp_path, monkeypatch, utils, object_code, said):
    """cuda.core 0.3.2 (what numba-cuda[cu13] 0.20 pins) and 0.4.2 lack ``cuda.core._utils``; one without
    ``ObjectCode`` would crash at its first load: each is unavailable, with the floor that mends it, and the
    process's launches go through the dispatcher with that warning; one with both is taken."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"standin_core_{int(utils)}{int(object_code)}"
    core = _standin_core(tmp_path, name, utils, object_code)
    why = drivers.CudaCoreDriver.unavailable(core=core, bindings=bindings)
    if said is None:
        assert why is None
        assert "lack cuLaunchKernel" in drivers.CudaCoreDriver.unavailable(core=core, bindings=object())
    else:
        assert said in why and "cuda-core>=0.5.1,<2" in why, why


def test_the_extras_pin_the_cuda_core_floor():
    """numba-cuda's own floor lets cuda.core 0.3.2 in: the ``cuda`` and ``cuda12`` extras pin what fastema's
    launches need."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    for extra in ("cuda", "cuda12"):
        assert "cuda-core>=0.5.1,<2" in extras["project"]["optional-dependencies"][extra], extra
