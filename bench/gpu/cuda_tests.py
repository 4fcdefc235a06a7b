#!/usr/bin/env python3
"""The CUDA tests of the GPU command (the second part of ``bash bench/gpu/run.sh all``, issue 63): two
pytest runs one after the other, each test named with its result, seconds and NVVM calls as it
ends (``bench/gpu/testlog.py``), all into ``OUTDIR/cuda-tests.log`` as it is printed:

    python3 -m bench.gpu.cuda_tests OUTDIR [--budget S] [--workers N] [--simulate] [-- PYTEST ARGS]

1. ``-m "cuda and not compiles"``: the files in :data:`PRIORITY` order (the kernels and the launch
   path first), then any other file with a ``cuda`` mark, each test at most ``TEST_TIMEOUT``
   seconds (pytest-timeout, where installed); none compiles a kernel (``tests/support/shipped.py``
   fails one that does);
2. ``-m "cuda and compiles"`` (the run-time compile path, torch.compile): last, with what is left
   of the budget, each test at most ``COMPILE_TIMEOUT`` seconds, if ``MIN_LAST`` are left; on
   ``COMPILE_WORKERS`` pytest-xdist workers (not in the simulator): each of these tests spends its
   time compiling on the CPU (NVVM in child processes, inductor and Triton), and the machine has 16
   cores.

Only the files that hold cuda tests are collected (every other test module's imports, TensorFlow,
JAX, transformers..., would cost each run tens of seconds). One process by default (the files run
in the order given); ``--workers N``: pytest-xdist's ``-n N --dist load`` for the first run. A run
is stopped at the budget's end (default 220 s for both; the second gets what the first left), its
output kept, and so is it when this process is sent SIGTERM (an outer ``timeout``). The last
line, ``[tests] N passed, N failed, ... in S s (done)``, counts the ``[test]`` lines.
``--simulate``: the Numba CUDA simulator, each run cut to a few tests (CI). Exit status: 1 when a
test failed or erred, 124 when the budget ran out first, else 0.
"""
from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLUGIN = os.path.relpath(os.path.join(HERE, "testlog"), ROOT).replace(os.sep, ".")
PRIORITY = ["tests/kernels/test_cuda.py", "tests/kernels/test_cuda_vector16.py",
            "tests/kernels/test_cuda_scan.py", "tests/kernels/test_bema_cuda.py",
            "tests/torch/test_target_cuda.py", "tests/torch/placement/test_offload_cuda.py",
            "tests/array/test_flat_split.py", "tests/array/test_chunks.py",
            "tests/array/test_smooth.py", "tests/schedules/test_merge_schedules.py",
            "tests/schedules/test_momentum_schedules.py"]
"""The CUDA test files, most important first: the kernels against the CPU, the launch path, torch
on a GPU (streams, graphs, capture), then the faces and the array layer."""
TEST_TIMEOUT, COMPILE_TIMEOUT, MIN_LAST, COMPILE_WORKERS = 60, 150, 20, 3
SIMULATED = {"not compiles": ["tests/kernels/test_cuda.py", "-k",
                              "test_ema_update_on_device_arrays_matches_cpu or "
                              "test_flat_shadow_on_device_arrays"],
             "compiles": ["tests/kernels/test_cuda_cache.py"]}
"""The simulator's cut: two small tests, and one module that skips itself there."""
_CHILD: list = []
"""The pytest process running now (its process group is stopped with it)."""


def cuda_files(marker: str = "mark.cuda") -> list:
    """The test files that hold ``marker``: PRIORITY's first, in its order, then the others."""
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        for name in names:
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    if marker in f.read():
                        found.append(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return [f for f in PRIORITY if f in found] + sorted(set(found) - set(PRIORITY))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _say(log, line: str) -> None:
    for stream in (sys.stdout, log):
        stream.write(line + "\n")
        stream.flush()


def _stop_child() -> None:
    for p in _CHILD:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(args: list, seconds: float, log) -> int:
    """pytest with ``args``, its output copied to ``log`` and stdout line by line; stopped (its
    whole process group) after ``seconds``: its exit status, 124 where stopped."""
    t0 = time.monotonic()
    _say(log, f"pytest {shlex.join(args)}")
    p = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, errors="replace",
                         start_new_session=True)
    _CHILD[:] = [p]
    stopped = []

    def stop(*_):
        stopped.append(True)
        _stop_child()

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        for text in p.stdout:
            for out in (sys.stdout, log):
                out.write(text)
                out.flush()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    rc = p.wait()
    _CHILD.clear()
    if stopped:
        _say(log, f"[tests] stopped at the budget's end after {time.monotonic() - t0:.0f} s: "
                  f"the tests above ran")
        rc = 124
    return rc


def count(text: str) -> collections.Counter:
    """The ``[test]`` lines' outcomes in ``text``."""
    return collections.Counter(re.findall(r"^\[test\] (\w+) ", text, re.M))


def _terminated(*_) -> None:
    _stop_child()
    raise SystemExit(124)


def main(argv) -> int:
    import argparse

    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "tests-out"))
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for both runs")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (1: none)")
    ap.add_argument("--simulate", action="store_true", help="the simulator, a few tests (CI)")
    opts = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if opts.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    simulate = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    signal.signal(signal.SIGTERM, _terminated)
    os.makedirs(opts.out, exist_ok=True)
    common = ["-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", "-p", PLUGIN, "--durations=15"]
    workers = {"not compiles": opts.workers, "compiles": 1 if simulate else COMPILE_WORKERS}
    t0, status = time.monotonic(), 0
    path = os.path.join(opts.out, "cuda-tests.log")
    with open(path, "w", encoding="utf-8") as log:
        for phase, per_test in (("not compiles", TEST_TIMEOUT), ("compiles", COMPILE_TIMEOUT)):
            left = opts.budget - (time.monotonic() - t0)
            if phase == "compiles" and left < MIN_LAST:
                _say(log, f"[tests] the compiles run was not started: {left:.0f} s left")
                status = status or 124
                break
            if simulate:
                files = SIMULATED[phase]
            else:
                files = cuda_files() if phase == "not compiles" else cuda_files("mark.compiles")
            args = [*files, "-m", f"cuda and {phase}", *common, *extra]
            if workers[phase] > 1 and _has("xdist"):
                args += ["-n", str(workers[phase]), "--dist", "load"]
            if _has("pytest_timeout"):
                args += ["--timeout", str(int(min(per_test, left)))]
            rc = _run(args, left, log)
            if rc == 124:
                status = 124
                if phase == "not compiles":
                    _say(log, "[tests] the compiles run was not started: the budget is spent")
                break
            if rc not in (0, 5):                          # 5: nothing collected (none here)
                status = status or 1
        with open(path, encoding="utf-8") as f:
            seen = count(f.read())
        total = ", ".join(f"{n} {word.lower()}" for word, n in sorted(seen.items())) or "no tests"
        how = "stopped at the budget" if status == 124 else "done"
        _say(log, f"[tests] {total} in {time.monotonic() - t0:.1f}s ({how})")
    if (seen.get("FAILED") or seen.get("ERROR")) and status != 124:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
