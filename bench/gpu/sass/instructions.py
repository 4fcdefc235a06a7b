"""Reading the SASS (``nvdisasm -c``'s text): the kernel's instructions in address order, branch
targets resolved, each global or local access with its width and the registers it writes and
reads."""
from __future__ import annotations

import dataclasses
import re

GLOBAL_LOAD = re.compile(r"^(LDG|LD)(\.|$)")
GLOBAL_STORE = re.compile(r"^(STG|ST)(\.|$)")
LOCAL = re.compile(r"^(LDL|STL)(\.|$)")
# bytes per access; none of them: 4
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+|\$\S+):\s*$")
TARGET = re.compile(r"`\(([^)]+)\)")         # a branch's target: a label, or an address
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
        """(written, read) general registers: a load writes its first operand's register and the
        next ``width / 4 - 1``; a store reads all; other instructions write the first operand (a
        guess that only matters for loads here)."""
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
            m = _REG.match(parts[-1])                  # the data: its width in registers
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
    """The instructions of the kernel's own section (``.text.<entry>``; the first ``.text._Z`` one
    when ``entry`` is None), in address order, branch targets resolved to addresses in
    ``operands``."""
    sections = re.split(r"^\s*\.section\s+", sass, flags=re.M)
    prefix = f".text.{entry}" if entry else ".text._Z"
    body = next((s for s in sections if s.startswith(prefix)), None)
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
        t = TARGET.search(i.operands)
        if t and t.group(1) in labels:
            i.operands = i.operands.replace(t.group(0), f"`({labels[t.group(1)]:#x})")
    return out
