"""Compile every CUDA kernel variant fastema's launchers can ask for, and write the shipped device code.

    .venv/bin/python scripts/build_device_code.py [--jobs N] [--check] [--recompile]

Needs numba-cuda with NVVM and nvJitLink (``pip install -e ".[cuda]"``); no GPU. For each variant of
``fastema._launch.variants.every_variant()``, NVVM compiles it once, to LTO-IR for compute capability
8.0 with its dispatcher's options (numba-cuda's own path at a launch), and nvJitLink (cuda.core's
``Linker``) links that LTO-IR with link-time optimisation into a cubin for each of :data:`CUBINS` and
into PTX for ``compute_80``. Written to ``kernels/device/``: ``ptx.xz``, ``<arch>.xz`` and ``ltoir.xz``
(each the variants' code one after another, one xz stream: similar kernels compress together, 5x smaller
than a file each; the LTO-IR, 12 MB, is kept for the next build on this machine, neither committed nor
shipped) and ``manifest.json`` (per variant: its key, id, kernel entry name, where its code lies in each
file and its SHA-256, NVVM's seconds and nvJitLink's figures per architecture: registers, spills, which
the machine-code checks read; the stamp of the kernel sources it was built from, and what built it).

A variant already built for these sources, whose LTO-IR is still here, is not compiled again: its LTO-IR
is linked anew (no NVVM), so adding a launcher's variant or an architecture costs seconds; ``--recompile``
compiles every one.

Run it after any change of the kernel sources (``tests/kernels/test_device_code.py`` fails until then,
naming this command) and commit ``kernels/device/``. ``--check``: build nothing; exit 1 when the shipped
code is stale (another stamp, or another set of variants).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PTX_CC = (8, 0)
PTX_ISA = "9.0"                                           # CUDA 13.0's: the oldest CUDA 13 driver reads it
CUBINS = ("sm_80", "sm_90", "sm_100", "sm_120")
_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


def _versions() -> dict:
    import importlib.metadata as md

    from numba.cuda.cudadrv import nvvm

    out = {}
    for name in ("numba-cuda", "cuda-core", "nvidia-nvjitlink", "nvidia-nvvm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    out["nvvm"] = ".".join(map(str, nvvm.NVVM().get_version()))
    return out


def _link(ltoir: bytes) -> tuple:
    """``(ptx, {arch: (cubin, nvJitLink's info log)})``: the LTO-IR linked with link-time optimisation (as
    numba-cuda links at a launch) into a cubin for each of :data:`CUBINS`, and into PTX for ``compute_80``."""
    from fastema._launch.compiler import link

    ptx, _ = link(ltoir, "ptx", arch=f"sm_{PTX_CC[0]}{PTX_CC[1]}", ptx=True)
    return _lowered(ptx), {arch: link(ltoir, "cubin", arch=arch, verbose=True) for arch in CUBINS}


def _lowered(ptx: bytes) -> bytes:
    """``ptx`` declared as PTX ISA :data:`PTX_ISA` (what every CUDA 13 driver reads: NVVM 13.5 writes 9.5,
    which a CUDA 13.0 driver refuses) where it assembles as such (ptxas checks every instruction against
    the declared version), else as it is."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    lowered = re.sub(rb"^\.version \d+\.\d+$", f".version {PTX_ISA}".encode(), ptx, count=1, flags=re.M)
    if lowered == ptx:
        return ptx
    try:
        linker = Linker(ObjectCode.from_ptx(lowered), options=LinkerOptions(arch=f"sm_{PTX_CC[0]}{PTX_CC[1]}"))
        try:
            linker.link("cubin")
        finally:
            linker.close()
    except Exception:                                     # noqa: BLE001 - it needs the newer ISA
        return ptx
    return lowered


def _figures(log: str) -> dict:
    """What nvJitLink's info log says of a kernel (summed over the functions of the link): registers,
    spill stores and loads, stack frame and static shared memory bytes (its timings left out: the manifest
    is the same for the same code)."""
    def total(pattern):
        return sum(int(x) for x in re.findall(pattern, log))

    def most(pattern):
        return max((int(x) for x in re.findall(pattern, log)), default=0)

    return {"registers": most(r"Used (\d+) registers"), "spill_stores": total(r"(\d+) bytes spill stores"),
            "spill_loads": total(r"(\d+) bytes spill loads"), "stack": most(r"(\d+) bytes stack frame"),
            "smem": most(r"(\d+) bytes smem")}


def _relink(keys: list) -> list:
    """As :func:`_compile`, from the LTO-IR kept beside the shipped code (no NVVM)."""
    from fastema._launch import device_code

    manifest = device_code._read_manifest()[0]
    out = []
    for key in keys:
        entry = manifest["variants"][key]
        ir = device_code.member("ltoir", entry)
        ptx, cubins = _link(ir)
        out.append((key, ir, ptx, cubins, entry.get("nvvm_seconds", 0.0)))
    return out


def _compile(keys: list) -> list:
    """``[(key, LTO-IR, PTX, {arch: (cubin, log)}, NVVM seconds)]`` for ``keys`` (one worker's share): NVVM
    once per variant, to LTO-IR for cc 8.0, with the dispatcher's own options (numba-cuda's default path
    where nvJitLink is present: the LTO-IR is optimised again for each architecture at the link, which keeps
    the per-step kernels within their launch bounds without a spill where PTX assembled by ptxas spills)."""
    from fastema._launch.compiler import nvvm
    from fastema._launch.variants import every_variant

    variants = every_variant()
    out = []
    for key in keys:
        t = time.perf_counter()
        dispatcher, types = variants[key]
        ir = nvvm(dispatcher, types, PTX_CC)
        seconds = time.perf_counter() - t
        ptx, cubins = _link(ir)
        out.append((key, ir, ptx, cubins, seconds))
        print(f"{seconds:6.1f} s  {key}", flush=True)
    return out


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def variant_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def main(argv=None) -> int:
    from fastema._launch import device_code
    from fastema._launch.variants import every_variant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="exit 1 when the shipped device code is stale")
    parser.add_argument("--recompile", action="store_true", help="compile every variant again (default: only "
                        "those not shipped for these sources; the others are linked again from their LTO-IR)")
    args = parser.parse_args(argv)
    keys = list(every_variant())
    folder = device_code.device_dir()
    if args.check:
        problem = device_code.stale(keys)
        print(problem or f"the shipped device code is current ({len(keys)} variants)")
        return 1 if problem else 0
    t0 = time.perf_counter()
    current = device_code._read_manifest()[0] or {"variants": {}}
    kept = os.path.exists(os.path.join(folder, "ltoir.xz"))
    reuse = [k for k in keys if kept and "ltoir" in current["variants"].get(k, {}).get("at", {})]
    todo = [k for k in keys if k not in reuse or args.recompile]
    reuse = [k for k in reuse if k not in todo]
    jobs = max(1, args.jobs)
    work = [(_relink, reuse[i::jobs]) for i in range(jobs)] + [(_compile, todo[i::jobs]) for i in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        parts = [pool.apply_async(fn, (share,)) for fn, share in work if share]
        built = [item for part in parts for item in part.get()]
    os.makedirs(folder, exist_ok=True)
    variants, blobs = {}, {arch: bytearray() for arch in ("ltoir", "ptx") + CUBINS}
    for key, ir, ptx, cubins, seconds in sorted(built):
        entries = _ENTRY.findall(ptx.decode())
        if len(entries) != 1:
            raise RuntimeError(f"{key}: expected one kernel entry in its PTX, found {entries}")
        record = {"id": variant_id(key), "entry": entries[0], "nvvm_seconds": round(seconds, 2), "at": {},
                  "sha256": {}, "link": {arch: _figures(log) for arch, (_, log) in cubins.items()}}
        for arch, code in [("ltoir", ir), ("ptx", ptx)] + [(a, c) for a, (c, _) in cubins.items()]:
            record["at"][arch] = [len(blobs[arch]), len(code)]
            record["sha256"][arch] = hashlib.sha256(code).hexdigest()
            blobs[arch] += code
        variants[key] = record
    for arch, blob in blobs.items():
        _write(os.path.join(folder, f"{arch}.xz"), lzma.compress(bytes(blob), preset=9 | lzma.PRESET_EXTREME))
    manifest = {"format": device_code.FORMAT, "sources": device_code.sources_digest(), "built_by": _versions(),
                "ptx": f"compute_{PTX_CC[0]}{PTX_CC[1]}", "cubins": list(CUBINS), "variants": variants}
    tmp = os.path.join(folder, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, "manifest.json"))
    print(f"{len(keys)} variants ({len(todo)} compiled, {len(reuse)} linked again from their LTO-IR), "
          f"{time.perf_counter() - t0:.0f} s with {jobs} jobs: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
