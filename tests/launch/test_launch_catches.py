"""What a CUDA launch falls back on, and what it raises (issue 70 item 2): only the driver's refusal of a
variant's code (``driver.REFUSALS``: ``device_code`` warns once and compiles, then numba's dispatcher where
the compiled code is refused too) reaches the dispatcher; a ``TypeError`` or ``ValueError`` of fastema's
own (an argument numba cannot type, one that is not device memory, a value the ABI cannot pack) is raised,
never taken for "launch it through the dispatcher" (``cuda.launch.CudaKernel._bind``'s catches were
``except TypeError``/``except ValueError`` before). Each is injected on the fake GPU."""
import os
import warnings

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the fake GPU's launch path, not the simulator's dispatcher", allow_module_level=True)
pytest.importorskip("numba.cuda")
pytest.importorskip("cuda.core")

from fastema import _launch  # noqa: E402
from fastema._launch.cuda import abi, compiler  # noqa: E402
from fastema._launch.cuda import device_code as D  # noqa: E402
from fastema._launch.cuda.driver import Refused  # noqa: E402
from fastema.kernels._bits import F32  # noqa: E402
from testkit.fake_driver import CompilesNothing, FakeDeviceArray, FakeDriver  # noqa: E402
from testkit.fake_gpu import fake_gpu  # noqa: E402


class _Refusing(FakeDriver):
    """A fake GPU whose driver refuses every image (the shipped and the compiled one)."""

    def load(self, kind, code, entry):
        self.launches.append(("refused", kind, entry))
        raise Refused("CUDA_ERROR_INVALID_IMAGE", "refused by the test")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    with D.afresh():                 # the warnings said once per reason and the shipped sets, anew
        yield


def _group():
    shadow, seg, offset = (FakeDeviceArray(8, np.int64, ptr=0x1000 * (i + 1)) for i in range(3))
    tables = _launch.Tables(shadow, seg, offset, FakeDeviceArray(8, np.int32, ptr=0x5000),
                            FakeDeviceArray(9, np.int64, ptr=0x6000), n=4096, chunks=8)
    return _launch.Group("cuda:0", F32, F32, tables, current_stream=lambda: 77)


def _kinds(driver) -> list:
    return [e[0] for e in driver.launches if e[0] in ("launch", "dispatcher")]


def test_a_refusal_of_every_image_falls_back_to_the_dispatcher_with_its_warnings(fresh):
    refusing = _Refusing()
    with fake_gpu(refusing, torch_on_gpu=False), compiler.using(CompilesNothing()):
        with pytest.warns(RuntimeWarning) as caught:
            _launch.launch("lerp", _group(), weights=(0.5,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")                # said once a process and reason
            _launch.launch("lerp", _group(), weights=(0.5,))
    said = " ".join(str(w.message) for w in caught)
    assert "refused" in said and "launched through numba's dispatcher" in said, said
    assert _kinds(refusing) == ["dispatcher", "dispatcher"]


def test_an_argument_numba_cannot_type_is_raised_not_dispatched():
    """numba's "cannot determine Numba type" (a ValueError) was read as "let the dispatcher decide"."""
    with fake_gpu(torch_on_gpu=False) as fake:
        with pytest.raises(TypeError, match="no numba type.*defect of fastema"):
            _launch.launch("lerp", _group(), weights=(0.5,), flag=object())
    assert _kinds(fake) == []


def test_host_memory_for_a_device_argument_is_raised_not_copied_over():
    """A NumPy flag where the kernel reads device memory was handed to the dispatcher, which copied it over
    (and back) at every launch; now it is refused, naming what it must be."""
    with fake_gpu(torch_on_gpu=False) as fake:
        with pytest.raises(abi.NotDeviceMemory, match="must be device memory"):
            _launch.launch("lerp", _group(), weights=(0.5,), flag=np.zeros(1, np.int32))
    assert _kinds(fake) == []


class _BadInterface(FakeDeviceArray):
    """Device memory whose interface fits the bound argument but whose address is not a number."""

    @property
    def __cuda_array_interface__(self):
        return dict(super().__cuda_array_interface__, data=(None, False))


def test_a_value_the_abi_cannot_pack_is_raised_when_patched():
    """A prepared launch patching a new object: an error packing it was read as "bind again" (then, at the
    bind, "launch through the dispatcher")."""
    with fake_gpu(torch_on_gpu=False) as fake:
        run = _launch.prepare("lerp", _group())
        run(FakeDeviceArray(1, np.float32))
        with pytest.raises(TypeError, match="int"):
            run(_BadInterface(1, np.float32))
    assert _kinds(fake) == ["launch"]


def test_another_dtype_binds_again_without_a_numba_type_per_call():
    """A later argument that does not fit its place (host weights after device weights: another variant)
    binds again; one that fits is patched in place (no new load)."""
    with fake_gpu(torch_on_gpu=False) as fake:
        run = _launch.prepare("lerp", _group())
        run((0.5,))
        run((0.25,))
        run(FakeDeviceArray(1, np.float32))
        run(FakeDeviceArray(1, np.float32))
        loads = [e for e in fake.launches if e[0] == "load"]
    assert _kinds(fake) == ["launch"] * 4 and len(loads) == 2
