"""A CUDA driver on the host that keeps the driver's rules: ``testkit/emulator.c`` (its comment says what it
holds fastema to: contexts per thread, capture, completion, out-parameters, launches checked against the
kernel's parameter layout read from the loaded image, flags, forked children), built here
(:func:`library_dir`) and read here (:class:`Emulator`).

A process loads it as its ``libcuda.so.1`` when started with :func:`library_dir` on ``LD_LIBRARY_PATH``
(:func:`environ`, :func:`run`); fastema's real ``CudaCoreDriver`` and cuda-bindings' real calls then run
against it as against a GPU's driver, the kernels excepted (nothing runs on a device). In that process
:class:`Emulator` reads what it saw (counters, refusals, launch records) through ctypes, and sets how work
completes (:attr:`Emulator.progress`). ``testkit.fake_gpu.fake_gpu(stub_driver=True)`` is fastema's launch
path on it; ``testkit.graphs`` is a CUDA-graph capture on it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

SOURCE = Path(__file__).with_name("emulator.c")
RESULTS = {0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
           3: "CUDA_ERROR_NOT_INITIALIZED", 101: "CUDA_ERROR_INVALID_DEVICE", 200: "CUDA_ERROR_INVALID_IMAGE",
           201: "CUDA_ERROR_INVALID_CONTEXT", 400: "CUDA_ERROR_INVALID_HANDLE", 401: "CUDA_ERROR_ILLEGAL_STATE",
           500: "CUDA_ERROR_NOT_FOUND", 600: "CUDA_ERROR_NOT_READY", 801: "CUDA_ERROR_NOT_SUPPORTED",
           900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", 901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
           906: "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", 907: "CUDA_ERROR_CAPTURED_EVENT",
           908: "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD"}
"""The results the emulator gives, by number."""


def _rule(folder: str, why: str) -> RuntimeError:
    return RuntimeError(f"{folder} is not a folder of this user's that only it can write ({why}): remove it and run "
                        f"again (the CUDA driver emulator built there is loaded into the test processes)")


def _whole(lib: str) -> bool:
    """An ELF shared object of some size: not a build cut short (``cc -o`` creates its output at 0 bytes)."""
    try:
        with open(lib, "rb") as f:
            head = f.read(64)
        return head[:4] == b"\x7fELF" and len(head) == 64 and os.path.getsize(lib) > 4096
    except OSError:
        return False


def library_dir() -> str | None:
    """A folder holding the emulator as ``libcuda.so.1`` (built once per user and source), or None where no C
    compiler is.

    Several processes build it at once (CI's two test workers and the gates): each compiles into a file of its
    own and renames it into place, so none sees a half-written library. One found empty or cut short (not an
    ELF object: a build stopped by a kill) is built again. The folder is the user's own (made 0700; one that
    another user owns or others can write, a file in its place, or one it cannot write into while the library
    is missing, is refused with what to do): the library is loaded into test processes through
    ``LD_LIBRARY_PATH``, so whoever could plant it would run code there."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source).hexdigest()[:12]               # a changed emulator is built anew
    folder = os.path.join(tempfile.gettempdir(), f"fastema-emulator-{os.getuid()}-{key}")
    lib = os.path.join(folder, "libcuda.so.1")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError as err:                                      # a file in its place, a parent it cannot write
        raise _rule(folder, f"{type(err).__name__}: {err.strerror or err}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _rule(folder, "not a folder")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise _rule(folder, "another user's, or others can write it")
    if _whole(lib):
        return folder
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = os.path.join(folder, f"libcuda.{os.getpid()}.tmp")
    try:
        done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-pthread", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if not os.access(folder, os.W_OK):
                raise _rule(folder, "it cannot be written")
            raise RuntimeError(f"the CUDA driver emulator ({SOURCE}) did not build: {done.stderr[-2000:]}")
        os.replace(tmp, lib)                                    # whole, at once, for every process
    except PermissionError as err:
        raise _rule(folder, f"it cannot be written: {err.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return folder


def environ(base: dict | None = None) -> dict | None:
    """``base`` (default: this process's environment) with the emulator first on ``LD_LIBRARY_PATH`` and the
    Numba CUDA simulator off; None where no C compiler is."""
    folder = library_dir()
    if folder is None:
        return None
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (folder, env.get("LD_LIBRARY_PATH")) if p)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return env


def run(body: str, cwd: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``body`` (Python source) run in a new process on the emulator (from ``cwd``, default the checkout)."""
    env = environ()
    if env is None:
        raise RuntimeError("no C compiler for the CUDA driver emulator")
    root = cwd or str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, cwd=root, env=env,
                          timeout=timeout)


class Launch(NamedTuple):
    """One recorded launch (``emu_launch``): what the driver was asked, and the parameter bank it gathered by the
    kernel's own layout (``params``, ``nbytes`` long)."""
    seq: int
    func: int
    kernel: str
    grid: tuple
    block: tuple
    shared: int
    stream: int
    context: int
    captured: int            # the capture it went into (0: queued to run)
    replay: int              # the graph exec that replayed it (0: a call's)
    nparams: int
    nbytes: int
    extra: bool              # the parameters came through ``extra``
    packed: bool             # each parameter's address lay at its own offset from the first
    params: bytes

    def same_work(self) -> tuple:
        """What a replay must repeat of it: the function, the geometry and the parameter bytes."""
        return self.kernel, self.grid, self.block, self.shared, self.params


class _Record(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_ulonglong), ("func", ctypes.c_ulonglong), ("kernel", ctypes.c_longlong),
                ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_ulonglong), ("context", ctypes.c_ulonglong), ("captured", ctypes.c_int),
                ("replay", ctypes.c_int), ("nparams", ctypes.c_int), ("nbytes", ctypes.c_int),
                ("extra", ctypes.c_int), ("packed", ctypes.c_int), ("params", ctypes.c_ubyte * 1024)]


class _Refusal(ctypes.Structure):
    _fields_ = [("entry", ctypes.c_int), ("result", ctypes.c_int), ("capturing", ctypes.c_int)]


RING, REFUSALS = 512, 256


class Emulator:
    """The emulator this process loaded as ``libcuda.so.1`` (started with :func:`environ`); raises RuntimeError
    where the process's ``libcuda.so.1`` is another."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        if not hasattr(lib, "emu_version"):
            raise RuntimeError("this process's libcuda.so.1 is not the driver emulator (start it with "
                               "testkit.emulator.environ())")
        self.lib = lib
        names = ctypes.c_char_p.in_dll(lib, "emu_counter_names").value.decode().split()
        self._counts = (ctypes.c_longlong * len(names)).in_dll(lib, "emu_count")
        self.counter_names = names
        self.entries = ctypes.c_char_p.in_dll(lib, "emu_entry_names").value.decode().split()
        self._calls = (ctypes.c_longlong * (len(self.entries) + 1)).in_dll(lib, "emu_calls")
        self._captured_calls = (ctypes.c_longlong * (len(self.entries) + 1)).in_dll(lib, "emu_captured_calls")
        self._launches = (_Record * RING).in_dll(lib, "emu_launches")
        self._refusals = (_Refusal * REFUSALS).in_dll(lib, "emu_refusals")
        self._unknown_calls = (ctypes.c_longlong * 1000).in_dll(lib, "emu_unknown_calls")
        for fn, res, args in (("emu_kernel_name", ctypes.c_char_p, [ctypes.c_longlong]),
                              ("emu_unknown_name", ctypes.c_char_p, [ctypes.c_int]),
                              ("emu_current", ctypes.c_ulonglong, []),
                              ("emu_pending", ctypes.c_ulonglong, [ctypes.c_ulonglong]),
                              ("emu_set_blocking", ctypes.c_int, [ctypes.c_ulonglong, ctypes.c_int])):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args

    # ---------------------------------------------------------------- what it saw
    def counters(self) -> dict:
        """Every counter by name (``emu_counter_names``: calls, no_context, forked_calls, refused_in_capture,
        invalidations, not_ready, host_waits, unfinished_frees, launches, ...)."""
        return dict(zip(self.counter_names, self._counts))

    def __getitem__(self, counter: str) -> int:
        return self._counts[self.counter_names.index(counter)]

    def calls(self, entry: str) -> int:
        """How often entry point ``entry`` (``cuMemFree``) was called."""
        return self._calls[self.entries.index(entry)]

    def captured_calls(self, entry: str) -> int:
        """How often ``entry`` was called while a capture was active (on any stream)."""
        return self._captured_calls[self.entries.index(entry)]

    def refusals(self, since: int = 0) -> list:
        """``(entry, result, captures active)`` of every error it answered after the ``since``-th (at most the
        last 256), oldest first."""
        seq = ctypes.c_ulonglong.in_dll(self.lib, "emu_refusal_seq").value
        out = []
        for n in range(max(since, seq - REFUSALS), seq):
            r = self._refusals[n % REFUSALS]
            out.append((self.entries[r.entry], RESULTS.get(r.result, str(r.result)), r.capturing))
        return out

    def refusal_mark(self) -> int:
        return ctypes.c_ulonglong.in_dll(self.lib, "emu_refusal_seq").value

    def mark(self) -> int:
        """The number of launches recorded so far (:meth:`launches` ``since``)."""
        return ctypes.c_ulonglong.in_dll(self.lib, "emu_launch_seq").value

    def launches(self, since: int = 0) -> list:
        """The launches recorded after the ``since``-th (at most the last 512), oldest first."""
        seq = self.mark()
        out = []
        for n in range(max(since, seq - RING), seq):
            r = self._launches[n % RING]
            name = self.lib.emu_kernel_name(r.kernel)
            out.append(Launch(r.seq, r.func, name.decode() if name else "?", tuple(r.grid), tuple(r.block),
                              r.shared, r.stream, r.context, r.captured, r.replay, r.nparams, r.nbytes,
                              bool(r.extra), bool(r.packed), bytes(r.params[:min(r.nbytes, 1024)])))
        return out

    def unknown(self) -> dict:
        """``{entry point: calls}`` of the entry points it does not emulate that were called (each answered
        CUDA_ERROR_NOT_SUPPORTED)."""
        out = {}
        for i in range(self.lib.emu_unknown_count()):
            if self._unknown_calls[i]:
                out[self.lib.emu_unknown_name(i).decode()] = self._unknown_calls[i]
        return out

    def flags(self) -> dict:
        """The flags of the last stream, event and pinned block made."""
        last = (ctypes.c_uint * 3).in_dll(self.lib, "emu_last_flags")
        return {"stream": last[0], "event": last[1], "host_alloc": last[2]}

    def depth(self) -> int:
        """The calling thread's context stack depth."""
        return self.lib.emu_depth()

    def current(self) -> int:
        """The calling thread's current context (0: none)."""
        return self.lib.emu_current()

    def active_captures(self) -> int:
        return self.lib.emu_active_captures()

    def pending(self, stream: int) -> int:
        """Work queued on the raw stream ``stream`` and not done."""
        return self.lib.emu_pending(stream)

    # ---------------------------------------------------------------- how it behaves
    @property
    def progress(self) -> int:
        """1 (the default): work is done once a query has answered NOT_READY for it; 0: only at a
        synchronisation or :meth:`complete_all`."""
        return ctypes.c_int.in_dll(self.lib, "emu_progress").value

    @progress.setter
    def progress(self, value: int) -> None:
        ctypes.c_int.in_dll(self.lib, "emu_progress").value = int(value)

    def complete_all(self) -> None:
        """Every stream's queued work done."""
        self.lib.emu_complete_all()

    def set_blocking(self, stream: int, blocking: bool = True) -> None:
        """The raw stream ``stream`` (one fastema did not make: torch's) blocking or not (its capture then makes
        the legacy stream illegal)."""
        self.lib.emu_set_blocking(stream, int(blocking))
