"""The compilers of CUDA device code, behind one interface: :class:`Compiler`.

One call, ``compile(dispatcher, types, images) -> {image: (kind, code, entry, figures)}``, from the
kernel's Python source (the numba dispatcher its factory made) and the numba types of its
arguments, for images ``"sm_XY"`` (a cubin; PTX where no linker is there) and ``"compute_XY"``
(PTX, which the driver assembles), each with the launch bounds ``kernels._bounds`` gives that
image in the compiler's set, and the figures its linker or ptxas said (``kernels._store.entry``).
The same call builds the shipped sets (``python -m fastema warm --into``: every image of a set)
and compiles what is missing at run time (one image, the device's), and whatever compiles must
keep the argument ABI the launch path packs (:mod:`.abi`, numba's) and name its entry in the code,
so another compiler of the same sources (numba-cuda-mlir, NVRTC) can take numba-cuda's place
without touching the launch path or the store.

- :class:`NumbaCuda`, the run-time compiler and the CUDA 13 set's: numba-cuda's public ``compile``
  (NVVM to LTO-IR, for the lowest image's compute capability) linked by nvJitLink with link-time
  optimisation, as numba-cuda compiles at a launch; PTX lowered to ISA :data:`PTX_ISA` where it
  assembles as such (what every CUDA 13 driver reads).
- :class:`Cu12`, the CUDA 12 set's: ``kernels._toolchain_cu12`` (NVVM 12.0 and ptxas 12.0, in a
  process of its own where ``activate`` ran).

:func:`using` gives another for a ``with`` block (the tests' stand-ins, a trial of another
compiler); :func:`current` is the one in use at run time.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Protocol

from ..._switch import Switch
from ...kernels import _bounds
from ...kernels._store.entry import figures
from ...kernels._store.identity import VARIANTS

PTX_ISA = "9.0"
"""The PTX ISA the CUDA 13 set's PTX declares where it assembles as such: CUDA 13.0's, the oldest
CUDA 13 driver's (NVVM 13.5 writes 9.5, which a CUDA 13.0 driver refuses)."""
_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


class Compiler(Protocol):
    name: str
    """What it is, for messages."""
    @property
    def set(self) -> str:
        """The compiled set whose launch bounds it applies (``kernels._bounds``): ``"cu12"``,
        ``"cu13"``."""

    def identity(self) -> str:
        """What its code depends on besides the kernel sources (the versions of the compiler's
        parts): part of an entry's identity, so another compiler's code is compiled again, never
        loaded."""

    def compile(self, dispatcher: Any, types: tuple, images: tuple) -> dict:
        """``{image: (kind, code, entry, figures)}`` of the kernel of ``dispatcher`` for arguments
        of numba ``types``, for each of ``images`` (``"sm_XY"``, ``"compute_XY"``): ``kind``
        ``"cubin"`` or ``"ptx"``, the name of the kernel's entry in ``code``, the figures of its
        link (``kernels._store.entry.figures``; empty for PTX)."""


def cc_of(image: str) -> tuple[int, int]:
    """``(9, 0)`` of ``"sm_90"`` or ``"compute_90"``; ``(12, 0)`` of ``"sm_120"``."""
    digits = image.rpartition("_")[2]
    return int(digits[:-1]), int(digits[-1])


def nvvm(dispatcher, types, cc: tuple, output: str = "ltoir", bounds=None):
    """The kernel's code from NVVM for compute capability ``cc``, with the dispatcher's own options,
    launch ``bounds`` and the kernels' NVVM options (``kernels._cuda_jit.NVVM``: no contraction):
    LTO-IR (bytes) or PTX (str)."""
    from ...kernels._cuda_jit import nvvm_code

    return nvvm_code(dispatcher, types, cc, output, bounds)


def link(ltoir: bytes, target: str, arch: str, verbose: bool = False) -> tuple[bytes, str]:
    """``(code, info log)``: ``ltoir`` linked by nvJitLink with link-time optimisation, as
    numba-cuda links at a launch, into ``target`` (``"cubin"`` or ``"ptx"``) for ``arch``
    (``"sm_XY"``), with the kernels' flags (``kernels._cuda_jit.LINK``: ``-fma=0``, which decides
    the contraction of LTO code; cuda.core's ``LinkerOptions(fma=False)`` writes ``-fma=false``,
    which nvJitLink 13.5 refuses, so nvJitLink is called through its bindings). ImportError where
    nvJitLink is missing."""
    from cuda.bindings import nvjitlink as J
    from cuda.pathfinder import DynamicLibNotFoundError

    from ...kernels._cuda_jit import LINK

    flags = [f"-arch={arch}", "-lto", *(["-ptx"] if target == "ptx" else []), *(["-verbose"] if verbose else []),
             *LINK]
    try:
        handle = J.create(len(flags), flags)
    except DynamicLibNotFoundError as e:                  # the bindings without the library
        raise ImportError(f"nvJitLink is not installed: {e}") from e
    try:
        J.add_data(handle, J.InputType.LTOIR, ltoir, len(ltoir), "kernel")
        try:
            J.complete(handle)
        except J.nvJitLinkError as e:
            log = bytearray(J.get_error_log_size(handle))
            J.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink could not link the kernel for {arch}: {e}; "
                               f"{bytes(log).rstrip(bytes(1)).decode(errors='replace')}") from e
        size, get = ((J.get_linked_ptx_size, J.get_linked_ptx) if target == "ptx"
                     else (J.get_linked_cubin_size, J.get_linked_cubin))
        code = bytearray(size(handle))
        get(handle, code)
        info = bytearray(J.get_info_log_size(handle))
        J.get_info_log(handle, info)
    finally:
        J.destroy(handle)
    return bytes(code), bytes(info).rstrip(bytes(1)).decode(errors="replace")


def lowered(ptx: bytes, arch: str) -> bytes:
    """``ptx`` declared as PTX ISA :data:`PTX_ISA` where it assembles as such for ``arch`` (ptxas
    checks every instruction against the declared version), else as it is."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    low = re.sub(rb"^\.version \d+\.\d+$", f".version {PTX_ISA}".encode(), ptx, count=1, flags=re.M)
    if low == ptx:
        return ptx
    try:
        linker = Linker(ObjectCode.from_ptx(low), options=LinkerOptions(arch=arch))
        try:
            linker.link("cubin")
        finally:
            linker.close()
    except Exception:                                     # noqa: BLE001 - it needs the newer ISA
        return ptx
    return low


def _bounds_of(compiler: Compiler, dispatcher, images) -> dict:
    """``{image: launch bounds}`` in ``compiler``'s set (``kernels._bounds``)."""
    own = dispatcher.targetoptions.get("launch_bounds")
    return {i: _bounds.launch_bounds(compiler.set, i, VARIANTS[dispatcher], own) for i in images}


class NumbaCuda:
    """numba-cuda's compile (see the module docstring). ``base``: the compute capability NVVM
    compiles for (the build's: 8.0, the CUDA 13 set's PTX), else the lowest image's."""

    name = "numba-cuda"

    def __init__(self, base: tuple | None = None):
        self.base = base

    @functools.cached_property
    def set(self) -> str:
        return "cu12" if self.identity().rpartition("\0")[2].startswith("12.") else "cu13"

    @functools.cache
    def identity(self) -> str:
        import importlib.metadata as md

        from .base import cuda_versions

        try:
            nvjitlink = md.version("nvidia-nvjitlink")
        except md.PackageNotFoundError:
            nvjitlink = "unknown"
        return f"{cuda_versions()[:3]!r}\0{nvjitlink}"

    def compile(self, dispatcher, types, images) -> dict:
        """NVVM to LTO-IR (once per distinct bounds) linked with link-time optimisation into a
        cubin per ``sm_XY`` and PTX per ``compute_XY``; where nvJitLink is missing, NVVM's PTX for
        each (the driver assembles it)."""
        bounds = _bounds_of(self, dispatcher, images)
        lowest = self.base or min(cc_of(i) for i in images)
        out: dict = {}
        try:
            for b in dict.fromkeys(bounds.values()):
                ir = nvvm(dispatcher, types, lowest, bounds=b)
                ptx, _ = link(ir, "ptx", arch="sm_%d%d" % lowest)
                entry = _ENTRY.findall(ptx.decode())[0]   # NVVM numbers each compile's names
                for image in (i for i in images if bounds[i] == b):
                    if image.startswith("compute_"):
                        out[image] = ("ptx", lowered(ptx, "sm_%d%d" % cc_of(image)), entry, {})
                    else:
                        cubin, log = link(ir, "cubin", arch=image, verbose=True)
                        out[image] = ("cubin", cubin, entry, figures(log))
        except ImportError:                               # no nvJitLink: PTX for the driver
            for b in dict.fromkeys(bounds.values()):
                ptx = nvvm(dispatcher, types, lowest, output="ptx", bounds=b)
                for image in (i for i in images if bounds[i] == b):
                    out[image] = ("ptx", ptx.encode(), _ENTRY.findall(ptx)[0], {})
        return out


class Cu12:
    """The CUDA 12 set's compiler (``kernels._toolchain_cu12``): NVVM 12.0 and ptxas 12.0 under
    ``root`` (ptxas 12.8 under ``late`` for Blackwell), in a process where ``activate`` ran."""

    name = "CUDA 12.0 (NVVM and ptxas)"
    set = "cu12"

    def __init__(self, root: str | None = None, late: str | None = None):
        from ...kernels import _toolchain_cu12 as T

        self.T = T
        self.tc = T.Toolchain.at(root or T.default_root())
        self.late = T.Toolchain.at(late or T.default_root(T.LATE_RELEASE))

    @functools.cache
    def identity(self) -> str:
        late = "" if self.late.missing(("ptxas",)) else f"\0ptxas {self.late.version()}"
        return f"nvvm {self.T.RELEASE}\0ptxas {self.tc.version()}{late}"

    def compile(self, dispatcher, types, images) -> dict:
        return self.T.build_cu12(dispatcher, types, tuple(images), self.tc, self.late)


@functools.cache
def _default() -> Compiler:
    return NumbaCuda()


COMPILERS: Switch[Compiler] = Switch(_default)
"""The compiler of what the launch path compiles at run time: the innermost given to :func:`using`,
else numba-cuda's."""
using = COMPILERS.using
"""``using(compiler)``: ``compiler`` compiles what the launch path compiles at run time for the
``with`` block."""
current = COMPILERS.current
"""``current()``: the compiler in use: the innermost :func:`using`'s, else numba-cuda's."""


def _typed(numba_cuda: NumbaCuda, cu12: Cu12) -> tuple[Compiler, Compiler]:   # mypy: both compile
    return numba_cuda, cu12
