"""The lowest CUDA pieces of dispatch, which every other CUDA module of ``_launch`` imports: what
built a kernel (:func:`cuda_versions`), device indices, what waits for a safe point
(:data:`WAITING`, :func:`prune_retired`: the retired sources of :class:`.tables.Retired` waiting for
their events, and the deferred frees of :mod:`.frees`) and the refusal of a code load inside a
capture (:func:`refuse_load_during_capture`). Sets, before any kernel is built, the kernel cache's
key versions (the dispatcher cache switch is set where the kernels are first imported:
:func:`.kernel_refs.kernels`). The driver calls are the launch driver's (:mod:`.driver`,
:mod:`.drivers`)."""
from __future__ import annotations

import functools

from ...kernels import _cache as _kernel_cache
from .frees import WAITING


@functools.cache
def cuda_versions() -> tuple:
    """``(name, version)`` of what built a CUDA kernel besides numba-cuda's magic tuple (NVRTC's
    version and the GPU's compute capability): numba-cuda, cuda-core, NVVM and the driver. The disk
    cache keys every kernel with them (:func:`fastema.kernels._cache.set_cuda_versions`): a kernel
    compiled by another numba-cuda or NVVM is compiled again, not loaded (issue 37, C6). A version
    that cannot be read is ``"unknown"``."""
    import importlib.metadata as md

    from numba.cuda.cudadrv import nvvm
    from numba.cuda.cudadrv.driver import driver
    from numba.cuda.cudadrv.error import CudaDriverError

    def read(fn) -> str:
        try:
            return str(fn())
        except (ImportError, OSError, CudaDriverError):   # not installed (PackageNotFoundError,
            return "unknown"                              # Cuda/NvvmSupportError), unloadable, or
                                                          # the driver's own error

    return (("numba-cuda", read(lambda: md.version("numba-cuda"))),
            ("cuda-core", read(lambda: md.version("cuda-core"))),
            ("nvvm", read(lambda: nvvm.NVVM().get_version())), ("driver", read(driver.get_version)))


_kernel_cache.set_cuda_versions(cuda_versions)      # before any kernel is built


def _index(device: str) -> int:
    """N of "cuda:N" (the names fastema._backends.device_name gives)."""
    return int(device.split(":")[1])


def prune_retired(driver, raw: int, index: int | None = None) -> None:
    """Drop the retired objects whose events have passed (:class:`.tables.Retired`) and issue the
    deferred frees (:mod:`.frees`): the holders of :data:`WAITING`. Skipped while the launch
    stream ``raw``, device ``index``'s legacy stream or a watched framework's current stream is
    being captured (:meth:`.driver.Driver.any_capturing`): event queries and frees are not permitted
    during a capture, and in global mode (torch's default) not from any thread while another
    captures. A capture on a stream current on another thread only is not seen (only current streams
    are asked: :meth:`.drivers.DispatcherDriver.any_capturing`): the holders are pruned with this
    thread's capture mode relaxed (:meth:`.driver.Driver.relaxed`), which leaves such a capture
    intact."""
    if driver.any_capturing(raw, index):
        return
    with driver.relaxed():
        for r in list(WAITING):
            r.prune()
            if not r.pending and r in WAITING:
                WAITING.remove(r)


def refuse_load_during_capture(driver, raw: int, index: int, dispatcher) -> None:
    """RuntimeError where a launch on the raw stream ``raw`` of device ``index`` must load its
    kernel's code (its first launch, or a new variant) while a CUDA graph is being captured there or
    on another stream ``driver`` asks. An H200's driver (580.159) permitted ``cuLibraryLoadData``,
    ``cuLibraryGetKernel`` and ``cuKernelGetFunction`` during a capture
    (``testkit/driver_rules.py``); drivers before it were not measured, and a refused load
    invalidates the capture, so fastema loads none there. Asked before any call that loads (one
    capture query a stream; only where code is to be loaded)."""
    if driver.any_capturing(raw, index):
        name = (getattr(dispatcher, "name", None)
                or getattr(dispatcher, "__name__", repr(dispatcher)))
        raise RuntimeError(f"fastema: the first launch of CUDA kernel {name} on cuda:{index} would "
                           f"load its code while a CUDA graph is being captured; fastema loads no code "
                           f"inside a capture (a driver may refuse it, which invalidates the capture). "
                           f"Make this call "
                           f"once before the capture (a warm-up step: the swap, copy_to() and "
                           f"scan_nonfinite() each launch a kernel of their own), so that its code "
                           f"is loaded. Nothing was launched.")
