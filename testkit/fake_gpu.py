"""fastema's CUDA launch path on a machine without a GPU: :func:`fake_gpu`, the
:class:`~.fake_driver.FakeDriver` given to the launch path (``fastema._launch.cuda.drivers.using``), and
the :class:`~.fake_backend.FakeGpuBackend` given to fastema's boundary (``fastema._backends.using``):
CPU torch tensors on ``cuda:0``, so that every entry point takes the road a GPU takes (a default
``EMA``'s device plan, the capture refusals). Nothing runs on a device and no tensor is written:
what it measures and checks is host work.

Used by the fake-GPU tests in ``tests/launch/``, and outside the tests by the benchmark tooling
(the gates' fake-GPU scenarios, the host-cost measurements).

The stub driver (:func:`stub_driver_dir`) is the driver emulator (:mod:`testkit.emulator`: a
``libcuda.so.1`` that keeps the driver's rules: contexts per thread, capture, events that complete, launches
checked against the kernel's parameter layout; device memory being host memory, devices 0 and 1 sm_90s of 132
multiprocessors whose primary contexts are :data:`STUB_CONTEXT` and ``STUB_CONTEXT + 0x100``), so that
cuda-bindings' and cuda.core's Python-side work, and ``CudaCoreDriver``'s device work, runs as on a GPU, the
kernels excepted. It must be on ``LD_LIBRARY_PATH`` when the process starts; :func:`fake_gpu` with
``stub_driver=True`` then loads, launches and does the device work through fastema's real ``CudaCoreDriver``,
with device 0's primary context current on the calling thread, as torch keeps it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .fake_backend import TORCH_STREAM, FakeGpuBackend  # noqa: F401  (TORCH_STREAM: the tests' name for it)
from .fake_driver import FakeDriver

STUB_CONTEXT = 0xC0C0


@contextlib.contextmanager
def fake_gpu(driver: FakeDriver | None = None, torch_on_gpu: bool = True, stub_driver: bool = False,
             **options) -> Iterator[FakeDriver]:
    """The launch path on ``driver`` (default: ``FakeDriver(**options)``) for the ``with`` block;
    with ``torch_on_gpu``, fastema's adapter of torch is a :class:`FakeGpuBackend` of ``driver``'s
    (CPU tensors on ``cuda:0``, their stream the raw handle :data:`TORCH_STREAM`, captured while
    ``driver.capture`` says so). ``stub_driver``: the loads, launches, context and capture queries and
    the device work (uploads, pinned staging, events) are fastema's real ``CudaCoreDriver``'s, into the
    driver emulator (the process must have started with :func:`stub_driver_dir` on ``LD_LIBRARY_PATH``),
    device 0's primary context current on this thread for the block."""
    from fastema import _backends
    from fastema._launch.cuda import drivers

    real = None
    if driver is None:
        if stub_driver:
            real = drivers.CudaCoreDriver()
            options.update(real=real, real_primary=STUB_CONTEXT)
        driver = FakeDriver(**options)
    torch = _backends.using(FakeGpuBackend(driver)) if torch_on_gpu else contextlib.nullcontext()
    current = real.device(0) if real is not None else contextlib.nullcontext()   # as torch keeps it
    with drivers.using(driver), torch, current:     # (fastema's caches are of one driver and adapter each)
        yield driver


def on_a_gpu_params() -> list:
    """``pytest.param``s of where a GPU test's Python runs (see :class:`OnAGpu`): ``"gpu"`` (marked
    ``cuda``; skipped without torch CUDA) and ``"fake gpu"`` (skipped in the simulator's run, which
    the fake does not stand in for)."""
    import os

    import pytest
    import torch

    return [pytest.param("gpu", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a GPU")]),
            pytest.param("fake gpu", marks=pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                                               reason="the fake GPU stands in for numba-cuda"))]


class OnAGpu:
    """Where a GPU test's Python runs: a GPU (``device`` "cuda"; in :meth:`no_sync` a host sync raises:
    torch's sync debug mode), or, in CI, the fake GPU (``device`` "cpu": CPU tensors on ``cuda:0`` to
    fastema, the same plans and launches with nothing run; :meth:`no_sync` checks the fake driver made
    no host wait), so that a GPU test's calls run, and are held to the API, on every CI run (issue 70 item 6:
    a GPU-only test called ``Smoother.update(v, weight=3.0)`` for rounds after the keyword became
    ``sample_weight``). ``real``: the kernels ran, so their results can be compared."""

    def __init__(self, where: str):
        self.real = where == "gpu"
        self.device = "cuda" if self.real else "cpu"
        self.fake: FakeDriver | None = None

    def __enter__(self) -> "OnAGpu":
        if not self.real:
            import pytest

            pytest.importorskip("numba.cuda.dispatcher")
            self._ctx = fake_gpu(record=False)
            self.fake = self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.real:
            return self._ctx.__exit__(*exc)
        return None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        if self.real:
            import torch

            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            assert self.fake is not None
            before = self.fake.counters["host_syncs"]
            yield
            assert self.fake.counters["host_syncs"] == before, "a host sync"


@contextlib.contextmanager
def cuda_factories_on_cpu() -> Iterator[None]:
    """Tensors asked for on ``cuda`` made on the CPU (the fake GPU's stand-ins), for a constructor that
    makes its own (``TargetNetwork``'s flags); used around construction only."""
    from torch.overrides import TorchFunctionMode

    class OnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs = dict(kwargs, device="cpu")
            return func(*args, **kwargs)

    with OnCpu():
        yield


def rl_mlp(hidden: int = 256, seed: int = 0):
    """The 6-tensor RL network of the probe (three Linear layers), on the CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 6))


def stub_driver_dir() -> str | None:
    """The folder of the driver emulator's ``libcuda.so.1`` (:func:`testkit.emulator.library_dir`: built once
    per user and source), or None where no C compiler is."""
    from .emulator import library_dir

    return library_dir()
