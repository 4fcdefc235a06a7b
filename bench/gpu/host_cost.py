"""Host cost of fastema's CUDA launch path, measured on the CPU with the fake GPU (issue 37, D1-D2).

    python -m bench.gpu.host_cost [--calls N] [--tensors 6,148,3000] [--json OUT]

What a training step pays on the host for fastema's launches, without a GPU: the fake GPU of
``testkit`` (a launch driver, ``FakeDriver``, and fake device arrays: nothing runs on a
device) stands in for the GPU under fastema's real kernel factories and shipped code, and the rows
are measured twice:

- **no driver**: the fake driver's launch is a no-op: fastema's own Python per launch;
- **stub driver**: the loads, the launch and the context query are fastema's real cuda.core driver's
  (``fastema._launch.cuda.drivers.CudaCoreDriver``) into a stub ``libcuda.so.1`` that returns at once
  (built with the C compiler, run in a child process with it on ``LD_LIBRARY_PATH``): everything on
  the host but the driver's own work, about 1.5-2 us a launch on a GPU, which comes on top in both
  columns. Context pushes are the fake's
  (free here); on the 11-22 H100 machine a push and pop cost 10.2 us, so the figures also give the
  number of pushes per call.

Rows: one bound lerp launch of a 6-tensor group (host weights), the same with device weights, and
``EMA.update()`` of the 6-tensor RL network (3 ``Linear`` layers, float32) with the plan on the device
(the GPU default: one plan+lerp launch per update) and on the host. Then ``EMA.update()`` (the GPU
default) of networks of ``--tensors`` tensors (4x4 ``Linear`` layers: the host path, not bandwidth),
and the line fitted through them (least squares): the fixed cost of an update and its cost per tensor
(the address check that refuses a moved or freed tensor: one address read a tensor). Each figure is
the median over 7 batches of ``--calls`` calls (fewer for the larger networks: ``--calls`` x 6 /
tensors, at least 50; ``--stat min``: their minimum), in us per call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from testkit import fake_gpu as G
from testkit.fake_driver import FakeDeviceArray

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAT = statistics.median
"""How the batches of one row are summarised (``--stat min``: the least disturbed batch, for a shared
machine where other processes take the cores)."""


def _median_us(fn, calls: int, repeats: int = 7) -> float:
    for _ in range(min(calls, 200)):                 # warm: binds, first dispatcher launch
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return STAT(times)


def fit(points: list) -> tuple[float, float]:
    """``(fixed us, us per tensor)``: the least-squares line through ``(tensors, us)`` points."""
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - per * mx, per


def _sized_rows(calls: int, tensors: list, out: dict) -> None:
    """``EMA.update()`` (the plan on the device) of a network of ``n`` tensors for each ``n`` of
    ``tensors``, and the fitted fixed and per-tensor costs (inside the fake GPU)."""
    import torch

    from fastema.torch import EMA

    points = []
    for n in tensors:
        net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(max(1, n // 2))])
        ema = EMA(net, 0.99)
        with torch.no_grad():
            us = _median_us(ema.update, max(50, calls * 6 // max(n, 1)))
        out[f"EMA.update, {n} tensors"] = us
        points.append((n, us))
    if len(points) >= 2:
        fixed, per = fit(points)
        out["EMA.update fit: fixed us"] = fixed
        out["EMA.update fit: us per tensor"] = per


def _rows(calls: int, stub: bool, tensors: list) -> dict:
    import numpy as np
    import torch

    import fastema
    from fastema import _launch
    from fastema.torch import EMA

    out = {}
    with G.fake_gpu(record=False, stub_driver=stub) as fake:
        model = G.rl_mlp()
        params = [p.detach() for p in model.parameters()]
        flat = fastema.FlatShadow(params)
        g = flat.layout.groups[0]
        run = _launch.prepare("lerp", g)
        w = (np.float32(0.01),)
        out["bound lerp launch, host weights"] = _median_us(lambda: run(w), calls)
        fake.pushes.clear()
        run(w)                                        # the steady state: the overload kept, the block packed
        out["context pushes per launch"] = float(sum(fake.pushes.values()))
        weights = FakeDeviceArray(1, np.float32)
        out["bound lerp launch, device weights"] = _median_us(lambda: run(weights), calls)
        for device_step in (True, False):
            ema = EMA(model, 0.99, device_step=device_step)
            with torch.no_grad():
                ema.update()
                ema.update()
                fake.pushes.clear()
                ema.update()
                pushes = sum(fake.pushes.values())
                out[f"EMA.update, 6 tensors, plan on the {'device' if device_step else 'host'}"] = \
                    _median_us(ema.update, calls)
                out[f"context pushes per EMA.update, plan on the {'device' if device_step else 'host'}"] = \
                    float(pushes)
        _sized_rows(calls, tensors, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tensors", default="6,148,3000", help="network sizes (tensors) of the EMA.update rows")
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="summarise the 7 batches of a row by their median (default) or their minimum")
    ap.add_argument("--stub-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    tensors = [int(t) for t in args.tensors.split(",") if t]
    if args.stub_child:
        print(json.dumps(_rows(args.calls, stub=True, tensors=tensors)))
        return 0
    results = {"no driver": _rows(args.calls, stub=False, tensors=tensors)}
    folder = G.stub_driver_dir()
    if folder is None:
        results["stub driver"] = {"error": "no C compiler for the stub driver"}
    else:
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [folder,
                                                                             os.environ.get("LD_LIBRARY_PATH")])))
        child = [sys.executable, "-m", "bench.gpu.host_cost", "--stub-child", "--calls", str(args.calls),
                 "--stat", args.stat, "--tensors", args.tensors]
        done = subprocess.run(child, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        if done.returncode == 0:
            results["stub driver"] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            results["stub driver"] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    rows = list(results["no driver"])
    print(f"| host us per call ({args.stat} of 7 x {args.calls}) | no driver | stub driver |")
    print("|---|---|---|")
    for r in rows:
        a, b = results["no driver"].get(r), results["stub driver"].get(r)
        fmt = (lambda v: f"{v:.0f}") if r.startswith("context") else (lambda v: f"{v:.3f}") if r.endswith(
            "per tensor") else (lambda v: f"{v:.2f}")
        print(f"| {r} | {fmt(a)} | {fmt(b) if isinstance(b, float) else b} |")
    if "error" in results["stub driver"]:
        print(f"stub driver: {results['stub driver']['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
