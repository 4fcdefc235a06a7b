#!/usr/bin/env python3
"""The launch mechanisms side by side (issue 86 item 3, ``../shared/design/gpu_speed.md`` section 6.2): what
one lerp launch of a 10-tensor group costs the host by each road, the same kernel, grid and parameter block:

- ``fastema kept launch``: today's prepared launch (``prepare("lerp", group)``, called as ``run(weights)``:
  whatever the launch path is when this runs: a one-frame launch lands here without an edit);
- ``cuLaunchKernel through the bindings``: the kept launch's own arguments (recorded from its call through
  cuda-bindings' ``cuLaunchKernel``), passed again: the driver call alone;
- ``cuGraphLaunch of a 1-node graph``: that launch captured once into a graph (``cuStreamBeginCapture`` on a
  side stream), instantiated, and launched;
- ``FlatShadow.update`` (the whole call), ``fastema.ema_update_`` and ``torch.lerp_`` of a 16-element pair
  (torch's one-liner, checked against ``ema_update_`` from the same inputs before it is timed).

Each row by ``measure.interleaved`` (host behind a GPU sleep, device, e2e; their batches in turn, 200 calls
a batch). On a GPU the driver is the real one; with ``--simulate`` (CI) a child process runs the rows on
the driver emulator (``testkit``'s stub ``libcuda.so.1`` under the fake GPU: cuda-bindings' and fastema's
host work as on a GPU, no kernel; torch's rows on the CPU), or, without a C compiler, in the Numba CUDA
simulator, where no cuLaunchKernel is made (those rows skipped).

    python3 -m bench.gpu.mechanisms OUTDIR [--simulate]

Writes ``OUTDIR/mechanisms.json`` (rewritten after each row) and ``mechanisms.md``. fastema's internals
(``fastema._launch``) are named in :func:`_kept_launch` only: the one place to follow a move.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CALLS = 200


def _kept_launch(group):
    """``run`` (called as ``run(weights)``): the group's ``"lerp"`` launch as fastema keeps it. fastema's
    internal names, all here: ``fastema._launch.prepare``, wherever the launch package puts it."""
    import importlib

    for where in ("fastema._launch", "fastema._launch.launches", "fastema._launch.core.launches"):
        try:
            prepare = getattr(importlib.import_module(where), "prepare", None)
        except ImportError:
            continue
        if prepare is not None:
            return prepare("lerp", group)
    raise ImportError("fastema's prepare() was not found in fastema._launch (it moved: name it in _kept_launch)")


@contextlib.contextmanager
def _recorded_launches(calls: list):
    """cuda-bindings' ``cuLaunchKernel`` wrapped for the block: each call's arguments appended to ``calls``."""
    from cuda.bindings import driver

    real = driver.cuLaunchKernel

    def recording(*args):
        calls.append(args)
        return real(*args)
    driver.cuLaunchKernel = recording
    try:
        yield real
    finally:
        driver.cuLaunchKernel = real


def _graph_of(args: tuple, side_raw: int):
    """A 1-node graph of the launch ``args`` captured on the raw stream ``side_raw``: its exec."""
    from cuda.bindings import driver as d

    side = d.CUstream(side_raw)
    err, = d.cuStreamBeginCapture(side, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
    assert not err, f"cuStreamBeginCapture: {err}"
    err, = d.cuLaunchKernel(*args[:8], side, *args[9:])
    assert not err, f"cuLaunchKernel in the capture: {err}"
    err, graph = d.cuStreamEndCapture(side)
    assert not err, f"cuStreamEndCapture: {err}"
    err, exec_ = d.cuGraphInstantiate(graph, 0)
    assert not err, f"cuGraphInstantiate: {err}"
    return exec_


def rows(rec, side_raw: int | None, device) -> None:
    """Every row (see the module docstring) into ``rec``: ``side_raw`` a raw stream to capture on (None:
    none); ``device`` where the torch tensors are."""
    import torch

    import fastema
    from bench.gpu import common as G
    from bench.gpu import measure as M
    from bench.suite.checked import checked, move_sources

    params = [torch.randn(16, device=device) for _ in range(10)]
    recorder, flat = fastema.FlatShadow([p.clone() for p in params]), fastema.FlatShadow(params)
    w = (0.01,)
    calls: list = []
    fns: dict = {}
    try:
        with _recorded_launches(calls):
            first = _kept_launch(recorder.layout.groups[0])
            first(w)
    except ImportError as err:                               # no cuda-bindings: the simulator
        rec.note("skipped", "cuLaunchKernel", f"no cuda-bindings ({err})")
    run = _kept_launch(flat.layout.groups[0])
    fns["fastema kept launch"] = lambda: run(w)
    if calls:
        from cuda.bindings import driver as d

        args = calls[-1]
        err, = d.cuLaunchKernel(*args)
        assert not err, f"cuLaunchKernel again: {err}"
        fns["cuLaunchKernel through the bindings"] = lambda: d.cuLaunchKernel(*args)
        if side_raw is not None:
            exec_, stream = _graph_of(args, side_raw), args[8]
            fns["cuGraphLaunch of a 1-node graph"] = lambda: d.cuGraphLaunch(exec_, stream)
    else:
        rec.note("skipped", "cuLaunchKernel through the bindings, cuGraphLaunch",
                 "no cuLaunchKernel was made: the dispatcher launches (the simulator)")
    a, b = torch.randn(16, device=device), torch.randn(16, device=device)
    a1 = a.clone()
    fns["fastema FlatShadow.update (whole call)"] = lambda: flat.update(0.99)
    fns["fastema.ema_update_ 16"] = lambda: fastema.ema_update_(a, b, decay=0.99)
    fns["torch.lerp_ 16"] = lambda: a1.lerp_(b, 0.01)
    lerp_checked = not (G.NO_DEVICE and not G.SIM)
    if lerp_checked:
        checked({"fastema.ema_update_ 16": fns["fastema.ema_update_ 16"], "torch.lerp_ 16": fns["torch.lerp_ 16"]},
                {"fastema.ema_update_ 16": lambda: [a], "torch.lerp_ 16": lambda: [a1]},
                ours="fastema.ema_update_ 16", inputs=[b], move=lambda: move_sources([b]))
    else:
        rec.note("skipped", "torch.lerp_ 16 checked against ema_update_", "the driver emulator runs no kernel: "
                 "fastema's result is not computed, so lerp_ is unchecked and no ratio is read against it")
    G.sync()
    same = {"cuLaunchKernel through the bindings", "cuGraphLaunch of a 1-node graph"}  # the kept launch's own
    M.record_all(rec, "one lerp launch, 10 tensors of 16", M.interleaved(fns, calls=CALLS), {}, 16 * 10,
                 [*same, *(["torch.lerp_ 16"] if lerp_checked else [])])
    rec.note("env", "driver", "the driver emulator (stub libcuda.so.1)" if G.NO_DEVICE and calls else
             "the Numba CUDA simulator" if G.SIM else "the GPU's")
    rec.note("env", "cuLaunchKernel parameters", None if not calls else
             {"grid": calls[-1][1], "block": calls[-1][4], "shared": calls[-1][7]})


def _child(out: str) -> int:
    """The rows on the driver emulator, under the fake GPU (``FASTEMA_BENCH_NO_DEVICE=1``, the stub on
    ``LD_LIBRARY_PATH``)."""
    from bench.gpu import common as G
    from testkit import fake_gpu as F

    rec = G.Record(os.path.join(out, "mechanisms.json"), ["env", "checks", "timings", "skipped"])
    with F.fake_gpu(record=False, stub_driver=True):
        rec.guarded("checks", "launch mechanisms", lambda: rows(rec, F.TORCH_STREAM + 1, "cpu"))
    return 1 if G.failed(rec.data["checks"]) else 0


def _report(out: str) -> str:
    from bench.suite.figures import table

    with open(os.path.join(out, "mechanisms.json")) as f:
        data = json.load(f)
    env = data.get("env", {})
    lines = [f"Launch mechanisms, one lerp launch of 10 tensors of 16 elements; driver: {env.get('driver')}; "
             f"kernel parameters {env.get('cuLaunchKernel parameters')}", "", table(data.get("timings", {}),
                                                                                    "fastema kept launch")]
    lines += [f"- {k}: {v}" for k, v in {**data.get("skipped", {}), **data.get("checks", {})}.items()]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    out = next((a for a in argv if not a.startswith("--")), os.environ.get("OUT", "mechanisms-out"))
    os.makedirs(out, exist_ok=True)
    if "--stub-child" in argv:
        return _child(out)
    rc = 0
    if "--simulate" in argv:
        from testkit.fake_gpu import stub_driver_dir

        folder = stub_driver_dir()
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        if folder is not None:
            env.update(FASTEMA_BENCH_NO_DEVICE="1", LD_LIBRARY_PATH=os.pathsep.join(
                filter(None, [folder, env.get("LD_LIBRARY_PATH")])))
            rc = subprocess.run([sys.executable, "-m", "bench.gpu.mechanisms", out, "--stub-child"], cwd=ROOT,
                                env=env, timeout=300).returncode
        else:                                                # no C compiler: the simulator, fewer rows
            env["NUMBA_ENABLE_CUDASIM"] = "1"
            rc = subprocess.run([sys.executable, "-m", "bench.gpu.mechanisms", out, "--in-simulator"], cwd=ROOT,
                                env=env, timeout=300).returncode
    else:
        from bench.gpu import common as G

        rec = G.Record(os.path.join(out, "mechanisms.json"), ["env", "checks", "timings", "skipped"])
        side = None
        if not G.SIM:
            import torch

            side = torch.cuda.Stream().cuda_stream
        rec.guarded("checks", "launch mechanisms", lambda: rows(rec, side, G.torch_device()))
        rc = 1 if G.failed(rec.data["checks"]) else 0
    from bench.gpu import common as G

    G.publish(os.path.join(out, "mechanisms.md"), _report(out))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
