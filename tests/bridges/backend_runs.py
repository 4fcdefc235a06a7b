"""Scripts that need a process of their own: Keras on the TensorFlow or JAX backend (Keras picks its
backend once per process), JAX with two (fake) CPU devices.

Every test module registers its scripts when it is imported (:func:`script`); the first test that
asks for a result (:func:`run_on`) runs every script registered for that backend in ONE subprocess,
each in a namespace of its own: one TensorFlow or JAX start-up (and one numba JIT) per backend for
the whole test session. A script prints JSON as its last line; :func:`run_on` returns it parsed.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

#: backend -> script name -> source, in registration order
SCRIPTS: dict[str, dict[str, str]] = {}
_RESULTS: dict[str, dict[str, dict]] = {}

#: the environment of each backend's subprocess (CPU only); JAX gets two CPU devices (sharded arrays)
_COMMON = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
ENV = {
    "tensorflow": {**_COMMON, "KERAS_BACKEND": "tensorflow"},
    "jax": {**_COMMON, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
}

RUNNER = r"""
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])                               # tests/, for models.py
for name, src in zip(sys.argv[2::2], sys.argv[3::2]):          # each script in a namespace of its own
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(src, name, "exec"), {"__name__": "__main__"})
        result = {"stdout": out.getvalue()}
    except BaseException:
        result = {"stdout": out.getvalue(), "error": traceback.format_exc()}
    print("@@", name, json.dumps(result), flush=True)
"""


def script(name: str, source: str, backends: tuple[str, ...]) -> None:
    """Register ``source`` to run as ``name`` on each of ``backends``."""
    for backend in backends:
        SCRIPTS.setdefault(backend, {})[name] = source


def _run(backend: str, names: list[str]) -> None:
    args = [a for name in names for a in (name, SCRIPTS[backend][name])]
    out = subprocess.run([sys.executable, "-c", RUNNER, str(pathlib.Path(__file__).parents[1]), *args],
                         capture_output=True, text=True, timeout=900, env={**os.environ, **ENV[backend]})
    assert out.returncode == 0, out.stderr[-3000:]
    results = _RESULTS.setdefault(backend, {})
    for line in out.stdout.splitlines():
        if line.startswith("@@ "):
            _, name, result = line.split(" ", 2)
            results[name] = json.loads(result)
    lost = [n for n in names if n not in results]
    assert not lost, f"no result from {lost}: {out.stderr[-3000:]}"


def run_on(backend: str, name: str):
    """The JSON the script ``name`` printed last, run on ``backend`` (with every script registered
    for it and not run yet, in one subprocess)."""
    if name not in _RESULTS.get(backend, {}):
        _run(backend, [n for n in SCRIPTS[backend] if n not in _RESULTS.get(backend, {})])
    result = _RESULTS[backend][name]
    assert "error" not in result, result["error"][-3000:]
    return json.loads(result["stdout"].strip().splitlines()[-1])
