"""The loops of the parsed SASS: every loop (a backward branch closes one), the loops over
elements among them, one pass of such a loop for one shadow row, and the bytes a thread has in
flight each time it waits for memory."""
from __future__ import annotations

import dataclasses

from .instructions import TARGET, Instruction


@dataclasses.dataclass
class Loop:
    head: int                 # address of the first instruction (a backward branch's target)
    tail: int                 # address of the backward branch
    body: list                # its instructions, in address order

    def contains(self, other: Loop) -> bool:
        return (self.head <= other.head and other.tail <= self.tail
                and (self.head, self.tail) != (other.head, other.tail))


def loops(code: list[Instruction]) -> list[Loop]:
    """Every loop: a branch (BRA, predicated or not) to a lower address closes one; a branch to
    itself (the trap after the exit) is none. Branches back to one head make one loop, the
    widest."""
    spans: dict[int, int] = {}
    for i in code:
        if i.op != "BRA":
            continue
        t = TARGET.search(i.operands)
        if not t or not t.group(1).startswith("0x"):
            continue
        target = int(t.group(1), 16)
        if target < i.address:
            spans[target] = max(spans.get(target, 0), i.address)
    return [Loop(h, t, [i for i in code if h <= i.address <= t]) for h, t in sorted(spans.items())]


def _touches(lp: Loop) -> tuple[bool, bool]:
    return any(i.is_load() for i in lp.body), any(i.is_store() for i in lp.body)


def element_loops(code: list[Instruction], chunked: bool = True,
                  loads_only: bool = False) -> list[Loop]:
    """The loops over elements: loops that load and store global memory (directly or in a loop
    nested in them; ``loads_only``: that load, for a scan, which stores once after its loops), but
    for the grid-stride loop over chunks around them (``chunked``: every kernel of
    ``kernels/cuda.py``) and for the loops nested in another loop over elements (the further rows
    of a device-weights lerp, whose row count is not known at compile time: the first row is peeled
    into the enclosing loop)."""
    ls = loops(code)
    both = [lp for lp in ls if _touches(lp)[0] and (loads_only or _touches(lp)[1])]
    chunk = [lp for lp in both if chunked and any(lp.contains(o) for o in both)
             and not any(o.contains(lp) for o in ls)]
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
    """Bytes of global loads a thread has issued, in address order through ``body``, each time it
    must first wait for one of them: an instruction reads (or overwrites) a register a pending load
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
