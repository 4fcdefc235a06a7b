"""What the GPU plan's Python parts share (``bench/gpu/smoke.py``, ``bench/gpu/probe.py`` and its
modules, ``headline.py``, ``targets.py``): the mode, arrays on the device, syncs and timers, a record
rewritten after every entry (and a budgeted plan run through it), the command line and the report.

Two modes:

- **GPU** (the device machine): device arrays are torch CUDA tensors; syncs, GPU sleeps and CUDA
  events are torch's.
- **Simulator** (``NUMBA_ENABLE_CUDASIM=1``; ``--simulate`` on a script's command line sets it
  before this module and numba are imported; CI runs the commands so): device arrays are the Numba
  CUDA simulator's (``numba.cuda.to_device``, which fastema takes through
  ``fastema/_backends/cudasim.py``), at tiny sizes; torch runs on the CPU; syncs and sleeps do
  nothing and events read ``time.perf_counter``. A check that needs torch CUDA (streams, graphs, a
  busy GPU) raises :class:`Skip` and is recorded ``{"ok": None, "skipped": ...}``, not as a
  failure.

The CPU reference of every kernel check is NumPy arrays (``ml_dtypes.bfloat16`` for bfloat16) run
through fastema's CPU kernels, in both modes.
"""
from __future__ import annotations

import json
import os
import time
import traceback

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
NO_DEVICE = SIM or os.environ.get("FASTEMA_BENCH_NO_DEVICE") == "1"
"""No torch CUDA: the simulator, or the driver emulator under the fake GPU (``bench/gpu/mechanisms.py``'s
stub mode): syncs and sleeps do nothing, events read the host clock."""


class Skip(Exception):
    """A check that cannot run in this mode (torch CUDA needed in the simulator)."""


def need_torch_cuda(what: str = "torch CUDA tensors") -> None:
    if SIM:
        raise Skip(f"not in the simulator: needs {what}")


# ------------------------------------------------------------------ the record


class Record:
    """Sections of named entries, written to ``path`` (JSON, through a temporary file and a rename)
    after every entry, so a run killed at its time limit leaves everything it found so far."""

    def __init__(self, path: str, sections):
        self.path = path
        self.data: dict = {s: {} for s in sections}
        self.started = time.perf_counter()
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)

    def note(self, section: str, key: str, value) -> None:
        self.data.setdefault(section, {})[key] = value
        print(f"[{section}] {key}: {value}", flush=True)
        self.save()

    def guarded(self, section: str, name: str, fn):
        """``fn()``; an exception is recorded as a failure under ``section``/``name``, not raised."""
        try:
            return fn()
        except Skip as s:
            self.note(section, name, {"ok": None, "skipped": str(s)})
        except Exception as e:                              # noqa: BLE001 - record and go on
            traceback.print_exc()
            self.note(section, name, {"ok": False, "detail": f"{type(e).__name__}: {e}"})
        return None

    def check(self, name: str, fn) -> None:
        """``fn() -> (ok, detail)`` recorded under ``checks``."""
        def run():
            t0 = time.perf_counter()
            ok, detail = fn()
            self.note("checks", name, {"ok": bool(ok), "detail": detail,
                                       "s": round(time.perf_counter() - t0, 3)})
        self.guarded("checks", name, run)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run_plan(self, plan, budget: float, failed_as: str = "{}", after=None) -> None:
        """Each ``(name, fn)`` of ``plan`` in turn, through :meth:`guarded` under ``checks`` (a failure
        named ``failed_as.format(name)``), its seconds under ``host``; one not started before ``budget``
        seconds had passed is recorded skipped (out of time) under ``checks``. ``after()`` follows each
        that ran."""
        for name, fn in plan:
            if self.elapsed() > budget:
                self.note("checks", name, {"ok": None,
                                           "skipped": f"out of time (the budget of {budget:.0f} s was spent)"})
                continue
            t0 = time.perf_counter()
            self.guarded("checks", failed_as.format(name), fn)
            self.data["host"][f"{name} s"] = round(time.perf_counter() - t0, 1)
            if after is not None:
                after()


def failed(checks: dict) -> int:
    return sum(1 for v in checks.values() if isinstance(v, dict) and v.get("ok") is False)


def options(argv, doc: str, name: str, budget: float, what: str):
    """A budgeted script's command line, ``OUTDIR [--budget SECONDS] [--simulate]`` (``doc``'s first
    paragraph its description; OUTDIR by default ``$OUT``, else ``NAME-out``; no ``what`` starts after
    the budget), parsed; OUTDIR made."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", f"{name}-out"))
    ap.add_argument("--budget", type=float, default=budget, help=f"no {what} starts after it")
    ap.add_argument("--simulate", action="store_true", help="the simulator, tiny sizes (CI)")
    opts = ap.parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    return opts


def publish(path: str, text: str) -> None:
    """A script's report: written to ``path`` and printed."""
    with open(path, "w") as fh:
        fh.write(text)
    print(text, flush=True)


# ------------------------------------------------------------------ arrays: NumPy on the host, the device's


def np_dtype(name: str):
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def uint_view(a):
    """The bits of a NumPy array (uint32 / uint16 / uint64), contiguous."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return a.view({8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize])


def same_bits(a, b) -> bool:
    import numpy as np

    a, b = to_host(a), to_host(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and np.array_equal(uint_view(a), uint_view(b))


def host_arrays(dtype: str, sizes, seed: int) -> list:
    """Seeded random NumPy arrays of ``sizes`` elements in ``dtype``."""
    import numpy as np

    g = np.random.default_rng(seed)
    return [g.standard_normal(n).astype(np.float32).astype(np_dtype(dtype)) for n in sizes]


def _torch_of(host):
    import numpy as np
    import torch

    host = np.ascontiguousarray(host)
    if host.dtype.name == "bfloat16":
        return torch.from_numpy(host.view(np.uint16).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def to_device(host):
    """A device copy of the NumPy array ``host``: a torch CUDA tensor, or a simulator device array."""
    if SIM:
        from numba import cuda

        return cuda.to_device(host)
    return _torch_of(host).to("cuda")


def to_host(x):
    """A NumPy copy of a device array, a torch tensor or a NumPy array."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    t = x.detach().cpu().contiguous()
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).view(np_dtype("bfloat16"))
    return t.numpy()


def write(dev, host) -> None:
    """Copy the NumPy array ``host`` into the device array ``dev`` (same size and dtype)."""
    if hasattr(dev, "copy_to_device"):
        dev.copy_to_device(host)
    else:
        dev.copy_(_torch_of(host).reshape(dev.shape))


# ------------------------------------------------------------------ syncs, sleeps and timers

_CYCLES_PER_MS: list = []


def sync() -> None:
    if not NO_DEVICE:
        import torch

        torch.cuda.synchronize()


def cycles_per_ms() -> int:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU (measured once; 0 in the simulator)."""
    if NO_DEVICE:
        return 0
    if not _CYCLES_PER_MS:
        import torch

        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        s.record()
        torch.cuda._sleep(20_000_000)
        e.record()
        e.synchronize()
        _CYCLES_PER_MS.append(max(1, int(20_000_000 / s.elapsed_time(e))))
    return _CYCLES_PER_MS[0]


def gpu_busy(ms: float) -> None:
    """Keep the current stream busy for about ``ms`` milliseconds (nothing in the simulator)."""
    if not NO_DEVICE and ms > 0:
        import torch

        torch.cuda._sleep(int(cycles_per_ms() * ms))


def gpu_idle() -> bool:
    """True when the current stream has run everything queued on it (always in the simulator)."""
    if NO_DEVICE:
        return True
    import torch

    return torch.cuda.current_stream().query()


class _ClockEvent:
    """A stand-in for ``torch.cuda.Event(enable_timing=True)`` without a device: the host clock. Its
    :meth:`query` says False: no GPU ran dry behind the host, none caught up with it (``measure``)."""

    def __init__(self):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3


def event():
    if NO_DEVICE:
        return _ClockEvent()
    import torch

    return torch.cuda.Event(enable_timing=True)


def torch_device():
    """Where the torch rows of the timings run: the GPU, or the CPU in the simulator."""
    import torch

    return torch.device("cpu" if SIM else "cuda")
