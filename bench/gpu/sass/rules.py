"""What ``bench/tests/test_sass.py`` holds each variant's machine code to (gpu.md §1.7): no
spills, no local memory in a loop over elements, a register cap with headroom, 64/128-bit global
accesses and no 16-bit scalar load in a streaming loop, enough bytes in flight per SM."""
from __future__ import annotations

from .launches import Variant
from .report import Report

IN_FLIGHT_MIN_KIB = 32     # the CI rule: about twice the ~14 KiB the model needs at 12 B/elem

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
        bad = [lp for lp in report.streaming if max(lp.loads, default=0) < 8
               or (v.family != "scan" and max(lp.stores, default=0) < 8)]
        return "; ".join(f"loop {lp.head:#x}: {lp.widths()}" for lp in bad) or None
    if name == "no_scalar16":
        bad = [i for lp in report.streaming for i in lp.scalar16]
        return f"16-bit scalar loads in a streaming loop: {bad}" if bad else None
    if name == "in_flight":
        kib = report.in_flight_sm_kib
        if kib < IN_FLIGHT_MIN_KIB:
            return (f"{kib:.1f} KiB in flight per SM < {IN_FLIGHT_MIN_KIB} "
                    f"({report.in_flight_thread:.0f} B a thread x {report.blocks_per_sm} blocks of "
                    f"256; bursts "
                    f"{[lp.bursts for lp in report.streaming]})")
        return None
    raise ValueError(f"no check {name!r}; the checks are {CHECKS}")
