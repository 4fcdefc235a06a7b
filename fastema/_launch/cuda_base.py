"""The lowest CUDA pieces of dispatch, which every other CUDA module of ``_launch`` imports: the driver
bindings, what built a kernel (:func:`cuda_versions`), device indices, Numba stream objects, the capture
query, launches through numba's dispatcher (:func:`_dispatch`) and the retired sources waiting for their
events (:data:`WAITING`, :func:`prune_retired`; the holders are :class:`.cuda.Retired`). Sets, before any
kernel is built, the kernel cache's switch and key versions."""
from __future__ import annotations

import functools

from numba import cuda

from ..kernels import _cache as _kernel_cache
from ..kernels import _cuda_jit
from ..kernels._cuda_hw import SIMULATOR
from . import config

_cuda_jit.CACHE = config.CUDA_DISPATCHER_CACHE     # numba's own cache of the dispatcher path: FASTEMA_CUDA_CACHE=1


@functools.cache
def cuda_versions() -> tuple:
    """``(name, version)`` of what built a CUDA kernel besides numba-cuda's magic tuple (NVRTC's
    version and the GPU's compute capability): numba-cuda, cuda-core, NVVM and the driver. The disk
    cache keys every kernel with them (:data:`fastema.kernels._cache.CUDA_VERSIONS`): a kernel
    compiled by another numba-cuda or NVVM is compiled again, not loaded (issue 37, C6). A version
    that cannot be read is ``"unknown"``."""
    import importlib.metadata as md

    from numba.cuda.cudadrv import nvvm
    from numba.cuda.cudadrv.driver import driver

    def read(fn) -> str:
        try:
            return str(fn())
        except Exception:                                 # noqa: BLE001 - a missing library: unknown
            return "unknown"

    return (("numba-cuda", read(lambda: md.version("numba-cuda"))),
            ("cuda-core", read(lambda: md.version("cuda-core"))),
            ("nvvm", read(lambda: nvvm.NVVM().get_version())), ("driver", read(driver.get_version)))


_kernel_cache.CUDA_VERSIONS = cuda_versions      # before any kernel is built


def _index(device: str) -> int:
    """N of "cuda:N" (the names fastema._backends.device_name gives)."""
    return int(device.split(":")[1])


@functools.cache
def _driver():
    """cuda-bindings' driver module (numba-cuda 0.30 runs on it)."""
    from cuda.bindings import driver

    return driver


@functools.lru_cache(maxsize=64)
def external_stream(ptr: int):
    """The Numba stream object of a raw CUDA stream handle (0: 0, the legacy default stream)."""
    return cuda.external_stream(ptr) if ptr else 0


def capturing(device: str, raw: int) -> bool:
    """Whether work queued on the raw stream ``raw`` of ``device`` now would be captured into a CUDA
    graph rather than run: the stream is capturing, or (the legacy stream) another stream's capture
    makes work on it illegal. One driver query (cuStreamIsCapturing); False in the simulator and
    where the query itself fails (no context: nothing can be capturing)."""
    if SIMULATOR:
        return False
    d = _driver()
    try:
        err, status = d.cuStreamIsCapturing(d.CUstream(raw))
    except Exception:                               # noqa: BLE001 - no driver: no capture
        return False
    if err == d.CUresult.CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
        return True
    return not err and status != d.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


def _dispatch(kernel, device: str, raw: int, blocks, *args):
    """Launch ``kernel`` through numba's dispatcher (compiling it if needed) on the raw stream ``raw``: the
    Numba CUDA simulator, ``FASTEMA_CUDA_LAUNCH=dispatcher``, an argument that is not device memory."""
    stream = external_stream(raw)
    with cuda.gpus[_index(device)]:
        if SIMULATOR or not stream:
            kernel[blocks, config.CUDA_THREADS](*args)
        else:
            kernel[blocks, config.CUDA_THREADS, stream](*args)


WAITING: list = []
"""The :class:`Retired` holders with objects pending; every launch looks at it (empty: one truth
test) and prunes them once it is not empty (:func:`prune_retired`)."""


def prune_retired(device: str, raw: int) -> None:
    """Drop the retired objects whose events have passed (:class:`Retired`). Skipped while the launch
    stream ``raw`` is being captured: event queries are not allowed during a capture."""
    if capturing(device, raw):
        return
    for r in list(WAITING):
        r.prune()
        if not r.pending:
            WAITING.remove(r)
