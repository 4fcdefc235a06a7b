"""What every CUDA kernel module of fastema shares: the element bodies bound for CUDA (:data:`E`), the
dispatcher maker (:func:`jit`: ``cuda.jit``'s options, the disk cache when :data:`CACHE`), raw pointers
by storage kind, and the masks of a 16-bit element's half of a 32-bit word. The kernel factories'
decorator, which names every kernel, is ``._store.identity.variant`` (outside the device code's
sources: an edit of it compiles nothing anew)."""
import functools
import sys

import numpy as np
from numba import cuda

from . import _bits, _cuda_hw, _elementwise, _intrinsics, _stats, _target, kinds
from ._cache import cached_cuda
from ._cuda_hw import HW, SIMULATOR
from ._target import bind
from .kinds import F32, F64

E = bind(functools.partial(cuda.jit, device=True, inline="always"), HW)
DEPENDENCIES = (_bits, _stats, _elementwise, _intrinsics, _target, _cuda_hw, kinds, sys.modules[__name__])
"""The modules every CUDA kernel's code depends on besides its own file (the cache's stamp): this one's
pointers and masks too."""
CACHE = False
"""Kernels built from now on by numba's dispatcher are cached on disk (:func:`._cache.cached_cuda`): set by
``fastema._launch.cuda.kernel_refs`` from FASTEMA_CUDA_CACHE=1. Only the dispatcher path uses it (the Numba CUDA
simulator has none; ``FASTEMA_CUDA_LAUNCH=dispatcher``): every other launch runs the shipped device code,
or code compiled once per node into fastema's own cache (``fastema._launch.cuda.device_code``)."""


NVVM = {"fma": 0}
"""NVVM's options for every kernel fastema compiles ahead of time or at a miss (:func:`nvvm_code`),
and nvJitLink's (:data:`LINK`), where the code is made under link-time optimisation: ``-fma=0``, no
multiply and add contracted into one FMA. NVVM contracts ``a * b + c`` by default and numba's CPU
target never does, so a GPU kernel rounded once where the CPU kernel rounded twice (the H100 run of
2026-11-26: the plan kernel's float64 state 1 ulp apart from the 4th call). With it the PTX's float
multiplies and adds carry ``.rn``, which ptxas never fuses either; the FMAs the kernels mean are
written (``fma``, ``llvm.fma``: kept). Numba's own dispatcher (``FASTEMA_CUDA_LAUNCH=dispatcher``)
takes no NVVM options and contracts."""
LINK = ("-fma=0",)
"""nvJitLink's flags besides the image's (``compiler.link``): :data:`NVVM`'s, for the code it makes."""


def nvvm_code(dispatcher, types, cc, output="ltoir", bounds=None):
    """The kernel of ``dispatcher`` for argument ``types`` compiled by NVVM for compute capability
    ``cc`` with launch ``bounds``, the dispatcher's own options and :data:`NVVM`: LTO-IR (bytes) or
    PTX (str). numba-cuda's public ``compile`` with the NVVM options it does not take (what its
    ``_compile_pyfunc_with_fixup`` does, through the functions its dispatcher calls)."""
    from numba.cuda import compiler
    from numba.cuda import types as nt
    from numba.cuda.cudadrv import nvvm

    o = dispatcher.targetoptions
    debug, fastmath, lto = bool(o.get("debug")), bool(o.get("fastmath")), output == "ltoir"
    options = {"fastmath": fastmath, "opt": 3 if o.get("opt", True) else 0, **NVVM}
    if debug:
        options["g"] = None
    if lto:
        options["gen-lto"] = None
    cres = compiler.compile_cuda(dispatcher.py_func, nt.void, tuple(types), debug=debug,
                                 lineinfo=bool(o.get("lineinfo")), fastmath=fastmath, nvvm_options=options,
                                 cc=tuple(cc), lto=lto, abi="numba")
    lib = cres.library
    kernel = lib.get_function(cres.fndesc.llvm_func_name)
    compiler.kernel_fixup(kernel, debug)
    nvvm.set_launch_bounds(kernel, bounds)
    if lto:
        return bytes(lib.get_ltoir(cc=tuple(cc)))
    (code,) = lib.get_asm_strs(cc=tuple(cc))
    return code


def jit(fn, **options):
    """A kernel's dispatcher, with ``cuda.jit``'s ``options`` (not in the simulator, which takes none of
    them) and the disk cache when :data:`CACHE` (never in the simulator)."""
    if SIMULATOR:
        return cuda.jit(fn)
    kernel = cuda.jit(fn, **options)
    return cached_cuda(kernel, DEPENDENCIES) if CACHE else kernel


_POINTERS = {F32: HW["u32_pointer"], F64: HW["f64_pointer"]}
M16, S16, Z32 = np.uint32(0xFFFF), np.uint32(16), np.uint32(0)   # a 16-bit element's half of a 32-bit word
M32, S32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def pointer(kind):
    """The raw-pointer intrinsic of a storage kind (32-bit words, float64, or 16-bit elements)."""
    return _POINTERS.get(kind, HW["u16_pointer"])
