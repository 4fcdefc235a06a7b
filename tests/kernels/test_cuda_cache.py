"""CUDA kernels cached on disk (issue #23 item 4, ``FASTEMA_CUDA_CACHE=1``): a second process loads the
kernels a first one compiled, and they compute the same bits. Runs on a GPU only (the simulator
compiles nothing); the descriptions that key the cache are checked on the CPU in test_kernel_cache.py.
Once this passes on a GPU, the cache can be switched on by default (kernels._cuda_jit.CACHE)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cuda, pytest.mark.compiles]   # numba's dispatcher compiles (in children)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator compiles no kernel to cache", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("hardware: numba's dispatcher compiles and loads through a real driver", allow_module_level=True)

CHILD = r"""
import json, time
import numpy as np
from numba import cuda
from fastema._launch.cuda import kernel_refs
from fastema.kernels import _cuda_jit
K = kernel_refs.kernels()                      # kernels.cuda, its dispatcher cache switched by FASTEMA_CUDA_CACHE
from fastema.kernels.kinds import BF16, F32
from fastema.kernels.layout import chunk_table, segment_offsets

assert _cuda_jit.CACHE
n = 5000
rng = np.random.default_rng(0)
src = cuda.to_device((rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
shadow = cuda.to_device(rng.standard_normal(n).astype(np.float32).view(np.uint32))
so = segment_offsets([1000, 4000])
cs, cb = chunk_table(so, 1024)
addr = lambda d: d.device_ctypes_pointer.value
tables = [cuda.to_device(a) for a in (addr(shadow) + so[:-1] * 4, addr(src) + so[:-1] * 2, so, cs, cb)]
flag = cuda.to_device(np.zeros(1, np.int32))
start = time.perf_counter()
lerp, copy = K.lerp_kernel(F32, BF16, False, False), K.copy_kernel(F32, BF16, False)
lerp[4, 128](n, *tables, (np.float32(0.25),), flag, np.uint32(0))
out = shadow.copy_to_host().tolist()
copy[4, 128](n, *tables, 0, 1, flag)                   # the sources <- the shadow row
cuda.synchronize()
seconds = time.perf_counter() - start
stats = {name: k.stats for name, k in (("lerp", lerp), ("copy", copy))}
print(json.dumps({"out": out, "back": src.copy_to_host().tolist(), "seconds": seconds,
                  "hits": {k: sum(s.cache_hits.values()) for k, s in stats.items()},
                  "misses": {k: sum(s.cache_misses.values()) for k, s in stats.items()}}))
"""


def _run(env):
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_cuda_kernels_from_the_cache(tmp_path):
    env = dict(os.environ, FASTEMA_CUDA_CACHE="1", NUMBA_CACHE_DIR=str(tmp_path))
    first, second = _run(env), _run(env)
    assert first["misses"] == {"lerp": 1, "copy": 1} and first["hits"] == {"lerp": 0, "copy": 0}
    assert second["hits"] == {"lerp": 1, "copy": 1} and second["misses"] == {"lerp": 0, "copy": 0}
    assert second["out"] == first["out"] and second["back"] == first["back"]
    print(f"first process {first['seconds']:.2f} s, second {second['seconds']:.2f} s")
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path) for f in fs)


def test_a_damaged_cuda_cache_file_is_a_miss_compiled_again_and_rewritten(tmp_path):
    """The CUDA kernels' index and data files (the CPU ones' format) truncated: the next process compiles
    the kernels again with the same bits, warns once naming a file and rewrites them; the one after loads
    them (test_kernel_cache.py damages the CPU ones every way)."""
    env = dict(os.environ, FASTEMA_CUDA_CACHE="1", NUMBA_CACHE_DIR=str(tmp_path))
    first = _run(env)
    damaged = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith((".nbi", ".nbc"))]
    assert damaged
    for path in damaged:
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    warned = [line for line in done.stderr.splitlines() if "RuntimeWarning: fastema:" in line and
              "could not be read" in line]
    assert len(warned) == 1 and any(path in warned[0] for path in damaged), done.stderr[-3000:]
    assert second["misses"] == {"lerp": 1, "copy": 1} and second["out"] == first["out"]
    third = _run(env)
    assert third["hits"] == {"lerp": 1, "copy": 1} and third["out"] == first["out"]
