"""The CUDA tests held to the shipped device code (``tests/support/shipped.py``, issue 63 item 2),
checked without a GPU through the fake one:

- a test's own kernel launch (``shipped.launch``) loads the variant's shipped cubin and launches it
  with fastema's argument block, compiling nothing; an unshipped variant or a host array is refused
  before anything is loaded;
- the plugin fails a ``cuda`` test that compiled (NVVM calls, fastema's run-time compiles) on a GPU,
  or that launched an unshipped variant through the launch path in the simulator, and lets a test
  marked ``compiles`` do so, counting its NVVM calls for the GPU command's log.
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the fake GPU stands in for cuda.core's driver, not the simulator",
                allow_module_level=True)
pytest.importorskip("numba.cuda.dispatcher")
pytest.importorskip("cuda.bindings.driver")

from support import shipped  # noqa: E402

from fastema._launch import config  # noqa: E402
from fastema._launch.cuda import compiler, device_code, drivers  # noqa: E402
from fastema._launch.shipped.variants import every_variant  # noqa: E402
from fastema.kernels import cuda as K  # noqa: E402
from fastema.kernels._store.identity import VARIANTS  # noqa: E402
from fastema.kernels.kinds import F32  # noqa: E402
from testkit.fake_driver import CompilesNothing, FakeDeviceArray, FakeDriver  # noqa: E402


def _lerp_args(weights=(np.float32(0.5),)):
    """The float32 lerp's arguments as fastema's launchers pass them (device arrays: fake ones)."""
    arrays = [FakeDeviceArray(2, dt) for dt in (np.int64, np.int64, np.int64, np.int32, np.int64)]
    return (8, *arrays, weights, FakeDeviceArray(1, np.int32), np.uint32(0))


def test_a_tests_launch_loads_the_shipped_code_and_compiles_nothing():
    kernel = K.lerp_kernel(F32, F32, False)
    compiles = len(device_code.COMPILES)
    with drivers.using(FakeDriver()) as fake:
        shipped.launch(kernel, 3, 8, *_lerp_args())
        shipped.launch(kernel, 3, 8, *_lerp_args())           # loaded once
    assert [e[:2] for e in fake.launches] == [("load", "cubin"), ("launch", 0), ("launch", 0)]
    assert fake.launches[1][2] == 3 and len(device_code.COMPILES) == compiles


def test_an_unshipped_variant_or_a_host_array_is_refused_before_anything_is_loaded():
    kernel = K.lerp_kernel(F32, F32, False)
    with drivers.using(FakeDriver()) as fake:
        with pytest.raises(AssertionError, match=r"not a shipped variant.*UniTuple\(float64 x 1\)|"
                                                 r"UniTuple\(float64 x 1\).*not a shipped variant"):
            shipped.launch(kernel, 3, 8, *_lerp_args((np.float64(0.5),)))
        args = list(_lerp_args())
        args[8] = np.zeros(1, np.int32)                        # the flag on the host
        with pytest.raises(AssertionError, match=r"arguments \[8\] are host arrays"):
            shipped.launch(kernel, 3, 8, *args)
    assert fake.launches == []


def _item(*marks):
    return types.SimpleNamespace(user_properties=[],
                                 get_closest_marker=lambda name: name if name in marks else None)


def _run(item, body):
    """The plugin's ``pytest_runtest_call`` around ``body`` (the test): what it raises, or None."""
    hook = shipped.pytest_runtest_call(item)
    next(hook)
    body()
    try:
        hook.send(None)
    except StopIteration:
        return None
    except AssertionError as error:
        return error
    raise AssertionError("the hook yielded twice")


def test_on_a_gpu_a_cuda_test_that_compiles_fails_unless_marked_compiles(monkeypatch):
    from numba.cuda.cudadrv import nvvm

    monkeypatch.setattr(shipped, "SIMULATOR", False)
    monkeypatch.setattr(shipped, "_NVVM", [])
    monkeypatch.setattr(nvvm, "compile_ir", lambda *a, **k: b"ir")   # counted from here on
    quiet = _item("cuda")
    assert _run(quiet, lambda: None) is None and quiet.user_properties == [("nvvm_calls", 0)]
    error = _run(_item("cuda"), lambda: nvvm.compile_ir("ir"))
    assert error is not None and "1 NVVM calls" in str(error)

    (_, (dispatcher, types)), = list(every_variant().items())[:1]
    key = device_code.variant_key(VARIANTS[dispatcher], types)

    def compile_one():                                   # fastema's run-time compile, recorded by it
        with config.tuned(CUDA_CACHE=False), compiler.using(CompilesNothing()):
            assert device_code.compiled(dispatcher, types, key, (9, 0)).code == b"new"

    error = _run(_item("cuda"), compile_one)
    assert error is not None and "fastema's run-time compiles" in str(error) and key in str(error)
    marked = _item("cuda", "compiles")
    assert _run(marked, lambda: (nvvm.compile_ir("a"), nvvm.compile_ir("b"))) is None
    assert marked.user_properties == [("nvvm_calls", 2)]
    assert _run(_item(), lambda: nvvm.compile_ir("ir")) is None     # not a cuda test: not watched


def test_in_the_simulator_a_launch_of_an_unshipped_variant_fails_the_test(monkeypatch):
    monkeypatch.setattr(shipped, "SIMULATOR", True)
    kernel = K.lerp_kernel(F32, F32, False)
    with drivers.using(FakeDriver(loads=False)) as fake:
        def launch(weights):
            return lambda: drivers.current().dispatch(kernel, 0, 0, 3, 8, _lerp_args(weights))

        assert _run(_item("cuda"), launch((np.float32(0.5),))) is None
        error = _run(_item("cuda"), launch((np.float64(0.5),)))
        assert error is not None and "UniTuple(float64 x 1)" in str(error)
        assert _run(_item("cuda", "compiles"), launch((np.float64(0.5),))) is None
        assert drivers.current() is fake                       # the guard's driver is gone again
    assert [e[0] for e in fake.launches] == ["dispatcher"] * 3


def test_no_test_launches_a_kernel_through_numbas_dispatcher():
    """``kernel[blocks, threads](...)`` compiles the kernel on a GPU (NVVM, in every test process):
    every test launches through ``shipped.launch`` (a string, such as a child process's script,
    is not code here)."""
    import ast
    import pathlib

    found = []
    for path in sorted(pathlib.Path(__file__).resolve().parents[1].rglob("*.py")):
        text = path.read_text()
        if "cuda" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.slice, ast.Tuple) and 2 <= len(node.func.slice.elts) <= 4:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert not found, found
