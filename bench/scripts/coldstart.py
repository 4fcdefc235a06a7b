"""Live: cold start of the CPU kernels (issue 54 items 3, 4 and 6): one compile per node, and ``fastema warm``.

    python -m bench.scripts.coldstart [--procs 8] [--rounds 1] [--out bench/results/cpu-DATE-coldstart.md]

Each process is a training job's start: ``import torch``, ``EMA(model)`` and one ``update()`` on the
CPU (a float32 MLP of 525k parameters: the parallel kernels' size), one thread each (``NUMBA_NUM_THREADS=1``,
as ranks sharing a node's cores), ``NUMBA_CACHE_DIR`` a fresh folder. Wall times, from the start of
the first process to the end of the last, in one run:

- (a) one process on an empty cache (its compile time);
- (b) ``--procs`` processes started at once on an empty cache;
- (c) the same processes on the cache (b) filled;
- (d) ``python -m fastema warm`` on an empty cache, then one fresh process: its first update
  (``EMA(model)`` + ``update()``, timed inside the process).

(a)-(c) run twice: with the lock (this fastema) and without it (``kernels._store.files.hold`` replaced by
a no-op in each process: the behaviour before the lock, every process compiling every kernel it
misses). Each process also reports how many kernels numba compiled in it (numba's compile event).
Targets (issue 54): (b) - (c) <= 1.5 x (a) with the lock, and (d) <= 0.5 s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import contextlib, json, sys, time
t0 = time.perf_counter()
from numba.core import event
compiled = []

class Count(event.Listener):
    def on_start(self, ev):
        if ev.data["dispatcher"].py_func.__module__.startswith("fastema.kernels"):
            compiled.append(1)
    def on_end(self, ev):
        pass

event.register("numba:compile", Count())
if sys.argv[1] == "unlocked":
    import fastema.kernels._store.files as files
    files.hold = lambda index_path: contextlib.ExitStack()
import torch
from torch import nn
from fastema.torch import EMA
model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
t1 = time.perf_counter()
EMA(model).update()
t2 = time.perf_counter()
print(json.dumps({"first_update": t2 - t1, "process": t2 - t0, "compiled": len(compiled)}))
"""


def _env(cache: str) -> dict:
    return dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")


def _batch(cache: str, procs: int, mode: str) -> dict:
    """``procs`` CHILD processes started at once on ``cache``: the batch's wall time and each one's report."""
    t = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", CHILD, mode], env=_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    reports = []
    for p in running:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a process failed ({mode}):\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"wall": time.perf_counter() - t, "reports": reports}


def _fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, 0o700)
    return path


def _round(root: str, procs: int, mode: str) -> dict:
    a = _batch(_fresh(root, f"{mode}-a"), 1, mode)
    cache = _fresh(root, f"{mode}-b")
    b = _batch(cache, procs, mode)
    c = _batch(cache, procs, mode)
    return {"a": a, "b": b, "c": c}


def _warm_then_first(root: str) -> dict:
    cache = _fresh(root, "warm")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastema", "warm", "--cpu-only"], env=_env(cache),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"python -m fastema warm failed:\n{done.stderr[-3000:]}")
    warm = time.perf_counter() - t
    first = _batch(cache, 1, "locked")["reports"][0]
    return {"warm": warm, "first": first}


def _compiled(batch: dict) -> str:
    return "+".join(str(r["compiled"]) for r in batch["reports"])


def _report(rounds: list, warm: list, procs: int) -> str:
    lines = [f"# CPU cold start: {procs} processes on one cache (issue 54)", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()}, "
             f"python {platform.python_version()}; `python -m bench.scripts.coldstart --procs {procs}`. Each process: "
             "`import torch`, `EMA(model)` + one `update()` (float32 MLP, 525k parameters), one thread, "
             "`NUMBA_CACHE_DIR` a fresh folder. Wall times from the first start to the last exit; `compiled`: the "
             "kernels numba compiled in each process (numba's compile event).", "",
             "| round | mode | (a) 1 process, empty cache | (b) N at once, empty | (c) N at once, warm | (b) - (c) | "
             "(b) - (c) <= 1.5 x (a)? | compiled in (b) |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds, 1):
        for mode in ("locked", "unlocked"):
            m = r[mode]
            a, b, c = m["a"]["wall"], m["b"]["wall"], m["c"]["wall"]
            ok = "met" if b - c <= 1.5 * a else "not met"
            label = "lock (this fastema)" if mode == "locked" else "no lock (before)"
            lines.append(f"| {i} | {label} | {a:.2f} s | {b:.2f} s | {c:.2f} s | {b - c:.2f} s "
                         f"({(b - c) / a:.2f} x (a)) | {ok} | {_compiled(m['b'])} |")
    lines += ["", "| round | `python -m fastema warm` (empty cache) | then a fresh process's first update "
                  "| <= 0.5 s? |", "|---|---|---|---|"]
    for i, w in enumerate(warm, 1):
        f = w["first"]
        lines.append(f"| {i} | {w['warm']:.1f} s | {f['first_update']:.3f} s ({f['compiled']} compiled; process "
                     f"{f['process']:.2f} s with imports) | {'met' if f['first_update'] <= 0.5 else 'not met'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=f"bench/results/cpu-{datetime.date.today()}-coldstart.md")
    args = ap.parse_args(argv)
    rounds, warm = [], []
    with tempfile.TemporaryDirectory(prefix="fastema-coldstart-") as root:
        for i in range(args.rounds):
            order = ("locked", "unlocked") if i % 2 == 0 else ("unlocked", "locked")
            rounds.append({mode: _round(root, args.procs, mode) for mode in order})
            warm.append(_warm_then_first(root))
            print(_report(rounds, warm, args.procs), flush=True)
    report = _report(rounds, warm, args.procs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
