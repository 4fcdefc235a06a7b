"""Live: the average inside a jitted JAX training step (issue 71), interleaved call by call: the rows of
``bench/suite/test_bench_jax_jit.py`` (the same ``_Row`` objects, checked there) timed in one
process, order alternating, so a loaded machine slows every row alike.

    python -m bench.scripts.jax_step [--count 300] [--numel 4096] [--calls 60] [--rows NAME,...]

Per row: the min and median wall time of ``--calls`` steps, and the median process CPU time
(every thread's: XLA's pool included), which a busy 2-core VM inflates far less than the wall
clock; then fastema's two ratios of issue 71: the K=1 update against the hand-written
``jax.tree.map`` lerp (target: no slower) and K=3 in one update against three one-decay updates
in one step and in three jitted calls (target: at least 1.2x). Not a timed test: figures for
``docs/guides/jax.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

ROWS = ["no average", "jit tree_map lerp", "fastema.jax.ema", "fastema.jax.ema K=3", "fastema.jax.ema K=1 x3",
        "fastema.jax.ema K=1 x3 (3 steps)", "flax.nnx.EMA"]


def measure(rows: list[str], count: int, numel: int, calls: int) -> dict:
    """``{row: (wall min, wall median, cpu median)}`` in seconds."""
    from bench.suite.shapes import many_small
    from bench.suite.test_bench_jax_jit import _Row

    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s, dtype=np.float32) for s in many_small(count=count, numel=numel)]
    built = {}
    for name in rows:
        row = _Row(name)
        row.start(host, host)
        row.fn()                                   # compile
        row.fn()
        built[name] = row
    wall: dict = {name: [] for name in rows}
    cpu: dict = {name: [] for name in rows}
    for k in range(calls):
        for name in (rows if k % 2 == 0 else rows[::-1]):
            t, c = time.perf_counter(), time.process_time()
            built[name].fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {n: (min(wall[n]), statistics.median(wall[n]), statistics.median(cpu[n])) for n in rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="leaves (default 300)")
    ap.add_argument("--numel", type=int, default=4096, help="elements a leaf (default 4096)")
    ap.add_argument("--calls", type=int, default=60, help="timed steps a row (default 60)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    got = measure(rows, args.count, args.numel, args.calls)
    print(f"{args.count} x {args.numel} float32, {args.calls} interleaved steps a row; load {os.getloadavg()[0]:.1f}")
    print("| row | wall min | wall median | CPU median |\n|---|---|---|---|")
    for name, (lo, med, c) in got.items():
        print(f"| {name} | {lo * 1e3:.2f} ms | {med * 1e3:.2f} ms | {c * 1e3:.2f} ms |")
    pairs = [("jit tree_map lerp", "fastema.jax.ema"), ("flax.nnx.EMA", "fastema.jax.ema"),
             ("fastema.jax.ema K=1 x3", "fastema.jax.ema K=3"),
             ("fastema.jax.ema K=1 x3 (3 steps)", "fastema.jax.ema K=3")]
    for base, ours in pairs:
        if base in got and ours in got:
            print(f"{ours} vs {base}: {got[base][1] / got[ours][1]:.2f}x wall median, "
                  f"{got[base][2] / got[ours][2]:.2f}x CPU median, {got[base][0] / got[ours][0]:.2f}x wall min")


if __name__ == "__main__":
    main()
