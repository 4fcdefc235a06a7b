"""fastema's CUDA launch path on a machine without a GPU: :func:`fake_gpu`, the
:class:`~.fake_driver.FakeDriver` given to the launch path (``fastema._launch.drivers.using``), and
CPU torch tensors described as on ``cuda:0``. Nothing runs on a device and no tensor is written:
what it measures and checks is host work.

Used by the fake-GPU tests in ``tests/kernels/``, and outside the tests by the benchmark tooling
(the gates' fake-GPU scenarios, the host-cost measurements).

The stub driver (:func:`stub_driver_dir`): a ``libcuda.so.1`` whose every entry point returns
CUDA_SUCCESS at once (``cuCtxGetCurrent`` and ``cuDevicePrimaryCtxRetain`` report
:data:`STUB_CONTEXT`), device memory being host memory (``cuMemAlloc``/``cuMemHostAlloc`` malloc, the
copies memcpy) and device 0 an sm_90 of 132 multiprocessors, so that cuda-bindings' and cuda.core's
Python-side work, and ``CudaCoreDriver``'s device work, runs as on a GPU, the kernels excepted. It must be on
``LD_LIBRARY_PATH`` when the process starts; :func:`fake_gpu` with ``stub_driver=True`` then loads
and launches through fastema's real ``CudaCoreDriver``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .fake_driver import FakeDeviceArray, FakeDriver

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
    from fastema._launch import drivers

    if driver is None:
        if stub_driver:
            options.update(real=drivers.CudaCoreDriver(), real_primary=STUB_CONTEXT)
        driver = FakeDriver(**options)
    torch = _torch_on_gpu(driver) if torch_on_gpu else contextlib.nullcontext()
    with drivers.using(driver), torch:        # (fastema's caches are of one driver and stand-in each)
        yield driver


class _TorchStandIn:
    """The fake ``cuda:0`` of fastema's torch backend (:class:`fastema._backends.torch.StandIn`):
    CPU tensors described as there, their kernel views :class:`FakeDeviceArray` over their own
    memory, launches on the raw stream :data:`TORCH_STREAM`."""

    device = "cuda:0"

    def __init__(self, driver: FakeDriver):
        self.driver = driver

    def kernel_view(self, address: int, numel: int, dtype, owner) -> FakeDeviceArray:
        return FakeDeviceArray(numel, dtype, ptr=address, driver=self.driver)

    @staticmethod
    def stream() -> int:
        return TORCH_STREAM


def _torch_on_gpu(driver: FakeDriver):
    """CPU torch tensors described as on ``cuda:0`` by fastema's torch backend, through the
    backend's own seam (:func:`fastema._backends.standing_in`)."""
    from fastema import _backends

    return _backends.standing_in(_TorchStandIn(driver))


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
    torch's sync debug mode), or, in CI, the fake GPU (``device`` "cpu": CPU tensors described as on
    ``cuda:0``, the same launches with nothing run; :meth:`no_sync` checks the fake driver made no host
    wait), so that a GPU test's calls run, and are held to the API, on every CI run (issue 70 item 6:
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


_STUB_SOURCE = r"""
/* Each entry point as the CUDA driver API declares it (cuda.h; cuda-bindings looks each up by its base
   name through cuGetProcAddress): device memory is host memory (malloc/free, copies memcpy), every
   stream and event is done at once, the one device is an sm_90 of 132 multiprocessors whose primary
   context is STUB_CONTEXT (always current). Every other entry point returns CUDA_SUCCESS at once. */
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void *CUcontext, *CUstream, *CUevent;
static unsigned long long handles = 0x5100;
static CUresult ok(void) { return 0; }
static CUresult current(CUcontext *ctx) { *ctx = (CUcontext)0xC0C0; return 0; }
static CUresult mem_alloc(CUdeviceptr *p, size_t n) {
    void *m = malloc(n ? n : 1); if (!m) return 2; *p = (CUdeviceptr)m; return 0; }
static CUresult mem_free(CUdeviceptr p) { free((void *)p); return 0; }
static CUresult htod(CUdeviceptr dst, const void *src, size_t n) { memcpy((void *)dst, src, n); return 0; }
static CUresult htod_async(CUdeviceptr dst, const void *src, size_t n, CUstream s) { return htod(dst, src, n); }
static CUresult dtoh(void *dst, CUdeviceptr src, size_t n) { memcpy(dst, (void *)src, n); return 0; }
static CUresult dtoh_async(void *dst, CUdeviceptr src, size_t n, CUstream s) { return dtoh(dst, src, n); }
static CUresult host_alloc(void **p, size_t n, unsigned int flags) {
    *p = malloc(n ? n : 1); return *p ? 0 : 2; }
static CUresult host_free(void *p) { free(p); return 0; }
static CUresult attribute(int *value, int attrib, CUdevice dev) {
    *value = attrib == 75 ? 9 : attrib == 76 ? 0 : attrib == 16 ? 132 : 1; return 0; }
static CUresult device_get(CUdevice *dev, int ordinal) { *dev = ordinal; return ordinal ? 101 : 0; }
static CUresult retain(CUcontext *ctx, CUdevice dev) { return current(ctx); }
static CUresult pop(CUcontext *ctx) { if (ctx) *ctx = (CUcontext)0xC0C0; return 0; }
static CUresult handle(void **h, unsigned int flags) { *h = (void *)(handles += 16); return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
static int same(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; } return *a == *b; }
static void *entry(const char *s) {
    return same(s, "cuCtxGetCurrent") ? (void *)current : same(s, "cuDriverGetVersion") ? (void *)cuDriverGetVersion
        : same(s, "cuMemAlloc") ? (void *)mem_alloc : same(s, "cuMemFree") ? (void *)mem_free
        : same(s, "cuMemcpyHtoD") ? (void *)htod : same(s, "cuMemcpyHtoDAsync") ? (void *)htod_async
        : same(s, "cuMemcpyDtoH") ? (void *)dtoh : same(s, "cuMemcpyDtoHAsync") ? (void *)dtoh_async
        : same(s, "cuMemHostAlloc") ? (void *)host_alloc : same(s, "cuMemFreeHost") ? (void *)host_free
        : same(s, "cuDeviceGetAttribute") ? (void *)attribute : same(s, "cuDeviceGet") ? (void *)device_get
        : same(s, "cuDevicePrimaryCtxRetain") ? (void *)retain : same(s, "cuCtxPopCurrent") ? (void *)pop
        : same(s, "cuStreamCreate") || same(s, "cuEventCreate") ? (void *)handle : (void *)ok; }
CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                             int *status) {
    *pfn = entry(symbol); if (status) *status = 1; return 0; }
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    *pfn = entry(symbol); return 0; }
"""


def stub_driver_dir() -> str | None:
    """A folder holding the stub ``libcuda.so.1`` (built once per user and stub source), or None
    where no C compiler is.

    Several processes build it at once (CI's two test workers and the gates): each compiles into a
    file of its own and renames it into place, so none sees a half-written library (``cc -o`` creates
    its output at 0 bytes first). The folder is the user's own (made 0700; one that another user owns
    or others can write is refused): the library is loaded into test processes through
    ``LD_LIBRARY_PATH``, so whoever could plant it would run code there."""
    import hashlib
    import os
    import shutil
    import stat
    import subprocess
    import tempfile

    key = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]     # a changed stub is built anew
    folder = os.path.join(tempfile.gettempdir(), f"fastema-stub-cuda-{os.getuid()}-{key}")
    lib = os.path.join(folder, "libcuda.so.1")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{folder} is not a folder of this user's that only it can write: remove it and run again "
                           f"(the stub driver built there is loaded into the test processes)")
    if os.path.exists(lib):
        return folder
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = os.path.join(folder, f"stub.{os.getpid()}.c")
    tmp = os.path.join(folder, f"libcuda.{os.getpid()}.tmp")
    with open(src, "w") as f:
        f.write(_STUB_SOURCE)
    try:
        done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, src], capture_output=True)
        if done.returncode != 0:
            return None
        os.replace(tmp, lib)                                # whole, at once, for every process
    finally:
        for leftover in (src, tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    return folder
