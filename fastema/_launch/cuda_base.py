"""The lowest CUDA pieces of dispatch, which every other CUDA module of ``_launch`` imports: what
built a kernel (:func:`cuda_versions`), device indices and the retired sources waiting for their
events (:data:`WAITING`, :func:`prune_retired`; the holders are :class:`.cuda.Retired`). Sets,
before any kernel is built, the kernel cache's key versions (the dispatcher cache switch is set
where the kernels are first imported: :func:`.kernel_refs.kernels`). The driver calls are the
launch driver's (:mod:`.driver`, :mod:`.drivers`)."""
from __future__ import annotations

import functools

from ..kernels import _cache as _kernel_cache


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


WAITING: list = []
"""The :class:`Retired` holders with objects pending; every launch looks at it (empty: one truth
test) and prunes them once it is not empty (:func:`prune_retired`)."""


def prune_retired(driver, raw: int) -> None:
    """Drop the retired objects whose events have passed (:class:`Retired`). Skipped while the
    launch stream ``raw`` is being captured (``driver``'s query): event queries are not allowed
    during a capture."""
    if driver.capturing(raw):
        return
    for r in list(WAITING):
        r.prune()
        if not r.pending:
            WAITING.remove(r)
