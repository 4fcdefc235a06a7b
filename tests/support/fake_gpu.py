"""fastema's CUDA launch path on a machine without a GPU: :func:`fake_gpu`, the
:class:`~.fake_driver.FakeDriver` given to the launch path (``fastema._launch.drivers.using``), and
CPU torch tensors described as on ``cuda:0``. Nothing runs on a device and no tensor is written:
what it measures and checks is host work.

Used by the fake-GPU tests in ``tests/kernels/``, and outside the tests by the benchmark tooling
(the gates' fake-GPU scenarios, the host-cost measurements).

The stub driver (:func:`stub_driver_dir`): a ``libcuda.so.1`` whose every entry point returns
CUDA_SUCCESS at once (``cuCtxGetCurrent`` reports :data:`STUB_CONTEXT`), so that cuda-bindings' and
cuda.core's Python-side work runs as on a GPU, the driver's own work excepted. It must be on
``LD_LIBRARY_PATH`` when the process starts; :func:`fake_gpu` with ``stub_driver=True`` then loads
and launches through fastema's real ``CudaCoreDriver``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from .fake_driver import FakeDeviceArray, FakeDriver

_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
           "bfloat16": np.uint16, "float16": np.uint16, "uint8": np.uint8}
STUB_CONTEXT = 0xC0C0
TORCH_STREAM = 77
"""The raw stream handle of torch's current stream on the fake ``cuda:0``."""


@contextlib.contextmanager
def fake_gpu(driver: FakeDriver | None = None, torch_on_gpu: bool = True, stub_driver: bool = False,
             **options) -> Iterator[FakeDriver]:
    """The launch path on ``driver`` (default: ``FakeDriver(**options)``) for the ``with`` block;
    with ``torch_on_gpu``, CPU torch tensors are described as on ``cuda:0`` (their stream: raw
    handle
    :data:`TORCH_STREAM`). ``stub_driver``: the loads, launches and context queries are fastema's
    real ``CudaCoreDriver``'s, into the stub driver (the process must have started with
    :func:`stub_driver_dir` on ``LD_LIBRARY_PATH``)."""
    import fastema
    from fastema._launch import drivers

    if driver is None:
        if stub_driver:
            options.update(real=drivers.CudaCoreDriver(), real_primary=STUB_CONTEXT)
        driver = FakeDriver(**options)
    fastema.ops._single_tables.cache_clear()              # tables made on another driver
    try:
        torch = _torch_on_gpu(driver) if torch_on_gpu else contextlib.nullcontext()
        with drivers.using(driver), torch:
            yield driver
    finally:
        fastema.ops._single_tables.cache_clear()


@contextlib.contextmanager
def _torch_on_gpu(driver: FakeDriver):
    """CPU torch tensors described as on ``cuda:0`` by fastema's torch backend (a seam of the
    backend's, not of the launch path: its class methods and ``_backends.stream_getter`` replaced
    for the block)."""
    from fastema import _backends
    from fastema._backends import torch as tb

    backend = _backends.backend_named("torch")
    cls = type(backend)
    describe, control = cls.describe, cls.control
    getter = _backends.stream_getter                        # lru-cached per (framework, device)

    def on_gpu(buf):
        return buf._replace(device="cuda:0") if buf.device == "cpu" else buf

    replaced = [
        (cls, "describe", lambda self, t, what: on_gpu(describe(self, t, what))),
        (cls, "location", lambda self, a: (tb.NAME, "cuda:0")),
        (cls, "control", lambda self, x, what, writable:
         ("cuda:0",) + tuple(control(self, x, what, writable))[1:]),
        (cls, "zeros", lambda self, device, n, dtype: _torch_zeros(n, dtype)),
        (cls, "kernel_view", lambda self, a:
         FakeDeviceArray(a.numel(), _DTYPES[str(a.dtype)[6:]], ptr=a.data_ptr(), driver=driver)),
        (_backends, "stream_getter", lambda framework, device: (lambda: TORCH_STREAM)
         if framework == tb.NAME and device != "cpu" else getter(framework, device))]
    saved = [(obj, name, vars(obj).get(name, _MISSING)) for obj, name, _ in replaced]
    for obj, name, value in replaced:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


def _torch_zeros(n, dtype):
    import torch

    return torch.zeros(n, dtype=getattr(torch, np.dtype(dtype).name))


def rl_mlp(hidden: int = 256, seed: int = 0):
    """The 6-tensor RL network of the probe (three Linear layers), on the CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 6))


_STUB_SOURCE = r"""
typedef int CUresult;
static CUresult ok(void) { return 0; }
static CUresult current(void **ctx) { *ctx = (void *)0xC0C0; return 0; }
static int same(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; } return *a == *b; }
CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                             int *status) {
    *pfn = same(symbol, "cuCtxGetCurrent") ? (void *)current : (void *)ok;
    if (status) *status = 1; return 0; }
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    *pfn = same(symbol, "cuCtxGetCurrent") ? (void *)current : (void *)ok; return 0; }
"""


def stub_driver_dir() -> str | None:
    """A folder holding the stub ``libcuda.so.1`` (built once per user), or None where no C compiler
    is."""
    import os
    import shutil
    import subprocess
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), f"fastema-stub-cuda-{os.getuid()}")
    lib = os.path.join(folder, "libcuda.so.1")
    if os.path.exists(lib):
        return folder
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "stub.c")
    with open(src, "w") as f:
        f.write(_STUB_SOURCE)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, src], capture_output=True)
    return folder if done.returncode == 0 else None
