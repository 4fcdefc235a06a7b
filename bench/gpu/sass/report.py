"""What the checks and the table read of one variant: its registers, frame, spills and shared
memory (from the cubin and the entry's figures), the blocks per SM they allow, and the figures of
each of its loops over elements (widths, local memory, 16-bit loads, bytes in flight)."""
from __future__ import annotations

import dataclasses

from .cubin import cubin_attributes
from .entries import Built
from .flow import bursts, element_loops, is_vector, iteration
from .instructions import LOCAL
from .launches import Variant
from .model import COPY_GBS, LATENCY_NS, MAX_WARPS, SMS, blocks_per_sm


@dataclasses.dataclass
class LoopFigures:
    """One loop over elements, one pass for one shadow row (:func:`iteration`)."""
    head: int
    tail: int
    fallback: bool            # scalar, in a kernel that also has a vector loop: the tail of each
                              # row and the unaligned chunks (gpu.md §1.2, §1.6 item 8)
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
            by_width = " ".join(f"{ws.count(w)}x{w}" for w in sorted(set(ws), reverse=True))
            return by_width + f" B {what}"
        if self.stores:
            return f"{count(self.loads, 'ld')}, {count(self.stores, 'st')}"
        return count(self.loads, "ld")


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
    source: str = ""          # the shipped set: "cu13" (NVVM + nvJitLink 13.5),
                              # "cu12" (NVVM + ptxas 12.0)

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
        """The share of the copy bandwidth gpu.md §1.3 predicts: min(copy, in-flight read bytes per
        SM x SMs / L / read share) / copy. A prediction, from two calibration points."""
        gbs = (self.in_flight_sm_kib * 1024 * SMS / (latency_ns * 1e-9) / self.variant.read_share()
               / 1e9)
        return min(1.0, gbs / COPY_GBS)


def analyse(built: Built) -> Report:
    """The figures of one built variant."""
    from fastema._launch import config

    code = built.code()
    attrs = cubin_attributes(built.cubin)
    entry = [a for name, a in attrs.items() if name.startswith("_Z") and "registers" in a]
    if len(entry) != 1:
        raise ValueError(f"{built.variant.name}: {len(entry)} kernel register counts in the cubin, "
                         f"expected 1")
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
            [f"{i.address:#06x} {i.opcode}" for i in one if i.is_load() and i.width() == 2],
            bursts(one)))
    registers = entry[0]["registers"]
    return Report(built.variant, registers, figures.get("registers") or None,
                  entry[0].get("frame", 0), figures["spill_stores"], figures["spill_loads"],
                  figures["smem"], blocks_per_sm(registers, config.CUDA_THREADS, figures["smem"]),
                  figs, built.source)
