"""The simulator's 16-byte vector accesses, counted without replacing them.

The Numba CUDA simulator runs the vector intrinsics (``kernels/_cuda_hw.VECTORS``: plain Python
there, failing on a misaligned address as the hardware does) in its threads; :func:`counting`
counts their calls there, so a test sees whether a kernel took its vector path while the kernels
run their own code. A trace function that sees calls only (``sys.settrace`` returning no local
tracer): the simulator makes millions of calls, and a profile function (``support.calls.watching``,
which sees returns and C calls too) doubled these tests' time. On a GPU nothing is counted: the
shipped code's accesses are read from its PTX instead.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator


@contextlib.contextmanager
def counting() -> Iterator[dict]:
    """For the ``with`` block, ``{"vectors": n}``: the vector loads and stores made in it, on this
    thread and the threads started in it (the simulator's; 0 on a GPU). A trace function set
    before (a debugger's) goes on seeing every call, and is put back after."""
    from fastema.kernels import _cuda_hw

    used = {"vectors": 0}
    if not _cuda_hw.SIMULATOR:
        yield used
        return
    codes = {f.__code__ for f in _cuda_hw.VECTORS.values()}
    previous, started = sys.gettrace(), threading.gettrace()

    def trace(frame, event, arg):
        if frame.f_code in codes:
            used["vectors"] += 1
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(trace)
    threading.settrace(trace)
    try:
        yield used
    finally:
        sys.settrace(previous)
        threading.settrace(started)
