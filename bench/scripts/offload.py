"""Live: offload through two staging chunks (issue 44 item 6): ``EMA(model, offload=Offload(chunk=C))``
against a plain ``EMA(model)`` in the same run, on the CPU, for float32 models of several sizes and several
chunk sizes; the host fold's GB/s against this machine's streaming bandwidth (measured in the same run);
and the memory each average adds.

    python -m bench.scripts.offload [--sizes 64,256,1024] [--chunks 4,16,64,256] [--reps 5] [--out FILE]
    python -m bench.scripts.offload --ring-only ...     # every window through the chunks (none in place)
    python -m bench.scripts.offload --gpu [--sizes ...] [--chunks ...]     # on a GPU: D2H GB/s, overlap

Not a timed test: figures for docs/benchmarks.md. Method:

- streaming bandwidth: a NumPy copy (``np.copyto``, 8 B an element: read + write), a STREAM triad
  ``a = b + s * c`` and an in-place triad ``a += s * b`` in Numba ``prange`` loops (12 B an element
  counted; the STREAM one moves 16 with its write-allocate read, the in-place one 12, as the fold does),
  64 Mi float32 elements, best of 5, once for the run; and both again (16 Mi elements) run beside each
  fold measurement: the fold is compared with the in-place triad (its own access pattern; the machine's
  load changes between measurements);
- each model size runs in a fresh subprocess (its memory is its own): the model is float32 ``Linear``
  weights of 16 MiB each; per chunk size the offloaded ``update()`` (returns once every window is
  staged) and ``update()`` + ``join()`` (every fold done) are timed ``--reps`` times after three warm-up
  calls (compile excluded), each between two calls of the plain EMA's ``update()``: the ratio is the
  median of each ``update()`` + ``join()`` over the mean of its two neighbours (a shared machine's load
  moves both alike), the times the medians;
- the host fold alone: every window's fold run again on the training thread with nothing beside it
  (the pipeline's folds share the cores and the parallel-kernel lock with the packs), GB/s counting
  12 B an element as STREAM's triad does (the slot and the shadow read, the shadow written), the best
  of ``--reps`` runs as for the streaming figures; the pack alone likewise at 8 B an element;
- memory: ``ema.memory(parts=True)`` and the growth of ``RssAnon`` (after ``malloc_trim``) from before
  the average is made to after three updates.

``--gpu``: the model on the GPU (bfloat16 weights, float32 shadow), the pinned device-to-host copy of one
chunk (GB/s), and a training step (matmuls standing for forward and backward) with and without
``update()`` after it: what the offloaded update adds to a step, against the synchronous EMA's.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MIB = 1 << 20


def proc_status(key: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``RssAnon``, ``VmRSS``, ``VmHWM``...)
    in bytes; 0 where it is not there (also bench_stream's and bench_teacher_sync's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_anon() -> int:
    """Resident anonymous memory, after the C heap has given back what is free (``malloc_trim``), so
    that memory freed earlier and reused by the next allocation does not hide it (also bench_replicas's)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status("RssAnon")


class Stream:
    """A NumPy copy (8 B an element), a Numba STREAM triad ``a = b + s * c`` (12 B an element counted; its
    stores to a third array also cost a write-allocate read, 16 B moved) and an in-place triad
    ``a += s * b`` (12 B an element, all of them moved: the fold's own pattern, a row read and written
    back and a slot read) over ``n`` float32 elements: this machine's streaming bandwidth, timed on
    demand (GB/s)."""

    def __init__(self, n: int = 64 << 20):
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def triad(a, b, c, s):
            for i in prange(a.size):
                a[i] = b[i] + s * c[i]

        @njit(parallel=True, fastmath=True)
        def in_place(a, b, s):
            for i in prange(a.size):
                a[i] += s * b[i]

        self.n, self._triad, self._in_place = n, triad, in_place
        self.a, self.b, self.c = (np.full(n, v, np.float32) for v in (0.0, 1.0, 2.0))
        triad(self.a, self.b, self.c, np.float32(3.0))           # compiled here
        in_place(self.a, self.b, np.float32(0.0))

    def copy(self) -> float:
        t = time.perf_counter()
        np.copyto(self.a, self.b)
        return 8 * self.n / (time.perf_counter() - t) / 1e9

    def triad(self) -> float:
        t = time.perf_counter()
        self._triad(self.a, self.b, self.c, np.float32(3.0))
        return 12 * self.n / (time.perf_counter() - t) / 1e9

    def in_place(self) -> float:
        t = time.perf_counter()
        self._in_place(self.a, self.b, np.float32(0.0))
        return 12 * self.n / (time.perf_counter() - t) / 1e9


def streaming(reps: int = 5) -> dict:
    """The best of ``reps`` runs of each of :class:`Stream`'s measures (GB/s)."""
    s = Stream()
    return {"copy": max(s.copy() for _ in range(reps)), "triad": max(s.triad() for _ in range(reps)),
            "in_place": max(s.in_place() for _ in range(reps))}


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_size(mib: int, chunks: list[int], reps: int, device: str) -> list[dict]:
    """Every figure for one model size (run in its own process)."""
    import torch

    from fastema.torch import EMA

    cuda = device != "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    per = 2048 * 2048 * 4                                            # one float32 16 MiB weight
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(max(1, mib * MIB // per))])
    model = model.to(device=device, dtype=dtype)
    plain = EMA(model, 0.999, device_step=False) if cuda else EMA(model, 0.999)
    for _ in range(2):
        _bump(model)
        plain.update()
    _sync(cuda)
    return [_offloaded(model, plain, mib, chunk, reps, cuda) for chunk in chunks if chunk <= mib]


def _bump(model) -> None:
    import torch

    with torch.no_grad():
        torch._foreach_add_(list(model.parameters()), 1e-3)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _offloaded(model, plain, mib: int, chunk: int, reps: int, cuda: bool) -> dict:
    """The offloaded EMA's figures with chunks of ``chunk`` MiB, its calls interleaved with the plain
    EMA's (``plain``) so that both see the same machine: a shared VM's load moves both alike."""
    from fastema.torch import EMA, Offload

    numel = sum(p.numel() for p in model.parameters())
    before = rss_anon()
    ema = EMA(model, 0.999, offload=Offload(chunk=chunk * MIB))
    for _ in range(3):
        _bump(model)
        ema.update()
    ema.join()
    _sync(cuda)
    added = rss_anon() - before
    parts = ema.memory(parts=True)
    plains, updates, joined = [], [], []
    for _ in range(reps):
        plains.append(_timed(lambda: (plain.update(), _sync(cuda))))
        updates.append(_timed(lambda: (ema.update(), _sync(cuda))))
        ema.join()
        joined.append(_timed(lambda: (ema.update(), ema.join())))
        plains.append(_timed(lambda: (plain.update(), _sync(cuda))))
    ratios = [j / ((a + b) / 2) for j, a, b in zip(joined, plains[::2], plains[1::2])]
    shadow = ema._avg
    windows = list(range(len(shadow.src.windows)))
    rows_at, weights = shadow._rows_at, (0.001,)

    def folds() -> None:
        for i in windows:
            ring = shadow._ring_of[shadow.src.device_of(i)]
            shadow.src.fold(i, ring.slot_at[i % 2], rows_at[shadow.src.windows[i].gi], weights, False, 0)

    def packs() -> None:
        for i in windows:
            shadow.src.pack(i, shadow._ring_of[shadow.src.device_of(i)].chunk_at[i % 2])
        _sync(cuda)

    stream = Stream(16 << 20)                                      # the triads again, beside each fold run
    fold_s = pack_s = float("inf")
    triad = in_place = 0.0
    for _ in range(reps):                                          # bandwidth: the best of the runs
        triad = max(triad, stream.triad())
        in_place = max(in_place, stream.in_place())
        fold_s = min(fold_s, _timed(folds))
        pack_s = min(pack_s, _timed(packs))
    del stream
    row = {"mib": mib, "chunk": chunk, "windows": len(windows), "plain_ms": statistics.median(plains) * 1e3,
           "update_ms": statistics.median(updates) * 1e3, "joined_ms": statistics.median(joined) * 1e3,
           "ratio": statistics.median(ratios), "fold_gbs": 12 * numel / fold_s / 1e9, "triad_gbs": triad,
           "in_place_gbs": in_place,
           "pack_gbs": (2 if cuda else 4) * 2 * numel / pack_s / 1e9, "rss_mib": added / MIB, "parts": parts}
    if cuda:
        row.update(gpu_figures(ema, reps))
    return row


def gpu_figures(ema, reps: int) -> dict:
    """On a GPU: the pinned device-to-host copy of one chunk (GB/s), and a training step with and without
    the offloaded update after it."""
    import torch

    ring = next(iter(ema._avg._ring_of.values()))
    nbytes = ring.chunks[0].numel()

    def d2h() -> None:
        ring.slots[0].copy_(ring.chunks[0], non_blocking=True)
        torch.cuda.synchronize()

    d2h_s = _median(d2h, reps)
    x = torch.randn(8192, 8192, device=ring.device, dtype=torch.bfloat16)

    def step() -> None:
        for _ in range(8):
            x.copy_(x @ x * 1e-4)

    def step_sync() -> None:
        step()
        torch.cuda.synchronize()

    def step_update() -> None:
        step()
        ema.update()
        torch.cuda.synchronize()

    step_s = _median(step_sync, reps)
    both_s = _median(step_update, reps)
    ema.join()
    return {"d2h_gbs": nbytes / d2h_s / 1e9, "step_ms": step_s * 1e3, "step_update_ms": both_s * 1e3}


def table(rows: list[dict]) -> str:
    lines = ["| model MiB | chunk MiB | windows | plain update ms | offloaded update() ms | update + join ms | "
             "(update + join) / plain | host fold GB/s | in-place triad beside it GB/s | fold / in-place triad | "
             "STREAM triad GB/s | pack GB/s | nbytes MiB | RssAnon added MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nbytes = sum(v for d in r["parts"].values() for v in d.values()) / MIB
        lines.append(f"| {r['mib']} | {r['chunk']} | {r['windows']} | {r['plain_ms']:.1f} | {r['update_ms']:.1f} | "
                     f"{r['joined_ms']:.1f} | {r['ratio']:.2f} | {r['fold_gbs']:.1f} | {r['in_place_gbs']:.1f} | "
                     f"{r['fold_gbs'] / r['in_place_gbs']:.0%} | {r['triad_gbs']:.1f} | {r['pack_gbs']:.1f} | "
                     f"{nbytes:.1f} | "
                     f"{r['rss_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,256,1024", help="model sizes, MiB of float32 weights")
    ap.add_argument("--chunks", default="4,16,64,256", help="Offload(chunk=) values, MiB")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    ap.add_argument("--gpu", action="store_true", help="the model on cuda:0")
    ap.add_argument("--ring-only", action="store_true", help="on the CPU, stage every window through the chunks "
                    "(no window folded from the weights in place): the GPU's pipeline without the copies")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # a subprocess: one size, JSON out
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    device = "cuda:0" if args.gpu else "cpu"
    if args.one is not None:
        if args.ring_only:
            from fastema.torch._placement import offload as _offload

            _offload.IN_PLACE = False
        print("ROWS " + json.dumps(one_size(args.one, chunks, args.reps, device)))
        return 0
    import numba
    import torch

    bw = streaming()
    rows: list[dict] = []
    for mib in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(mib), "--chunks", args.chunks, "--reps", str(args.reps)]
        cmd += (["--gpu"] if args.gpu else []) + (["--ring-only"] if args.ring_only else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        rows += json.loads([s for s in done.stdout.splitlines() if s.startswith("ROWS ")][-1][5:])
    flags = (" --gpu" if args.gpu else "") + (" --ring-only" if args.ring_only else "")
    head = (f"# bench/scripts/offload.py --sizes {args.sizes} --chunks {args.chunks} --reps {args.reps}{flags}"
            f"\n\ntorch {torch.__version__}, numba {numba.__version__}, "
            f"{os.cpu_count()} CPUs ({numba.config.NUMBA_NUM_THREADS} numba threads), {device}\n\n"
            f"Streaming bandwidth, same run: NumPy copy {bw['copy']:.1f} GB/s (8 B an element), Numba STREAM "
            f"triad {bw['triad']:.1f} GB/s (12 B an element counted), in-place triad {bw['in_place']:.1f} GB/s "
            f"(12 B an element).\n\n")
    report = head + table(rows) + "\n"
    if args.gpu:
        report += ("\n| model MiB | chunk MiB | D2H GB/s | step ms | step + offloaded update ms |\n"
                   "|---|---|---|---|---|\n")
        report += "\n".join(f"| {r['mib']} | {r['chunk']} | {r['d2h_gbs']:.1f} | {r['step_ms']:.1f} | "
                            f"{r['step_update_ms']:.1f} |" for r in rows) + "\n"
    report += "\n```json\n" + json.dumps({"streaming": bw, "rows": rows}, indent=1) + "\n```\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
