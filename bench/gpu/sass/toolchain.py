"""The tools that read the shipped code: ``nvdisasm`` found, run on a cubin, and why the sm_90 code
of a set cannot be read here."""
from __future__ import annotations

import hashlib
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
        from fastema._launch.cuda import device_code

        return device_code.problem(source)
    except ImportError as err:
        return f"needs numba-cuda: pip install 'fastema[cuda]' ({err.__class__.__name__}: {err})"


#: Disassemblies kept by the cubin's and the tool's digest (``bench/out/``, ignored by git): CI's machine-code
#: tests and its sass gate read the same shipped cubins, so the gate reads the tests' text instead of running
#: nvdisasm 80 times again. The text is plain (no pickle), keyed by what made it.
CACHE = Path(__file__).resolve().parents[2] / "out" / "sass-cache"


def _tool_id(tool: str) -> str:
    st = os.stat(tool)
    return f"{os.path.realpath(tool)}:{st.st_size}:{st.st_mtime_ns}"


def disassemble(cubin: bytes, folder: Path, stem: str, cache: Path | None = CACHE) -> str:
    """``nvdisasm -c`` of ``cubin`` (written to ``folder/stem.cubin``), or the text kept in ``cache`` for the
    same cubin and the same nvdisasm (None: no cache)."""
    tool = nvdisasm()
    if tool is None:
        raise RuntimeError(toolchain_problem() or "nvdisasm not found")
    key = hashlib.sha256(cubin + b"\0" + _tool_id(tool).encode()).hexdigest()
    kept = cache / f"{key}.sass" if cache is not None else None
    if kept is not None and kept.is_file():
        return kept.read_text()
    path = folder / f"{stem}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
        tmp.write_text(out.stdout)
        os.replace(tmp, kept)                                # whole or absent: two readers never see half
    return out.stdout
