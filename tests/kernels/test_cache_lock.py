"""One compile per node for the CPU kernels (issue 54 item 3, fastema.kernels._cache_node): processes
started at once on one empty cache compile each kernel once in total, the others wait and load it; a
damaged entry is still compiled again (once); the index stamp is the source's content, not its mtime;
the default folder, where the package folder is read-only, is node-local."""
import json
import os
import subprocess
import sys
import time

import pytest
from compile_count import COUNT_COMPILES

from fastema.kernels import _cache
from fastema.kernels._store import files

pytestmark = pytest.mark.skipif(not _cache.SHARED, reason="this numba's cache internals are unknown: no shared cache")

# One process of several started at once: says it is ready (argv[1]/ready-<argv[2]>), waits for
# argv[1]/go, then makes a first update's kernels (a serial and a parallel lerp, float32 shadow and
# bfloat16 source, and a copy). Prints every fastema kernel numba compiled here (counted at numba's
# compile event, which fires only where nothing was loaded from the cache), the hits and the bits.
CHILD = COUNT_COMPILES + r"""
import json, os, sys, time
import numpy as np
from fastema.kernels import cpu as K
from fastema.kernels.kinds import BF16, F32
from fastema.kernels.layout import chunk_table, segment_offsets

folder, me = sys.argv[1], sys.argv[2]
open(os.path.join(folder, f"ready-{me}"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.005)
n = 3000
rng = np.random.default_rng(0)
src = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
so = segment_offsets([1000, 2000])
cs, cb = chunk_table(so, 512)
flag = np.zeros(1, np.int32)
out, hits = {}, {}
for name, parallel in [("serial", False), ("parallel", True)]:
    kernel = K.lerp_kernel(F32, BF16, False, parallel)
    shadow = np.full(n, 0x3f800000, np.uint32)                      # float32 1.0
    kernel(n, shadow.ctypes.data + so[:-1] * 4, src.ctypes.data + so[:-1] * 2, so, cs, cb, (np.float32(0.25),), flag,
           np.uint32(0))
    out[name], hits[name] = shadow.tolist(), sum(kernel.stats.cache_hits.values())
copy = K.copy_kernel(F32, BF16, True, False)
dst = np.zeros(n, np.uint32)
copy(n, dst.ctypes.data + so[:-1] * 4, src.ctypes.data + so[:-1] * 2, so, cs, cb, 0, 1, flag)
out["copy"], hits["copy"] = dst.tolist(), sum(copy.stats.cache_hits.values())
print(json.dumps({"compiled": compiled, "hits": hits, "out": out}))
"""


def _at_once(cache, folder, count: int) -> list:
    """``count`` CHILD processes on the cache folder ``cache``, released together once all are ready
    (imports done); each one's report."""
    folder.mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(count)]
    deadline = time.monotonic() + 120
    while sum(f.name.startswith("ready-") for f in folder.iterdir()) < count and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (folder / "go").touch()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def _once_each(reports) -> list:
    """Every kernel compiled by the processes of ``reports``, checking that none was compiled twice."""
    compiled = [name for r in reports for name in r["compiled"]]
    assert len(compiled) == len(set(compiled)), compiled
    return compiled


def test_processes_started_at_once_on_an_empty_cache_compile_each_kernel_once(tmp_path):
    """4 processes (one thread each) released at once on one empty cache folder: none fails, each
    kernel (the three launched and the per-chunk functions they call) is compiled by one process in
    all, and the others load it: they waited on its lock rather than compiling it too. Then every
    data file damaged: 3 processes at once compile each kernel again, once in all, and get the same bits."""
    cache = tmp_path / "cache"
    reports = _at_once(cache, tmp_path / "run1", 4)
    compiled = _once_each(reports)
    assert sum(".<locals>.kernel." in name for name in compiled) == 3, compiled         # the lerps and the copy
    assert len(compiled) >= 4                                                 # + their per-chunk functions
    for name in ("serial", "parallel", "copy"):                               # each loaded by the 3 that waited
        assert sum(r["hits"][name] for r in reports) == 3
    assert all(r["out"] == reports[0]["out"] for r in reports)

    for d, _, names in os.walk(cache):
        for f in names:
            if f.endswith(".nbc"):
                with open(os.path.join(d, f), "wb") as out:
                    out.write(b"not a pickle")
    again = _at_once(cache, tmp_path / "run2", 3)
    assert sorted(_once_each(again)) == sorted(compiled)
    assert all(r["out"] == reports[0]["out"] for r in again)


# A kernel module of its own (argv[1]: its folder), cached by fastema's CPU cache; prints hits and misses.
STAMPED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import stamped
print(json.dumps({"result": stamped.f(1), "hits": sum(stamped.f.stats.cache_hits.values()),
                  "misses": sum(stamped.f.stats.cache_misses.values()), "path": stamped.f.stats.cache_path}))
"""

MODULE = """from numba import njit
from fastema.kernels._cache import cached

# {comment}


def f(x):
    return x + 1


f = cached(njit(f))
"""


def _stamped(folder, env):
    done = subprocess.run([sys.executable, "-c", STAMPED, str(folder)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_index_stamp_is_the_source_content_not_its_mtime(tmp_path):
    """A touched (or reinstalled) unchanged file keeps its cached kernel; an edit, even one of the same
    size with the old mtime put back (which a (mtime, size) stamp cannot see), drops it."""
    folder = tmp_path / "module"
    folder.mkdir()
    source = folder / "stamped.py"
    source.write_text(MODULE.format(comment="version a"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = _stamped(folder, env)
    assert (first["result"], first["hits"], first["misses"]) == (2, 0, 1)
    st = source.stat()
    os.utime(source, (st.st_atime + 3600, st.st_mtime + 3600))                # touched: a hit
    touched = _stamped(folder, env)
    assert (touched["hits"], touched["misses"], touched["path"]) == (1, 0, first["path"])
    source.write_text(MODULE.format(comment="version b"))                      # same size, old mtime back: a miss
    os.utime(source, (st.st_atime + 3600, st.st_mtime + 3600))
    assert source.stat().st_size == st.st_size
    got = _stamped(folder, env)
    assert (got["result"], got["hits"], got["misses"]) == (2, 0, 1)
    again = _stamped(folder, env)                                              # and that one is cached
    assert (again["hits"], again["misses"]) == (1, 0)


# The package folder read-only (numba's in-tree locator finds it unwritable) and NUMBA_CACHE_DIR unset.
READ_ONLY = r"""
import json, sys
from numba.core import caching
caching.InTreeCacheLocator.from_function = classmethod(lambda cls, py_func, py_file: None)
sys.path.insert(0, sys.argv[1])
import stamped
print(json.dumps({"result": stamped.f(1), "path": stamped.f.stats.cache_path}))
"""


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX user ids")
def test_where_the_package_folder_is_read_only_the_default_folder_is_node_local(tmp_path):
    folder = tmp_path / "module"
    folder.mkdir()
    (folder / "stamped.py").write_text(MODULE.format(comment="node"))
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path / "tmp")
    done = subprocess.run([sys.executable, "-c", READ_ONLY, str(folder)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    root = tmp_path / "tmp" / f"fastema-{os.getuid()}"
    assert got["result"] == 2 and got["path"].startswith(str(root / "numba") + os.sep)
    assert (root.stat().st_mode & 0o777) == 0o700
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(root / "numba") for f in fs)


def test_a_lock_held_elsewhere_is_waited_for_then_given_up_after_the_timeout(tmp_path):
    """A lock another open file holds is waited for, then given up: TimeoutError before the body
    runs (the caller compiles in memory: tests/faults/test_faults_caches.py)."""
    path = str(tmp_path / "entry")
    with files.locked(path) as held:
        assert held
        t = time.monotonic()
        with pytest.raises(TimeoutError):           # another open file: flock conflicts with it
            with files.locked(path, timeout=0.2):
                raise AssertionError("the body ran without the lock")
        assert 0.2 <= time.monotonic() - t < 2
    with files.locked(path, timeout=0.2) as again:          # released: had at once
        assert again


def test_the_locks_live_in_the_node_local_folder_one_per_index():
    a, b = files.lock_path("/x/one.nbi"), files.lock_path("/y/one.nbi")
    assert a != b and os.path.dirname(a) == os.path.join(files.node_folder(), "locks")
