"""Host cost of fastema's CUDA launch path, measured on the CPU with the fake GPU (issue 37, D1-D2).

    python bench/gpu_host_cost.py [--calls N] [--json OUT]

What a training step pays on the host for fastema's launches, without a GPU: ``bench/gpu_fake.py``
stands in for numba's dispatcher, device arrays and ``numba.cuda`` (so nothing runs on a device),
and the rows are measured twice:

- **no driver**: the final launch call (``cuda.core.launch``, or the pre-packed driver launch) is a
  no-op: fastema's own Python per launch;
- **stub driver**: the launch and the context query are the real ones (cuda.core / cuda-bindings)
  into a stub ``libcuda.so.1`` that returns at once (built with the C compiler, run in a child
  process with it on ``LD_LIBRARY_PATH``): everything on the host but the driver's own work, about
  1.5-2 us a launch on a GPU, which comes on top in both columns. Context pushes are the fake's
  (free here); on the 11-22 H100 machine a push and pop cost 10.2 us, so the figures also give the
  number of pushes per call.

Rows: one bound lerp launch of a 6-tensor group (host weights), the same with device weights, and
``EMA.update()`` of the 6-tensor RL network (3 ``Linear`` layers, float32) with the plan on the device
(the GPU default: one plan+lerp launch per update) and on the host. Each figure is the median over 7
batches of ``--calls`` calls (``--stat min``: their minimum), in us per call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_fake as G  # noqa: E402

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


def _rows(calls: int, stub: bool) -> dict:
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
        run = _launch.lerp_launcher(g)
        w = (np.float32(0.01),)
        out["bound lerp launch, host weights"] = _median_us(lambda: run(w), calls)
        fake.pushes.clear()
        run(w)                                        # the steady state: the overload kept, the block packed
        out["context pushes per launch"] = float(sum(fake.pushes.values()))
        weights = G.FakeDeviceArray(1, np.float32)
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
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="summarise the 7 batches of a row by their median (default) or their minimum")
    ap.add_argument("--stub-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.stub_child:
        print(json.dumps(_rows(args.calls, stub=True)))
        return 0
    results = {"no driver": _rows(args.calls, stub=False)}
    folder = G.stub_driver_dir()
    if folder is None:
        results["stub driver"] = {"error": "no C compiler for the stub driver"}
    else:
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [folder,
                                                                             os.environ.get("LD_LIBRARY_PATH")])))
        child = [sys.executable, __file__, "--stub-child", "--calls", str(args.calls), "--stat", args.stat]
        done = subprocess.run(child, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode == 0:
            results["stub driver"] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            results["stub driver"] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    rows = list(results["no driver"])
    print(f"| host us per call ({args.stat} of 7 x {args.calls}) | no driver | stub driver |")
    print("|---|---|---|")
    for r in rows:
        a, b = results["no driver"].get(r), results["stub driver"].get(r)
        fmt = (lambda v: f"{v:.0f}") if r.startswith("context") else (lambda v: f"{v:.2f}")
        print(f"| {r} | {fmt(a)} | {fmt(b) if isinstance(b, float) else b} |")
    if "error" in results["stub driver"]:
        print(f"stub driver: {results['stub driver']['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
