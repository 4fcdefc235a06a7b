"""Live: the average split over replicas (issue 43 item 8): per-rank shadow bytes and update time, split
against unsplit in the same run, the swap's gather, and a state dict's time and peak memory.

    python -m bench.scripts.replicas [--mib 64] [--ranks 1,2,4] [--calls 20] [--out bench/results/...md]

Each rank count runs in spawned processes on gloo (CPU, one thread a rank), every rank making both
averages of the same float32 model (``--mib`` of parameters) and timing, after a warm-up, the best
of several batches of ``update()`` calls of each (compile time excluded). The swap: one
``average_parameters()`` in and out (two gathers). Host memory: ``VmHWM`` is not per-call, so the
state dict's memory is the growth of ``RssAnon`` while it is held (its second call); the memory each
average adds, ``ema.nbytes`` and the growth of ``RssAnon`` when it is made (the split one first). Not
a timed test: figures for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.scripts.offload import rss_anon as _rss_anon


def _best(fn, calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def _rank(rank: int, world: int, store: str, mib: int, calls: int, out: str) -> None:
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from fastema.torch import EMA

    torch.manual_seed(0)
    width = 1024
    layers = max(1, (mib << 20) // (4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    params = list(model.parameters())
    small = torch.nn.Linear(1024, 1024)                  # large enough for the parallel kernels (their threads)
    for ema in (EMA(small, 0.999, shard_replicas=True), EMA(small, 0.999)):
        ema.update()                                       # every kernel compiled and loaded first
    rss0 = _rss_anon()
    split = EMA(model, 0.999, shard_replicas=True)
    rss_split = _rss_anon() - rss0                         # resident memory the split average added
    whole = EMA(model, 0.999)
    rss_whole = _rss_anon() - rss0 - rss_split
    for ema in (whole, split):
        for _ in range(3):
            ema.update()                                   # compiled and warm
    times = {"unsplit": _best(whole.update, calls), "split": _best(split.update, calls)}
    held = (split.nbytes, whole.nbytes)
    split.state_dict()                                     # its pages touched once
    before = _rss_anon()
    t = time.perf_counter()
    state = split.state_dict()
    state_s = time.perf_counter() - t
    peak = _rss_anon() - before
    del state
    dist.barrier()
    t = time.perf_counter()
    with split.average_parameters():
        pass
    swap = time.perf_counter() - t
    row = (f"| {world} | {rank} | {sum(p.numel() for p in params) * 4 / 2**20:.0f} | {held[0] / 2**20:.1f} | "
           f"{held[1] / 2**20:.1f} | {rss_split / 2**20:.1f} | {rss_whole / 2**20:.1f} |"
           f" {times['split'] * 1e3:.2f} | {times['unsplit'] * 1e3:.2f} | "
           f"{times['split'] / times['unsplit']:.2f} | {swap * 1e3:.1f} | {state_s * 1e3:.1f} | {peak / 2**20:.0f} |")
    with open(os.path.join(out, f"{world}-{rank}.txt"), "w") as f:
        f.write(row)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = ["| ranks | rank | model MiB | split nbytes MiB | unsplit nbytes MiB | split RssAnon MiB | "
             "unsplit RssAnon MiB | split update ms | unsplit update ms | split / unsplit | swap in+out ms | "
             "state_dict ms | "
             "state_dict peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for world in (int(w) for w in args.ranks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            mp.start_processes(_rank, args=(world, store, args.mib, args.calls, tmp), nprocs=world,
                               start_method="spawn")          # joins them
            lines += [open(os.path.join(tmp, f"{world}-{r}.txt")).read() for r in range(world)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bench/scripts/replicas.py --mib {args.mib} --ranks {args.ranks}\n\n"
                    f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo, one thread a rank\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
