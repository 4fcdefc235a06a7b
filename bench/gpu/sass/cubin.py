"""Reading the cubin (a 64-bit ELF): what the driver allocates at a launch, from its ``.nv.info``
section."""
from __future__ import annotations

import struct

_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE = 0x2F, 0x11


def cubin_attributes(cubin: bytes) -> dict:
    """``{symbol name: {"registers": n, "frame": bytes}}`` from the cubin's ``.nv.info`` section
    (EIATTR_REGCOUNT and EIATTR_FRAME_SIZE records: what the driver allocates at a launch)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
                for i in range(shnum)]

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
            if fmt == 0x04 and size == 8:                     # EIFMT_SVAL: symbol index, value
                index, value = struct.unpack_from("<II", cubin, at + 4)
                field = {_EIATTR_REGCOUNT: "registers", _EIATTR_FRAME_SIZE: "frame"}.get(attr)
                if field:
                    out.setdefault(symbols[index], {})[field] = value
            at += 4 + (size if fmt == 0x04 else 0)
    return out
