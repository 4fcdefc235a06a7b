"""The driver's capture rules as a table, asked of whatever ``libcuda.so.1`` the process loaded: a GPU's driver
(``python -m testkit.driver_rules OUT.json``; a GPU run's contract asks it too, ``bench/gpu/contract.py``) or the
driver emulator (``testkit/emulator.c``, through :func:`testkit.emulator.run`). The GPU's table is stored
(:data:`REFERENCE`: an H200, driver 580.159) and the emulator must answer every case the same
(``tests/launch/test_emulator.py``): that is what holds the emulator to the driver.

Each case begins a capture on a blocking or a non-blocking stream (a pinned-to-device copy inside), then makes
one call a capture may forbid, on the capturing thread or another one, with that thread's capture mode set by
``cuThreadExchangeStreamCaptureMode``; then ends the capture. Its row: the call's result and the end's
(``CUDA_SUCCESS`` with a graph, or ``CUDA_ERROR_STREAM_CAPTURE_INVALIDATED``).

What the H200 answered, beside what CUDA's documentation of ``cudaThreadExchangeStreamCaptureMode`` says (a
call is forbidden where its thread's own capture was not begun relaxed, or, in global mode, where another
thread's capture was begun in global mode; relaxed forbids nothing): allocations, frees, stream and event
queries and waits follow that rule; ``cuCtxSynchronize`` is refused while any capture of its context runs,
whatever the modes; a synchronous copy is refused (``CUDA_ERROR_STREAM_CAPTURE_IMPLICIT``) only where a
blocking stream captures, whatever the modes, and permitted otherwise; ``cuLibraryLoadData``,
``cuLibraryGetKernel`` and ``cuKernelGetFunction`` are permitted (lazy loading, the default). A refused call
invalidates the capture.
"""
from __future__ import annotations

import itertools
import json
import sys
import threading
from pathlib import Path

MODES = ("GLOBAL", "THREAD_LOCAL", "RELAXED")
WHERE = ("same thread", "other thread")
STREAMS = ("non-blocking", "blocking")
CALLS = ("cuMemAlloc", "cuMemFree", "cuMemHostAlloc", "cuMemFreeHost", "cuMemcpyDtoH", "cuStreamQuery",
         "cuStreamSynchronize", "cuEventQuery", "cuEventSynchronize", "cuCtxSynchronize", "cuLibraryLoadData",
         "cuLibraryGetKernel", "cuKernelGetFunction", "cuMemcpyHtoD")
_PTX = (b".version 7.8\n.target sm_70\n.address_size 64\n"
        b".visible .entry fastema_rule_probe()\n{\n\tret;\n}\n\x00")


def key(stream: str, where: str, capture: str, thread: str, call: str) -> str:
    return f"{stream} | {where} | capture {capture} | thread {thread} | {call}"


def cases():
    return itertools.product(STREAMS, WHERE, MODES, MODES, CALLS)


def table() -> dict:
    """Every case of :func:`cases` asked of the loaded driver: ``{key: [call's result, end's result]}``."""
    from cuda.bindings import driver as d

    def ok(got):
        if got[0] != d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"set-up call failed: {got[0].name}")
        return got[1] if len(got) > 1 else None

    ok(d.cuInit(0))
    ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0))))
    ok(d.cuCtxPushCurrent(ctx))
    mode = {m: getattr(d.CUstreamCaptureMode, f"CU_STREAM_CAPTURE_MODE_{m}") for m in MODES}
    s, s2, sb = ok(d.cuStreamCreate(1)), ok(d.cuStreamCreate(1)), ok(d.cuStreamCreate(0))
    dst, pinned, out = ok(d.cuMemAlloc(64)), ok(d.cuMemHostAlloc(64, 0)), ok(d.cuMemHostAlloc(64, 0))
    rows = {}
    for case in cases():
        try:
            rows[key(*case)] = _one(d, ok, ctx, mode, (s if case[0] == "non-blocking" else sb, s2, dst, pinned, out),
                                    *case[1:])
        except Exception as err:                       # a GPU run records it and goes on to the next case
            rows[key(*case)] = [f"raised {type(err).__name__}: {err}"[:200],
                                d.cuStreamEndCapture(s if case[0] == "non-blocking" else sb)[0].name]
            d.cuThreadExchangeStreamCaptureMode(mode["GLOBAL"])      # the next case starts as every case does
    ok(d.cuMemFree(dst))
    for host in (pinned, out):
        ok(d.cuMemFreeHost(host))
    ok(d.cuCtxPopCurrent())
    return rows


def _one(d, ok, ctx, mode, held, where, capture, thread, call) -> list:
    s, s2, dst, pinned, out = held
    p, h, ev = ok(d.cuMemAlloc(64)), ok(d.cuMemHostAlloc(64, 0)), ok(d.cuEventCreate(2))
    lib = ok(d.cuLibraryLoadData(_PTX, None, None, 0, None, None, 0))
    kernel = ok(d.cuLibraryGetKernel(lib, b"fastema_rule_probe")) if call == "cuKernelGetFunction" else None
    ok(d.cuEventRecord(ev, s2))
    ok(d.cuEventSynchronize(ev))
    made = []

    def act():
        if where == "other thread":
            ok(d.cuCtxPushCurrent(ctx))
        before = ok(d.cuThreadExchangeStreamCaptureMode(mode[thread]))
        got = {"cuMemAlloc": lambda: d.cuMemAlloc(64), "cuMemFree": lambda: d.cuMemFree(p),
               "cuMemHostAlloc": lambda: d.cuMemHostAlloc(64, 0), "cuMemFreeHost": lambda: d.cuMemFreeHost(h),
               "cuMemcpyDtoH": lambda: d.cuMemcpyDtoH(out, dst, 64), "cuStreamQuery": lambda: d.cuStreamQuery(s2),
               "cuStreamSynchronize": lambda: d.cuStreamSynchronize(s2), "cuEventQuery": lambda: d.cuEventQuery(ev),
               "cuEventSynchronize": lambda: d.cuEventSynchronize(ev), "cuCtxSynchronize": d.cuCtxSynchronize,
               "cuLibraryLoadData": lambda: d.cuLibraryLoadData(_PTX, None, None, 0, None, None, 0),
               "cuLibraryGetKernel": lambda: d.cuLibraryGetKernel(lib, b"fastema_rule_probe"),
               "cuKernelGetFunction": lambda: d.cuKernelGetFunction(kernel),
               "cuMemcpyHtoD": lambda: d.cuMemcpyHtoD(dst, out, 64)}[call]()
        ok(d.cuThreadExchangeStreamCaptureMode(before))
        if where == "other thread":
            ok(d.cuCtxPopCurrent())
        made.append(got)

    ok(d.cuStreamBeginCapture(s, mode[capture]))
    ok(d.cuMemcpyHtoDAsync(dst, pinned, 64, s))
    if where == "other thread":
        t = threading.Thread(target=act)
        t.start()
        t.join(30)
    else:
        act()
    err, graph = d.cuStreamEndCapture(s)
    if not made:
        raise RuntimeError(f"{call} did not return")
    got = made[0]
    row = [got[0].name, err.name]
    if err == d.CUresult.CUDA_SUCCESS:
        ok(d.cuGraphDestroy(graph))
    ok(d.cuStreamSynchronize(s))
    ok(d.cuEventDestroy(ev))
    freed = got[0] == d.CUresult.CUDA_SUCCESS
    if not (freed and call == "cuMemFree"):
        ok(d.cuMemFree(p))
    if not (freed and call == "cuMemFreeHost"):
        ok(d.cuMemFreeHost(h))
    if freed and call == "cuMemAlloc":
        ok(d.cuMemFree(got[1]))
    if freed and call == "cuMemHostAlloc":
        ok(d.cuMemFreeHost(got[1]))
    if freed and call == "cuLibraryLoadData":
        ok(d.cuLibraryUnload(got[1]))
    ok(d.cuLibraryUnload(lib))
    return row


REFERENCE = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu-2026-11-27-h200-driver-rules.json"
"""The table a GPU's driver gave (``{"driver": ..., "command": ..., "rows": {key: [call, end]}}``)."""


def against_reference(rows: dict) -> dict:
    """The cases where ``rows`` and :data:`REFERENCE` differ: ``{key: {"here": ..., "driver": ...}}``."""
    reference = json.loads(REFERENCE.read_text())["rows"]
    return {k: {"here": rows.get(k), "driver": reference.get(k)} for k in sorted(set(rows) | set(reference))
            if rows.get(k) != reference.get(k)}


def check() -> dict:
    """A contract check: the loaded driver's table against :data:`REFERENCE` (``ok``: the same)."""
    rows = table()
    differ = against_reference(rows)
    return {"ok": not differ, "cases": len(rows), "differ": len(differ),
            "first differences": dict(list(differ.items())[:12])}


if __name__ == "__main__":
    rows = table()
    with open(sys.argv[1], "w") as fh:
        json.dump({"rows": rows}, fh, indent=1)
    print(f"{len(rows)} cases, {len(against_reference(rows))} not as {REFERENCE.name} has them")
