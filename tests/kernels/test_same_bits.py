"""The GPU computes the CPU's bits (issue 70 item 5), checked without a GPU.

The H100 run of 2026-11-26 found three ways a GPU kernel rounded otherwise than the CPU kernel:
NVVM contracted ``a * b + c`` into one FMA (the momentum plan kernel's float64 state 1 ulp apart from
the 4th call), CUDA's libdevice ``sin`` and ``pow`` differ from libm's in the last bits (the merge
schedules' weights 4-7 ulp apart), and a NaN made by the arithmetic has another sign (float16 shadows:
0x7E00 against 0xFE00; ``test_bits.py``). The simulator runs the kernels' Python with Python's
floats, so it cannot see any of them; these tests check the code a GPU runs (the PTX NVVM and
nvJitLink write, the shipped PTX) and the formulas every target compiles.
"""
import math
import os
import re

import numpy as np
import pytest

from fastema.kernels import _stats

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("reads the real targets' code, not the simulator's", allow_module_level=True)

LOOSE = re.compile(r"\b(?:mul|add|sub)(?:\.ftz)?(?:\.sat)?\.f(?:32|64)\b")
"""A float multiply, add or subtract with no rounding modifier: ptxas may fuse a pair of them into
an FMA (the PTX ISA: "mul/add sequences with no rounding modifiers may be optimized to use
fused-multiply-add instructions"); NVVM writes ``.rn`` on every one when it contracts nothing."""
FMA = re.compile(r"\bfma\.rn\.f64\b")


def test_sin_pi_is_within_2_ulps_of_the_exact_value():
    """``sin_pi`` (``+ - * /`` and ``floor`` alone: the same bits on every target) against
    ``sin(pi x)`` to 60 digits, over ``[0, 1]`` (where WSM's cosine shape reads it), its quarter
    points' neighbours and a span of reals."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    rng = np.random.default_rng(70)
    edges = [c + k * 2.0 ** -52 for c in (0.25, 0.5, 0.75) for k in range(-3, 4)]
    xs = [*rng.random(1500), *(rng.random(300) * 20 - 10), *edges, 1e-300, 2.0 ** -30]
    worst = 0.0
    for x in map(float, xs):
        exact = mpmath.sin(mpmath.pi * mpmath.mpf(x))
        worst = max(worst, float(abs(mpmath.mpf(_stats.sin_pi(x)) - exact)) / math.ulp(float(exact)))
    assert worst <= 2.0, worst
    assert [_stats.sin_pi(x) for x in (0.0, 0.5, 1.0, 1.5, 2.0, -0.5)] == [0.0, 1.0, 0.0, -1.0, 0.0, -1.0]


def test_the_merge_weights_call_no_libm_or_libdevice_function():
    """WSM's cosine and 1-sqrt shapes are written in operations IEEE 754 rounds alike everywhere
    (``sin_pi``; ``x sqrt(x)`` for ``x ** 1.5``): the CPU-compiled ``merge_weight`` (what the plan
    kernel inlines) calls no ``sin``, ``cos`` or ``pow``, whose libm and libdevice versions differ
    in the last bits (the H100: 4-7 ulp in the weights). Fails on the code of before (``math.sin``,
    ``x ** 1.5``)."""
    from numba import types as T

    from fastema.kernels import cpu

    fn = cpu.E.merge_weight
    sig = (T.float64[::1], T.int64, T.float64, T.float64)
    fn.compile(sig)
    ir = fn.inspect_llvm(sig)
    called = set(re.findall(r"call [^@]*@\"?([A-Za-z_.0-9]+)", ir))
    libm = {c for c in called if re.search(r"(^|\.)(sin|cos|pow|exp|log)(f|\.f64|\.f32)?$", c)}
    assert not libm, libm
    assert "llvm.sqrt.f64" in called            # IEEE's square root, correctly rounded on both targets


def test_the_cpu_kernels_formulas_equal_the_hosts_bit_for_bit():
    """The CPU-compiled ``sin_pi`` and ``wsm_antiderivative`` equal their Python (the host's schedule
    values, the simulator's) bit for bit: numba's CPU target contracts nothing either."""
    from fastema.kernels import cpu

    rng = np.random.default_rng(71)
    for x in map(float, [*rng.random(400), 0.0, 0.25, 0.5, 1.0]):
        assert cpu.E.sin_pi(x) == _stats.sin_pi(x), x
        for shape in (0.0, 1.0, 2.0):
            assert cpu.E.wsm_antiderivative(shape, x) == _stats.wsm_antiderivative(shape, x), (shape, x)


def _contracting_kernel():
    """A kernel NVVM would contract (``a * b + c``, ``d - a * b``) beside one FMA written out."""
    from numba import cuda

    from fastema.kernels import _cuda_jit

    fma = _cuda_jit.E.fma

    def kernel(x, out):
        out[0] = x[0] * x[1] + x[2]
        out[1] = x[3] - x[0] * x[2]
        out[2] = fma(x[1], x[2], x[3])

    return cuda.jit(kernel)


def test_the_build_contracts_no_multiply_and_add():
    """The compiler of the shipped code and of a run-time miss (``fastema._launch.cuda.compiler``: NVVM to
    LTO-IR, nvJitLink) makes a kernel's ``a * b + c`` a rounded multiply and a rounded add, as the
    CPU does, and keeps the FMA a kernel writes: one ``fma.rn.f64``, every multiply and add ``.rn``
    (which ptxas never fuses). Fails on the code of before (nvJitLink's default ``-fma=1``: two
    FMAs, a ``mul.f64`` and a ``sub.f64``)."""
    pytest.importorskip("cuda.bindings.nvjitlink")
    from numba.cuda import types as T

    from fastema._launch.cuda import compiler

    dispatcher = _contracting_kernel()
    sig = (T.float64[::1], T.float64[::1])
    ir = compiler.nvvm(dispatcher, sig, (8, 0))
    ptx = compiler.link(ir, "ptx", arch="sm_80")[0].decode()
    assert len(FMA.findall(ptx)) == 1, FMA.findall(ptx)
    assert not LOOSE.findall(ptx), LOOSE.findall(ptx)
    assert re.search(r"\bmul\.rn\.f64\b", ptx) and re.search(r"\badd\.rn\.f64\b", ptx)
    cubin, log = compiler.link(ir, "cubin", arch="sm_90", verbose=True)
    assert cubin[:4] == b"\x7fELF" and "registers" in log.lower()


def test_without_nvjitlink_the_compiler_gives_nvvms_ptx_contracting_nothing(monkeypatch):
    """Where the nvJitLink library is missing (cuda-bindings without it), ``compile`` gives NVVM's PTX
    for each image, made with ``-fma=0`` too."""
    pytest.importorskip("cuda.bindings.nvjitlink")
    from cuda.bindings import nvjitlink
    from cuda.pathfinder import DynamicLibNotFoundError
    from numba.cuda import types as T

    from fastema._launch.cuda import compiler
    from fastema.kernels._store.identity import variant

    def missing(*args):
        raise DynamicLibNotFoundError("libnvJitLink.so.13 not found")

    monkeypatch.setattr(nvjitlink, "create", missing)
    dispatcher = variant(lambda: _contracting_kernel())()
    out = compiler.NumbaCuda().compile(dispatcher, (T.float64[::1], T.float64[::1]), ("sm_90", "compute_80"))
    for kind, code, entry, figures in out.values():
        ptx = code.decode()
        assert kind == "ptx" and f".entry {entry}(" in ptx and figures == {}
        assert len(FMA.findall(ptx)) == 1 and not LOOSE.findall(ptx), (FMA.findall(ptx), LOOSE.findall(ptx))


def test_nvvms_own_ptx_contracts_nothing_either():
    """NVVM's PTX (what the CUDA 12 set's ptxas assembles, and the fallback where nvJitLink is missing:
    ``_cuda_jit.nvvm_code(..., "ptx")``) with the kernels' ``-fma=0``: the written FMA alone."""
    from numba.cuda import types as T

    from fastema.kernels._cuda_jit import nvvm_code

    ptx = nvvm_code(_contracting_kernel(), (T.float64[::1], T.float64[::1]), (8, 0), "ptx")
    assert len(FMA.findall(ptx)) == 1 and not LOOSE.findall(ptx), (FMA.findall(ptx), LOOSE.findall(ptx))


@pytest.mark.parametrize("name,image", [("cu13", "compute_80"), ("cu12", "compute_70")])
def test_the_shipped_code_contracts_no_multiply_and_add(name, image):
    """Every variant's shipped PTX (both sets; the cubins are assembled from the same code) has no
    float multiply, add or subtract without ``.rn``: built with ``-fma=0`` (``_cuda_jit.NVVM``),
    nothing was contracted and ptxas contracts nothing, so the GPU rounds where the CPU rounds.
    Fails on the set built before (NVVM's and nvJitLink's default ``-fma=1``)."""
    from fastema.kernels._store.store import Shipped, folder

    shipped = Shipped(folder(), name)
    loose = {}
    for key in shipped.index["variants"]:
        entry = shipped.get(key, image)
        assert entry is not None, key
        found = LOOSE.findall(entry.code.decode("ascii", "replace"))
        if found:
            loose[key] = sorted(set(found))
    assert not loose, f"{len(loose)} variants, e.g. {next(iter(loose.items()))}: rebuild the set (CONTRIBUTING.md)"
