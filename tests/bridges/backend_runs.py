"""Scripts that need a process of their own: Keras on the TensorFlow or JAX backend (Keras picks its
backend once per process), JAX with two (fake) CPU devices, or four (a 2x2 mesh).

Every test module registers its scripts when it is imported (:func:`script`). The first test that
asks for a result on a backend (:func:`run_on`) starts ONE subprocess for that backend, which then
runs each script when a test asks for it, each in a namespace of its own: one TensorFlow or JAX
start-up (and one numba JIT) per backend for the whole test session, and each test pays for its
own script only (plus the start-up, for the first one), whatever else is registered or selected.
A script prints JSON as its last line; :func:`run_on` returns it parsed.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time

#: backend -> script name -> source, in registration order
SCRIPTS: dict[str, dict[str, str]] = {}
_RESULTS: dict[str, dict[str, dict]] = {}

#: the environment of each backend's subprocess (CPU only); JAX gets two CPU devices (sharded arrays)
_COMMON = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
ENV = {
    "tensorflow": {**_COMMON, "KERAS_BACKEND": "tensorflow"},
    "jax": {**_COMMON, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    # a 2x2 mesh of CPU devices: fastema.jax.ema() under NamedSharding and shard_map (test_jax_sharded.py)
    "jax4": {**_COMMON, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
}

#: seconds one script may take (its backend's start-up included) before its process is killed
TIMEOUT = 900

# Reads one request a line ({"name", "source"}) and answers each with one line, "@@ name {json}".
RUNNER = r"""
import contextlib, io, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])                               # tests/, for models.py
requests, sys.stdin = sys.stdin, open(os.devnull)             # a script reads no request
for line in requests:
    request = json.loads(line)
    name, out = request["name"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(request["source"], name, "exec"), {"__name__": "__main__"})
        result = {"stdout": out.getvalue()}
    except BaseException:
        result = {"stdout": out.getvalue(), "error": traceback.format_exc()}
    print("@@", name, json.dumps(result), flush=True)
"""


def script(name: str, source: str, backends: tuple[str, ...]) -> None:
    """Register ``source`` to run as ``name`` on each of ``backends``."""
    for backend in backends:
        SCRIPTS.setdefault(backend, {})[name] = source


class _Process:
    """One backend's subprocess, running the scripts it is sent, one at a time."""

    def __init__(self, backend: str):
        self.backend = backend
        self.stderr = tempfile.TemporaryFile()                # never a full pipe, whatever the backend logs
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(pathlib.Path(__file__).parents[1])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, **ENV[backend]})
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)                                  # the process has ended

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:].decode(errors="replace")

    def run(self, name: str) -> dict:
        """Run the script ``name``; its result, or AssertionError when the process died or hung."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"name": name, "source": SCRIPTS[self.backend][name]}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass                                              # it died: the reader says so below
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(f"{self.backend} script {name} ran past {TIMEOUT} s: {self.stderr_tail()}")
            if line is None:
                code = self.proc.wait()
                raise AssertionError(f"the {self.backend} process ended (status {code}) in {name}: "
                                     f"{self.stderr_tail()}")
            if line.startswith(f"@@ {name} "):
                return json.loads(line.split(" ", 2)[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()                       # the runner's loop ends
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


_PROCESSES: dict[str, _Process] = {}


@atexit.register
def _close_all() -> None:
    for p in _PROCESSES.values():
        p.close()


def run_on(backend: str, name: str):
    """The JSON the script ``name`` printed last, run on ``backend`` in that backend's subprocess
    (started at the first call; started again after a script killed it)."""
    results = _RESULTS.setdefault(backend, {})
    if name not in results:
        process = _PROCESSES.get(backend)
        if process is None or process.proc.poll() is not None:
            if process is not None:
                process.close()
            process = _PROCESSES[backend] = _Process(backend)
        results[name] = process.run(name)
    result = results[name]
    assert "error" not in result, result["error"][-3000:]
    return json.loads(result["stdout"].strip().splitlines()[-1])
