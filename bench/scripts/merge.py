"""Live: checkpoint merging against plain file I/O and a naive load-everything-and-sum loop (issue 36 item 8).

    .venv/bin/python -m bench.scripts.merge             # 4 inputs of 1 GiB, float32 and bfloat16 (needs ~11 GB of disk)
    .venv/bin/python -m bench.scripts.merge --small     # 4 inputs of 64 MiB (CI size, seconds)
    .venv/bin/python -m bench.scripts.merge --size 256 --format pt   # 4 torch .pt files of 256 MiB

Not a timed test: a script that prints a Markdown table (and writes it with ``--out FILE``). Every
measurement runs in a child process of its own, in one run, in turn, ``--repeat`` times (the median
is reported), over the same inputs in the page cache (written just before, and read once by a
warm-up), each child measuring:

- ``plain I/O``: every input read once (``readinto`` a 16 MiB buffer) and one output of the merged
  size written (``write`` of that buffer, then ``fsync``): what the merge cannot go below;
- ``fastema``: ``fastema.merge.merge_checkpoints(inputs, out)`` (uniform weights), in process with
  its kernels compiled (a small merge first), once per read mode, side by side on the same inputs
  (the ``read`` column): ``read="pread"`` (the default: pieces copied into small buffers; for torch
  files, copied out of torch's map) and ``read="mmap"`` (read in place); ``x mmap`` is a row's time
  over the mmap row's;
- ``naive``: fairseq's ``average_checkpoints.py`` loop: each input loaded whole
  (``safetensors.torch.load_file``, or ``torch.load`` of a ``.pt``), floating tensors promoted to
  float32 and summed into the first's clone, divided by the count, converted back and saved with
  ``save_file``.

Peak anonymous memory: ``RssAnon`` of ``/proc/self/status`` (heap and buffers; the file pages of
memory-mapped inputs do not count), sampled every 2 ms by a thread of the child, less its value
before the measured call. Inputs: per dtype, 4 safetensors files (``--format pt``: torch ``.pt``
files, ``torch.save``) of one model: an embedding of a quarter of the file, 8 matrices of 1/16 and
32 of 1/128 (the largest tensor is a quarter of an input).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

GiB = 1 << 30


def anon() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """The largest RssAnon seen while the block runs (a sampling thread), less the value at its start."""

    def __enter__(self):
        self.base = self.peak = anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon())
        self.added = self.peak - self.base


def layout(nbytes: int, itemsize: int) -> dict:
    """name -> shape of one input of ``nbytes`` (elements of ``itemsize`` bytes), 4096 columns."""
    cols = 4096
    rows = lambda frac: max(1, nbytes // frac // itemsize // cols)  # noqa: E731
    shapes = {"embed.weight": (rows(4), cols)}
    shapes.update({f"layers.{i}.mlp.weight": (rows(16), cols) for i in range(8)})
    shapes.update({f"layers.{i}.attn.weight": (rows(128), cols) for i in range(32)})
    return shapes


def make_inputs(folder: str, size: int, dtype: str, fmt: str = "safetensors") -> list:
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    shapes = layout(size, torch.empty((), dtype=tdtype).element_size())
    paths = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        tensors = {name: torch.randn(shape, generator=g).to(tdtype) for name, shape in shapes.items()}
        paths.append(os.path.join(folder, f"{dtype}-{i}.{fmt}"))
        if fmt == "pt":
            torch.save({"model": tensors, "step": 100 * (i + 1)}, paths[-1])
        else:
            save_file(tensors, paths[-1], metadata={"format": "pt", "step": str(100 * (i + 1))})
        del tensors
    return paths


# ---------------------------------------------------------------- the children


def child_plain(paths: list, out: str) -> dict:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    size = os.path.getsize(paths[0])
    with PeakAnon() as peak:
        t = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
        with open(out, "wb", buffering=0) as f:
            left = size
            while left:
                left -= f.write(view[:min(left, len(view))])
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "anon": peak.added}


def child_fastema(paths: list, out: str, read: str) -> dict:
    from fastema.merge import merge_checkpoints

    warm = os.path.join(os.path.dirname(out), "warm")          # kernels compiled (or loaded) before timing
    os.makedirs(warm, exist_ok=True)
    import torch
    from safetensors.torch import save_file

    dtype = _load(paths[0])["layers.0.attn.weight"].dtype
    small = [os.path.join(warm, f"{i}.safetensors") for i in range(4)]
    for p in small:
        save_file({"w": torch.ones(1 << 16, dtype=dtype)}, p)
    merge_checkpoints(small, os.path.join(warm, "out.safetensors"), read=read)
    shutil.rmtree(warm)
    with PeakAnon() as peak:
        t = time.perf_counter()
        report = merge_checkpoints(paths, out, read=read, progress=False)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "anon": peak.added, "report_anon": report.peak_anon_bytes}


def _load(path: str) -> dict:
    """Every tensor of a safetensors file, or of a ``.pt`` file's ``model``, in memory."""
    if path.endswith(".pt"):
        import torch

        return torch.load(path, weights_only=True)["model"]
    from safetensors.torch import load_file

    return load_file(path)


def child_naive(paths: list, out: str) -> dict:
    from safetensors.torch import save_file

    with PeakAnon() as peak:
        t = time.perf_counter()
        params: dict = {}
        dtypes: dict = {}
        for p in paths:
            state = _load(p)
            for k, v in state.items():
                dtypes.setdefault(k, v.dtype)
                v = v.float() if v.is_floating_point() else v
                if k not in params:
                    params[k] = v.clone()
                else:
                    params[k] += v
            del state
        merged = {k: (v / len(paths)).to(dtypes[k]) for k, v in params.items()}
        del params
        save_file(merged, out)
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "anon": peak.added}


def run_child(kind: str, paths: list, out: str, read: str = "pread") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--read", read, "--out", out, *paths]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    if os.path.exists(out):
        os.remove(out)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the table


METHODS = (("plain", "plain I/O (read inputs, write output)", "-"), ("pread", "fastema merge", "pread (default)"),
           ("mmap", "fastema merge", "mmap"), ("naive", "naive loop (fairseq-style)", "-"))


def bench(folder: str, size: int, repeat: int, dtypes, fmt: str = "safetensors") -> list:
    rows = []
    for dtype in dtypes:
        paths = make_inputs(folder, size, dtype, fmt)
        out = os.path.join(folder, "out.safetensors")
        results: dict = {k: [] for k in ("plain", "mmap", "pread", "naive")}
        run_child("plain", paths, out)                    # warm-up: every input in the page cache
        for _ in range(repeat):
            results["plain"].append(run_child("plain", paths, out))
            results["pread"].append(run_child("fastema", paths, out, "pread"))
            results["mmap"].append(run_child("fastema", paths, out, "mmap"))
            results["naive"].append(run_child("naive", paths, out))
        largest = max(os.path.getsize(paths[0]) // 4, 1)
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
        best = {k: min(r["seconds"] for r in v) for k, v in results.items()}
        peak = {k: max(r["anon"] for r in v) for k, v in results.items()}
        moved = 5 * os.path.getsize(paths[0])                # 4 inputs read, one output written
        for k, label, read in METHODS:
            rows.append({"dtype": dtype, "method": label, "read": read, "seconds": med[k], "best": best[k],
                         "all": [r["seconds"] for r in results[k]], "gbps": moved / med[k] / 1e9,
                         "anon_mib": peak[k] / 2**20, "vs_plain": med[k] / med["plain"],
                         "vs_naive": med[k] / med["naive"], "best_vs_plain": best[k] / best["plain"],
                         "vs_mmap": med[k] / med["mmap"] if k in ("pread", "mmap") else None,
                         "best_vs_mmap": best[k] / best["mmap"] if k in ("pread", "mmap") else None,
                         "best_vs_naive": best[k] / best["naive"], "bound_mib": (1.5 * largest + 300e6) / 2**20})
        for p in paths:
            os.remove(p)
    return rows


def table(rows: list, size: int, fmt: str = "safetensors") -> str:
    lines = [f"4 {fmt} inputs of {size / GiB:g} GiB each, uniform weights; each child's wall time, median (and best) "
             f"of {len(rows[0]['all'])} runs; ratios of medians (and of bests); peak RssAnon added (the bound: 1.5x "
             f"the largest tensor + 300 MB = {rows[0]['bound_mib']:.0f} MiB).", "",
             "| dtype | method | read | time (s) | GB/s moved | x mmap | x plain I/O | x naive | "
             "peak RssAnon added (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_mmap = "-" if r["vs_mmap"] is None else f"{r['vs_mmap']:.2f} ({r['best_vs_mmap']:.2f})"
        lines.append(f"| {r['dtype']} | {r['method']} | {r['read']} | {r['seconds']:.2f} ({r['best']:.2f}) | "
                     f"{r['gbps']:.2f} | {vs_mmap} | {r['vs_plain']:.2f} ({r['best_vs_plain']:.2f}) | "
                     f"{r['vs_naive']:.2f} ({r['best_vs_naive']:.2f}) | {r['anon_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="4 inputs of 64 MiB instead of 1 GiB")
    p.add_argument("--size", type=int, metavar="MIB", help="4 inputs of this many MiB (default: 1024, --small: 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median) (default: 3)")
    p.add_argument("--dir", default=None, help="where the inputs go (default: a temporary folder)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="(default: float32,bfloat16)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "pt"),
                   help="the inputs' format (default: %(default)s)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--read", default="pread", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = args.out
        fn = {"plain": child_plain, "naive": child_naive}.get(args.child)
        res = fn(args.paths, out) if fn else child_fastema(args.paths, out, args.read)
        print(json.dumps(res))
        return 0
    size = (args.size << 20) if args.size else (64 << 20) if args.small else GiB
    folder = tempfile.mkdtemp(prefix="fastema-bench-merge-", dir=args.dir)
    try:
        free = shutil.disk_usage(folder).free
        if free < 6 * size + (1 << 30):
            raise SystemExit(f"{folder} has {free / GiB:.1f} GiB free; the benchmark needs {6 * size / GiB + 1:.1f}")
        rows = bench(folder, size, args.repeat, args.dtypes.split(","), args.format)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = table(rows, size, args.format)
    print(text)
    print("\nevery run's seconds: " + "; ".join(f"{r['dtype']} {r['method']} ({r['read']}): "
                                               f"{[round(s, 2) for s in r['all']]}" for r in rows))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
