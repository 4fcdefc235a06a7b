"""The per-kernel table of the shipped sm_90 code of one set (the variants whose name contains one
of ``NAME``)::

    python -m bench.gpu.sass [--set cu13|cu12] [--folder DIR] [--jobs N] [NAME ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .entries import build_all, temp_folder
from .launches import variants
from .markdown import table
from .report import analyse
from .toolchain import toolchain_problem


def main(argv=None) -> int:                   # pragma: no cover - python -m bench.gpu.sass [names]
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu.sass",
        description="sm_90 machine code of fastema's per-step CUDA kernels")
    parser.add_argument("names", nargs="*",
                        help="variants whose name contains one of these (default: all)")
    parser.add_argument("--set", default="cu13", choices=("cu13", "cu12"), help="which shipped set")
    parser.add_argument("--folder", type=Path, help="keep the disassembled code there")
    parser.add_argument("--jobs", type=int, default=1, help="nvdisasm processes at once")
    a = parser.parse_args(argv)
    problem = toolchain_problem(a.set)
    if problem:
        print(problem)
        return 2
    chosen = [v for v in variants() if not a.names or any(n in v.name for n in a.names)]
    folder = a.folder or Path(temp_folder())
    print(table([analyse(b) for b in build_all(chosen, folder, a.jobs, a.set)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
