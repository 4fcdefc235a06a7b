"""The machine code of fastema's per-step CUDA kernels for sm_90, read without a GPU (issues 45, 60).

Shared by ``bench/tests/test_sass.py`` (the checks CI runs) and ``bench/gpu/static.py`` (the table).
The method is ``../shared/design/gpu.md`` §1: each variant is the one its launcher asks for (its
argument types typed by numba-cuda's own ``typeof``, as the bound launch path types them), read from
the store as fastema ships it (``kernels/device``: the CUDA 13 set's sm_90 cubin, or the CUDA 12
set's): nothing is compiled here. The entry's cubin is disassembled by ``nvdisasm`` (the
``nvidia-cuda-nvdisasm`` wheel, 13.5, which reads CUDA 12.0 cubins too) and read: registers and frame
size from the cubin's ``.nv.info``, spills, registers and shared memory from the entry's figures (the
linker's or ptxas' log, parsed once when the entry was built), and from the SASS the loops (a backward
branch closes one), their global loads and stores, their widths, and the bytes a thread has in flight
when it first waits for one of its loads.

Occupancy follows the sm_90 rules at ``CUDA_THREADS`` (256) threads a block (gpu.md §1.1): 65,536
registers per SM, allocated per warp in units of 256; at most 64 warps and 32 blocks per SM; 228 KiB of
shared memory with 1 KiB reserved per block. The bandwidth model is gpu.md §1.3 (Little's law, calibrated
on the 2026-11-22 H100 run): a prediction, not a measurement.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ARCH, CC = "sm_90", (9, 0)

# sm_90 (H100) limits, gpu.md §1.1
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_BLOCKS = 65536, 256, 64, 32
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024
SMS = 132                                  # H100 SXM5

# The bandwidth model, gpu.md §1.3
COPY_GBS = 3017.0                          # the 2026-11-22 H100 copy ceiling
LATENCY_NS = 920.0                         # loaded DRAM latency fitted on the 2026-11-22 figures
IN_FLIGHT_MIN_KIB = 32                     # the CI rule: about twice the ~14 KiB the model needs at 12 B/elem

GLOBAL_LOAD = re.compile(r"^(LDG|LD)(\.|$)")
GLOBAL_STORE = re.compile(r"^(STG|ST)(\.|$)")
LOCAL = re.compile(r"^(LDL|STL)(\.|$)")
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}   # bytes per access; none of them: 4


# ---------------------------------------------------------------- the toolchain


def nvdisasm() -> str | None:
    """The path of ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, or one on PATH), or None."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("nvdisasm")
        if found:
            return str(found)
    except Exception:                               # noqa: BLE001 - an older cuda-pathfinder, or none
        pass
    return shutil.which("nvdisasm")


# ---------------------------------------------------------------- the variants

@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel as one launcher launches it."""
    name: str                 # short, unique: the test id and the table's first column
    path: str                 # which public path launches it
    family: str               # "lerp", "plan_lerp", "scan", "other"
    build: Callable           # () -> (dispatcher, args): the kernel and the arguments its launcher passes
    cap: int                  # register cap (headroom over today's count, gpu.md §1.7)
    x_bytes: int = 4          # bytes per source element read
    q_bytes: int = 4          # bytes per shadow element (read and written, per row)
    rows: int = 1             # shadow rows updated
    chunked: bool = True      # grid-stride over chunks, threads over elements (kernels/cuda.py); else over elements
    streaming: bool = True    # a per-step streaming kernel: every check; else spills and registers only
    known: tuple = ()         # ((check, reason), ...): checks it is known to fail, until fixed
    traffic: tuple | None = None   # (read, written) bytes per element, where not the family's

    def moved(self) -> tuple[float, float]:
        """(read, written) bytes per element a launch must move: the source and each shadow row read,
        each row written (the scan: the source read)."""
        if self.traffic is not None:
            return self.traffic
        if self.family == "scan":
            return float(self.x_bytes), 0.0
        return float(self.x_bytes + self.q_bytes * self.rows), float(self.q_bytes * self.rows)

    def min_bytes(self) -> float:
        return sum(self.moved())

    def read_share(self) -> float:
        """The share of those bytes that are reads (gpu.md §1.3)."""
        read, written = self.moved()
        return read / (read + written)


def _tables():
    """Host tables as ``fastema._launch.tables`` builds them (their values do not matter, their types do:
    on a GPU they are device arrays, which numba types as these arrays)."""
    from fastema._launch import Tables
    from fastema.kernels.layout import chunk_table, segment_offsets

    seg_offset = segment_offsets([4096, 1000])
    chunk_seg, chunk_begin = chunk_table(seg_offset, 4096)
    n = int(seg_offset[-1])
    return Tables(np.array([1 << 20, 2 << 20], np.int64), np.array([3 << 20, 4 << 20], np.int64), seg_offset,
                  chunk_seg, chunk_begin, n, len(chunk_seg))


def _plan(rows: int = 1, groups: int = 2) -> dict:
    """A device plan's arrays (``fastema.average._device_plan._OnDevice``'s, by dtype)."""
    from fastema.kernels.kinds import PLAN_PARAMS, S_NORMS

    sizes = dict(state=(S_NORMS + rows, np.float64), params=(PLAN_PARAMS + 4 * rows, np.float64),
                 decays=(rows, np.float64), w32=(rows, np.float32), w64=(rows, np.float64),
                 flag=(1, np.int32), keys=(groups, np.int64), done=(1, np.int32))
    return {k: np.zeros(size, dt) for k, (size, dt) in sizes.items()}


def _lerp(sk, xk, stochastic=False, rows=1, device=False):
    """``cuda_bound.LerpLaunch.__call__``'s arguments: host weights cast to float32 (a tuple) with a
    uint32 key, or the device plan's weights and a group's int64[1] key (``DevicePlan.weights/key``)."""
    def build():
        from fastema.kernels import cuda as K

        t = _tables()
        flag = np.zeros(1, np.int32)
        if device:
            plan = _plan(rows)
            weights, key = plan["w32"], plan["keys"][0:1]
        else:
            weights, key = tuple(map(np.float32, [0.01] * rows)), np.uint32(7)
        return K.lerp_kernel(sk, xk, stochastic, device), (*t.args(), weights, flag, key)
    return build


def _plan_lerp(sk, xk, stochastic=False, rows=1):
    """``cuda_bound.plan_lerp_launch``'s arguments: head (state, params, decays), ``given`` (a Python
    int), tail (w32, w64, flag, keys, done, np.int64(gi))."""
    def build():
        from fastema.kernels import cuda as K

        t, p = _tables(), _plan(rows)
        args = (*t.args(), p["state"], p["params"], p["decays"], 5, p["w32"], p["w64"], p["flag"], p["keys"],
                p["done"], np.int64(0))
        return K.plan_lerp_kernel(sk, xk, stochastic), args
    return build


def _scan(xk):
    """``cuda_bound.nonfinite_launch``'s arguments: the source tables and the flag."""
    def build():
        from fastema.kernels import cuda as K

        t = _tables()
        return K.nonfinite_kernel(xk), (t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin, np.zeros(1, np.int32))
    return build


def _other(name):
    """The other per-update kernels, with the arguments their launchers pass (``cuda_bound.plan_launch``,
    ``copy_launch``; ``cuda.bema``, host weights for the float64 lerp)."""
    def build():
        from fastema.kernels import cuda as K
        from fastema.kernels.kinds import F32, F64

        t, p, flag = _tables(), _plan(), np.zeros(1, np.int32)
        if name == "plan":
            return K.plan_kernel(), (p["state"], p["params"], p["decays"], 5, p["w32"], p["w64"], p["flag"], p["keys"])
        if name == "copy":
            return K.copy_kernel(F32, F32, True), (*t.args(), 0, 1, flag)
        if name == "bema":
            return K.bema_kernel(F32), (*t.args(), np.float32(0.5), flag)
        return K.lerp_kernel(F64, F64, False), (*t.args(), (np.float64(0.01),), flag, np.uint32(0))
    return build


def variants() -> list[Variant]:
    """Every per-step streaming kernel variant (issue 45 item 1)."""
    from fastema.kernels.kinds import BF16, F16, F32

    return [
        Variant("lerp f32<-f32", "FlatShadow.update, ema_update_, EMA (plan on the host)", "lerp",
                _lerp(F32, F32), 64),
        Variant("lerp f32<-f32 x2 rows", "two decays in one pass", "lerp", _lerp(F32, F32, rows=2), 64, rows=2),
        Variant("lerp f32<-bf16", "bfloat16 model, float32 shadow", "lerp", _lerp(F32, BF16), 64, x_bytes=2),
        Variant("lerp f32<-f16", "float16 model, float32 shadow", "lerp", _lerp(F32, F16), 64, x_bytes=2),
        Variant("lerp f32<-f32 dev w", "EMA with the plan on the device (groups that do not carry it)", "lerp",
                _lerp(F32, F32, device=True), 80),
        Variant("lerp f32<-bf16 dev w", "as above, bfloat16 model", "lerp", _lerp(F32, BF16, device=True), 80,
                x_bytes=2),
        Variant("plan_lerp f32<-f32", "EMA.update's default on a GPU (plan+lerp, one launch)", "plan_lerp",
                _plan_lerp(F32, F32), 80),
        Variant("plan_lerp f32<-bf16", "as above, bfloat16 model", "plan_lerp", _plan_lerp(F32, BF16), 80, x_bytes=2),
        Variant("lerp bf16<-bf16", "bfloat16 shadow, nearest", "lerp", _lerp(BF16, BF16), 72, 2, 2),
        Variant("lerp f16<-f16", "float16 shadow, nearest", "lerp", _lerp(F16, F16), 72, 2, 2),
        Variant("lerp bf16<-bf16 SR", "bfloat16 shadow, stochastic rounding", "lerp", _lerp(BF16, BF16, True), 72,
                2, 2),
        Variant("lerp bf16<-f32 SR", "float32 model, bfloat16 shadow, stochastic rounding", "lerp",
                _lerp(BF16, F32, True), 72, 4, 2),
        Variant("lerp bf16<-bf16 SR dev w", "bfloat16 SR shadow, plan on the device", "lerp",
                _lerp(BF16, BF16, True, device=True), 72, 2, 2),
        Variant("plan_lerp bf16<-bf16 SR", "EMA.update's default, bfloat16 SR shadow", "plan_lerp",
                _plan_lerp(BF16, BF16, True), 72, 2, 2),
        Variant("scan f32", "skip_nonfinite, float32 model", "scan", _scan(F32), 96),
        Variant("scan bf16", "skip_nonfinite, bfloat16 model", "scan", _scan(BF16), 96, x_bytes=2),
        Variant("plan", "the device plan's step where no lerp carries it (one thread)", "other", _other("plan"), 96,
                streaming=False, traffic=(0.0, 0.0)),
        Variant("copy f32->f32", "a model average's buffers, copied at every update", "other", _other("copy"), 96,
                streaming=False, traffic=(4.0, 4.0)),
        Variant("bema f32", "BEMA's output", "other", _other("bema"), 96, streaming=False, traffic=(12.0, 4.0)),
        Variant("lerp f64<-f64", "float64 model and shadow", "lerp", _other("lerp64"), 96, 8, 8, streaming=False),
    ]


# ---------------------------------------------------------------- the shipped entries, disassembled


def argument_types(args) -> tuple:
    """The numba types numba-cuda's dispatcher gives ``args`` at a launch (``cuda_bound._typeof``)."""
    from numba.cuda.typing.typeof import Purpose, typeof

    return tuple(typeof(a, Purpose.argument) for a in args)


def disassemble(cubin: bytes, folder: Path, stem: str) -> str:
    """``nvdisasm -c`` of ``cubin`` (written to ``folder/stem.cubin``)."""
    path = folder / f"{stem}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([nvdisasm(), "-c", str(path)], capture_output=True, text=True, check=True)
    return out.stdout


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def shipped(variant: Variant, source: str = "cu13"):
    """The entry (``kernels._store.entry.Entry``: cubin and figures) of ``variant`` for sm_90 in the
    shipped set ``source`` (``"cu13"``, ``"cu12"``: what a user's H100 runs under a CUDA 13 or 12
    driver), checked whole; LookupError naming what is missing where it is not shipped (or stale)."""
    from fastema._launch import device_code
    from fastema._launch.variants import variant_key
    from fastema.kernels._store.identity import VARIANTS

    problem = device_code.problem(source)
    if problem:
        raise LookupError(problem)
    dispatcher, args = variant.build()
    key = variant_key(VARIANTS[dispatcher], argument_types(args))
    found = device_code.entry(source, key, ARCH, dispatcher)
    if found is None:
        raise LookupError(f"{variant.name}: no {source} {ARCH} cubin shipped for {key} (not a variant the "
                          f"launchers ask for, or stale)")
    return found


def build(variant: Variant, folder: Path | None = None, source: str = "cu13") -> Built:
    """``variant``'s shipped sm_90 entry of set ``source`` (:func:`shipped`), disassembled (into
    ``folder``, else a temporary one)."""
    found = shipped(variant, source)
    where = folder if folder is not None else Path(_tmp())
    where.mkdir(parents=True, exist_ok=True)
    sass = disassemble(found.code, where, f"{_slug(variant.name)}.{source}")
    return Built(variant, found.key, source, found.code, found.figures, sass)


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="fastema-sass-")


# ---------------------------------------------------------------- reading the cubin and the log

_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE = 0x2F, 0x11


def cubin_attributes(cubin: bytes) -> dict:
    """``{symbol name: {"registers": n, "frame": bytes}}`` from the cubin's ``.nv.info`` section
    (EIATTR_REGCOUNT and EIATTR_FRAME_SIZE records: what the driver allocates at a launch)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def name(table, offset):
        start = sections[table][4] + offset
        return cubin[start:cubin.index(b"\0", start)].decode()

    symtab = next(s for s in sections if s[1] == 2)                 # SHT_SYMTAB
    symbols = []
    for i in range(symtab[5] // 24):
        st_name, = struct.unpack_from("<I", cubin, symtab[4] + 24 * i)
        symbols.append(name(symtab[6], st_name))
    out: dict = {}
    for s in sections:
        if name(shstrndx, s[0]) != ".nv.info":
            continue
        at, end = s[4], s[4] + s[5]
        while at + 4 <= end:
            fmt, attr, size = struct.unpack_from("<BBH", cubin, at)
            if fmt == 0x04 and size == 8:                            # EIFMT_SVAL: symbol index, value
                index, value = struct.unpack_from("<II", cubin, at + 4)
                field = {_EIATTR_REGCOUNT: "registers", _EIATTR_FRAME_SIZE: "frame"}.get(attr)
                if field:
                    out.setdefault(symbols[index], {})[field] = value
            at += 4 + (size if fmt == 0x04 else 0)
    return out


# ---------------------------------------------------------------- reading the SASS

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+|\$\S+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"\bR(\d+)\b")


@dataclasses.dataclass
class Instruction:
    address: int
    predicate: str            # "@P0", "@!P1" or ""
    opcode: str               # with its modifiers: "LDG.E.128"
    operands: str

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    def width(self) -> int:
        """Bytes a memory access moves per thread."""
        for m in self.opcode.split(".")[1:]:
            if m in WIDTH:
                return WIDTH[m]
        return 4

    def is_load(self) -> bool:
        return bool(GLOBAL_LOAD.match(self.opcode))

    def is_store(self) -> bool:
        return bool(GLOBAL_STORE.match(self.opcode))

    def registers(self) -> tuple[list[int], list[int]]:
        """(written, read) general registers: a load writes its first operand's register and the next
        ``width / 4 - 1``; a store reads all; other instructions write the first operand (a guess that
        only matters for loads here)."""
        parts = [p.strip() for p in self.operands.split(",")]
        if not parts or not parts[0]:
            return [], []
        if self.is_load() or LOCAL.match(self.opcode) and self.op == "LDL":
            m = _REG.match(parts[0])
            first = int(m.group(1)) if m else None
            written = [] if first is None else list(range(first, first + max(1, self.width() // 4)))
            read = [int(r) for p in parts[1:] for r in _REG.findall(p)]
            return written, read
        if self.is_store() or self.op == "STL":
            read = [int(r) for p in parts for r in _REG.findall(p)]
            m = _REG.match(parts[-1])                                  # the data: its width in registers
            if m:
                first = int(m.group(1))
                read += list(range(first, first + max(1, self.width() // 4)))
            return [], read
        m = _REG.match(parts[0])
        written = [int(m.group(1))] if m else []
        read = [int(r) for p in parts[1:] for r in _REG.findall(p)]
        if self.opcode.endswith(".64") or ".WIDE" in self.opcode:
            written += [w + 1 for w in written]
        return written, read


def parse(sass: str, entry: str | None = None) -> list[Instruction]:
    """The instructions of the kernel's own section (``.text.<entry>``; the first ``.text._Z`` one when
    ``entry`` is None), in address order, branch targets resolved to addresses in ``operands``."""
    sections = re.split(r"^\s*\.section\s+", sass, flags=re.M)
    body = next((s for s in sections if s.startswith(f".text.{entry}" if entry else ".text._Z")), None)
    if body is None:
        raise ValueError("no kernel section in the SASS")
    labels: dict[str, int] = {}
    pending: list[str] = []
    out: list[Instruction] = []
    for line in body.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        address, text = int(m.group(1), 16), m.group(2).rstrip(" ;")
        for name in pending:
            labels[name] = address
        pending = []
        predicate = ""
        if text.startswith("@"):
            predicate, text = text.split(None, 1)
        opcode, _, operands = text.partition(" ")
        out.append(Instruction(address, predicate, opcode, operands.strip()))
    for i in out:
        t = _TARGET.search(i.operands)
        if t and t.group(1) in labels:
            i.operands = i.operands.replace(t.group(0), f"`({labels[t.group(1)]:#x})")
    return out


@dataclasses.dataclass
class Loop:
    head: int                 # address of the first instruction (a backward branch's target)
    tail: int                 # address of the backward branch
    body: list                # its instructions, in address order

    def contains(self, other: Loop) -> bool:
        return self.head <= other.head and other.tail <= self.tail and (self.head, self.tail) != (other.head,
                                                                                                   other.tail)


def loops(code: list[Instruction]) -> list[Loop]:
    """Every loop: a branch (BRA, predicated or not) to a lower address closes one; a branch to itself
    (the trap after the exit) is none. Branches back to one head make one loop, the widest."""
    spans: dict[int, int] = {}
    for i in code:
        if i.op != "BRA":
            continue
        t = _TARGET.search(i.operands)
        if not t or not t.group(1).startswith("0x"):
            continue
        target = int(t.group(1), 16)
        if target < i.address:
            spans[target] = max(spans.get(target, 0), i.address)
    return [Loop(h, t, [i for i in code if h <= i.address <= t]) for h, t in sorted(spans.items())]


def _touches(lp: Loop) -> tuple[bool, bool]:
    return any(i.is_load() for i in lp.body), any(i.is_store() for i in lp.body)


def element_loops(code: list[Instruction], chunked: bool = True, loads_only: bool = False) -> list[Loop]:
    """The loops over elements: loops that load and store global memory (directly or in a loop nested
    in them; ``loads_only``: that load, for a scan, which stores once after its loops), but for the
    grid-stride loop over chunks around them (``chunked``: every kernel of ``kernels/cuda.py``) and for
    the loops nested in another loop over elements (the further rows of a device-weights lerp, whose
    row count is not known at compile time: the first row is peeled into the enclosing loop)."""
    ls = loops(code)
    both = [lp for lp in ls if _touches(lp)[0] and (loads_only or _touches(lp)[1])]
    chunk = [lp for lp in both if chunked and any(lp.contains(o) for o in both) and not any(o.contains(lp) for o in ls)]
    rest = [lp for lp in both if not any(lp is c for c in chunk)]
    return [lp for lp in rest if not any(o.contains(lp) for o in rest)]


def iteration(lp: Loop, code: list[Instruction]) -> list[Instruction]:
    """One pass over an element loop as a thread runs it for one shadow row: its instructions, each
    nested loop walked once, but for the loops over further rows where the compiler peeled the first
    row into the pass (nested loops with global stores, when the pass stores without them)."""
    rows = [o for o in loops(code) if lp.contains(o) and all(_touches(o))]
    own = [i for i in lp.body if not any(o.head <= i.address <= o.tail for o in rows)]
    return own if any(i.is_store() for i in own) else lp.body


def is_vector(body: list[Instruction]) -> bool:
    """Whether a loop's global accesses include 64- or 128-bit ones."""
    return any((i.is_load() or i.is_store()) and i.width() >= 8 for i in body)


def bursts(body: list[Instruction]) -> list[int]:
    """Bytes of global loads a thread has issued, in address order through ``body``, each time it must
    first wait for one of them: an instruction reads (or overwrites) a register a pending load
    writes. The last burst ends at the end of the body. Little's law wants the bytes in flight
    while a thread waits: ``sum(bursts) / len(bursts)`` per latency, per thread."""
    out: list[int] = []
    pending: dict[int, int] = {}      # register -> 1 while a load of it is pending
    size = 0
    for i in body:
        written, read = i.registers()
        if pending and any(r in pending for r in read + ([] if i.is_load() else written)):
            out.append(size)
            pending, size = {}, 0
        if i.is_load():
            size += i.width()
            for r in written:
                pending[r] = 1
    if size:
        out.append(size)
    return out


@dataclasses.dataclass
class Built:
    variant: Variant
    key: str                  # the variant's key in the store
    source: str               # the shipped set it was read from: "cu13", "cu12"
    cubin: bytes
    figures: dict             # the entry's (kernels._store.entry.figures)
    sass: str

    def code(self) -> list[Instruction]:
        return parse(self.sass)


@dataclasses.dataclass
class LoopFigures:
    """One loop over elements, one pass for one shadow row (:func:`iteration`)."""
    head: int
    tail: int
    fallback: bool            # scalar, in a kernel that also has a vector loop: the tail of each row and
                              # the unaligned chunks (gpu.md §1.2, §1.6 item 8)
    loads: list               # widths (bytes) of its global loads, in order
    stores: list
    local: list               # LDL/STL anywhere in the loop (nested loops included)
    scalar16: list            # 16-bit global loads in one pass
    bursts: list              # bytes in flight at each wait (:func:`bursts`)

    @property
    def in_flight(self) -> float:
        """Bytes a thread has in flight per wait on memory, on average over a pass."""
        return sum(self.bursts) / len(self.bursts) if self.bursts else 0.0

    def widths(self) -> str:
        """``"LDG 4x16 B, STG 2x16 B"``: the pass's global accesses by width."""
        def count(ws, what):
            return " ".join(f"{ws.count(w)}x{w}" for w in sorted(set(ws), reverse=True)) + f" B {what}"
        return f"{count(self.loads, 'ld')}, {count(self.stores, 'st')}" if self.stores else count(self.loads, "ld")


@dataclasses.dataclass
class Report:
    """What the checks and the table read of one variant."""
    variant: Variant
    registers: int            # per thread, as the cubin tells the driver (EIATTR_REGCOUNT)
    log_registers: int | None  # as the linker's or ptxas' log reported them (the entry's figures)
    frame: int                # stack frame bytes
    spill_stores: int
    spill_loads: int
    smem: int                 # static shared memory bytes
    blocks_per_sm: int        # resident blocks per SM at CUDA_THREADS (gpu.md §1.1)
    loops: list               # LoopFigures of every loop over elements
    source: str = ""          # the shipped set: "cu13" (NVVM + nvJitLink 13.5), "cu12" (NVVM + ptxas 12.0)

    @property
    def streaming(self) -> list:
        """The loops over elements that do the streaming (the fallback loops left out)."""
        return [lp for lp in self.loops if not lp.fallback]

    @property
    def in_flight_thread(self) -> float:
        """Bytes a thread has in flight per wait, in its worst streaming loop."""
        return min((lp.in_flight for lp in self.streaming), default=0.0)

    @property
    def occupancy(self) -> float:
        from fastema._launch import config

        return self.blocks_per_sm * config.CUDA_THREADS / 32 / MAX_WARPS

    @property
    def in_flight_sm_kib(self) -> float:
        """KiB of loads in flight per SM: the threads resident per SM x :attr:`in_flight_thread`."""
        from fastema._launch import config

        return self.in_flight_thread * self.blocks_per_sm * config.CUDA_THREADS / 1024

    def predicted_share(self, latency_ns: float = LATENCY_NS) -> float:
        """The share of the copy bandwidth gpu.md §1.3 predicts: min(copy, in-flight read bytes per SM x
        SMs / L / read share) / copy. A prediction, from two calibration points."""
        gbs = self.in_flight_sm_kib * 1024 * SMS / (latency_ns * 1e-9) / self.variant.read_share() / 1e9
        return min(1.0, gbs / COPY_GBS)


def blocks_per_sm(registers: int, threads: int = 256, smem: int = 0) -> int:
    """Resident blocks per SM on sm_90 at ``registers`` per thread (gpu.md §1.1): registers allocated
    per warp in units of 256, 64 warps, 32 blocks, shared memory with 1 KiB reserved per block."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // warps if per_warp else MAX_BLOCKS
    return min(by_regs, MAX_WARPS // warps, SMEM_PER_SM // (smem + SMEM_RESERVED), MAX_BLOCKS)


def analyse(built: Built) -> Report:
    """The figures of one built variant."""
    from fastema._launch import config

    code = built.code()
    attrs = cubin_attributes(built.cubin)
    entry = [a for name, a in attrs.items() if name.startswith("_Z") and "registers" in a]
    if len(entry) != 1:
        raise ValueError(f"{built.variant.name}: {len(entry)} kernel register counts in the cubin, expected 1")
    figures = built.figures
    found = element_loops(code, built.variant.chunked, loads_only=built.variant.family == "scan")
    vector = any(is_vector(iteration(lp, code)) for lp in found)
    figs = []
    for lp in found:
        one = iteration(lp, code)
        figs.append(LoopFigures(
            lp.head, lp.tail, vector and not is_vector(one),
            [i.width() for i in one if i.is_load()], [i.width() for i in one if i.is_store()],
            [f"{i.address:#06x} {i.opcode}" for i in lp.body if LOCAL.match(i.opcode)],
            [f"{i.address:#06x} {i.opcode}" for i in one if i.is_load() and i.width() == 2], bursts(one)))
    return Report(built.variant, entry[0]["registers"], figures.get("registers") or None, entry[0].get("frame", 0),
                  figures["spill_stores"], figures["spill_loads"], figures["smem"],
                  blocks_per_sm(entry[0]["registers"], config.CUDA_THREADS, figures["smem"]), figs, built.source)


# ---------------------------------------------------------------- the checks (gpu.md §1.7)

CHECKS = ("spills", "local", "registers", "vector", "no_scalar16", "in_flight")
OTHER_CHECKS = ("spills", "registers")      # the kernels that are not per-step streaming ones


def checks(variant: Variant) -> tuple:
    """The checks ``variant`` is held to."""
    return CHECKS if variant.streaming else OTHER_CHECKS


def check(report: Report, name: str) -> str | None:
    """What is wrong with ``report`` by check ``name`` (:data:`CHECKS`), or None when it holds."""
    v = report.variant
    if name == "spills":
        if not report.spill_stores == report.spill_loads == 0:
            return f"spills {report.spill_stores} B stored, {report.spill_loads} B loaded"
        return None
    if name == "local":
        bad = [i for lp in report.loops for i in lp.local]
        return f"local memory in a loop over elements: {bad}" if bad else None
    if name == "registers":
        if report.log_registers is not None and report.log_registers != report.registers:
            return f"the cubin says {report.registers} registers, the linker {report.log_registers}"
        return f"{report.registers} registers > cap {v.cap}" if report.registers > v.cap else None
    if not report.streaming:
        return "no loop over elements found in the SASS"
    if name == "vector":
        bad = [lp for lp in report.streaming if max(lp.loads, default=0) < 8 or (v.family != "scan" and max(
            lp.stores, default=0) < 8)]
        return "; ".join(f"loop {lp.head:#x}: {lp.widths()}" for lp in bad) or None
    if name == "no_scalar16":
        bad = [i for lp in report.streaming for i in lp.scalar16]
        return f"16-bit scalar loads in a streaming loop: {bad}" if bad else None
    if name == "in_flight":
        kib = report.in_flight_sm_kib
        if kib < IN_FLIGHT_MIN_KIB:
            return (f"{kib:.1f} KiB in flight per SM < {IN_FLIGHT_MIN_KIB} ({report.in_flight_thread:.0f} B a thread "
                    f"x {report.blocks_per_sm} blocks of 256; bursts {[lp.bursts for lp in report.streaming]})")
        return None
    raise ValueError(f"no check {name!r}; the checks are {CHECKS}")


# ---------------------------------------------------------------- the table


def table(reports: list[Report], latency_ns: float = LATENCY_NS) -> str:
    """The per-kernel table (markdown)."""
    head = ("| kernel | path | regs (cap) | spills | blocks/SM (occupancy) | streaming loop, one pass (bytes a "
            "thread) | B/elem (min) | in flight B/thread | in flight KiB/SM | predicted % of copy |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in reports:
        if not r.variant.min_bytes():             # the plan kernel: one thread, nothing streamed
            rows.append(f"| {r.variant.name} | {r.variant.path} | {r.registers} ({r.variant.cap}) | "
                        f"{r.spill_stores + r.spill_loads} | {r.blocks_per_sm} ({r.occupancy:.1%}) | one thread | - "
                        "| - | - | - |")
            continue
        loops_ = "; ".join(lp.widths() for lp in r.streaming) or "none found"
        tails = [lp for lp in r.loops if lp.fallback]
        if tails:
            loops_ += f" (+ {len(tails)} scalar fallback loop{'s' if len(tails) > 1 else ''})"
        rows.append(f"| {r.variant.name} | {r.variant.path} | {r.registers} ({r.variant.cap}) | "
                    f"{r.spill_stores + r.spill_loads} | {r.blocks_per_sm} ({r.occupancy:.1%}) | {loops_} | "
                    f"{r.variant.min_bytes():g} | {r.in_flight_thread:.0f} | {r.in_flight_sm_kib:.1f} | "
                    f"{r.predicted_share(latency_ns):.0%} |")
    return head + "\n".join(rows) + "\n"


def toolchain_problem(source: str = "cu13") -> str | None:
    """Why the shipped sm_90 code of set ``source`` cannot be read here (what to do), or None."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "reads the real target's code, not the simulator's"
    if nvdisasm() is None:
        return "needs nvdisasm: pip install nvidia-cuda-nvdisasm (the cuda extra)"
    try:
        from fastema._launch import device_code

        return device_code.problem(source)
    except ImportError as err:
        return f"needs numba-cuda: pip install 'fastema[cuda]' ({err.__class__.__name__}: {err})"


def build_all(chosen: list[Variant], folder: Path, jobs: int = 1, source: str = "cu13") -> list[Built]:
    """Every variant of ``chosen`` read from shipped set ``source`` (:func:`build`), disassembled by
    ``jobs`` nvdisasm processes at once (nothing is compiled)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda v: build(v, folder, source), chosen))


def main(argv=None) -> int:                   # pragma: no cover - python bench/gpu/sass.py [names...]
    import argparse

    parser = argparse.ArgumentParser(description="sm_90 machine code of fastema's per-step CUDA kernels")
    parser.add_argument("names", nargs="*", help="variants whose name contains one of these (default: all)")
    parser.add_argument("--set", default="cu13", choices=("cu13", "cu12"), help="which shipped set")
    parser.add_argument("--folder", type=Path, help="keep the disassembled code there")
    parser.add_argument("--jobs", type=int, default=1, help="nvdisasm processes at once")
    a = parser.parse_args(argv)
    problem = toolchain_problem(a.set)
    if problem:
        print(problem)
        return 2
    chosen = [v for v in variants() if not a.names or any(n in v.name for n in a.names)]
    print(table([analyse(b) for b in build_all(chosen, a.folder or Path(_tmp()), a.jobs, a.set)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
