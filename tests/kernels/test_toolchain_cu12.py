"""The CUDA 12 toolchain (``kernels/_toolchain_cu12.py``) and the launch bounds per compiled set and
architecture (``kernels/_bounds.py``), without a GPU (issue 60).

- The figures parser (``kernels/_store/entry.py``, the one) reads ``ptxas -v`` and nvJitLink's
  info log alike (registers and stack: the most of any function; spills: summed).
- The bounds table names only kernels that exist, keeps the 256 threads fastema launches and only
  ever lowers a kernel's blocks per multiprocessor; a kernel without an entry keeps its own bounds.
- ``ptxas`` of CUDA 12.0 (the ``nvidia-cuda-nvcc-cu12==12.0.76`` wheel, installed outside the
  environment: ``.toolchains/cu12-12.0`` or ``$FASTEMA_CU12_TOOLCHAIN``) assembles ISA 8.0 for sm_75
  and sm_90 into images that name CUDA 12.0, and refuses ISA 9.0; skipped, with the install command,
  where the wheel is absent.
- The shipped CUDA 12 set (CI's checks, cheap): every PTX declares ISA 8.0; a sample of them (every
  kernel family, every kernel with launch bounds of its own) assembles with ptxas 12.0 for sm_75 and
  sm_90 (the build assembled all of them with that ptxas: every cubin names its toolkit, 12.0, or
  12.8 for Blackwell's); no sm_75 or sm_90 image spills (the entries' figures).
- Where the whole toolchain is there (NVVM and NVRTC 12.0 too), in a process of its own: a variant
  built for CUDA 12 is PTX 8.0 for sm_70 and a spill-free cubin for every CUDA 12 architecture, and
  a process that has used NVVM 13 is refused.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fastema.kernels import _bounds as B
from fastema.kernels import _toolchain_cu12 as T
from fastema.kernels._store import entry as E
from fastema.kernels._store import store as S

ROOT = pathlib.Path(__file__).resolve().parents[2]
TC = T.Toolchain.at(T.default_root())
NO_PTXAS, NO_TOOLCHAIN = TC.missing(("ptxas",)), TC.missing()
needs_ptxas = pytest.mark.skipif(NO_PTXAS is not None, reason=f"CUDA 12.0 ptxas absent: {NO_PTXAS}")
needs_toolchain = pytest.mark.skipif(NO_TOOLCHAIN is not None,
                                     reason=f"no CUDA 12 build checked here: {NO_TOOLCHAIN}")

PTXAS_LOG = """\
ptxas info    : 280 bytes gmem
ptxas info    : Compiling entry function '_ZN7fastema7kernels4cuda16plan_lerp_kernel' for 'sm_75'
ptxas info    : Function properties for _ZN7fastema7kernels4cuda16plan_lerp_kernel
    48 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, 444 bytes smem, 1104 bytes cmem[0], 232 bytes cmem[2]
ptxas info    : Function properties for __internal_accurate_pow
    0 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
NVJITLINK_LOG = """\
ptxas info    : 272 bytes gmem
ptxas info    : Function properties for __internal_accurate_pow
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 44.072 ms
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
ptxas         .     40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN7fastema7kernels4cuda16plan_lerp_kernel' for 'sm_120'
ptxas info    : Function properties for _ZN7fastema7kernels4cuda16plan_lerp_kernel
ptxas         .     56 bytes stack frame, 192 bytes spill stores, 168 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 444 bytes smem
ptxas info    : Compile time = 2625.628 ms
info    : 272 bytes gmem
info    : used 64 registers, used 1 barriers, 96 stack, 444 bytes smem, 0 bytes lmem
"""
TINY_PTX = """\
.version {isa}
.target sm_70
.address_size 64

.visible .entry tiny(.param .u64 out)
{{
\t.reg .b32 %r<2>;
\t.reg .b64 %rd<3>;
\tld.param.u64 %rd1, [out];
\tcvta.to.global.u64 %rd2, %rd1;
\tmov.u32 %r1, %tid.x;
\tst.global.u32 [%rd2], %r1;
\tret;
}}
"""


def _first_shipped(name: str, image: str) -> bytes:
    """The code of set ``name``'s first variant for ``image``."""
    shipped = S.Shipped(S.folder(), name)
    return shipped.get(next(iter(shipped.index["variants"])), image).code


def test_figures_of_a_ptxas_log():
    assert E.figures(PTXAS_LOG) == {"registers": 64, "spill_stores": 24, "spill_loads": 16,
                                    "stack": 48, "smem": 444}


def test_figures_of_an_nvjitlink_log_count_each_function_once():
    """nvJitLink repeats the kernel's figures in its own words (``used 64 registers``, ``96
    stack``): they are not counted again."""
    assert E.figures(NVJITLINK_LOG) == {"registers": 64, "spill_stores": 192, "spill_loads": 168,
                                        "stack": 56, "smem": 444}


def test_ptx_version_reads_the_declared_isa():
    assert T.ptx_version(TINY_PTX.format(isa="8.0").encode()) == "8.0"
    assert T.ptx_version(_first_shipped("cu13", "compute_80")) == "9.0"   # no CUDA 12 driver's
    with pytest.raises(ValueError, match="no .version"):
        T.ptx_version(b"\x7fELF")


def test_a_missing_toolchain_says_what_to_install(tmp_path):
    problem = T.Toolchain.at(str(tmp_path)).missing()
    assert "pip install --no-deps --target" in problem and T.WHEELS["nvcc"] in problem
    assert T.WHEELS["nvrtc"] in problem and "ptxas" in problem


def test_activate_without_the_toolchain_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install"):
        T.activate(T.Toolchain.at(str(tmp_path)))


# ---------------------------------------------------------------- launch bounds per set and arch

def _own_bounds() -> dict:
    """Every kernel's name to its own launch bounds (its dispatcher's)."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator's kernels take no launch bounds")
    from fastema._launch.shipped.variants import every_variant
    from fastema.kernels._store.identity import VARIANTS

    return {VARIANTS[d]: d.targetoptions.get("launch_bounds") for d, _ in every_variant().values()}


def test_every_override_lowers_the_blocks_of_a_kernel_that_exists():
    from fastema._launch import config

    own = _own_bounds()
    archs = {"cu12": {*T.CUBINS, *T.LATE, "compute_%d%d" % T.PTX_CC},
             "cu13": {"sm_80", "sm_90", "sm_100", "sm_120", "compute_80"}}
    for (toolset, arch), table in B.OVERRIDES.items():
        assert arch in archs[toolset], (toolset, arch)
        for name, bounds in table.items():
            assert name in own, f"{toolset} {arch}: no kernel {name}"
            assert own[name] is not None and len(bounds) == 2, name
            # .maxntid is the launch's own: 256 threads
            assert bounds[0] == own[name][0] == config.CUDA_THREADS, (name, bounds)
            assert 1 <= bounds[1] < own[name][1], (name, bounds, own[name])


def test_a_kernel_without_an_override_keeps_its_own_bounds():
    assert B.launch_bounds("cu12", "sm_90", "no_such_kernel(0)", (256, 4)) == (256, 4)
    assert B.launch_bounds("cu99", "sm_90", "no_such_kernel(0)", None) is None
    for (toolset, arch), table in B.OVERRIDES.items():
        for name, bounds in table.items():
            assert B.launch_bounds(toolset, arch, name, (256, 9)) == bounds


# ---------------------------------------------------------------- ptxas 12.0

@needs_ptxas
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_ptxas_12_0_assembles_isa_8_0(arch):
    cubin, figures, log = T.assemble(TINY_PTX.format(isa="8.0").encode(), arch, TC.ptxas)
    assert cubin[:4] == b"\x7fELF" and f"for '{arch}'" in log
    assert figures["registers"] > 0 and not E.spills(figures)


@needs_ptxas
def test_the_cubins_of_ptxas_12_0_name_cuda_12_0_and_the_shipped_ones_13():
    """What an r525 driver surely loads: an image made by CUDA 12.0 (ELF ABI v7, e_version 120);
    the CUDA 13 set's images (ABI v8) name release 13.x in their toolkit note."""
    cubin, _, _ = T.assemble(TINY_PTX.format(isa="8.0").encode(), "sm_90", TC.ptxas)
    assert (cubin[8], T.toolkit(cubin)) == (7, "12.0") and TC.version().startswith("12.0, V12.0.")
    shipped = _first_shipped("cu13", "sm_90")
    assert shipped[8] == 8 and T.toolkit(shipped).startswith("13.")
    with pytest.raises(ValueError, match="not a cubin"):
        T.toolkit(TINY_PTX.encode())


@needs_ptxas
def test_ptxas_12_0_refuses_isa_9_0():
    with pytest.raises(RuntimeError, match=r"Unsupported \.version 9\.0"):
        T.assemble(TINY_PTX.format(isa="9.0").encode(), "sm_90", TC.ptxas)


# ---------------------------------------------------------------- the build, in its own processes

_BUILD_ONE = """
import json, sys
from fastema.kernels import _toolchain_cu12 as T
tc = T.Toolchain.at(sys.argv[1])
T.activate(tc)
from fastema._launch.shipped.variants import every_variant
variants = every_variant()
key = next(k for k in variants if k.startswith("nonfinite_kernel(3)"))
got = T.build_cu12(*variants[key], ("compute_70",) + T.CUBINS, tc=tc)
ptx = got["compute_70"][1]
print(json.dumps({"isa": T.ptx_version(ptx), "sm_70": b".target sm_70" in ptx,
                  "cubins": {a: [T.toolkit(c), f] for a, (kind, c, _, f) in got.items() if kind == "cubin"}}))
"""
_CONTRACT = """
import json, re, sys
sys.path.insert(0, sys.argv[2])
from fastema.kernels import _toolchain_cu12 as T
T.activate(T.Toolchain.at(sys.argv[1]))
from numba.cuda import types as nt
from test_same_bits import FMA, LOOSE, _contracting_kernel
ptx = T.compile_ptx(_contracting_kernel(), (nt.float64[::1], nt.float64[::1]), None).decode()
print(json.dumps({"release": T.RELEASE in ptx.split(".version", 1)[0], "fma": len(FMA.findall(ptx)),
                  "loose": LOOSE.findall(ptx)}))
"""
_NVVM_FIRST = """
import sys
from numba.cuda.cudadrv import nvvm
nvvm.NVVM().get_version()                       # CUDA 13's libNVVM, loaded by cuda-pathfinder
from fastema.kernels import _toolchain_cu12 as T
try:
    T.activate(T.Toolchain.at(sys.argv[1]))
except RuntimeError as err:
    print("refused:", err)
"""


def _run(code: str) -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator has no NVVM")
    here = os.path.dirname(__file__)
    run = subprocess.run([sys.executable, "-c", code, TC.root, here], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@needs_toolchain
def test_a_variant_built_for_cuda_12_is_ptx_8_0_and_spill_free_cubins():
    out = json.loads(_run(_BUILD_ONE).splitlines()[-1])
    assert out["isa"] == T.PTX_ISA == "8.0" and out["sm_70"]
    assert set(out["cubins"]) == set(T.CUBINS)
    for arch, (release, figures) in out["cubins"].items():
        assert release == "12.0" and not E.spills(figures), (arch, figures)


@needs_toolchain
def test_nvvm_12_0_contracts_no_multiply_and_add():
    """The CUDA 12 set's NVVM (12.0) with the kernels' ``-fma=0`` (``_cuda_jit.NVVM``): ``a * b + c``
    stays a rounded multiply and add, the written FMA alone is one (issue 70 item 5; NVVM's
    default contracts, and ptxas 12.0 would fuse a multiply and add without ``.rn``)."""
    out = json.loads(_run(_CONTRACT).splitlines()[-1])
    assert out == {"release": True, "fma": 1, "loose": []}, out


@needs_toolchain
def test_activate_refuses_a_process_that_already_uses_another_nvvm():
    """A process that has used NVVM 13 would go on compiling with it (libNVVM is loaded once per
    process): activate refuses it rather than mix the two."""
    assert "refused: this process already uses" in _run(_NVVM_FIRST)


# ---------------------------------------------------------------- the shipped CUDA 12 set (CI)

def _cu12():
    shipped = S.Shipped(S.folder(), "cu12")
    return shipped, shipped.index["variants"]


def _sample(keys) -> list:
    """One variant of every kernel family (``lerp_kernel``, ``copy_kernel``, ...) and of every
    kernel that has launch bounds of its own or in the CUDA 12 table, the smallest PTX of each."""
    from fastema._launch.shipped.variants import every_variant
    from fastema.kernels._store.identity import VARIANTS

    variants = every_variant()
    overridden = {n for (s, _), table in B.OVERRIDES.items() if s == "cu12" for n in table}
    groups: dict = {}
    for key in keys:
        dispatcher = variants[key][0]
        name = VARIANTS[dispatcher]
        groups.setdefault(name.split("(")[0], []).append(key)
        if dispatcher.targetoptions.get("launch_bounds") is not None or name in overridden:
            groups.setdefault(name, []).append(key)
    return sorted({min(group, key=len) for group in groups.values()})


def test_every_cuda_12_ptx_declares_isa_8_0_for_compute_70():
    shipped, variants = _cu12()
    blob = shipped._blob("compute_70")
    for key, images in variants.items():
        at, size, _ = images["compute_70"]
        ptx = E.loads(blob[at:at + size], key, "compute_70").code
        assert T.ptx_version(ptx) == "8.0" and b"\n.target sm_70" in ptx, key


@needs_ptxas
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_a_sample_of_the_cuda_12_ptx_assembles_with_ptxas_12_0(arch):
    shipped, variants = _cu12()
    sample = _sample(variants)
    assert len(sample) >= 30
    for key in sample:
        ptx = shipped.get(key, "compute_70").code
        cubin, figures, _ = T.assemble(ptx, arch, TC.ptxas)
        assert T.toolkit(cubin) == "12.0" and figures["registers"] > 0, key


def test_every_cuda_12_cubin_names_the_ptxas_that_built_it():
    """The build assembled every cubin with ptxas 12.0 (ptxas 12.8 for sm_100 and sm_120) from the
    shipped PTX: every variant's image of every architecture names that toolkit (its ELF note)."""
    shipped, variants = _cu12()
    wrong = []
    for arch in (*T.CUBINS, *T.LATE):
        want = T.LATE_RELEASE if arch in T.LATE else T.RELEASE
        wrong += [(arch, key) for key in variants if T.toolkit(shipped.get(key, arch).code) != want]
    assert not wrong, f"{len(wrong)} cubins not made by their set's ptxas, first {wrong[0]}"


@pytest.mark.parametrize("name,image", [("cu12", "sm_75"), ("cu12", "sm_90"), ("cu13", "sm_90")])
def test_no_shipped_sm_75_or_sm_90_image_spills(name, image):
    shipped = S.Shipped(S.folder(), name)
    blob, spilled = shipped._blob(image), []
    for key, images in shipped.index["variants"].items():
        at, size, _ = images[image]
        got = E.loads(blob[at:at + size], key, image)
        assert got.figures["registers"] > 0, key
        if E.spills(got.figures):
            spilled.append((key, got.figures))
    assert not spilled, f"{len(spilled)} {name} {image} images spill: {spilled[:3]}"
