"""Historical: post-hoc snapshot reads for issue 64, H5 (its figures: 2026-11-26, at 3c79a29).

fastema's ``pread`` reader against the memory-mapped read it replaced (safetensors' ``safe_open`` +
``get_tensor``, which died of SIGBUS when a snapshot was truncated while it was read), same run,
same snapshots, interleaved. It still runs against today's reader (``--small``: seconds), but what
it was written to answer, what ``pread`` costs against the old map, is settled
(``bench/results/cpu-2026-11-26-posthoc-read.md``, ``docs/benchmarks.md``); the map's side is code
fastema no longer has (:class:`MmapReader` below).

    .venv/bin/python -m bench.scripts.posthoc_read              # 256 MiB model, 4 snapshots
    .venv/bin/python -m bench.scripts.posthoc_read --small      # a 64 MiB model (seconds)
    .venv/bin/python -m bench.scripts.posthoc_read --cold       # also read from the disk
    .venv/bin/python -m bench.scripts.posthoc_read --mib 1024 --snapshots 8 --out FILE

Not a timed test: a script that prints a Markdown table (and writes it with ``--out FILE``). A
``PostHocEMA`` of a float32 model of ``--mib`` MiB (``bench_merge``'s layout: an embedding of a
quarter, 8 matrices of 1/16 and 32 of 1/128) tracking 2 profiles (sigma_rel 0.05 and 0.10) writes
``--snapshots`` snapshots (each 2 x the model: every byte a synthesis reads). Then, in this
process, ``--repeat`` rounds, the order of the methods reversed every other round, over snapshots
in the page cache (written just before, and read once by a warm-up round):

- ``read every tensor``: every tensor of every snapshot through a snapshot reader (opened; each
  tensor read and checked: its CRC-32, shape and dtype; closed), ``pread``
  (:func:`fastema.posthoc.tensor_reader`, the reader now: each tensor in memory of its own, or,
  ``into one buffer``, a :class:`~fastema.posthoc._snapshots.Scratch` reused, as a synthesis
  reads its profiles) and ``mmap`` (the reader before it: ``safe_open`` memory-maps the file and
  ``get_tensor`` returns a tensor backed by that map, no copy; the same checks:
  :class:`MmapReader` below, the old code);
- ``synthesize``: :func:`fastema.posthoc.synthesize`'s work (``SynthesisPlan`` at sigma_rel 0.08,
  every tensor combined in float64) with each reader; the two results are checked bit-equal;
- ``plain I/O``: every snapshot file read once with ``readinto`` of a 16 MiB buffer (no tensor,
  no check): the floor of any read.

With ``--cold``, each is measured again with the snapshots evicted from the page cache before the
call (``POSIX_FADV_DONTNEED``), so that it reads from the disk. Reported: the median (and best)
wall time, GB/s of snapshot bytes, ms per GB, and ``x mmap``: a ``pread`` row's time over its
``mmap`` row's (medians, and bests).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

import torch
from torch import nn

from bench.scripts.merge import layout
from fastema.posthoc import MAX_ERROR, SynthesisPlan, read_snapshots, tensor_reader
from fastema.posthoc._snapshots import Scratch, TensorReader
from fastema.torch import PostHocEMA

MIB, GB = 1 << 20, 1e9
READ, SYNTH, PLAIN = "read every tensor", "synthesize (sigma_rel 0.08)", "plain I/O (readinto)"
REUSED = "read every tensor, into one buffer"


class _MappedFile:
    """The snapshot file reader before issue 64 (fastema/posthoc/_snapshots.py at 90e3d7e):
    safetensors' ``safe_open`` (a memory map of the file, held until the reader goes) and
    ``get_tensor`` (a tensor backed by the map), then the CRC-32 of its bytes."""

    def __init__(self, snap):
        from safetensors import safe_open

        self.path, self.handle = snap.path, safe_open(snap.path, framework="pt")
        self.keys = set(self.handle.keys())
        self.checksums = snap.meta.checksums if snap.meta is not None else {}

    def read(self, key: str, want, scratch=None):      # no copy: nothing to read into a scratch
        if key not in self.keys:
            raise ValueError(f"{self.path!r} has no tensor {key!r}")
        t = self.handle.get_tensor(key)
        if key in self.checksums:
            flat = t.contiguous().view(-1).view(torch.uint8)
            data = memoryview(flat.numpy()) if t.numel() else b""
            if f"{zlib.crc32(data):08x}" != self.checksums[key]:
                raise ValueError(f"{self.path!r}: tensor {key!r} fails its checksum")
        return t

    def close(self) -> None:
        self.handle = None


class MmapReader(TensorReader):
    """:class:`~fastema.posthoc._snapshots.TensorReader`'s checks (shape, dtype, raw dtypes) over
    :class:`_MappedFile`: the whole old read path."""

    def __init__(self, snap):
        self.snap = snap
        self._file, self._dcp = _MappedFile(snap), None


class Model(nn.Module):
    def __init__(self, nbytes: int):
        super().__init__()
        shapes = layout(nbytes, 4)
        self.w = nn.ParameterDict({name.replace(".", "_"): nn.Parameter(torch.empty(shape))
                                   for name, shape in shapes.items()})


def make_snapshots(folder: str, nbytes: int, count: int) -> str:
    model = Model(nbytes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=g)
    run = os.path.join(folder, "run")
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=1, path=run)
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        ema.update()
    return run


def read_all(run: str, reader, scratch=None) -> int:
    """Every tensor of every snapshot through ``reader`` (into ``scratch``: one reused buffer, as a
    synthesis reads its profiles); the bytes read."""
    total = 0
    for snap in read_snapshots(run):
        r = reader(snap)
        try:
            for key in snap.meta.checksums:
                total += r(key, scratch).nbytes
        finally:
            r.close()
    return total


def synthesized(run: str, reader) -> dict:
    plan = SynthesisPlan(run, 0.08, None, None, MAX_ERROR, None, reader=reader)
    try:
        return {name: plan.tensor(name) for name in plan.names}
    finally:
        plan.close()


def plain(run: str) -> int:
    buf = memoryview(bytearray(16 << 20))
    total = 0
    for snap in read_snapshots(run):
        with open(snap.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def evict(run: str) -> None:
    """The snapshots' pages dropped from the page cache (``POSIX_FADV_DONTNEED``: clean pages no
    process maps), so that the next read comes from the disk."""
    for snap in read_snapshots(run):
        fd = os.open(snap.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench(run: str, repeat: int, cold: bool) -> list:
    methods = {
        (PLAIN, "-"): lambda: plain(run),
        (READ, "pread"): lambda: read_all(run, tensor_reader),
        (READ, "mmap"): lambda: read_all(run, MmapReader),
        (REUSED, "pread"): lambda: read_all(run, tensor_reader, Scratch()),
        (SYNTH, "pread"): lambda: synthesized(run, tensor_reader),
        (SYNTH, "mmap"): lambda: synthesized(run, MmapReader),
    }
    a, b = synthesized(run, tensor_reader), synthesized(run, MmapReader)    # warm-up, and check
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "readers differ"
    del a, b
    read_all(run, tensor_reader)
    read_all(run, MmapReader)
    moved = sum(os.path.getsize(s.path) for s in read_snapshots(run))
    caches = ("page cache", "cold") if cold else ("page cache",)
    keys = [(what, read, cache) for cache in caches for what, read in methods]
    times: dict = {k: [] for k in keys}
    for i in range(repeat):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            if key[2] == "cold":
                evict(run)
            t = time.perf_counter()
            methods[key[:2]]()
            times[key].append(time.perf_counter() - t)
    rows = []
    for (what, read, cache), ts in times.items():
        med, best = statistics.median(ts), min(ts)
        base = READ if what == REUSED else what          # the mmap row a pread row is compared with
        other = times.get((base, "mmap", cache)) if read == "pread" else None
        rows.append({
            "what": what, "read": read, "cache": cache, "seconds": med, "best": best, "all": ts,
            "gbps": moved / med / GB, "ms_per_gb": med * 1e3 / (moved / GB), "bytes": moved,
            "vs_mmap": med / statistics.median(other) if other else None,
            "best_vs_mmap": best / min(other) if other else None})
    return rows


def table(rows: list, mib: int, count: int) -> str:
    n, gb = len(rows[0]["all"]), rows[0]["bytes"] / GB
    lines = [f"{count} snapshots of a {mib} MiB float32 model, 2 profiles each ({gb:.2f} GB a "
             f"pass); wall time, median (and best) of {n} interleaved rounds; x mmap: a pread "
             f"row's time over the mmap row's (medians, and bests); cold: the snapshots evicted "
             f"from the page cache before each call.", "",
             "| files | what | read | time (s) | GB/s | ms per GB | x mmap |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["vs_mmap"] is None else f"{r['vs_mmap']:.2f} ({r['best_vs_mmap']:.2f})"
        lines.append(f"| {r['cache']} | {r['what']} | {r['read']} | {r['seconds']:.3f} "
                     f"({r['best']:.3f}) | {r['gbps']:.2f} | {r['ms_per_gb']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=256, help="the model's float32 MiB (default: 256)")
    p.add_argument("--small", action="store_true", help="a 64 MiB model")
    p.add_argument("--snapshots", type=int, default=4, help="snapshots written (default: 4)")
    p.add_argument("--repeat", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; on a shared machine, torch's threads spin-wait "
                        "when another job holds a core)")
    p.add_argument("--cold", action="store_true",
                   help="also read from the disk (the snapshots evicted before each call)")
    p.add_argument("--dir", default=None, help="where the snapshots go (default: a temporary one)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mib = 64 if args.small else args.mib
    folder = tempfile.mkdtemp(prefix="fastema-bench-posthoc-read-", dir=args.dir)
    try:
        need = 2 * mib * MIB * args.snapshots * 1.05
        if shutil.disk_usage(folder).free < need + (1 << 30):
            raise SystemExit(f"{folder}: too little free disk (the snapshots: {need / GB:.1f} GB)")
        run = make_snapshots(folder, mib * MIB, args.snapshots)
        rows = bench(run, args.repeat, args.cold)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = table(rows, mib, args.snapshots)
    print(text)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntorch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
          f"load average {load} at the end; every round's seconds:")
    for r in rows:
        print(f"  {r['cache']}, {r['what']} ({r['read']}): {[round(s, 3) for s in r['all']]}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
