"""Which compiled code this is: one digest, one variant key.

- :func:`digest`, the one digest function of fastema's compiled code (SHA-256 of length-prefixed
  parts): the kernel sources (:func:`of_files`, :func:`cuda_sources`), a node store entry's name, a
  CPU kernel's variant and its numba index stamp (``kernels._cache``).
- A CUDA variant is a kernel, named by its factory and the factory's arguments (:func:`variant`,
  :data:`VARIANTS`: ``lerp_kernel(0,1,0,0)``), and the numba types of its arguments
  (:func:`variant_key`).
- The device code's identity is the digest of the sources every CUDA kernel is compiled from
  (:data:`CUDA_SOURCES`, read as files: no numba-cuda needed) and of the toolchain that compiled
  it (its versions, :mod:`.store`); an edit of any of those files makes every compiled entry
  stale, an edit of this package or of the toolchain modules does not (what they change is named
  by the toolchain's versions or is not code).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os

KERNELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The kernels package's folder."""

CPU_SOURCES = ("_bits", "_stats", "_elementwise", "_intrinsics", "_target", "_cpu_hw", "kinds")
"""The modules every CPU kernel's code depends on besides its own file (add a new one here)."""

CUDA_SOURCES = ("_bits", "_stats", "_elementwise", "_intrinsics", "_target", "_cuda_hw", "kinds",
                "_cuda_jit", "cuda", "_cuda_scan", "_cuda_stream", "_cuda_copy")
"""The modules every CUDA kernel's device code is compiled from: the CPU ones' shared bodies, the
CUDA shims and skeletons (add a new one here). Not the launch bounds per set and architecture
(``kernels._bounds``): each entry records its own, so an edit of that table makes stale only the
entries whose bounds it changes."""


def digest(*parts, size: int = 64) -> str:
    """The SHA-256 hex digest (its first ``size`` digits) of ``parts`` (bytes, or anything as its
    ``str``), each prefixed by its length, so ``("ab", "c")`` and ``("a", "bc")`` differ."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:size]


@functools.cache
def of_file(path: str) -> str | None:
    """:func:`digest` of the bytes of ``path``, read once per process (the code compiled is the code
    imported); None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return digest(f.read())
    except OSError:
        return None


@functools.cache
def of_files(paths: tuple) -> str:
    """:func:`digest` of the files ``paths``: each one's name and :func:`of_file`."""
    return digest(*(f"{os.path.basename(p)}\0{of_file(p)}" for p in paths))


def paths(names) -> tuple:
    """The source files of the kernel modules ``names`` (:data:`CUDA_SOURCES`)."""
    return tuple(os.path.join(KERNELS, f"{name}.py") for name in names)


def cuda_sources() -> str:
    """The digest of :data:`CUDA_SOURCES`: the sources part of every CUDA entry's identity."""
    return of_files(paths(CUDA_SOURCES))


def variant_key(kernel: str, types) -> str:
    """A variant's name: its kernel's (``lerp_kernel(0,1,0,0)``) and its arguments' numba types."""
    return f"{kernel}[{', '.join(map(str, types))}]"


VARIANTS: dict = {}
"""``dispatcher -> "factory(arg,...)"``: the name of every kernel a factory decorated by :func:`variant`
made in this process (the first half of its key)."""


def variant(factory):
    """A kernel factory made once per arguments (as ``functools.cache``), each kernel it makes named in
    :data:`VARIANTS` by the factory's name and its arguments with their defaults, as integers
    (``lerp_kernel(0,1,0,0)``): the same kernel, however it was asked for, has one name. Called
    with every argument by position (the launchers' calls), it looks the kernel up at once; only
    keywords or defaults go through ``inspect.Signature.bind`` (~13 us)."""
    signature = inspect.signature(factory)
    every = len(signature.parameters)

    @functools.cache
    def made(*args):
        numbers = tuple(int(a) for a in args)
        dispatcher = factory(*numbers)
        VARIANTS[dispatcher] = f"{factory.__name__}({','.join(map(str, numbers))})"
        return dispatcher

    @functools.wraps(factory)
    def named(*args, **kwargs):
        if kwargs or len(args) != every:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        return made(*args)          # equal numbers hash alike: 0, False and np.int8(0) are one key

    named.cache_clear = made.cache_clear             # fastema.clear_caches()
    named.cache_info = made.cache_info
    return named
