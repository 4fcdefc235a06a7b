"""The run-time compiler of CUDA device code, behind one interface: :class:`Compiler`.

What is not shipped (or what the driver refuses) is compiled at its first use (``device_code``, once
per node into its cache). The compile is one call, ``compile(dispatcher, types, cc) -> (kind, code,
entry)``, from the kernel's Python source (the numba dispatcher its factory made) and the numba
types of its arguments, so that another compiler of the same sources (numba-cuda-mlir, NVRTC) can
take numba-cuda's place without touching the launch path or the cache: whatever compiles must keep
the argument ABI the launch path packs (:mod:`.abi`, numba's) and name its entry in the code.

Today's compiler is :class:`NumbaCuda` (numba-cuda's public ``compile``: NVVM to LTO-IR, then
nvJitLink with link-time optimisation, as numba-cuda compiles at a launch; the build of the shipped
code uses the same :func:`nvvm` and :func:`link`). :func:`using` gives another for a ``with`` block
(the tests' stand-ins, a trial of another compiler); :func:`current` is the one in use.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Iterator, Protocol

_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


class Compiler(Protocol):
    name: str
    """What it is, for messages."""

    def identity(self) -> str:
        """What its code depends on besides the kernel sources and the architecture (the versions of
        the compiler's parts): part of a cached entry's name, so that another compiler's code is
        compiled again, never loaded."""

    def compile(self, dispatcher: Any, types: tuple, cc: tuple) -> tuple[str, bytes, str]:
        """``(kind, code, entry)`` of the kernel of ``dispatcher`` for arguments of numba ``types``,
        for compute capability ``cc``: ``kind`` ``"cubin"`` or ``"ptx"`` (which the driver
        assembles), and the name of the kernel's entry in ``code``."""


def nvvm(dispatcher, types, cc: tuple, output: str = "ltoir"):
    """The kernel's code from NVVM (numba-cuda's public ``compile``) for compute capability ``cc``,
    with the dispatcher's own options: LTO-IR (bytes) or PTX (str)."""
    from numba import cuda

    o = dispatcher.targetoptions
    code, _ = cuda.compile(dispatcher.py_func, tuple(types), debug=bool(o.get("debug")),
                           lineinfo=bool(o.get("lineinfo")), device=False,
                           fastmath=bool(o.get("fastmath")), cc=tuple(cc), opt=o.get("opt", True),
                           abi="numba", output=output, launch_bounds=o.get("launch_bounds"))
    return bytes(code) if output == "ltoir" else code


def link(ltoir: bytes, target: str, **options) -> tuple[bytes, str]:
    """``(code, info log)``: ``ltoir`` linked by nvJitLink (cuda.core's ``Linker``) with link-time
    optimisation, as numba-cuda links at a launch, into ``target`` (``"cubin"`` or ``"ptx"``)."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    options = LinkerOptions(link_time_optimization=True, **options)
    linker = Linker(ObjectCode.from_ltoir(ltoir), options=options)
    try:
        return bytes(linker.link(target).code), linker.get_info_log()
    finally:
        linker.close()


class NumbaCuda:
    """numba-cuda's compile (see the module docstring)."""

    name = "numba-cuda"

    def identity(self) -> str:
        import importlib.metadata as md

        from .cuda_base import cuda_versions

        try:
            nvjitlink = md.version("nvidia-nvjitlink")
        except md.PackageNotFoundError:
            nvjitlink = "unknown"
        return f"{cuda_versions()[:3]!r}\0{nvjitlink}"

    def compile(self, dispatcher, types, cc: tuple) -> tuple[str, bytes, str]:
        """NVVM to LTO-IR, linked with link-time optimisation into a cubin; where nvJitLink is
        missing, NVVM's PTX (the driver assembles it)."""
        try:
            ir = nvvm(dispatcher, types, cc)
            arch = f"sm_{cc[0]}{cc[1]}"
            ptx, _ = link(ir, "ptx", arch=arch, ptx=True)
            return "cubin", link(ir, "cubin", arch=arch)[0], _ENTRY.findall(ptx.decode())[0]
        except ImportError:                               # no nvJitLink: PTX for the driver
            ptx = nvvm(dispatcher, types, cc, output="ptx")
            return "ptx", ptx.encode(), _ENTRY.findall(ptx)[0]


_STACK: list = []


@contextlib.contextmanager
def using(compiler: Compiler) -> Iterator[Compiler]:
    """``compiler`` compiles what the launch path compiles at run time for the ``with`` block."""
    _STACK.append(compiler)
    try:
        yield compiler
    finally:
        _STACK.remove(compiler)


@functools.cache
def _default() -> Compiler:
    return NumbaCuda()


def current() -> Compiler:
    """The compiler in use: the innermost :func:`using`'s, else numba-cuda's."""
    return _STACK[-1] if _STACK else _default()


def _typed(numba_cuda: NumbaCuda) -> Compiler:              # mypy: numba-cuda's is a Compiler
    return numba_cuda
