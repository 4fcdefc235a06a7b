"""The per-kernel table (markdown): registers and their cap, spills, blocks per SM, one pass of
the streaming loop by width, bytes per element, bytes in flight, and the model's predicted share of
the copy bandwidth."""
from __future__ import annotations

from .model import LATENCY_NS
from .report import Report


def table(reports: list[Report], latency_ns: float = LATENCY_NS) -> str:
    """The per-kernel table (markdown)."""
    head = ("| kernel | path | regs (cap) | spills | blocks/SM (occupancy) | streaming loop, one "
            "pass (bytes a thread) | B/elem (min) | in flight B/thread | in flight KiB/SM | "
            "predicted % of copy |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in reports:
        if not r.variant.min_bytes():             # the plan kernel: one thread, nothing streamed
            rows.append(f"| {r.variant.name} | {r.variant.path} | {r.registers} "
                        f"({r.variant.cap}) | {r.spill_stores + r.spill_loads} | "
                        f"{r.blocks_per_sm} ({r.occupancy:.1%}) | one thread | - | - | - | - |")
            continue
        loops_ = "; ".join(lp.widths() for lp in r.streaming) or "none found"
        tails = [lp for lp in r.loops if lp.fallback]
        if tails:
            loops_ += f" (+ {len(tails)} scalar fallback loop{'s' if len(tails) > 1 else ''})"
        rows.append(f"| {r.variant.name} | {r.variant.path} | {r.registers} ({r.variant.cap}) | "
                    f"{r.spill_stores + r.spill_loads} | {r.blocks_per_sm} "
                    f"({r.occupancy:.1%}) | {loops_} | {r.variant.min_bytes():g} | "
                    f"{r.in_flight_thread:.0f} | {r.in_flight_sm_kib:.1f} | "
                    f"{r.predicted_share(latency_ns):.0%} |")
    return head + "\n".join(rows) + "\n"
