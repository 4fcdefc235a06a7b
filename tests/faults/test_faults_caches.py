"""The kernel caches never stop an update (reliability round 7: H4, L1-L6).

- A cache entry that cannot be written (a full or size-limited node-local folder: ENOSPC, EFBIG;
  a read-only one: EROFS, EACCES) or locked (a lock held too long, a lock folder that fails the
  trust rule, a planted symbolic link) leaves the kernel compiled in memory: the update runs, with
  one warning a process naming the folder and the fix; the CPU kernels' numba cache and the CUDA
  run-time cache (``fastema._launch.cuda.device_code``) alike. Before, the CPU cache's failed save
  raised OSError from the first ``update()``.
- The node-local folder ``<temp>/fastema-<uid>`` is used only when it is the user's own, not a
  symbolic link, and writable by nobody else; else one warning names it and says why (the CPU
  cache moved to ``~/.cache/numba`` without a word; a loose one was used, its ``locks/`` too), and
  the CUDA cache's warning names it (it said "not cached in None").
- ``FASTEMA_CUDA_CACHE`` reads the usual spellings of on and off; a thread count of ``'²'`` is
  warned about, never an import error; a malformed image name in a shipped set's index falls back
  like any other damage.

The file-size limit is real (``RLIMIT_FSIZE``: EFBIG, as a full tmpfs gives ENOSPC). The tests run
as root, where a chmod'd folder stays writable, so EROFS and EACCES are injected at the first
call that would meet them: numba's ``IndexDataCacheFile._open_for_write`` (every index and data
file numba writes is opened there) and ``tempfile.mkstemp`` (the device-code entry's temporary
file), each raising the ``OSError`` the real call raises.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings

import pytest

from fastema._launch import config
from fastema._launch.cuda import device_code as D
from fastema.kernels import _cache, _cache_node
from fastema.kernels._store import files

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid") or not _cache.SHARED,
                                reason="POSIX owners and modes; numba's cache internals as known")

TINY = """from numba import njit
from fastema.kernels._cache import cached


def f(x):
    return x + 1


def g(x):
    return x + 2


f = cached(njit(f))
g = cached(njit(g))
"""

# A read-only install (numba finds the package folder unwritable) with NUMBA_CACHE_DIR unset: the
# kernels' cache is the node-local <TMPDIR>/fastema-<uid>. Each cache write then fails once, in
# turn: the file-size limit (a real float32 update: EFBIG), EROFS at numba's file opening, a lock
# held by another open file past LOCK_WAIT (0.2 s here); then the same three for the CUDA run-time
# cache, with NVVM's compile replaced by a stand-in (no GPU, no NVVM in CI) and EACCES for EROFS.
CHILD = r"""
import contextlib, errno, fcntl, json, os, resource, sys, tempfile, warnings
from numba.core import caching
caching.InTreeCacheLocator.from_function = classmethod(lambda cls, py_func, py_file: None)
import numpy as np
import fastema
from fastema._launch.cuda import device_code as D
from fastema.kernels._store import files

sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
waiting = files.afresh(lock_wait=0.2)               # for the whole child (kept: entered, never left)
waiting.__enter__()
out = {}


def hold_elsewhere(entry):
    # the entry's lock, held by another open file (flock conflicts with it as with another process)
    path = files.lock_path(entry) + ".lock"
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def fail_open(self, filepath):                  # numba's _open_for_write on a read-only file system
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), filepath)
    yield


def fail_mkstemp(*args, dir=None, **kwargs):    # tempfile.mkstemp in a folder it cannot write
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = np.linspace(-1, 1, 4096, dtype=np.float32)
    b = np.cos(np.arange(4096, dtype=np.float32))
    ref = 0.75 * a.astype(np.float64) + 0.25 * b.astype(np.float64)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    fastema.ema_update_(a, b, 0.75)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["update_error"] = float(np.abs(a - ref).max())
    import tiny
    real_open = caching.IndexDataCacheFile._open_for_write
    caching.IndexDataCacheFile._open_for_write = fail_open
    out["f"] = tiny.f(1)
    caching.IndexDataCacheFile._open_for_write = real_open
    index = tiny.g._cache._cache_file._index_path
    hold_elsewhere(index)
    out["g"], out["g_saved"] = tiny.g(1), os.path.exists(index)
    if sys.argv[2] == "cuda":
        from fastema._launch.cuda import compiler
        from fastema.kernels._store import store as S

        class Stand:                            # NVVM's place (none in CI)
            name, set = "stand-in", "cu13"
            def identity(self):
                return "stand-in"
            def compile(self, dispatcher, types, images):
                return {i: ("cubin", b"\x7fELF" + bytes(8192), "entry", {}) for i in images}

        standing = compiler.using(Stand())     # held: a dropped generator's finally would pop it
        standing.__enter__()
        keys = [f"stand_in_kernel({i})[int64]" for i in range(3)]
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        codes = [D.compiled(None, (), keys[0], (9, 0))]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        real_mkstemp, tempfile.mkstemp = tempfile.mkstemp, fail_mkstemp
        codes.append(D.compiled(None, (), keys[1], (9, 0)))
        tempfile.mkstemp = real_mkstemp
        hold_elsewhere(S.Node(D.cache_folder()).path(keys[2], "sm_90", S.code_identity("stand-in"), None))
        codes.append(D.compiled(None, (), keys[2], (9, 0)))
        out["cuda_sizes"] = [len(e.code) for e in codes]
        out["cuda_written"] = sorted(os.listdir(D.cache_folder()))
out["unsaved"] = files.UNSAVED
out["warned"] = [str(w.message) for w in caught if str(w.message).startswith("fastema:")]
out["root"] = files.node_folder()
print(json.dumps(out))
"""


def test_a_cache_that_cannot_be_written_or_locked_never_stops_an_update(tmp_path):
    """H4: the first update runs, right against float64, under a 1 KiB file-size limit; so do
    a kernel whose files meet EROFS and one whose lock another holder keeps past LOCK_WAIT (compiled
    in memory, its index not written), and the CUDA run-time cache's three alike (no entry
    written). One warning in all, naming the first folder and the fix."""
    (tmp_path / "module").mkdir()
    (tmp_path / "module" / "tiny.py").write_text(TINY)
    (tmp_path / "tmp").mkdir()
    unset = ("NUMBA_CACHE_DIR", "FASTEMA_CUDA_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(TMPDIR=str(tmp_path / "tmp"), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cuda = importlib.util.find_spec("numba.cuda") and env.get("NUMBA_ENABLE_CUDASIM") != "1"
    args = [str(tmp_path / "module"), "cuda" if cuda else "cpu"]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    root = str(tmp_path / "tmp" / f"fastema-{os.getuid()}")
    assert out["root"] == root
    assert out["update_error"] < 1e-6 and (out["f"], out["g"]) == (2, 3) and not out["g_saved"]
    numba_folder, device_folder = os.path.join(root, "numba"), os.path.join(root, "fastema-device")
    reasons = [("File too large", numba_folder), ("Read-only file system", numba_folder),
               ("held its lock for over 0.2 s", numba_folder)]
    if cuda:
        assert out["cuda_sizes"] == [8196] * 3 and out["cuda_written"] == []
        reasons += [("File too large", device_folder), ("Permission denied", device_folder),
                    ("held its lock for over 0.2 s", device_folder)]
    found = [next((i for i, (words, folder) in enumerate(reasons)
                   if words in why and where.startswith(folder)), None)
             for where, why in out["unsaved"]]
    assert None not in found and found == sorted(found), out["unsaved"]   # in turn, nothing else
    assert set(found) == set(range(len(reasons))), out["unsaved"]
    (warned,) = out["warned"]
    assert warned.startswith(f"fastema: a compiled kernel could not be cached in {numba_folder}")
    assert "File too large" in warned and "used from memory" in warned
    assert "NUMBA_CACHE_DIR" in warned


@pytest.fixture
def node(monkeypatch, tmp_path):
    """A fresh ``<temp>`` for the node-local folder (``tempfile.gettempdir()``), and the caches'
    per-process records emptied; the node folder is looked up again after the test."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    with _cache.afresh(), D.afresh(), config.tuned(CUDA_CACHE=True):
        yield temp / f"fastema-{os.getuid()}"


def _node_locator():
    from numba.core.caching import CompileResultCacheImpl

    classes = _cache_node.node_locators(CompileResultCacheImpl._locator_classes)
    return next(c for c in classes if c.__name__ == "NodeLocalLocator")


def _kernel(x):
    return x


ROOTS = ["group or others can write it (mode 777)", "it belongs to another user (uid 65534)",
         "it is a symbolic link"]


@pytest.mark.parametrize("why", ROOTS)
def test_a_node_folder_not_ones_own_alone_is_not_used_and_said_once(node, tmp_path, why):
    """L1, L5, L6: a root loosened to 0777, one another user made first, one that is a symbolic link
    (to a folder of the user's own): not used, nor its locks/; one warning names the folder and why,
    as the CUDA cache's names it (never "None")."""
    if "another user" in why and os.geteuid() != 0:
        pytest.skip("needs chown (root)")
    if "symbolic" in why:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        node.symlink_to(tmp_path / "elsewhere")
    else:
        node.mkdir(mode=0o700)
        if "mode" in why:
            os.chmod(node, 0o777)
        else:
            os.chown(node, 65534, -1)
    locator = _node_locator()
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(2):
            assert locator.from_function(_kernel, __file__) is None
    (said,) = [str(w.message) for w in caught if "fastema:" in str(w.message)]
    assert f"folder {node}{os.sep}numba is not used ({node}: {why})" in said
    assert "~/.cache/numba" in said and "TMPDIR" in said
    with files.hold(str(tmp_path / "index.nbi")) as refused:
        assert refused is None                      # no lock kept: nothing written under the root
    assert not os.path.exists(os.path.join(node, "locks"))
    with pytest.warns(RuntimeWarning, match="not cached in") as caught:
        assert D.cache_folder() is None
    (said,) = [str(w.message) for w in caught if "fastema:" in str(w.message)]
    assert f"not cached in {node}{os.sep}fastema-device ({node}: {why})" in said
    assert "None" not in said


def _plant(node, tmp_path, how):
    """The node folder made as fastema makes it, then its locks/ planted: the lock of the entry
    ``tmp_path/index.nbi`` a symbolic link, locks/ itself a link to a folder of one's own, or
    loose."""
    node.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    locks = node / "locks"
    if how == "symbolic lock file":
        locks.mkdir(mode=0o700)
        os.symlink(target / "victim", files.lock_path(str(tmp_path / "index.nbi")) + ".lock")
    elif how == "symbolic lock folder":
        locks.symlink_to(target)
    else:
        locks.mkdir(mode=0o700)
        os.chmod(locks, 0o777)
    return target


@pytest.mark.parametrize("how, words", [
    ("symbolic lock file", "its lock cannot be had: [Errno"),
    ("symbolic lock folder", "is not used: it is a symbolic link"),
    ("loose lock folder", "is not used: group or others can write it (mode 777)")])
def test_a_lock_folder_held_to_the_same_rule_never_follows_a_link(node, tmp_path, how, words):
    """L1: the locks are held to the node folder's rule: a lock file is never opened through a
    symbolic link (O_NOFOLLOW), and a lock folder that is a link or that others can write is not
    used. The entry is then not written (the caller compiles in memory and says so)."""
    target = _plant(node, tmp_path, how)
    with files.hold(str(tmp_path / "index.nbi")) as refused:
        assert isinstance(refused, str) and words in refused, refused
    assert os.listdir(target) == []                    # nothing created through a link


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("OFF", False),
                                       ("No", False), ("1", True), ("TRUE", True), (" on ", True),
                                       ("yes", True), ("", None)])
def test_fastema_cuda_cache_reads_the_usual_spellings(monkeypatch, value, on):
    """L2: off is 0, false, off or no, on is 1, true, on or yes, in any case; unset or empty keeps
    the default (config.CUDA_CACHE on, the dispatcher's cache off)."""
    monkeypatch.setenv("FASTEMA_CUDA_CACHE", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config._switch("FASTEMA_CUDA_CACHE", "the default") is on


def test_a_value_neither_on_nor_off_is_named_and_the_default_kept(monkeypatch):
    monkeypatch.setenv("FASTEMA_CUDA_CACHE", "maybe")
    said = (r"FASTEMA_CUDA_CACHE='maybe' is neither on \(1, true, on, yes\) nor off "
            r"\(0, false, off, no\).*the default holds")
    with pytest.warns(RuntimeWarning, match=said):
        assert config._switch("FASTEMA_CUDA_CACHE", "the default") is None


IMPORT = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastema
    from fastema._launch import config
    from fastema._launch.cpu import threads
print(json.dumps({"threads": config.CPU_THREADS, "omp": threads._OMP,
                  "cuda_cache": config.CUDA_CACHE, "dispatcher_cache": config.CUDA_DISPATCHER_CACHE,
                  "warned": [str(w.message) for w in caught
                             if str(w.message).startswith("fastema:")]}))
"""


def test_import_reads_the_environment_and_never_raises_on_it():
    """L2 and L4 at import: FASTEMA_CUDA_CACHE=false turns the run-time CUDA cache off (it stayed
    on); FASTEMA_NUM_THREADS='²' and OMP_NUM_THREADS='²' (digits that ``int`` refuses: ``import
    fastema`` raised ValueError) are each named in one warning and ignored."""
    env = dict(os.environ, FASTEMA_CUDA_CACHE="false", FASTEMA_NUM_THREADS="\u00b2",
               OMP_NUM_THREADS="\u00b2")
    done = subprocess.run([sys.executable, "-c", IMPORT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["threads"] is None and out["omp"] == 0
    assert out["cuda_cache"] is False and out["dispatcher_cache"] is False
    names = sorted(w.split("=")[0] for w in out["warned"])
    assert names == ["fastema: FASTEMA_NUM_THREADS", "fastema: OMP_NUM_THREADS"], out["warned"]
    assert all("'²' is not a positive whole number, so it is ignored" in w for w in out["warned"])


@pytest.mark.parametrize("change", [{"sm_9": {}}, {"garbage": {}}, {"compute_8": {}}, {"sm_9x": {}}])
def test_a_malformed_image_name_in_an_index_falls_back(tmp_path, change):
    """L3: an image named "sm_9" or "garbage" (and other names ``choose`` cannot read) makes the
    set's index unusable, with the warning and fallback of every other damage, for a device whose
    code would be the PTX (11.0) as for one with a cubin (9.0); ``choose`` raised ValueError."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator runs no device code")
    import shutil

    shutil.copytree(os.path.join(D.device_dir(), "cu13"), tmp_path / "cu13")
    data = json.loads((tmp_path / "cu13" / "index.json").read_text())
    data["images"].update(change)
    (tmp_path / "cu13" / "index.json").write_text(json.dumps(data))
    with D.afresh(str(tmp_path)):
        with pytest.warns(RuntimeWarning, match="cu13 device code cannot be used .*image names"):
            assert D.choose(13000, (11, 0)) == [] and D.choose(13000, (9, 0)) == []
        assert "image names" in D.incomplete(list(data["variants"]))


def _first_variant(data):
    key = next(iter(data["variants"]))
    return key, next(iter(data["variants"][key]))


@pytest.mark.parametrize("damage", ["variant-list", "offset-int", "driver-string", "no-identity"])
def test_a_wrong_typed_field_in_an_index_falls_back(tmp_path, damage):
    """Round 8 L2: a variant that is a list (AttributeError in ``Shipped.get``), an offset that
    is an int (TypeError), a ``driver`` that is a string (TypeError in ``choose``), no
    ``identity`` (KeyError) raised from the CUDA load path; now the set is unusable, with the
    warning and fallback of every other damage."""
    pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator runs no device code")
    import shutil

    shutil.copytree(os.path.join(D.device_dir(), "cu13"), tmp_path / "cu13")
    data = json.loads((tmp_path / "cu13" / "index.json").read_text())
    key, image = _first_variant(data)
    if damage == "variant-list":
        data["variants"][key] = [data["variants"][key][image]]
    elif damage == "offset-int":
        data["variants"][key][image] = 0
    elif damage == "driver-string":
        data["images"][image]["driver"] = "13000"
    else:
        del data["identity"]
    (tmp_path / "cu13" / "index.json").write_text(json.dumps(data))
    with D.afresh(str(tmp_path)):
        with pytest.warns(RuntimeWarning, match="cu13 device code cannot be used .*cannot be read"):
            assert D.entry("cu13", key, image) is None
        assert D.choose(13000, (9, 0)) == []
