"""The driver emulator (``testkit/emulator.c``, issue 78 item 1) refuses what a CUDA driver refuses, through
cuda-bindings' real calls, each in a process that loaded it as its ``libcuda.so.1``: a call with no current
context, a free during a capture (the capture invalidated for good; by global mode from another thread, not by
thread-local or relaxed), a swapped launch geometry or parameter block, a call from a child forked after cuInit
(a child of a process that never called it works, as on the driver); every
out-parameter is written (an unwritten capture status made cuda-bindings raise ``ValueError``); events answer
NOT_READY until their stream's work is done; a launch is recorded with the parameter bank gathered by the
kernel's own layout, read from the shipped image. Its entry points are held to cuda-bindings' own prototypes
(``cydriver.pxd``) and docstrings, and hold every driver call fastema's code makes."""
from __future__ import annotations

import json
import os
import pathlib
import re
import textwrap

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("processes on the driver emulator", allow_module_level=True)
bindings = pytest.importorskip("cuda.bindings.driver")

from testkit import emulator  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
_PRELUDE = """
import ctypes, os, sys, threading
from cuda.bindings import driver as d
from testkit.emulator import Emulator
e = Emulator()
R = d.CUresult
assert d.cuInit(0) == (R.CUDA_SUCCESS,)
ctx = d.cuDevicePrimaryCtxRetain(d.cuDeviceGet(0)[1])[1]
"""


def _run(body: str, prelude: str = _PRELUDE) -> str:
    if emulator.library_dir() is None:
        pytest.skip("no C compiler for the driver emulator")
    done = emulator.run(prelude + textwrap.dedent(body))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_call_that_needs_a_context_is_refused_without_one():
    out = _run("""
        calls = [("cuMemAlloc", (16,)), ("cuMemHostAlloc", (16, 1)), ("cuStreamCreate", (1,)),
                 ("cuEventCreate", (2,)), ("cuStreamIsCapturing", (d.CUstream(0),)),
                 ("cuStreamSynchronize", (d.CUstream(0),)), ("cuCtxSynchronize", ())]
        for name, args in calls:
            assert getattr(d, name)(*args)[0] == R.CUDA_ERROR_INVALID_CONTEXT, name
        assert d.cuCtxPopCurrent()[0] == R.CUDA_ERROR_INVALID_CONTEXT      # nothing to pop
        assert d.cuCtxPushCurrent(ctx) == (R.CUDA_SUCCESS,)
        err, p = d.cuMemAlloc(16)
        err2, ev = d.cuEventCreate(2)
        assert (err, err2) == (R.CUDA_SUCCESS, R.CUDA_SUCCESS) and e.depth() == 1
        done = []
        def bare():                                         # another thread: its own stack, empty
            done.append((d.cuMemFree(p)[0], d.cuEventDestroy(ev)[0], d.cuCtxGetCurrent()[1]))
        t = threading.Thread(target=bare); t.start(); t.join()
        assert done == [(R.CUDA_ERROR_INVALID_CONTEXT, R.CUDA_ERROR_INVALID_CONTEXT, d.CUcontext(0))], done
        assert d.cuMemFree(p) == (R.CUDA_SUCCESS,) and d.cuEventDestroy(ev) == (R.CUDA_SUCCESS,)
        assert d.cuMemFree(p) == (R.CUDA_ERROR_INVALID_VALUE,)               # freed twice
        print(e["no_context"])
    """)
    assert out.split() == ["9"], out


def test_a_free_during_a_capture_invalidates_it_for_good_as_each_mode_says():
    out = _run("""
        d.cuCtxPushCurrent(ctx)
        s = d.cuStreamCreate(1)[1]
        M = d.CUstreamCaptureMode
        p = d.cuMemAlloc(64)[1]
        ok = d.cuMemAlloc(64)[1]
        assert d.cuStreamBeginCapture(s, M.CU_STREAM_CAPTURE_MODE_GLOBAL) == (R.CUDA_SUCCESS,)
        assert d.cuStreamIsCapturing(s)[1] == d.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
        assert d.cuMemFree(p) == (R.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        assert d.cuStreamIsCapturing(s)[1] == d.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_INVALIDATED
        assert d.cuEventQuery(d.cuEventCreate(2)[1]) == (R.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        err, graph = d.cuStreamEndCapture(s)
        assert err == R.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED and graph is None, (err, graph)
        assert d.cuMemFree(p) == (R.CUDA_SUCCESS,)          # outside a capture: freed

        def other(mode):                                    # a free on another thread while s captures in mode
            assert d.cuStreamBeginCapture(s, mode) == (R.CUDA_SUCCESS,)
            got = []
            def free():
                d.cuCtxPushCurrent(ctx)
                q = d.cuMemAlloc(8)
                got.append(q[0])
                if q[0] == R.CUDA_SUCCESS:
                    d.cuMemFree(q[1])
                d.cuCtxPopCurrent()
            t = threading.Thread(target=free); t.start(); t.join()
            return got[0].name, d.cuStreamEndCapture(s)[0].name
        print(other(M.CU_STREAM_CAPTURE_MODE_GLOBAL), other(M.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
              other(M.CU_STREAM_CAPTURE_MODE_RELAXED))
        assert d.cuStreamBeginCapture(s, M.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) == (R.CUDA_SUCCESS,)
        assert d.cuMemFree(ok) == (R.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)   # its own thread: forbidden
        d.cuStreamEndCapture(s)
        print(e["invalidations"], e["refused_in_capture"], e.captured_calls("cuMemFree"))
    """)
    lines = out.splitlines()
    assert lines[0] == ("('CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED', 'CUDA_ERROR_STREAM_CAPTURE_INVALIDATED') "
                        "('CUDA_SUCCESS', 'CUDA_SUCCESS') ('CUDA_SUCCESS', 'CUDA_SUCCESS')"), out
    assert lines[1] == "3 4 4", out


def test_the_emulator_answers_every_capture_rule_as_a_gpus_driver_did():
    """``testkit.driver_rules``' 504 cases (a call a capture may forbid, on the capturing thread or another, in
    each capture and thread mode, on a blocking and a non-blocking stream) answered as an H200's driver (580.159)
    answered them, call and capture end alike. Before it was measured the emulator followed the documented mode
    rule everywhere: it refused library loads and synchronous copies by it and let ``cuCtxSynchronize`` through
    in relaxed mode (102 cases differed)."""
    from testkit import driver_rules

    out = _run("""
        import json
        from testkit import driver_rules
        print("ROWS " + json.dumps(driver_rules.table()))
    """)
    rows = json.loads(next(x for x in out.splitlines() if x.startswith("ROWS "))[5:])
    assert len(rows) == 504
    differ = driver_rules.against_reference(rows)
    assert not differ, dict(list(differ.items())[:6])


def test_the_capture_status_is_written_every_time():
    """The old stub left ``cuStreamIsCapturing``'s status unwritten: cuda-bindings converted the C stack's
    garbage and raised ``ValueError`` (2000 of 2000 calls through a wrapper); every out-parameter of every
    entry point is written, on success and on error (a poisoned slot called straight through ctypes)."""
    out = _run("""
        def wrapped(raw):                                   # a frame between: other stack contents
            return d.cuStreamIsCapturing(d.CUstream(raw))
        d.cuCtxPushCurrent(ctx)
        statuses = {wrapped(77)[1] for _ in range(1000)} | {wrapped(0)[1] for _ in range(1000)}
        lib = ctypes.CDLL("libcuda.so.1")
        def entry(name):
            fn = ctypes.c_void_p()
            assert lib.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), 13000, 0, None) == 0
            return fn.value
        P = ctypes.c_ulonglong
        def poisoned(name, args, at=0, room=8):         # (name, result, out-slot written): slot at ``at``
            slot = (ctypes.c_ubyte * room)(*([0xAB] * room))
            args = list(args)
            args.insert(at, ctypes.c_void_p(ctypes.addressof(slot)))
            proto = ctypes.CFUNCTYPE(ctypes.c_int, *[type(a) for a in args])
            result = proto(entry(name))(*args)
            return name, result, bytes(slot) != bytes([0xAB] * room)
        I, U = ctypes.c_int, ctypes.c_uint
        outs = [poisoned("cuStreamIsCapturing", [P(77)], 1, room=4), poisoned("cuStreamIsCapturing", [P(0)], 1, 4),
                poisoned("cuStreamEndCapture", [P(0)], 1)]
        for name, args in [("cuCtxGetCurrent", []), ("cuDeviceGet", [I(5)]), ("cuDeviceGetAttribute", [I(0), I(0)]),
                           ("cuMemAlloc", [ctypes.c_size_t(0)]), ("cuEventCreate", [U(99)]),
                           ("cuStreamCreate", [U(8)]), ("cuMemHostAlloc", [ctypes.c_size_t(8), U(64)]),
                           ("cuDevicePrimaryCtxRetain", [I(9)]), ("cuDriverGetVersion", []),
                           ("cuLibraryGetKernel", [P(1), ctypes.c_char_p(b"x")]), ("cuKernelGetFunction", [P(1)]),
                           ("cuGraphInstantiate", [P(1), P(0)]), ("cuDeviceGetCount", [])]:
            outs.append(poisoned(name, args))
        print(sorted(int(s) for s in statuses))
        print([o for o in outs if not o[2]])
    """)
    assert out.splitlines() == ["[0]", "[]"], out


def test_the_legacy_streams_capture_is_answered_with_a_full_stream_table():
    """The legacy stream's capture query read the stream table at the index a lookup returned, -1 where
    the table was full (out of bounds: another context's answer, or none). It is the current context's."""
    out = _run("""
        d.cuCtxPushCurrent(ctx)
        blocking = d.cuStreamCreate(0)[1]
        M = d.CUstreamCaptureMode
        assert d.cuStreamBeginCapture(blocking, M.CU_STREAM_CAPTURE_MODE_RELAXED) == (R.CUDA_SUCCESS,)
        made = 0
        while d.cuStreamCreate(1)[0] == R.CUDA_SUCCESS:     # until the table is full
            made += 1
        print(made > 0, d.cuStreamIsCapturing(d.CUstream(0))[0].name)
    """)
    assert out.split() == ["True", "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"], out


def test_a_swapped_launch_geometry_or_parameter_block_is_refused_and_a_launch_recorded_by_the_layout():
    """A kernel of the shipped cu13 sm_90 image loaded by cuda.core as fastema loads it: a launch whose block
    is over 1024 threads (grid and block swapped), or whose parameters come as ``extra`` (the two swapped), is
    ``CUDA_ERROR_INVALID_VALUE``; a right one is recorded with fastema's block gathered by the kernel's own
    ``KPARAM_INFO`` offsets and sizes (``packed``: fastema's addresses lie at those offsets)."""
    pytest.importorskip("cuda.core")
    pytest.importorskip("numba.cuda")
    out = _run("""
        import numpy as np
        from cuda.core import ObjectCode
        from fastema._launch.cuda import abi, device_code
        from fastema._launch.cuda.memory import DeviceArray
        d.cuCtxPushCurrent(ctx)
        index = device_code.sets()["cu13"].index
        key = sorted(k for k in index["variants"] if k.startswith("nonfinite_kernel"))[0]
        entry = device_code.entry("cu13", key, "sm_90")
        k = ObjectCode.from_cubin(entry.code).get_kernel(entry.name)
        func = d.cuKernelGetFunction(d.CUkernel(int(k.handle)))[1]
        def value(t):
            if hasattr(t, "ndim"):
                return DeviceArray.view(0x7F0000001000, 5, np.dtype(str(t.dtype)), None)
            return np.dtype(str(t)).type(3)
        from fastema._launch.shipped.variants import every_variant
        _, types = every_variant()[key]
        block = abi.Block(types, tuple(value(t) for t in types))
        S = d.CUstream(77)
        bad_geometry = d.cuLaunchKernel(func, 256, 1, 1, 2000, 1, 1, 0, S, block.address, 0)[0]
        swapped = d.cuLaunchKernel(func, 2000, 1, 1, 256, 1, 1, 0, S, 0, block.address)[0]
        both = d.cuLaunchKernel(func, 2000, 1, 1, 256, 1, 1, 0, S, block.address, block.address)[0]
        shared = d.cuLaunchKernel(func, 1, 1, 1, 256, 1, 1, 1 << 20, S, block.address, 0)[0]
        mark = e.mark()
        good = d.cuLaunchKernel(func, 7, 1, 1, 256, 1, 1, 0, S, block.address, 0)[0]
        (r,) = e.launches(mark)
        print(bad_geometry.name, swapped.name, both.name, shared.name, good.name, e["bad_launches"])
        print(r.kernel == entry.name, r.grid, r.block, r.stream, r.context == int(ctx), r.captured, r.extra,
              r.packed, r.nparams == len(block.sizes), r.nbytes == block.layout.nbytes,
              r.params == bytes(block.buffer)[:r.nbytes])
    """)
    lines = out.splitlines()
    assert lines[0] == ("CUDA_ERROR_INVALID_VALUE CUDA_ERROR_INVALID_VALUE CUDA_ERROR_INVALID_VALUE "
                        "CUDA_ERROR_INVALID_VALUE CUDA_SUCCESS 4"), out
    assert lines[1] == "True (7, 1, 1) (256, 1, 1) 77 True 0 False True True True True", out


def test_events_answer_not_ready_until_their_streams_work_is_done():
    out = _run("""
        d.cuCtxPushCurrent(ctx)
        s = d.cuStreamCreate(1)[1]
        dst = d.cuMemAlloc(64)[1]
        host = d.cuMemHostAlloc(64, 1)[1]
        ev = d.cuEventCreate(2)[1]
        e.progress = 0                                      # work done only when waited for
        d.cuMemcpyHtoDAsync(dst, host, 64, s)
        d.cuEventRecord(ev, s)
        seen = [d.cuEventQuery(ev)[0].name for _ in range(3)]
        d.cuEventSynchronize(ev)
        seen.append(d.cuEventQuery(ev)[0].name)
        d.cuMemcpyHtoDAsync(dst, host, 64, s)               # a copy from the pinned block not done...
        d.cuMemFreeHost(host)                               # ...when it is freed: counted
        e.progress = 1                                      # NOT_READY once per record, then done
        d.cuEventRecord(ev, s)
        d.cuMemcpyHtoDAsync(dst, d.cuMemHostAlloc(64, 1)[1], 64, s)
        d.cuEventRecord(ev, s)
        seen += [d.cuEventQuery(ev)[0].name for _ in range(2)]
        print(seen, e["unfinished_frees"], e.flags())
    """)
    assert out.split("]")[0] + "]" == ("['CUDA_ERROR_NOT_READY', 'CUDA_ERROR_NOT_READY', 'CUDA_ERROR_NOT_READY', "
                                       "'CUDA_SUCCESS', 'CUDA_ERROR_NOT_READY', 'CUDA_SUCCESS']"), out
    assert out.split("]")[1].strip() == "1 {'stream': 1, 'event': 2, 'host_alloc': 1}", out


def test_a_call_naming_a_destroyed_stream_is_counted_and_refused():
    """A destroyed stream's handle points at freed driver memory: a real driver's behaviour is undefined (an
    H200 crashed in ``cuStreamIsCapturing`` of a stream CuPy had destroyed); the emulator refuses and counts."""
    out = _run("""
        d.cuCtxPushCurrent(ctx)
        s = d.cuStreamCreate(1)[1]
        live = d.cuStreamIsCapturing(s)[0].name
        d.cuStreamDestroy(s)
        seen = [d.cuStreamIsCapturing(s)[0].name, d.cuStreamQuery(s)[0].name, d.cuStreamDestroy(s)[0].name]
        legacy = d.cuStreamIsCapturing(d.CUstream(0))[0].name
        print(live, seen, legacy, e["dead_stream_calls"])
    """)
    assert out.split() == ["CUDA_SUCCESS", "['CUDA_ERROR_INVALID_HANDLE',", "'CUDA_ERROR_INVALID_HANDLE',",
                           "'CUDA_ERROR_INVALID_HANDLE']", "CUDA_SUCCESS", "3"], out


def test_a_call_from_a_forked_child_is_counted_and_refused():
    out = _run("""
        d.cuCtxPushCurrent(ctx)
        p = d.cuMemAlloc(8)[1]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = (d.cuMemFree(p)[0].name, d.cuCtxGetCurrent()[0].name, e["forked_calls"])
            os.write(w, repr(got).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 1000).decode(), e["forked_calls"], d.cuMemFree(p)[0].name)
    """)
    assert out.strip() == "('CUDA_ERROR_NOT_INITIALIZED', 'CUDA_ERROR_NOT_INITIALIZED', 2) 0 CUDA_SUCCESS", out


def test_a_child_of_a_process_that_never_called_cuinit_uses_cuda_as_any_process():
    # The driver refuses a forked child only where CUDA was initialised before the fork: a worker forked
    # from a process that never touched CUDA initialises it and works; its own forked child is refused.
    out = _run("""
        import os
        from cuda.bindings import driver as d
        from testkit.emulator import Emulator
        e = Emulator()
        R = d.CUresult
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = [d.cuInit(0)[0].name]
            ctx = d.cuDevicePrimaryCtxRetain(d.cuDeviceGet(0)[1])[1]
            got.append(d.cuCtxPushCurrent(ctx)[0].name)
            err, p = d.cuMemAlloc(8)
            got += [err.name, d.cuMemFree(p)[0].name, e["forked_calls"]]
            r2, w2 = os.pipe()
            pid2 = os.fork()
            if pid2 == 0:                                  # the child's child: CUDA was initialised at its fork
                os.write(w2, d.cuCtxGetCurrent()[0].name.encode())
                os._exit(0)
            os.waitpid(pid2, 0)
            got.append(os.read(r2, 100).decode())
            os.write(w, repr(got).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 1000).decode(), e["forked_calls"], e.calls("cuInit"))
    """, prelude="")
    assert out.strip() == ("['CUDA_SUCCESS', 'CUDA_SUCCESS', 'CUDA_SUCCESS', 'CUDA_SUCCESS', 0, "
                           "'CUDA_ERROR_NOT_INITIALIZED'] 0 0"), out


def test_a_graph_replays_what_its_capture_captured():
    out = _run("""
        from testkit import graphs
        d.cuCtxPushCurrent(ctx)
        g = graphs.CUDAGraph()
        with graphs.graph(g, stream=77):
            pass
        g.replay()
        d.cuCtxPopCurrent()
        print(e.active_captures(), e["replayed_launches"], e["errors"])
    """)
    assert out.split() == ["0", "0", "0"], out


# ---------------------------------------------------------------- held to cuda-bindings

_SOURCE = (ROOT / "testkit" / "emulator.c").read_text()
_ENTRIES = dict(re.findall(r"static CUresult e_(\w+)\(([^)]*)\)", _SOURCE))


def _types(params: str) -> list:
    """Each parameter's C type, spelled one way (``CUdeviceptr*``), its name dropped."""
    out = []
    for p in params.split(","):
        p = " ".join(p.replace("*", " * ").split())
        if p in ("", "void"):
            continue
        words = p.split()
        out.append("".join(words[:-1]).replace("const", "const "))
    return out


def _pxd() -> dict:
    path = pathlib.Path(bindings.__file__).parent / "cydriver.pxd"
    if not path.exists():
        pytest.skip("cuda-bindings without its cydriver.pxd")
    return dict(re.findall(r"cdef CUresult (\w+)\(([^)]*)\) except", path.read_text()))


def test_every_entry_point_has_cuda_bindings_own_prototype():
    """The emulator's prototypes equal the driver's (cuda-bindings' ``cydriver.pxd``, the C declarations its
    calls are compiled against), parameter for parameter, and each Python signature (the docstring's first
    line) takes the C parameters that are not out-parameters."""
    real = _pxd()
    assert len(_ENTRIES) >= 40, sorted(_ENTRIES)
    for name, params in _ENTRIES.items():
        assert name in real, f"{name}: no such driver entry point"
        assert _types(params) == _types(real[name]), (name, params, real[name])
        python = getattr(bindings, name).__doc__.splitlines()[0]
        inside = python[python.index("(") + 1:-1]
        given = [p.split(":")[0].split()[-1].lstrip("*") for p in inside.split(",") if p.strip()]
        names = [p.replace("*", " ").split()[-1] for p in real[name].split(",") if p.strip()]
        assert set(given) <= set(names), (name, python)


def test_every_driver_call_fastema_makes_is_emulated():
    """Each ``cuXxx`` fastema's launch path names (``d.cuXxx(`` and the strings it calls by name), and the two
    cuda.core makes to load a kernel, is an entry point of the emulator's: a new call it does not know fails
    here (and at run time answers CUDA_ERROR_NOT_SUPPORTED, counted as an unknown call)."""
    called = set()
    for path in (ROOT / "fastema" / "_launch").rglob("*.py"):
        text = path.read_text()
        called |= set(re.findall(r"\bd\.(cu[A-Z]\w+)\(", text)) | set(re.findall(r"\"(cu[A-Z][A-Za-z]+)\"", text))
    called |= {"cuLibraryLoadData", "cuLibraryGetKernel"}
    assert {"cuLaunchKernel", "cuMemFree", "cuStreamIsCapturing", "cuEventDestroy"} <= called
    missing = sorted(c for c in called if c not in _ENTRIES)
    assert not missing, missing


# ---------------------------------------------------------------- its folder (issue 77, L5 and L6)

def _build(tmp, *, expect_ok: bool = True) -> str:
    import subprocess
    import sys

    probe = ("import ctypes, os; from testkit.emulator import library_dir; d = library_dir(); "
             "lib = os.path.join(d, 'libcuda.so.1'); ctypes.CDLL(lib).emu_depth; print(d, os.path.getsize(lib))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == expect_ok, done.stderr[-2000:]
    return done.stdout if expect_ok else done.stderr


def _built() -> pathlib.Path:
    """This user's emulator folder (built once per source), whose name a folder under another TMPDIR takes."""
    folder = emulator.library_dir()
    if folder is None:
        pytest.skip("no C compiler for the driver emulator")
    return pathlib.Path(folder)


def test_its_folder_refuses_a_file_in_its_place_or_a_folder_it_cannot_write_with_the_rules_message(tmp_path):
    """A file where the folder goes, or a read-only folder with no library yet, raised a raw OSError
    (``FileExistsError``, ``PermissionError``); each gives the rule's message, naming the folder and what to do."""
    name = _built().name
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / name).write_text("not a folder")
    said = _build(tmp_path / "file", expect_ok=False)
    assert "RuntimeError" in said and f"{name} is not a folder of this user's" in said, said
    assert "remove it and run again" in said and "FileExistsError" in said, said
    if os.geteuid() != 0:                                       # root writes anywhere
        (tmp_path / "ro" / name).mkdir(parents=True, mode=0o700)
        os.chmod(tmp_path / "ro" / name, 0o500)
        try:
            said = _build(tmp_path / "ro", expect_ok=False)
        finally:
            os.chmod(tmp_path / "ro" / name, 0o700)
        assert "RuntimeError" in said and "remove it and run again" in said and "cannot be written" in said, said


def test_an_empty_or_cut_short_library_is_built_again(tmp_path):
    """A ``libcuda.so.1`` left empty or cut short (a build stopped) was handed out as it was: every test
    process then failed to load it ("file too short"). One is built again (and loads)."""
    import shutil

    built = _built()
    folder = tmp_path / built.name
    folder.mkdir(mode=0o700)
    lib = folder / "libcuda.so.1"
    whole = (built / "libcuda.so.1").read_bytes()
    lib.write_bytes(b"")
    assert not emulator._whole(str(lib))
    lib.write_bytes(whole[:2000])                               # an ELF header, the rest cut off
    assert not emulator._whole(str(lib))
    out = _build(tmp_path)
    assert out.split()[0] == str(folder) and int(out.split()[1]) == len(whole), out
    shutil.rmtree(folder)
