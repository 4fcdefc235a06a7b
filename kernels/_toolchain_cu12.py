"""The CUDA 12 toolchain: the device code fastema ships to CUDA 12 drivers (r525 and newer), built
by NVIDIA's CUDA 12.0 wheels from numba-cuda's own IR.

Why 12.0 and not a later 12.x: a cubin made by the 12.0 toolkit (ELF ABI v7, ``e_version`` 120:
:func:`toolkit`) is what an r525 driver was released with, so it loads there without leaning on
minor-version compatibility; and NVVM 12.0 writes PTX ISA 8.0, the newest an r525 driver reads, so
nothing is lowered or rewritten. The wheels (:data:`WHEELS`), installed outside the environment by
``pip install --no-deps --target DIR`` (:func:`install`) and never imported as packages:

- ``nvidia-cuda-nvcc-cu12`` (libNVVM, libdevice, ``ptxas``; 19.8 MB, 47 MB unpacked): never into
  the environment itself, where numba-cuda would take its libdevice for the CUDA 13 build too (it
  looks for that wheel first);
- ``nvidia-cuda-nvrtc-cu12`` (the build only): numba-cuda asks NVRTC which architectures exist
  before it names NVVM's target, and CUDA 13's NVRTC starts at 7.5, 12.0's at 5.0.

The path of one variant (:func:`build_cu12`):

- NVVM 12.0 compiles the kernel (numba-cuda's public ``compile``, the dispatcher's own options) to
  PTX for :data:`PTX_CC`, compute_70 (NVVM 12.0's code for 7.0 to 9.0 differs only in ``.target``;
  compute_70 also serves sm_72 and any device without a cubin), once per distinct launch bounds
  that :mod:`._bounds` gives the architectures;
- ``ptxas`` 12.0 assembles it into a cubin for each of :data:`CUBINS`; ``-v`` gives the figures
  (:func:`figures`: registers, spills, stack, shared memory).

No nvJitLink: the 12.0-12.2 libraries export versioned symbols (``__nvJitLinkCreate_12_0``) that
cuda-bindings cannot find, cuda.core's ``Linker`` refuses any older than 12.3 (it falls back to the
driver, which has no LTO), and a newer one makes the cubins 12.x-built for little: nvJitLink 12.9's
LTO of NVVM 12.0's LTO-IR gave the same registers and spills as ptxas 12.0 but for one kernel on
sm_90 (4/8 bytes of spill instead of 12/12; the launch bounds remove both).

libNVVM and NVRTC are loaded once per process: :func:`activate` loads the 12.0 ones before anything
has used NVVM (cuda-pathfinder, which cuda-bindings asks, takes a library already loaded), so a
CUDA 12 build runs in processes of its own (spawned), never beside the CUDA 13 build. Nothing here
imports ``fastema``.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile

from ._store.entry import figures

SET = "cu12"
"""This compiled set's name (its key in :data:`._bounds.OVERRIDES`)."""
RELEASE = "12.0"
WHEELS = {"nvcc": "nvidia-cuda-nvcc-cu12==12.0.76", "nvrtc": "nvidia-cuda-nvrtc-cu12==12.0.76",
          "late": "nvidia-cuda-nvcc-cu12==12.8.93"}
PTX_CC = (7, 0)
PTX_ISA = "8.0"
CUBINS = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
LATE_RELEASE = "12.8"
LATE = ("sm_100", "sm_120")
"""Blackwell's cubins, which ptxas 12.0 does not know: assembled by ptxas 12.8 (the first to know
sm_100 and sm_120, the oldest driver a Blackwell GPU runs under) from the same PTX 8.0, so a CUDA
12.8 or 12.9 driver loads a cubin rather than compiling the PTX."""
_VERSION = re.compile(r"^\.version (\d+\.\d+)$", re.M)
_TARGET = re.compile(r"^\.target (sm_\d+)\b", re.M)


class Toolchain:
    """Where the CUDA 12.0 tools lie under ``root`` (the ``--target`` folder of :func:`install`)."""

    __slots__ = ("root", "ptxas", "nvvm", "libdevice", "nvrtc")

    def __init__(self, root: str):
        nvcc = os.path.join(root, "nvidia", "cuda_nvcc")
        self.root, self.ptxas = root, os.path.join(nvcc, "bin", "ptxas")
        self.nvvm = os.path.join(nvcc, "nvvm", "lib64", "libnvvm.so")
        self.libdevice = os.path.join(nvcc, "nvvm", "libdevice", "libdevice.10.bc")
        self.nvrtc = os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12")

    @classmethod
    def at(cls, root: str) -> Toolchain:
        return cls(root)

    def missing(self, parts=("ptxas", "nvvm", "libdevice", "nvrtc")) -> str | None:
        """Why ``parts`` of this toolchain cannot be used, with the command that installs them; None
        where they are all there."""
        absent = [p for p in parts if not os.path.isfile(getattr(self, p))]
        if not absent:
            return None
        wheels = sorted({WHEELS["nvrtc" if p == "nvrtc" else "nvcc"] for p in absent})
        return (f"the CUDA {RELEASE} toolchain has no {', '.join(absent)} in {self.root}: "
                f"python -m pip install --no-deps --target {self.root} {' '.join(wheels)}")

    def version(self) -> str:
        """``ptxas --version``'s release (``"12.0, V12.0.76"``): what a manifest records."""
        out = subprocess.run([self.ptxas, "--version"], capture_output=True, text=True,
                             check=True).stdout
        found = re.search(r"release (\d+\.\d+, V[\d.]+)", out)
        if found is None:
            raise RuntimeError(f"{self.ptxas} --version names no release: {out!r}")
        return found.group(1)


def default_root(release: str = RELEASE) -> str:
    """``$FASTEMA_CU12_TOOLCHAIN`` (12.0's), else ``.toolchains/cu12-<release>`` in the checkout
    above this package."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    given = os.environ.get("FASTEMA_CU12_TOOLCHAIN") if release == RELEASE else None
    return given or os.path.join(here, ".toolchains", f"cu12-{release}")


def install(root: str, parts=("nvcc", "nvrtc")) -> None:
    """The wheels of ``parts`` unpacked into ``root`` by pip (no dependencies, nothing imported)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    root, *(WHEELS[p] for p in parts)], check=True)


# ---------------------------------------------------------------- the tools

def ptx_version(ptx: bytes) -> str:
    """The PTX ISA a module declares (its ``.version``)."""
    found = _VERSION.search(ptx.decode("ascii", "replace"))
    if found is None:
        raise ValueError("not a PTX module: no .version line")
    return found.group(1)


def toolkit(cubin: bytes) -> str:
    """The CUDA release whose ptxas made ``cubin`` (``"12.0"``): the release its toolkit note
    (``.note.nv.tkinfo``: ptxas 12.9 for sm_100 and later, every CUDA 13 image) names, else, in
    an ELF ABI v7 image, ``e_version`` (120: 12.0, 129: 12.9). ValueError where it says neither."""
    found = re.search(rb"compilation tools, release (\d+\.\d+),", cubin)
    if found:
        return found.group(1).decode()
    if cubin[:4] == b"\x7fELF" and cubin[8] == 7:
        version = int.from_bytes(cubin[20:24], "little")
        return f"{version // 10}.{version % 10}"
    raise ValueError("not a cubin that names its toolkit (ELF ABI v7, or a .note.nv.tkinfo)")


def assemble(ptx: bytes, arch: str, ptxas: str, options=()) -> tuple[bytes, dict, str]:
    """``(cubin, figures, log)``: ``ptx`` assembled for ``arch`` by the ``ptxas`` at that path.
    RuntimeError with ptxas's words where it refuses (a newer ISA, an unknown architecture)."""
    with tempfile.TemporaryDirectory(prefix="fastema-ptxas-") as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "wb") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"-arch={arch}", *options, "-o", out, src],
                             capture_output=True, text=True)
        if run.returncode != 0:            # ptxas 12.0 on ISA 9.0 says why, then dies of SIGSEGV
            raise RuntimeError(f"ptxas ({ptxas}) failed for {arch} (rc {run.returncode}): "
                               f"{(run.stderr or run.stdout).strip()[:600]}")
        with open(out, "rb") as f:
            cubin = f.read()
    log = run.stdout + run.stderr
    return cubin, figures(log), log


def _mapped(stem: str) -> set:
    """The real paths of the files named ``stem*`` this process has mapped (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(stem)}


def activate(tc: Toolchain) -> None:
    """Make numba-cuda compile with ``tc``'s NVVM, libdevice and NVRTC in this process: the
    libraries loaded now, before anything has used NVVM or NVRTC, and ``tc.root`` appended to
    ``sys.path``, where numba-cuda's search for libdevice finds the ``nvidia-cuda-nvcc-cu12`` wheel
    first. RuntimeError where another libNVVM or NVRTC is loaded already (a CUDA 12 build needs a
    process of its own); :func:`compile_ptx` checks the release of every PTX besides."""
    problem = tc.missing()
    if problem:
        raise FileNotFoundError(problem)
    for stem, path in (("libnvvm.so", tc.nvvm), ("libnvrtc.so", tc.nvrtc)):
        others = _mapped(stem) - {os.path.realpath(path)}
        if others:
            raise RuntimeError(f"this process already uses {sorted(others)[0]}, not {path}: build "
                               f"the CUDA 12 set in a process of its own, before any NVVM compile")
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    if tc.root not in sys.path:
        sys.path.append(tc.root)
    from numba.cuda.cuda_paths import get_cuda_paths

    libdevice = get_cuda_paths()["libdevice"].info
    if not (libdevice and os.path.samefile(libdevice, tc.libdevice)):
        raise RuntimeError(f"numba-cuda takes libdevice from {libdevice}, not {tc.libdevice} "
                           f"(CONDA_PREFIX set? it looks there first): build outside conda")


def compile_ptx(dispatcher, types, bounds) -> bytes:
    """The kernel of ``dispatcher`` for argument ``types`` compiled by NVVM (``._cuda_jit.nvvm_code``:
    the dispatcher's own options and the kernels' NVVM options, no contraction) to PTX for
    :data:`PTX_CC` with launch ``bounds``; RuntimeError unless it is CUDA 12.0's PTX :data:`PTX_ISA`
    (:func:`activate` not called first)."""
    from ._cuda_jit import nvvm_code

    code = nvvm_code(dispatcher, types, PTX_CC, "ptx", bounds)
    ptx = code.encode()
    target = _TARGET.search(code)
    made = f"release {RELEASE}," in code.split(".version", 1)[0]        # NVVM's header comment
    want = "sm_%d%d" % PTX_CC
    if not made or ptx_version(ptx) != PTX_ISA or target is None or target.group(1) != want:
        raise RuntimeError(f"NVVM wrote PTX {ptx_version(ptx)} for {target and target.group(1)}, "
                           f"not CUDA {RELEASE}'s {PTX_ISA} for {want}: call activate() first, in "
                           f"a process of its own")
    return ptx


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


def entry_of(ptx: bytes) -> str:
    """The name of the one kernel entry of ``ptx`` (NVVM numbers every compile's names: an image
    takes the name of the PTX it was assembled from)."""
    found = _ENTRY.findall(ptx.decode("ascii", "replace"))
    if len(found) != 1:
        raise ValueError(f"expected one kernel entry in the PTX, found {found}")
    return found[0]


def build_cu12(dispatcher, types, archs=CUBINS, tc: Toolchain | None = None,
               late: Toolchain | None = None) -> dict:
    """``{image: (kind, code, entry, figures)}`` of one variant for CUDA 12 drivers, in a process
    where :func:`activate` ran: for each of ``archs``, a cubin assembled by ptxas 12.0 (ptxas
    :data:`LATE_RELEASE` of ``late`` for :data:`LATE`) from the PTX compiled with that
    architecture's bounds (:mod:`._bounds`: the kernel's own unless overridden; NVVM once per
    distinct bounds), and for ``compute_70`` among them the PTX (ISA 8.0) itself."""
    from . import _bounds
    from ._store.identity import VARIANTS

    tc = tc or Toolchain.at(default_root())
    name = VARIANTS[dispatcher]
    own = dispatcher.targetoptions.get("launch_bounds")
    wanted = {a: _bounds.launch_bounds(SET, a, name, own) for a in archs}
    code = {b: compile_ptx(dispatcher, types, b) for b in dict.fromkeys(wanted.values())}
    out = {}
    for arch in archs:
        ptx = code[wanted[arch]]
        if arch.startswith("compute_"):
            out[arch] = ("ptx", ptx, entry_of(ptx), {})
            continue
        if arch in LATE:
            if late is None:
                raise ValueError(f"{arch} is assembled by ptxas {LATE_RELEASE}: pass late=")
            ptxas = late.ptxas
        else:
            ptxas = tc.ptxas
        cubin, f, _ = assemble(ptx, arch, ptxas)
        out[arch] = ("cubin", cubin, entry_of(ptx), f)
    return out
