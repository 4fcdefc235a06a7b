"""One compiled-code entry, the one format of the shipped store and the node store.

An entry is one variant's code for one image (a cubin for ``sm_XY`` or PTX for ``compute_XY``):
its key (``._store.identity.variant_key``), the image, the code's kind, the name of its kernel's
entry point, the figures the linker or ptxas said of it (:func:`figures`: parsed once, when it was
made), its identity (the sources and the toolchain it was compiled from) and the launch bounds it
was compiled with (``kernels._bounds``). Written as one line
of magic, one line of JSON (the fields, the code's size and SHA-256) and the code. The node store
holds one file per entry; the shipped store packs the entries of one image one after another,
compressed (``._store.store``). :func:`loads` checks what it reads against what was asked for:
an entry that is damaged or holds another variant, image or identity is never used.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import NamedTuple

MAGIC = b"fastema-entry 1\n"


class Entry(NamedTuple):
    key: str          # the variant (``identity.variant_key``)
    image: str        # "sm_90", "compute_80"
    kind: str         # "cubin" or "ptx"
    name: str         # the kernel's entry point in ``code``
    code: bytes
    figures: dict     # :func:`figures` (empty for PTX: the driver assembles it)
    identity: str     # the sources and the toolchain it was compiled from
    bounds: tuple | None = None   # the launch bounds it was compiled with (``kernels._bounds``)


def dumps(entry: Entry) -> bytes:
    """``entry`` as bytes (see the module docstring)."""
    if entry.kind not in ("cubin", "ptx"):
        raise ValueError(f"an entry's kind is cubin or ptx, not {entry.kind!r}")
    head = {"key": entry.key, "image": entry.image, "kind": entry.kind, "name": entry.name,
            "figures": entry.figures, "identity": entry.identity, "size": len(entry.code),
            "bounds": None if entry.bounds is None else list(entry.bounds),
            "sha256": hashlib.sha256(entry.code).hexdigest()}
    return MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + entry.code


def loads(data: bytes, key: str | None = None, image: str | None = None,
          identity: str | None = None) -> Entry:
    """The entry ``data`` holds, checked whole (its size and SHA-256) and, where given, against the
    ``key``, ``image`` and ``identity`` asked for; ValueError saying what is wrong."""
    if not data.startswith(MAGIC):
        raise ValueError("not a fastema compiled-code entry")
    head_line, _, code = data[len(MAGIC):].partition(b"\n")
    try:
        head = json.loads(head_line)
        bounds = head["bounds"]
        got = Entry(head["key"], head["image"], head["kind"], head["name"], code,
                    head["figures"], head["identity"], None if bounds is None else tuple(bounds))
        size, sha = head["size"], head["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"its header cannot be read ({err})") from None
    if len(code) != size or hashlib.sha256(code).hexdigest() != sha:
        raise ValueError("its code fails its checksum")
    for field, want in (("key", key), ("image", image), ("identity", identity)):
        if want is not None and getattr(got, field) != want:
            raise ValueError(f"it holds {field} {getattr(got, field)!r}, not {want!r}")
    return got


_FIGURES = (("registers", r"Used (\d+) registers", max),
            ("spill_stores", r"(\d+) bytes spill stores", sum),
            ("spill_loads", r"(\d+) bytes spill loads", sum),
            ("stack", r"(\d+) bytes stack frame", max),
            ("smem", r"(\d+) bytes smem", max))


def figures(log: str) -> dict:
    """What ``ptxas -v`` or nvJitLink's info log (the same lines) says of a kernel, over the
    functions of its module: registers, stack frame and static shared memory bytes (the most of any
    function), spill stores and loads (bytes, summed). Timings and names are left out: the same
    code has the same figures. The one parser of those logs."""
    out = {}
    for field, pattern, fold in _FIGURES:
        values = [int(x) for x in re.findall(pattern, log)]
        out[field] = fold(values) if values else 0
    return out


def spills(f: dict) -> bool:
    """Whether figures ``f`` (:func:`figures`) show a spill."""
    return bool(f.get("spill_stores") or f.get("spill_loads"))
