#!/usr/bin/env python3
"""The versions a GPU run depends on, one ``key=value`` a line (part 1 of ``bash bench/gpu/run.sh all``
writes them to ``env.txt``; ``bench/gpu/summary.py`` reads ``driver``, ``numba-cuda``, ``cuda-core``
and ``cached_launch`` from it):

    python -m bench.gpu.versions ENV_TXT [--simulate]

The driver from ``nvidia-smi``; Python; the packages from their metadata (whichever copy comes first
on ``sys.path``: a numpy put on ``PYTHONPATH`` by ``bench/gpu/env.sh`` too); the numpy actually
imported and whether it has ``row_stack`` (numba-cuda 0.30 needs it); NVVM's version as numba-cuda
loads it, the libnvvm and libnvJitLink files it loads, and the CUDA runtime's; whether fastema's
cached launch is in use; what ``bench/gpu/env.sh`` did (``GPU_NUMPY_FIX``, ``GPU_FASTEMA_INSTALL``).
A value that cannot be read says why. Each line is also printed.
"""
import os
import sys

if "--simulate" in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import importlib.metadata as md  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402

PACKAGES = ("torch", "numba", "numba-cuda", "cuda-core", "cuda-bindings", "cuda-pathfinder", "llvmlite", "numpy",
            "nvidia-nvjitlink", "nvidia-nvjitlink-cu13", "nvidia-nvjitlink-cu12", "cuda-toolkit", "nvidia-cuda-nvcc",
            "nvidia-cuda-runtime", "pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "ml_dtypes", "jax",
            "cupy-cuda13x", "fastema")


def _why(e: BaseException) -> str:
    return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


def lines():
    """(key, value) pairs, as they are read (a hang later leaves the earlier ones written)."""
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    yield "simulator", sim
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        name, driver, mem = (f.strip() for f in smi.stdout.splitlines()[0].split(","))
        yield from [("gpu", name), ("driver", driver), ("gpu_memory", mem)]
    except Exception as e:                              # noqa: BLE001 - no nvidia-smi (CI) or no GPU
        yield from [("gpu", _why(e)), ("driver", "none")]
    yield ("python", f"{platform.python_version()} ({sys.executable})")
    for pkg in PACKAGES:
        try:
            yield (pkg, md.version(pkg))
        except md.PackageNotFoundError:
            if not pkg.startswith(("nvidia-nvjitlink-", "cupy")):
                yield (pkg, "not installed")
    try:
        import numpy

        yield from [("numpy_imported", f"{numpy.__version__} ({os.path.dirname(numpy.__file__)})"),
                ("numpy_row_stack", "row_stack" in vars(numpy))]
    except Exception as e:                              # noqa: BLE001
        yield ("numpy_imported", _why(e))
    yield from [("numpy_fix", os.environ.get("GPU_NUMPY_FIX", "not run through bench/gpu/env.sh")),
            ("fastema_install", os.environ.get("GPU_FASTEMA_INSTALL", "not run through bench/gpu/env.sh"))]
    try:
        from numba.cuda.cudadrv import nvvm

        yield from [("nvvm", nvvm.NVVM().get_version()), ("nvvm_ir", nvvm.NVVM().get_ir_version())]
    except Exception as e:                              # noqa: BLE001 - the simulator has no NVVM
        yield ("nvvm", _why(e))
    for lib in ("nvvm", "nvJitLink"):                   # which files numba-cuda loads (cuda-pathfinder)
        try:
            from cuda import pathfinder

            yield (f"{lib}_lib", pathfinder.load_nvidia_dynamic_lib(lib).abs_path)
        except Exception as e:                          # noqa: BLE001
            yield (f"{lib}_lib", _why(e))
    try:
        from numba import cuda

        yield ("cuda_runtime", cuda.runtime.get_version())
        if not sim:
            yield ("cuda_driver_api", cuda.cudadrv.driver.driver.get_version())  # type: ignore[attr-defined]
    except Exception as e:                              # noqa: BLE001
        yield ("cuda_runtime", _why(e))
    try:
        import torch

        yield from [("torch_cuda", torch.version.cuda), ("torch_sees_gpu", torch.cuda.is_available())]
        if torch.cuda.is_available():
            yield from [("torch_gpu", torch.cuda.get_device_name(0)),
                    ("compute_capability", "%d.%d" % torch.cuda.get_device_capability(0))]
    except Exception as e:                              # noqa: BLE001
        yield ("torch_cuda", _why(e))
    try:
        import fastema
        from fastema._launch.cuda.launch import cached_launch_available

        yield from [("fastema_from", os.path.dirname(fastema.__file__)),
                ("cached_launch", cached_launch_available())]
    except Exception as e:                              # noqa: BLE001
        yield ("cached_launch", _why(e))


def main(argv) -> int:
    args = [a for a in argv if not a.startswith("--")]
    path = args[0] if args else None
    fh = open(path, "w") if path else None
    try:
        for key, value in lines():
            line = f"{key}={value}"
            print(line, flush=True)
            if fh:
                fh.write(line + "\n")
                fh.flush()
    finally:
        if fh:
            fh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
