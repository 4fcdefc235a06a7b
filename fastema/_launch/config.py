"""Launch tunables, all host side: the launchers read them at every call and pass them to
the kernels as arguments (numba freezes globals at compile time), so tests can shrink them.

Also how the kernels' disk cache (:mod:`fastema.kernels._cache`) reports what it found: set here,
when fastema's launch layer is imported, before any kernel is built."""
import os
import warnings

from ..kernels import _cache as _kernel_cache

CPU_CHUNK = 1 << 14          # elements per CPU work item (64 KiB of float32: the source stays in L2 across rows)
CPU_SERIAL_BELOW = 1 << 15   # total elements below which the serial kernel runs (thread start-up costs more)
CPU_STREAMS_SERIAL_BELOW = 1 << 16   # metric streams below which the smoother kernels run serially
CUDA_CHUNK = 1 << 12         # elements per CUDA block iteration
CUDA_THREADS = 256
CUDA_MAX_BLOCKS = 1 << 15    # grid-stride over chunks beyond this
CUDA_STREAM_MAX_BLOCKS = 4096   # metric streams: grid-stride beyond this many blocks
CUDA_STAGING_SLOTS = 4       # pinned slots per device table for in-place address rewrites
CUDA_RETIRED_MAX = 64        # replaced JAX/TensorFlow sources held for fastema's queued launches
CUDA_CACHE = os.environ.get("FASTEMA_CUDA_CACHE", "0") == "1"   # CUDA kernels cached on disk (read at import)


def _cache_warning(message: str) -> None:
    """What the kernel cache found wrong, as a RuntimeWarning (:data:`fastema.kernels._cache.REPORT`)."""
    warnings.warn(f"fastema: {message}", RuntimeWarning, stacklevel=2)


_kernel_cache.REPORT = _cache_warning
