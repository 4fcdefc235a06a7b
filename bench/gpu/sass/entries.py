"""The shipped entries, disassembled: each variant's sm_90 entry looked up in a shipped set (by the
numba types its launcher's arguments get, as the bound launch path types them) and read by
``nvdisasm``. Nothing is compiled."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .instructions import Instruction, parse
from .launches import Variant
from .model import ARCH
from .toolchain import disassemble


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


def argument_types(args) -> tuple:
    """The numba types numba-cuda's dispatcher gives ``args`` at a launch
    (``_launch.cuda.launch._typeof``)."""
    from numba.cuda.typing.typeof import Purpose, typeof

    return tuple(typeof(a, Purpose.argument) for a in args)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def temp_folder() -> str:
    """A new temporary folder for the disassembled code."""
    import tempfile

    return tempfile.mkdtemp(prefix="fastema-sass-")


def shipped(variant: Variant, source: str = "cu13"):
    """The entry (``kernels._store.entry.Entry``: cubin and figures) of ``variant`` for sm_90 in the
    shipped set ``source`` (``"cu13"``, ``"cu12"``: what a user's H100 runs under a CUDA 13 or 12
    driver), checked whole; LookupError naming what is missing where it is not shipped (or
    stale)."""
    from fastema._launch.cuda import device_code
    from fastema._launch.shipped.variants import variant_key
    from fastema.kernels._store.identity import VARIANTS

    problem = device_code.problem(source)
    if problem:
        raise LookupError(problem)
    dispatcher, args = variant.build()
    key = variant_key(VARIANTS[dispatcher], argument_types(args))
    found = device_code.entry(source, key, ARCH, dispatcher)
    if found is None:
        raise LookupError(f"{variant.name}: no {source} {ARCH} cubin shipped for {key} (not a "
                          f"variant the launchers ask for, or stale)")
    return found


def build(variant: Variant, folder: Path | None = None, source: str = "cu13") -> Built:
    """``variant``'s shipped sm_90 entry of set ``source`` (:func:`shipped`), disassembled (into
    ``folder``, else a temporary one)."""
    found = shipped(variant, source)
    where = folder if folder is not None else Path(temp_folder())
    where.mkdir(parents=True, exist_ok=True)
    sass = disassemble(found.code, where, f"{_slug(variant.name)}.{source}")
    return Built(variant, found.key, source, found.code, found.figures, sass)


def build_all(chosen: list[Variant], folder: Path, jobs: int = 1,
              source: str = "cu13") -> list[Built]:
    """Every variant of ``chosen`` read from shipped set ``source`` (:func:`build`), disassembled by
    ``jobs`` nvdisasm processes at once (nothing is compiled)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda v: build(v, folder, source), chosen))
