"""The CPU kernels are compiled once per machine: a second process loads them from numba's on-disk
cache (fastema.kernels._cache) instead of compiling them again, and runs them bit for bit alike."""
import importlib.util as importlib_util
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastema.kernels import _cache, cpu
from fastema.kernels.kinds import BF16, F32

# One process: a serial and a parallel lerp (float32 shadow, bfloat16 source: the variants share
# their closure's code and differ only in what it captures) and a copy, on a few thousand elements;
# prints the results' bits and each kernel's cache hits and misses.
CHILD = r"""
import json, sys
import numpy as np
from fastema.kernels import cpu as K
from fastema.kernels.kinds import BF16, F16, F32
from fastema.kernels.layout import chunk_table, segment_offsets

n = 3000
rng = np.random.default_rng(0)
src = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)   # bfloat16 bits
so = segment_offsets([1000, 2000])
cs, cb = chunk_table(so, 512)
flag = np.zeros(1, np.int32)
out, stats = {}, {}
start = rng.standard_normal(n).astype(np.float32).view(np.uint32)
kernels = [("serial", K.lerp_kernel(F32, BF16, False, False)), ("parallel", K.lerp_kernel(F32, BF16, False, True))]
if sys.argv[1] == "second":     # first a variant not in the cache: compiled here, its symbols numbered as the first
    kernels.insert(0, ("float16", K.lerp_kernel(F32, F16, False, False)))   # process numbered the bfloat16 one's
for name, kernel in kernels:
    shadow = start.copy()
    shadow_addr = shadow.ctypes.data + so[:-1] * 4
    src_addr = src.ctypes.data + so[:-1] * 2
    kernel(n, shadow_addr, src_addr, so, cs, cb, (np.float32(0.25),), flag, np.uint32(0))
    out[name] = shadow.tolist()
    stats[name] = kernel.stats
copy = K.copy_kernel(F32, BF16, True, False)
dst = np.zeros(n, np.uint32)
copy(n, dst.ctypes.data + so[:-1] * 4, src.ctypes.data + so[:-1] * 2, so, cs, cb, 0, 1, flag)
out["copy"], stats["copy"] = dst.tolist(), copy.stats
print(json.dumps({"out": out, "hits": {k: sum(s.cache_hits.values()) for k, s in stats.items()},
                  "misses": {k: sum(s.cache_misses.values()) for k, s in stats.items()}}))
"""


def _run(env, which):
    done = subprocess.run([sys.executable, "-c", CHILD, which], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _run_warned(env, which):
    """One CHILD run: its results, and the lines of what it printed on stderr (warnings)."""
    done = subprocess.run([sys.executable, "-c", CHILD, which], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _damage(path, how):
    data = open(path, "rb").read()
    damaged = {"truncated": data[:len(data) // 2], "emptied": b"",
               "garbage": bytes(np.random.default_rng(len(data)).integers(0, 256, len(data), np.uint8))}[how]
    with open(path, "wb") as f:
        f.write(damaged)


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A kernel cache filled by one process on an empty folder, that process's results and the files
    it left (each test copies the folder: the processes of one module share one first compile)."""
    root = tmp_path_factory.mktemp("populated")
    first, _ = _run_warned(dict(os.environ, NUMBA_CACHE_DIR=str(root)), "first")
    return root, first, _files(root)


@pytest.mark.skipif(not _cache.SHARED, reason="this numba's cache internals are unknown: no shared cache")
def test_a_second_process_loads_the_kernels_from_the_cache(populated, tmp_path):
    root, first, files = populated             # the first process, on an empty cache: the fixture's
    shutil.copytree(root, tmp_path / "cache")
    second = _run(dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache")), "second")
    assert first["misses"] == {"serial": 1, "parallel": 1, "copy": 1} and not any(first["hits"].values())
    assert second["misses"].pop("float16") == 1 and second["hits"].pop("float16") == 0
    assert second["hits"] == {"serial": 1, "parallel": 1, "copy": 1} and not any(second["misses"].values())
    after = _files(tmp_path / "cache")
    assert set(files) < set(after) and len(after) == len(files) + 4   # the float16 lerp's
    second["out"].pop("float16")
    assert second["out"] == first["out"]
    assert first["out"]["serial"] == first["out"]["parallel"]
    # one index per compiled function, each holding one entry: 3 kernels, 2 per-chunk functions (the
    # serial and parallel lerps' are the same variant, compiled once), and the copy's element body with
    # the 3 it calls (cpu.E_CALLED: functions of their own, cached as the kernels are)
    assert sum(f.endswith(".nbi") for f in files) == sum(f.endswith(".nbc") for f in files) == 9
    bodies = {os.path.basename(f).split(".v")[0] for f in files if f.endswith(".nbi") and ".locals." not in f}
    assert bodies == {"_elementwise.copy_at", "_elementwise.convert", "_bits.encode", "_bits.decode"}


@pytest.mark.skipif(not _cache.SHARED, reason="this numba's cache internals are unknown: no shared cache")
@pytest.mark.parametrize("suffix, how", [(".nbi", "truncated"), (".nbi", "emptied"), (".nbi", "garbage"),
                                         (".nbc", "truncated"), (".nbc", "emptied"), (".nbc", "garbage")])
def test_a_damaged_cache_file_is_a_miss_compiled_again_and_rewritten(populated, tmp_path, suffix, how):
    """Every index (.nbi) or data (.nbc) file truncated, emptied or overwritten with garbage (a crash or
    a full disk while numba wrote it: numba does not fsync): the next process compiles those kernels
    again, runs them bit for bit as before, rewrites the files and warns once, naming one; the process
    after it loads them from the cache. (Each such process died at its first update with pickle's
    UnpicklingError or EOFError, naming no file, until the cache was deleted.)"""
    root, first, _ = populated
    shutil.copytree(root, tmp_path / "cache")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    damaged = [os.path.join(tmp_path / "cache", f) for f in _files(tmp_path / "cache") if f.endswith(suffix)]
    assert len(damaged) == 9                                 # the kernels, chunks and bodies above
    for path in damaged:
        _damage(path, how)
    second, said = _run_warned(env, "first")
    assert second["out"] == first["out"]
    assert second["misses"] == {"serial": 1, "parallel": 1, "copy": 1} and not any(second["hits"].values())
    warned = [line for line in said.splitlines() if "RuntimeWarning: fastema:" in line and "could not be read" in line]
    assert len(warned) == 1 and any(path in warned[0] for path in damaged), said[-3000:]
    assert "compiled again" in warned[0] and "RuntimeWarning" in warned[0]
    third, said = _run_warned(env, "first")                 # repaired: every kernel from the cache, no warning
    assert third["hits"] == {"serial": 1, "parallel": 1, "copy": 1} and not any(third["misses"].values())
    assert third["out"] == first["out"] and "could not be read" not in said


class _Planted:
    """A pickle that, unpickled, creates the file ``marker``: what anyone who can write a cache folder could
    put there for the next process to run (numba's cache files are pickles)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(root, marker) -> dict:
    """Every index file under ``root`` replaced by a :class:`_Planted` pickle; returns path -> its bytes."""
    planted = {}
    for f in _files(root):
        if f.endswith(".nbi"):
            data = pickle.dumps(_Planted(marker))
            with open(os.path.join(root, f), "wb") as out:
                out.write(data)
            planted[os.path.join(root, f)] = data
    return planted


def _others_can_write(cache, how):
    if how == "world-writable":
        os.chmod(cache, 0o777)
    elif how == "group-writable":          # another group than the user's own
        os.chown(cache, -1, 54321)
        os.chmod(cache, 0o775)
    else:                                   # its subfolder, where numba writes, belongs to another user
        sub = next(os.path.join(cache, d) for d in os.listdir(cache))
        os.chown(sub, 54321, -1)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another user's"])
def test_a_cache_folder_others_can_write_is_not_read_from(populated, tmp_path, how):
    """numba's cache files are pickles, so a file planted in a cache folder others can write would run as
    code in the next fastema process (L7: NUMBA_CACHE_DIR on a shared machine). Such a folder is not read
    from, nor written: the kernels are compiled in memory, with one warning naming the folder and the fix."""
    if how != "world-writable" and os.geteuid() != 0:
        pytest.skip("needs chown (root)")
    root, first, _ = populated
    cache = tmp_path / "cache"
    shutil.copytree(root, cache)
    marker = tmp_path / "planted-code-ran"
    planted = _plant(cache, marker)
    _others_can_write(cache, how)
    got, said = _run_warned(dict(os.environ, NUMBA_CACHE_DIR=str(cache)), "first")
    assert not marker.exists(), "a planted cache file was unpickled"
    assert got["out"] == first["out"]
    assert got["misses"] == {"serial": 1, "parallel": 1, "copy": 1} and not any(got["hits"].values())
    assert all(open(p, "rb").read() == data for p, data in planted.items())     # not rewritten either
    warned = [line for line in said.splitlines() if "RuntimeWarning: fastema:" in line and "cache folder" in line]
    assert len(warned) == 1, said[-3000:]
    words = {"world-writable": "writable by everyone", "group-writable": "writable by group 54321",
             "another user's": "belongs to another user (uid 54321)"}[how]
    assert str(cache) in warned[0] and words in warned[0] and "compiled in memory" in warned[0]
    assert "NUMBA_CACHE_DIR" in warned[0]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_cache_folder_of_ones_own_in_a_sticky_shared_folder_is_used(populated, tmp_path):
    """A cache folder of the user's own inside a folder everyone may write with the sticky bit (/tmp: nobody
    can replace another's entries) is used, with no warning: a second process loads every kernel."""
    root, first, _ = populated
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    shutil.copytree(root, shared / "cache")
    got, said = _run_warned(dict(os.environ, NUMBA_CACHE_DIR=str(shared / "cache")), "first")
    assert got["hits"] == {"serial": 1, "parallel": 1, "copy": 1} and got["out"] == first["out"]
    assert "cache folder" not in said


def test_the_readme_says_the_kernel_cache_is_trusted_as_code():
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    trusts = readme.split("## What fastema trusts")[1].split("\n## ")[0]
    assert "kernel cache" in trusts and "NUMBA_CACHE_DIR" in trusts and "pickle" in trusts


def test_each_variant_is_keyed_by_what_it_captures():
    # The serial and parallel twins capture the same values; their options tell them apart, as the
    # kinds tell the float32 and bfloat16 sources apart. Each name carries its variant's digest.
    variants = [cpu.lerp_kernel(F32, F32, False, False), cpu.lerp_kernel(F32, BF16, False, False),
                cpu.lerp_kernel(F32, BF16, False, True), cpu.lerp_kernel(F32, BF16, True, False)]
    names = {k.py_func.__qualname__ for k in variants}
    assert len(names) == 4 and all(n.startswith("lerp_kernel.<locals>.kernel.v") for n in names)
    assert cpu.lerp_kernel(F32, BF16, False, True).py_func.__qualname__ in names     # built once per process
    serial, parallel = (re.sub(r"kernel\.v[0-9a-f]{32}", "kernel", _cache.describe(k)) for k in variants[1:3])
    assert serial != parallel and serial.replace("'parallel', 'False'", "'parallel', 'True'") == parallel


def test_a_capture_it_cannot_describe_is_refused():
    table = np.zeros(3)

    def kernel(i):
        return table[i]

    with pytest.raises(TypeError, match="cannot key a cached kernel on a captured ndarray"):
        _cache.describe_function(kernel)


def test_digest_tells_near_inputs_apart_and_is_stable():
    from fastema.kernels._store.identity import digest

    a, b = b"SK=int:0 XK=int:1", b"SK=int:1 XK=int:0"
    assert digest(a, size=32) != digest(b, size=32) and digest(b"") != digest(b"\0")
    assert digest(a) == digest(a.decode()) and len(digest(a, size=32)) == 32


def test_no_writable_cache_location_compiles_per_process_and_warns():
    class NoLocation:
        def __init__(self, py_func, variant):
            raise RuntimeError("cannot cache function 'kernel': no locator available for file 'cpu.py'")

    def kernel(x):
        return x + 1

    from numba import njit

    from fastema._launch.cpu import pool as launch_cpu

    with _cache.afresh(), _cache.using(cache_class=NoLocation):
        jitted = _cache.cached(njit(kernel))
        assert jitted(1) == 2 and not any(jitted.stats.cache_hits.values())      # works, uncached
        assert _cache.NOT_CACHED == ["cannot cache function 'kernel': no locator available for file 'cpu.py'"]
        with pytest.warns(RuntimeWarning, match="no writable folder .* set NUMBA_CACHE_DIR to a writable folder"):
            launch_cpu._check_disk_cache()
        with _cache.using(shared=False):
            with pytest.warns(RuntimeWarning, match="cache internals are not the ones fastema knows"):
                launch_cpu._check_disk_cache()
        assert _cache.SHARED
    assert _cache._cache_class() is not NoLocation


# The CUDA kernels' descriptions, keys of their disk cache (issue #23 item 4; the cache itself runs on a
# GPU only: tests/kernels/test_cuda_cache.py). Built, not compiled: no GPU needed.
CUDA_KERNELS = r"""
from fastema.kernels import _cache, cuda as K
from fastema.kernels.kinds import BF16, F16, F32, F64, PACK
kernels = {"lerp f32<-bf16": K.lerp_kernel(F32, BF16, False, True),
           "lerp f32<-f16": K.lerp_kernel(F32, F16, False, True),
           "lerp sr": K.lerp_kernel(BF16, F32, True, True), "plan+lerp": K.plan_lerp_kernel(F32, BF16, False),
           "plan+lerp f64": K.plan_lerp_kernel(F64, F64, False), "copy": K.copy_kernel(F32, BF16, True),
           "copy back": K.copy_kernel(F32, BF16, False), "swap": K.swap_kernel(F32, BF16, PACK),
           "window": K.window_kernel(F64, F32), "plan": K.plan_kernel(), "zero": K.zero_kernel(),
           "streams": K.streams_kernel(F32, 3, True, False), "streams weighted": K.streams_kernel(F64, 2, False, True),
           "bema": K.bema_kernel(F64),
           "nonfinite": K.nonfinite_kernel(F16)}
described = {name: _cache.describe(k) for name, k in kernels.items()}
"""
CUDA_CHILD = CUDA_KERNELS + "import json\nprint(json.dumps(described))\n"


def test_cuda_kernels_are_described_alike_in_every_process():
    """Every CUDA kernel factory's variants have a description (device functions, intrinsics and numba
    types included) that is the same in two processes (this one and a fresh one: other hash seeds,
    other object ids) and differs between variants."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator's kernels are plain Python")
    here: dict = {}
    exec(CUDA_KERNELS, here)
    done = subprocess.run([sys.executable, "-c", CUDA_CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [here["described"], json.loads(done.stdout.strip().splitlines()[-1])]
    assert runs[0] == runs[1]
    assert len(set(runs[0].values())) == len(runs[0])
    assert _cache._cuda_cache_class() is not None          # numba-cuda's internals are the ones known


def test_a_cached_cuda_kernel_is_keyed_by_its_variant_and_gpu(tmp_path, monkeypatch):
    """``cached_cuda`` gives a kernel numba-cuda's cache keyed by the variant's description and the
    codegen's magic tuple (CUDA runtime and compute capability), with the kernels' other sources in the
    stamp; two variants of one closure get two index files."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator has no kernel cache")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    from numba import cuda

    from fastema.kernels import _cuda_jit
    from fastema.kernels import cuda as K
    from fastema.kernels.kinds import BF16, F16, F32

    caches = []
    for xk in (BF16, F16):
        fn = K.lerp_kernel.__wrapped__(F32, xk, False, True).py_func
        k = _cache.cached_cuda(cuda.jit(fn), _cuda_jit.DEPENDENCIES)
        caches.append(k._cache)
    a, b = caches
    codegen = type("Codegen", (), {"magic_tuple": lambda self: ("12.8", (9, 0))})()
    ka, kb = a._index_key(("sig",), codegen), b._index_key(("sig",), codegen)
    assert ka != kb and ka[1] == ("12.8", (9, 0)) and ka[2][1] == _cache.describe(K.lerp_kernel(F32, BF16, False, True))
    assert a._impl.filename_base != b._impl.filename_base
    assert a._cache_file._source_stamp[1] == _cache.sources(_cuda_jit.DEPENDENCIES)


def test_the_cuda_cache_key_holds_numba_cuda_cuda_core_nvvm_and_driver_versions(tmp_path, monkeypatch):
    """numba versions its cache index by numba's own version only, and numba-cuda's magic tuple is NVRTC's
    version and the compute capability: after an upgrade of numba-cuda (or of NVVM, cuda-core or the
    driver) with the same numba and NVRTC, a kernel compiled by the old one was loaded (issue 37, C6).
    The key now holds all four versions (fastema._launch.cuda.tables.cuda_versions, set when the CUDA
    launchers load) besides the magic tuple: a change of any of them, or of the GPU, is a miss."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator has no kernel cache")
    import importlib.metadata as md

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    from numba import cuda

    from fastema._launch.cuda import tables as launch_cuda
    from fastema.kernels import _cuda_jit
    from fastema.kernels import cuda as K
    from fastema.kernels.kinds import BF16, F32

    assert _cache.CUDA_VERSIONS is launch_cuda.cuda_versions
    names = dict(launch_cuda.cuda_versions())
    assert names["numba-cuda"] == md.version("numba-cuda") and names["cuda-core"] == md.version("cuda-core")
    assert set(names) == {"numba-cuda", "cuda-core", "nvvm", "driver"}      # the driver: "unknown" without one
    fn = K.lerp_kernel.__wrapped__(F32, BF16, False, True).py_func
    cache = _cache.cached_cuda(cuda.jit(fn), _cuda_jit.DEPENDENCIES)._cache
    h100, a100 = ((type("Codegen", (), {"magic_tuple": lambda self, cc=cc: ("13.0", cc)})()) for cc in ((9, 0), (8, 0)))
    base = (("numba-cuda", "0.30.4"), ("cuda-core", "1.2.2"), ("nvvm", (2, 0)), ("driver", (13, 0)))
    with _cache.using(cuda_versions=lambda: base):
        key = cache._index_key(("sig",), h100)
        assert cache._index_key(("sig",), h100) == key and cache._index_key(("sig",), a100) != key
    assert (9, 0) in key[1] and dict(key[-1][1]) == dict(base)
    for i, changed in enumerate(["0.30.5", "1.3.0", (2, 1), (13, 1)]):
        other = base[:i] + ((base[i][0], changed),) + base[i + 1:]
        with _cache.using(cuda_versions=lambda other=other: other):
            assert cache._index_key(("sig",), h100) != key, base[i][0]
    assert _cache.CUDA_VERSIONS is launch_cuda.cuda_versions


def test_fastema_cuda_cache_turns_the_cuda_kernel_cache_on(tmp_path):
    """FASTEMA_CUDA_CACHE=1, read where fastema's launch layer first needs the kernels' dispatchers
    (``kernel_refs.kernels()``: a variant not shipped, the dispatcher path, the build), gives the
    kernels built from then on the keyed disk cache; without it they have none (numba-cuda's default)."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator has no kernel cache")
    child = ("from fastema._launch.cuda import kernel_refs; K = kernel_refs.kernels(); "
             "from fastema.kernels.kinds import F32; print(type(K.lerp_kernel(F32, F32, False)._cache).__name__)")
    names = []
    for value in ("1", "0"):
        env = dict(os.environ, FASTEMA_CUDA_CACHE=value, NUMBA_CACHE_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        names.append(done.stdout.strip().splitlines()[-1])
    assert names == ["CUDAVariantCache", "NullCache"]


def test_intrinsics_of_one_name_for_different_types_are_described_apart():
    """The pointer and vector intrinsics are built per element type under one name (``typed_pointer``,
    ``load4``): a kernel capturing only one of them must not share another's cache key."""
    from fastema.kernels._cpu_hw import HW as CPU_HW

    described = [_cache.describe(CPU_HW[k]) for k in ("u32_pointer", "u16_pointer", "f64_pointer")]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and importlib_util.find_spec("numba.cuda") is not None:
        from fastema.kernels._cuda_hw import HW, VECTORS

        described += [_cache.describe(HW[k]) for k in ("u32_pointer", "u16_pointer", "f64_pointer")]
        described += [_cache.describe(VECTORS[k]) for k in ("load4_u32", "load4_u16")]
    assert len(set(described)) == len(described), described
