"""Live: host cost of the GPU entry points other than the array functions, without a GPU (issue 70 items 1-3).

    python -m bench.scripts.entry_points [--calls N] [--stub | --cpu] [--instructions] [--rows "A;B"]

Each row runs inside the fake GPU of ``testkit`` (CPU tensors described as on ``cuda:0``,
nothing runs on a device), so what it measures is the host work of one call: ``Smoother.update``
(K = 1 and K = 10^6 streams, two value tensors alternating as a training loop's losses do),
``TargetNetwork.update`` (6 and 30 tensors), ``EMA.update()`` and an ``average_parameters()`` round
trip (in and out) at 3000 tensors of 4096 elements, and, as the yardstick, a bound
``FlatShadow.update`` of one tensor. ``--stub``: the loads, launches and context queries go through
fastema's real cuda.core driver into the stub ``libcuda.so.1`` (``testkit/fake_gpu.py``; the
script restarts itself with it on ``LD_LIBRARY_PATH``). Host time: the median of 7 batches of calls
(``perf_counter``), in us a call. ``--instructions``: instructions a call instead (valgrind's
callgrind, the gates' client requests: ``I(2N) - I(N)`` over N calls), deterministic. ``--cpu``: the
rows on the CPU kernels instead (which run: pass ``--elements 16`` for the host's share at 3000 tensors).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROWS = ("FlatShadow.update, 1 tensor", "Smoother.update, K=1", "Smoother.update, K=10^6",
        "TargetNetwork.update, 6 tensors", "TargetNetwork.update, 30 tensors", "EMA.update, 3000 tensors",
        "average_parameters in+out, 3000 tensors")


def _net(layers: int, width: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=True) for _ in range(layers)])


def build(name: str, elements: int = 4096):
    """The call one row measures, made inside the fake GPU (or on the CPU); ``elements``: of each
    tensor of the 3000-tensor rows (a square number)."""
    import torch

    import fastema
    from fastema.torch import EMA, TargetNetwork
    from testkit.fake_gpu import rl_mlp

    if name == "FlatShadow.update, 1 tensor":
        flat = fastema.FlatShadow([torch.zeros(1024)])
        return lambda: flat.update(0.999)
    if name.startswith("Smoother.update"):
        k = 1 if name.endswith("K=1") else 10 ** 6
        s = fastema.Smoother(decay=0.9, window=50)
        values = [torch.ones(k), torch.full((k,), 2.0)]
        state = [0]

        def smoother():
            state[0] ^= 1
            s.update(values[state[0]])
        return smoother
    if name.startswith("TargetNetwork.update"):
        online = rl_mlp() if "6 tensors" in name else _net(15, 16)
        tn = TargetNetwork(online, copy.deepcopy(online).requires_grad_(False), tau=0.005)

        def target():
            with torch.no_grad():
                tn.update()
        return target
    side = int(round(elements ** 0.5))
    net = _net(1500, side)                                # 3000 tensors: 1500 weights, 1500 biases
    with torch.no_grad():
        for p in net.parameters():                        # `elements` each: the weights square, the biases
            if p.ndim == 1:                               # replaced (no forward runs)
                p.data = torch.zeros(side * side)
    ema = EMA(net, 0.999)
    if name == "EMA.update, 3000 tensors":
        def update():
            with torch.no_grad():
                ema.update()
        return update

    def round_trip():
        with ema.average_parameters():
            pass
    return round_trip


def host_us(fn, calls: int, repeats: int = 7) -> float:
    for _ in range(min(calls, 50)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _calls_for(name: str, calls: int) -> int:
    return max(20, calls // 50) if "3000" in name else calls


def measure(rows: list, calls: int, stub: bool, cpu: bool = False, elements: int = 4096) -> dict:
    import contextlib

    from testkit import fake_gpu as G

    out = {}
    with contextlib.nullcontext() if cpu else G.fake_gpu(record=False, stub_driver=stub):
        for name in rows:
            out[name] = round(host_us(build(name, elements), _calls_for(name, calls)), 2)
    return out


def instructions(rows: list, stub: bool) -> dict:
    """Inside valgrind: each row's instructions a call (``I(2N) - I(N)`` over N calls, N = 20; 4 at
    3000 tensors), dumped by the gates' client requests."""
    import ctypes

    from bench.gates.instructions import dump_regions
    from testkit import fake_gpu as G

    lib = ctypes.CDLL(os.environ["GATES_CLIENT"])
    lib.gates_dump.argtypes = [ctypes.c_char_p]
    with G.fake_gpu(record=False, stub_driver=stub):
        built = []
        for name in rows:
            fn = build(name)
            for _ in range(64):
                fn()
            built.append((name, fn, 4 if "3000" in name else 20))
        gc.collect()
        gc.disable()
        lib.gates_instrument()
        for name, fn, n in built:
            for _ in range(3):
                fn()
            dump_regions(name, fn, n, lib)
    return {}


def _with_stub_env() -> dict:
    from testkit import fake_gpu as G

    folder = G.stub_driver_dir()
    if folder is None:
        raise SystemExit("no C compiler for the stub driver")
    return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [folder, os.environ.get("LD_LIBRARY_PATH")])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--stub", action="store_true", help="through the stub driver (cuda.core's real launch path)")
    ap.add_argument("--instructions", action="store_true", help="instructions a call (valgrind), not host time")
    ap.add_argument("--cpu", action="store_true", help="on the CPU kernels (they run), not in the fake GPU")
    ap.add_argument("--elements", type=int, default=4096, help="elements of each tensor of the 3000-tensor rows")
    ap.add_argument("--rows", default=";".join(ROWS), help="which rows, separated by semicolons (default: all)")
    ap.add_argument("--child", choices=("time", "valgrind"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(";") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; the rows are {list(ROWS)}")
    if args.cpu and (args.instructions or args.stub):
        ap.error("--cpu measures host time on the CPU kernels: not with --instructions or --stub")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        from bench.gates.common import use_tree

        use_tree()                                        # this tree's fastema, whatever is installed
    if args.child == "time":
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(rows, args.calls, args.stub, args.cpu, args.elements)))
        return 0
    if args.child == "valgrind":
        import torch

        torch.set_num_threads(1)
        instructions(rows, args.stub)
        return 0
    env = _with_stub_env() if args.stub else dict(os.environ)
    base = [sys.executable, "-m", "bench.scripts.entry_points", "--rows", ";".join(rows)] + (["--stub"] if args.stub
                                                                                               else [])
    if not args.instructions:
        done = subprocess.run(base + ["--child", "time", "--calls", str(args.calls), "--elements", str(args.elements)]
                              + (["--cpu"] if args.cpu else []), env=env, cwd=root,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        unit = "host us a call"
    else:
        import shutil
        import tempfile

        from bench.gates.instructions import child_env, client_library, parse_callgrind, per_update

        out = os.path.join(tempfile.mkdtemp(prefix="fastema-entry-"), "callgrind.out")
        cmd = [shutil.which("valgrind"), "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               "--combine-dumps=yes", f"--callgrind-out-file={out}"] + base + ["--child", "valgrind"]
        extra = {"GATES_CLIENT": client_library()}
        if args.stub:
            extra["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]
        done = subprocess.run(cmd, env=child_env(**extra), cwd=root, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
        with open(out) as f:
            figures = per_update(parse_callgrind(f.read()))
        unit = "instructions a call"
    where = "CPU kernels" if args.cpu else "stub driver" if args.stub else "fake GPU, no driver"
    print(f"| {unit} ({where}) | |\n|---|---|")
    for r in rows:
        print(f"| {r} | {figures.get(r)} |")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
