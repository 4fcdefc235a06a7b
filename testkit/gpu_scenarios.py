"""The GPU contract's scenarios (issue 78 items 3 and 8), one Python for two places: a GPU run checks them
first, on the real driver (``bench/gpu/contract.py``: ``torch.cuda.graph``, CUDA tensors), and CI runs them
on the driver emulator (:mod:`testkit.emulator`, under ``fake_gpu(stub_driver=True)``, captures by
:mod:`testkit.graphs`), so that what the GPU runs does not rot:

- :func:`captures`: ``EMA.update()``, an attached ``opt.step()``, ``TargetNetwork.update()``,
  ``Smoother.update()`` (an EMA smoother: a window's ring slot is host state, which a replay repeats) and the
  swap (``average_parameters()`` in and out), each warmed up, then captured in a CUDA graph with a
  ``gc.collect()`` of another shadow's reference cycle inside the capture (torch 2.13's ``torch.cuda.graph``
  collects nothing first): the capture is not invalidated, and the replay does what the eager call does
  (the emulator: the replay's launches equal the captured and the eager call's, kernel, grid, block and
  parameter bytes; a GPU: three replays leave the state a twin's three eager calls leave, bit for bit);
- :func:`forked_worker`: a DataLoader worker (``fork``) collects the parent's fastema objects: no driver call
  (the emulator counts them), no error printed;
- :func:`first_binds`: after a warm-up of ``update()`` only, a first swap, ``copy_to()`` and
  ``scan_nonfinite()`` inside a capture are refused by fastema (its RuntimeError, naming the kernel and the
  warm-up) before anything is loaded (fastema loads no code inside a capture), and the capture ends valid;
- :func:`other_thread_capture`: another thread begins a capture in global mode (torch's default) on a stream
  current only there, which no check of fastema's can name, while fastema, at a launch, queries the event of a
  retired source (a parameter moved by ``p.data = ...``) and issues deferred frees: the frees are done and
  that capture ends valid (both are made in relaxed mode, :meth:`fastema._launch.cuda.driver.Driver.relaxed`; in
  global mode the driver refuses them and invalidates it), and the launching thread is in global mode again
  after.

Each returns ``{name: {"ok": bool, ...what was seen}}``. A default ``EMA`` takes the plan a GPU's tensors
give it, the device plan, on a GPU and on the fake GPU alike (CPU tensors on ``cuda:0`` to fastema:
:mod:`testkit.fake_backend`); the scenarios would hold for a host plan too (constant decays, no schedule, so
an eager call's launch equals a replay's either way).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import sys
from typing import Any, Callable, Iterator

import torch


class OnEmulator:
    """Where the scenarios run in CI: the fake ``cuda:0`` on the driver emulator (the process started with
    ``testkit.emulator.environ()``), captures by :mod:`testkit.graphs` on torch's stream there."""

    name = "emulator"
    device = "cpu"

    def __init__(self):
        from .emulator import Emulator

        self.e = Emulator()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        from .fake_gpu import fake_gpu

        with fake_gpu(stub_driver=True), torch.no_grad():
            yield

    def building(self):
        from .fake_gpu import cuda_factories_on_cpu

        return cuda_factories_on_cpu()

    def graph(self, capture_error_mode: str = "global"):
        from . import graphs

        g = graphs.CUDAGraph()
        return g, graphs.graph(g, capture_error_mode=capture_error_mode)

    def counters(self) -> dict:
        return dict(self.e.counters())

    def compare(self, call: Callable[[], None], state: Callable[[], list], twin) -> dict:
        """The eager call's launches, then the captured and replayed ones (with a collection inside)."""
        mark = self.e.mark()
        call()
        eager = [r.same_work() for r in self.e.launches(mark)]
        before = self.counters()
        g, block = self.graph()
        with block:
            call()
            _garbage_collected()
        replayed = [r.same_work() for r in g.replay()]
        captured = [r.same_work() for r in g.captured()]
        after = self.counters()
        return {"launches": len(eager), "same": bool(eager) and eager == captured == replayed,
                "invalidations": after["invalidations"] - before["invalidations"],
                "refused": after["refused_in_capture"] - before["refused_in_capture"]}


class OnGpu:
    """Where the scenarios run on a GPU: CUDA tensors, ``torch.cuda.graph``."""

    name = "gpu"
    device = "cuda"

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with torch.no_grad():
            yield

    def building(self):
        return contextlib.nullcontext()

    def graph(self, capture_error_mode: str = "global"):
        g = torch.cuda.CUDAGraph()
        return g, torch.cuda.graph(g, capture_error_mode=capture_error_mode)

    def counters(self) -> dict:
        return {}

    def compare(self, call: Callable[[], None], state: Callable[[], list], twin) -> dict:
        """Three replays of a capture (a collection inside it) against three eager calls of ``twin``."""
        torch.cuda.synchronize()
        g, block = self.graph()
        with block:
            call()
            _garbage_collected()
        for _ in range(3):
            g.replay()
            twin[0]()
        torch.cuda.synchronize()
        ours, theirs = state(), twin[1]()
        same = len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
        return {"same": same, "invalidations": 0, "refused": 0}


def _model(where, seed: int):
    from .fake_gpu import rl_mlp

    return rl_mlp(hidden=32, seed=seed).to(where.device)


_CYCLES: list = []


def _garbage() -> None:
    """Another shadow left as garbage: an EMA (a reference cycle) the collector has not found yet."""
    from fastema.torch import EMA

    model = _model(_CYCLES[0], 99) if _CYCLES else None
    if model is None:
        return
    other = EMA(model, 0.9)
    other.update()
    del other, model


def _garbage_collected() -> int:
    return gc.collect()


def _entry(where, name: str, seed: int) -> tuple:
    """``(call, state)`` of entry ``name`` on a fresh model of ``seed`` (warmed up)."""
    import fastema
    from fastema.torch import EMA, TargetNetwork

    model = _model(where, seed)
    call: Callable[[], Any]
    state: Callable[[], list]
    if name == "EMA.update()":
        ema = EMA(model, 0.99)
        call = ema.update
        state = lambda: _averages(ema)  # noqa: E731
    elif name == "attached opt.step()":
        ema = EMA(model, 0.99)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ema.attach(opt)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        call = opt.step
        state = lambda: _averages(ema) + [p.clone() for p in model.parameters()]  # noqa: E731
    elif name == "TargetNetwork.update()":
        with where.building():
            tn = TargetNetwork(model, copy.deepcopy(model).requires_grad_(False), tau=0.005)
        call = tn.update
        state = lambda: [p.clone() for p in tn.target.parameters()]  # noqa: E731
    elif name == "Smoother.update()":
        sm = fastema.Smoother(decay=0.9)
        x = torch.linspace(0, 1, 8, device=where.device)
        call = lambda: sm.update(x)  # noqa: E731
        state = lambda: [sm.ema.clone()]  # noqa: E731
    elif name == "swap (average_parameters in and out)":
        ema = EMA(model, 0.99)
        ema.allow_nonfinite = True     # a captured swap's replays cannot be checked: refused unless allowed
        ema.update()
        call = functools.partial(_swap, ema)
        state = lambda: [p.clone() for p in model.parameters()]  # noqa: E731
    else:
        raise KeyError(name)
    call()                                                 # the warm-up: every launch bound
    return call, state


def _averages(ema) -> list:
    with ema.average_parameters() as model:
        return [p.clone() for p in model.parameters()]


ENTRIES = ("EMA.update()", "attached opt.step()", "TargetNetwork.update()", "Smoother.update()",
           "swap (average_parameters in and out)")


def captures(where) -> dict:
    """See the module docstring."""
    out = {}
    with where.running():
        _CYCLES[:] = [where]
        for i, name in enumerate(ENTRIES):
            gc.collect()
            gc.disable()                                   # the cycle is found inside the capture, not before
            try:
                call, state = _entry(where, name, i)
                twin = _entry(where, name, i) if where.name == "gpu" else None
                _garbage()
                got = where.compare(call, state, twin)
                got["ok"] = got["same"] and not got["invalidations"] and not got["refused"]
            except Exception as err:                       # the scenario's outcome, never the run's
                got = {"ok": False, "raised": f"{type(err).__name__}: {err}"}
            finally:
                gc.enable()
            out[f"capture {name} with a collection inside"] = got
        _CYCLES.clear()
    return out


class _Collecting(torch.utils.data.Dataset):
    """A worker's items: it collects the parent's garbage and reports the errors printed there (and, on the
    emulator, the driver calls the child made)."""

    def __init__(self, count: Callable[[], int]):
        self.count = count

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        seen: list = []
        sys.unraisablehook = lambda u: seen.append(repr(u.exc_value))
        before = self.count()
        gc.collect()
        return torch.tensor([self.count() - before, len(seen)])


def forked_worker(where) -> dict:
    """See the module docstring."""
    counted = (lambda: where.e["forked_calls"]) if where.name == "emulator" else (lambda: 0)
    with where.running():
        gc.collect()
        gc.disable()
        try:
            _CYCLES[:] = [where]
            _garbage()
            loader = torch.utils.data.DataLoader(_Collecting(counted), batch_size=None, num_workers=1,
                                                 multiprocessing_context="fork")
            calls, errors = (int(v) for v in sum(loader))
        except Exception as err:
            return {"forked DataLoader worker collects": {"ok": False, "raised": f"{type(err).__name__}: {err}"}}
        finally:
            gc.enable()
            _CYCLES.clear()
    return {"forked DataLoader worker collects": {"ok": calls == 0 and errors == 0, "driver_calls": calls,
                                                  "errors": errors}}


def first_binds(where) -> dict:
    """See the module docstring."""
    import fastema
    from fastema.torch import EMA

    out = {}
    with where.running():
        for name, warm, first in (
                # the scan first: a swap in and copy_to() scan the average outside their capture
                ("scan_nonfinite()", lambda m: fastema.FlatShadow([p.detach() for p in m.parameters()]),
                 lambda flat: flat.scan_nonfinite()),
                ("swap", lambda m: EMA(m, 0.99), lambda ema: _swap(ema)),
                ("copy_to()", lambda m: EMA(m, 0.99), lambda ema: ema.copy_to())):
            try:
                out[f"first {name} in a capture after a warm-up"] = _first_bind(where, warm, first)
            except Exception as err:                       # the scenario's outcome, never the run's
                out[f"first {name} in a capture after a warm-up"] = {"ok": False,
                                                                     "raised": f"{type(err).__name__}: {err}"}
    return out


def _first_bind(where, warm, first) -> dict:
    model = _model(where, 7)
    thing = warm(model)
    if hasattr(thing, "copy_to"):                          # an EMA: update(); a FlatShadow: update(decay)
        thing.update()
    else:
        thing.update(0.9)
    before = where.counters()
    g, block = where.graph()
    said = None
    try:
        with block:
            first(thing)
    except RuntimeError as err:
        said = str(err)
    after = where.counters()
    invalid = after.get("invalidations", 0) - before.get("invalidations", 0)
    ok = said is not None and said.startswith("fastema:") and "warm-up" in said and not invalid
    first(thing)                                           # outside: loads and runs
    return {"ok": ok, "said": (said or "")[:200], "invalidations": invalid}


def _swap(ema) -> None:
    with ema.average_parameters():
        pass


def other_thread_capture(where) -> dict:
    """See the module docstring."""
    import threading

    from cuda.bindings import driver as d

    from fastema._launch.cuda import base, frees
    from fastema.torch import EMA

    name = "deferred frees while another thread captures on a stream only it names"
    began, freed, seen = threading.Event(), threading.Event(), {}

    def capture() -> None:
        try:
            d.cuInit(0)
            d.cuCtxPushCurrent(d.cuDevicePrimaryCtxRetain(d.cuDeviceGet(0)[1])[1])
            stream = d.cuStreamCreate(1)[1]
            seen["begin"] = d.cuStreamBeginCapture(stream, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)[0].name
        finally:
            began.set()
        freed.wait(60)
        err, graph = d.cuStreamEndCapture(stream)
        seen["end"] = err.name
        if graph is not None:
            d.cuGraphDestroy(graph)
        d.cuStreamDestroy(stream)
        d.cuCtxPopCurrent()

    with where.running():
        gc.collect()
        gc.disable()
        try:
            _CYCLES[:] = [where]
            model = _model(where, 5)
            ema = EMA(model, 0.99)
            ema.update()
            _garbage()                                     # another shadow's cycle, not collected yet
            p = next(model.parameters())
            p.data = p.data.clone()                        # moved: the next launch retires the old storage
            ema.update()
            gc.collect()                                   # the cycle's frees queued, none issued yet
            queued = len(frees.PENDING)
            retired = sum(r is not frees.FREES for r in base.WAITING)
            t = threading.Thread(target=capture)
            t.start()
            began.wait(60)
            try:
                ema.update()                               # a launch: fastema's safe point, the frees issued
            finally:
                freed.set()
                t.join(60)
            left = len(frees.PENDING)
            M = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL
            after = d.cuThreadExchangeStreamCaptureMode(M)[1].name     # this thread's mode after fastema's calls
        except Exception as err:                           # the scenario's outcome, never the run's
            return {name: {"ok": False, "raised": f"{type(err).__name__}: {err}"[:300], **seen}}
        finally:
            gc.enable()
            _CYCLES.clear()
    ok = (queued > 0 and retired > 0 and left == 0 and after == M.name
          and seen == {"begin": "CUDA_SUCCESS", "end": "CUDA_SUCCESS"})
    return {name: {"ok": ok, "queued": queued, "retired holders": retired, "left": left, "mode after": after,
                   **seen}}


def everything(where) -> dict:
    """Every scenario on ``where``, the first binds first: a driver keeps a module loaded for the process, so
    after :func:`captures` (which swaps) the swap's code is loaded and its first bind in a capture needs no
    load, nothing for fastema to refuse (on an H200 it ran, the capture valid; the scenario asks for the
    refusal of a first load)."""
    return {**first_binds(where), **captures(where), **forked_worker(where), **other_thread_capture(where)}
