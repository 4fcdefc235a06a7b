"""The tools that read the shipped code: ``nvdisasm`` found, run on a cubin, and why the sm_90 code
of a set cannot be read here."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def nvdisasm() -> str | None:
    """The path of ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, or one on PATH), or None."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("nvdisasm")
        if found:
            return str(found)
    except Exception:                          # noqa: BLE001 - an older cuda-pathfinder, or none
        pass
    return shutil.which("nvdisasm")


def toolchain_problem(source: str = "cu13") -> str | None:
    """Why the shipped sm_90 code of set ``source`` cannot be read here (what to do), or None."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "reads the real target's code, not the simulator's"
    if nvdisasm() is None:
        return "needs nvdisasm: pip install nvidia-cuda-nvdisasm (the cuda extra)"
    try:
        from fastema._launch import device_code

        return device_code.problem(source)
    except ImportError as err:
        return f"needs numba-cuda: pip install 'fastema[cuda]' ({err.__class__.__name__}: {err})"


def disassemble(cubin: bytes, folder: Path, stem: str) -> str:
    """``nvdisasm -c`` of ``cubin`` (written to ``folder/stem.cubin``)."""
    path = folder / f"{stem}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([nvdisasm(), "-c", str(path)], capture_output=True, text=True, check=True)
    return out.stdout
