"""The sm_90 machine code of every per-step streaming CUDA kernel, checked without a GPU (issue 45), as
fastema ships it (issue 54: what a user's H100 runs).

Each variant (``bench/gpu/sass/``: float32/bfloat16/float16 sources, float32 and 16-bit shadows,
nearest and stochastic rounding, one and two rows, host and device weights, the fused plan+lerp, the
``skip_nonfinite`` scan) is the shipped sm_90 cubin of the variant its launcher asks for
(``kernels/device``: the CUDA 13 set's and the CUDA 12 set's, built by ``python -m fastema warm
--into``; a variant not shipped fails here), disassembled by ``nvdisasm`` and held to
``../shared/design/gpu.md`` §1.7: no spills; no local memory in a loop over elements; a register cap
with headroom; 64/128-bit global loads and stores in every streaming loop and no
16-bit scalar load in one; at least 32 KiB of loads in flight per SM at the occupancy the registers
allow. What is known not to pass yet is marked xfail (strict), check by check, with the reason.

Needs numba-cuda and ``nvidia-cuda-nvdisasm`` (the ``cuda`` extra); skipped with the reason where one is
missing. Nothing is compiled: CI checks the code it ships (spills come from nvJitLink's or ptxas' log,
kept in each entry).
"""
import pathlib
import re

import pytest

from bench.gpu import sass as S

ROOT = pathlib.Path(__file__).resolve().parents[2]

PROBLEM = S.toolchain_problem("cu13") or S.toolchain_problem("cu12")
needs_toolchain = pytest.mark.skipif(PROBLEM is not None, reason=f"machine-code checks skipped: {PROBLEM}")
VARIANTS = S.variants()
SETS = ("cu13", "cu12")                 # an H100 under a CUDA 13 driver, and under a CUDA 12 one


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Every variant's shipped sm_90 cubin of a set read, once per set: ``shipped(set) -> {name: Report}``."""
    folder, read = tmp_path_factory.getbasetemp() / "sass", {}

    def get(source):
        if source not in read:
            read[source] = {b.variant.name: S.analyse(b) for b in S.build_all(VARIANTS, folder, 2, source)}
        return read[source]
    return get


@pytest.fixture(scope="module")
def reports(shipped):
    return shipped("cu13")


# Known shortfalls of one set only, each with its reason (strict xfail: one that starts holding fails).
KNOWN_IN_SET: dict = {}


def _cases():
    for source in SETS:
        for v in VARIANTS:
            known = dict(v.known)
            known.update({c: why for (s, n, c), why in KNOWN_IN_SET.items() if s == source and n == v.name})
            for check in S.checks(v):
                marks = [pytest.mark.xfail(strict=True, reason=known[check])] if check in known else []
                yield pytest.param(source, v.name, check, marks=marks,
                                   id=f"{source}-{re.sub(r'[^A-Za-z0-9]+', '_', v.name)}-{check}")


@needs_toolchain
@pytest.mark.parametrize("source,name,check", list(_cases()))
def test_machine_code(shipped, source, name, check):
    problem = S.check(shipped(source)[name], check)
    assert problem is None, f"{source} {name}: {problem}"


@needs_toolchain
def test_fused_plan_lerp_blocks_per_sm_is_what_its_config_says(reports):
    """``CUDA_PLAN_LERP_BLOCKS_PER_SM`` caps the fused kernel's grid at whole waves of the blocks its
    registers let reside: the launch bounds hold every fused kernel to them (4 blocks per SM, 64
    registers: 3 at 72-80 before issue 86), and the config's comment names each figure (it said 3
    blocks at 70 registers while they were 89 and 94: 2 blocks)."""
    from fastema._launch import config
    from fastema.kernels import cuda as K

    assert K.PLAN_LERP_BOUNDS[0] == K.SR_LERP_BOUNDS[0] == K.SCAN_BOUNDS[0] == config.CUDA_THREADS
    fused = [r for r in reports.values() if r.variant.family == "plan_lerp"]
    assert len(fused) == 3
    source = (ROOT / "fastema" / "_launch" / "config.py").read_text()
    line = re.search(r"^CUDA_PLAN_LERP_BLOCKS_PER_SM = .*(?:\n +#.*)*", source, re.M).group(0)
    line = re.sub(r"\s*\n\s*#\s*", " ", line)                 # the comment as one line
    for r in fused:
        blocks = (K.SR_LERP_BOUNDS if r.variant.name.endswith(" SR") else K.PLAN_LERP_BOUNDS)[1]
        assert r.blocks_per_sm == blocks, (r.variant.name, r.registers)
        waves, rest = divmod(config.CUDA_PLAN_LERP_BLOCKS_PER_SM, blocks)
        assert rest == 0 and waves >= 2
        assert f"{waves} waves" in line and f"{blocks} blocks per SM" in line, line


@needs_toolchain
def test_the_scans_keep_the_blocks_their_launch_bounds_allow(reports):
    """The ``skip_nonfinite`` scan's launch bounds (6 blocks of 256 per SM) hold: with two 16-byte loads
    a thread, that is what keeps 48 KiB in flight (the in_flight check holds it to 32)."""
    from fastema.kernels import cuda as K

    scans = [r for r in reports.values() if r.variant.family == "scan"]
    assert len(scans) == 2 and all(r.blocks_per_sm == K.SCAN_BOUNDS[1] for r in scans), \
        [(r.variant.name, r.registers) for r in scans]


@needs_toolchain
def test_plain_float32_shadow_lerps_keep_four_blocks_per_sm(reports):
    """gpu.md §1.7: the plain lerps (host weights, float32 shadow) stay at 4 blocks of 256 per SM."""
    for r in reports.values():
        if r.variant.name.startswith("lerp f32<-") and "dev w" not in r.variant.name:
            assert r.blocks_per_sm >= 4, (r.variant.name, r.registers)


# ---------------------------------------------------------------- the reader itself (no toolchain)

SASS = """
//--------------------- .text._Z6kernel --------------------------
	.section	.text._Z6kernel,"ax",@progbits
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R12.64] ;
        /*0030*/              @!P0 LDG.E.64 R16, desc[UR4][R14.64] ;
        /*0040*/                   FADD R20, R4, -R8 ;
        /*0050*/                   LDG.E.U16 R21, desc[UR4][R14.64] ;
        /*0060*/                   STG.E.128 desc[UR4][R12.64], R8 ;
        /*0070*/                   IADD3 R21, R21, 0x1, RZ ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
.L_x_2:
        /*00a0*/                   BRA `(.L_x_2);
"""


def test_reader_finds_the_loop_its_accesses_and_the_bytes_in_flight():
    code = S.parse(SASS)
    assert [i.opcode for i in code][:3] == ["LDC", "LDG.E.128", "LDG.E.128"]
    (loop,) = S.loops(code)                                   # the trap's branch to itself is no loop
    assert (loop.head, loop.tail) == (0x10, 0x80)
    assert S.element_loops(code, chunked=False) == [loop]
    one = S.iteration(loop, code)
    assert [i.width() for i in one if i.is_load()] == [16, 16, 8, 2]
    assert [i.width() for i in one if i.is_store()] == [16]
    assert S.bursts(one) == [40, 2]                           # FADD waits on R4 and R8; the add on R21


SCAN_SASS = """
//--------------------- .text._Z4scan --------------------------
	.section	.text._Z4scan,"ax",@progbits
.L_x_0:
        /*0000*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*0030*/                   LOP3.LUT R16, R4, 0x7f800000, RZ, 0xc0, !PT ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/               @P2 BRA `(.L_x_0) ;
        /*0060*/                   STG.E desc[UR4][R2.64], R5 ;
        /*0070*/                   EXIT ;
"""


def test_reader_finds_a_scans_loop_that_only_loads():
    """A scan's streaming loop loads and stores nothing (its flag is stored once, after its loops): found
    with ``loads_only``, the grid-stride loop over chunks around it left out; a lerp's rule (loads and
    stores) finds none."""
    code = S.parse(SCAN_SASS)
    assert S.element_loops(code) == []
    (loop,) = S.element_loops(code, loads_only=True)
    assert (loop.head, loop.tail) == (0x10, 0x40)
    assert S.bursts(S.iteration(loop, code)) == [32]


def test_occupancy_follows_the_sm90_rules():
    """gpu.md §1.1: 56 registers -> 4 blocks of 256, 70 or 80 -> 3, 89 -> 2; 40 -> 6; 32 -> 8."""
    assert [S.blocks_per_sm(r) for r in (32, 40, 56, 64, 70, 80, 81, 89, 94)] == [8, 6, 4, 4, 3, 3, 2, 2, 2]


def test_prediction_reproduces_the_calibration():
    """gpu.md §1.3: the 2026-11-22 scalar float32 lerp, 8 B a thread at 1536 threads per SM, at L = 951 ns
    gives its measured 2559 GB/s."""
    kib = 8 * 1536 / 1024
    gbs = kib * 1024 * S.SMS / 951e-9 / (8 / 12) / 1e9
    assert abs(gbs - 2559) < 5


@needs_toolchain
@pytest.mark.parametrize("source", SETS)
def test_the_static_table_renders_from_a_shipped_set(shipped, source):
    """``python -m bench.gpu.static`` reads the reports this module checks (it read a ``Report.linked``
    that the store's entries no longer have, and crashed)."""
    from bench.gpu import static

    reports = list(shipped(source).values())
    text = static.report(reports, S.LATENCY_NS)
    assert f"`{source}` ({static.BUILT_BY[source]})" in text
    for r in reports:
        assert f"| {r.variant.name} |" in text


@needs_toolchain
def test_a_disassembly_is_kept_by_the_cubins_and_the_tools_digest(tmp_path):
    """The sass gate reads the text CI's machine-code tests made of the same cubin (one nvdisasm run
    each): the same cubin and tool read the kept text; another cubin is disassembled afresh."""
    from bench.gpu.sass import toolchain

    cubin = S.shipped(VARIANTS[0], "cu13").code
    cache = tmp_path / "cache"
    first = toolchain.disassemble(cubin, tmp_path, "a", cache=cache)
    assert "EXIT" in first and len(list(cache.iterdir())) == 1
    kept = next(cache.iterdir())
    kept.write_text("kept text")
    assert toolchain.disassemble(cubin, tmp_path, "a", cache=cache) == "kept text"
    assert toolchain.disassemble(cubin, tmp_path, "a", cache=None) == first
    other = S.shipped(VARIANTS[1], "cu13").code
    assert toolchain.disassemble(other, tmp_path, "b", cache=cache) not in ("kept text", first)
    assert len(list(cache.iterdir())) == 2
