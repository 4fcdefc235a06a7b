"""The per-kernel table of fastema's per-step CUDA kernels for sm_90, from their machine code, without a GPU.

    python -m bench.gpu.static [--jobs 2] [--latency 920] [--out FILE | --no-write] [NAME ...]

Prints and writes (``bench/results/gpu-static-DATE.md``) one row per kernel variant: registers per
thread and the blocks of 256 they let reside per SM on sm_90 (occupancy), spills, the global loads and
stores of one pass of its streaming loop by width, the bytes per element it must move, the bytes a
thread has in flight each time it waits for memory and per SM at that occupancy, and the share of the
copy bandwidth the Little's-law model of ``../shared/design/gpu.md`` §1.3 predicts at a loaded latency
of 920 ns (fitted on the 2026-11-22 H100 run): a prediction, to be checked on a GPU. Then every check
of ``bench/tests/test_sass.py`` per variant, with the ones known to fail and why.

Each variant's sm_90 cubin is read from a shipped set of the store (``--set cu13``, the default, or
``cu12``; nothing is compiled) and disassembled by nvdisasm: ``bench/gpu/sass/``, shared with the test.
Needs ``nvidia-cuda-nvdisasm``; about 15 s on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu import sass as S  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUILT_BY = {"cu13": "NVVM + nvJitLink 13.5", "cu12": "NVVM 12.0 + ptxas 12.0"}
"""What built each shipped set's sm_90 cubins (``kernels/device/<set>/``)."""


def versions() -> str:
    """The toolchain, one line."""
    out = []
    for dist in ("numba", "numba-cuda", "cuda-core", "nvidia-cuda-nvdisasm"):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} absent")
    return ", ".join(out)


def revision() -> str:
    """The git revision of the tree (``+`` when the kernels differ from it), or "unknown"."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "fastema/_launch/config.py"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+ (kernels changed since)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def checks_table(reports: list) -> str:
    """Per variant: the checks that hold, those known to fail (and why), those that fail unexpectedly."""
    lines = ["| kernel | holds | known not to hold yet (why) | fails |", "|---|---|---|---|"]
    for r in reports:
        known = dict(r.variant.known)
        held, xfail, failed = [], [], []
        for c in S.checks(r.variant):
            problem = S.check(r, c)
            (held if problem is None else xfail if c in known else failed).append(c)
        why = sorted({known[c] for c in xfail})
        lines.append(f"| {r.variant.name} | {', '.join(held) or '-'} | "
                     f"{', '.join(xfail) + (' (' + '; '.join(why) + ')' if why else '') or '-'} | "
                     f"{', '.join(failed) or '-'} |")
    return "\n".join(lines) + "\n"


def report(reports: list, latency_ns: float) -> str:
    from fastema._launch import config

    sets = " / ".join(sorted({f"`{r.source}` ({BUILT_BY.get(r.source, r.source)})" for r in reports}))
    return (
        f"# fastema's per-step CUDA kernels on sm_90, from their machine code ({datetime.date.today().isoformat()})\n\n"
        f"`python -m bench.gpu.static` at {revision()}; {versions()}. Each variant's sm_90 cubin as "
        f"shipped in the store's set {sets}, the image an H100 loads for the argument types its launcher "
        f"passes, disassembled by nvdisasm; {config.CUDA_THREADS} threads a block. No GPU: registers, spills and the "
        "SASS are exact for this toolchain; **the last column is a prediction** (Little's law, "
        f"`../shared/design/gpu.md` §1.3: min(copy, KiB in flight per SM x {S.SMS} SMs / {latency_ns:g} ns / "
        f"read share), as a share of the 2026-11-22 H100 copy ceiling, {S.COPY_GBS:g} GB/s).\n\n"
        "- *streaming loop, one pass*: the global loads (ld) and stores (st) of one pass of each loop over "
        "elements, by count x bytes a thread; a scalar fallback loop (each row's last elements and unaligned "
        "chunks) is counted apart and not held to the vector rules.\n"
        "- *in flight B/thread*: the load bytes a thread has issued each time it first waits for one of them "
        "(an instruction reads a register a pending load writes), averaged over a pass (the worst streaming "
        "loop); per SM: x threads resident per SM. The CI rule is >= 32 KiB per SM (about twice the ~14 KiB "
        "the model needs at 12 B/elem).\n\n"
        + S.table(reports, latency_ns)
        + "\n## The checks of `bench/tests/test_sass.py`\n\n"
        + checks_table(reports))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only the variants whose name contains one of these")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="build processes")
    parser.add_argument("--latency", type=float, default=S.LATENCY_NS, help="loaded DRAM latency, ns")
    parser.add_argument("--out", type=Path, help="the report's file (default: bench/results/gpu-static-DATE.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--folder", type=Path, help="keep the disassembled code there (reused)")
    parser.add_argument("--set", choices=sorted(BUILT_BY), default="cu13", help="the shipped set read")
    a = parser.parse_args(argv)
    problem = S.toolchain_problem(a.set)
    if problem:
        print(f"gpu_static: {problem}", file=sys.stderr)
        return 2
    chosen = [v for v in S.variants() if not a.names or any(n in v.name for n in a.names)]
    folder = a.folder or Path(tempfile.mkdtemp(prefix="fastema-sass-"))
    reports = [S.analyse(b) for b in S.build_all(chosen, folder, a.jobs, a.set)]
    text = report(reports, a.latency)
    print(text)
    if not a.no_write:
        out = a.out or RESULTS / f"gpu-static-{datetime.date.today().isoformat()}.md"
        out.write_text(text)
        print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
