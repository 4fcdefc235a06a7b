"""Live: the average streamed out (issue 52 item 3): the extra host memory while ``iter_weights()`` streams a
split average on 4 gloo ranks, against ``full_state_dict()``, and the bound it keeps (one bucket plus
the largest tensor).

    python -m bench.scripts.stream [--mib 64] [--bucket-mib 8] [--layouts split,hsdp] [--out bench/out/stream.json]

Each layout runs in 4 spawned processes on gloo (CPU, one thread a rank), every rank making the
average of the same float32 model (``--mib`` of parameters: ``Linear(1024, 1024)`` layers and one
twice that size, the largest tensor): ``split`` is ``EMA(model, shard_replicas=True)`` (each rank a
quarter of the average), ``hsdp`` an FSDP2 model on a 2x2 mesh (replicate x shard) with the average
split over its replicate dimension. Measured per rank, each after a warm-up call: the high-water
of resident memory above what was resident before (``VmHWM`` reset through ``/proc/self/clear_refs``;
freed memory goes back to the system: ``MALLOC_MMAP_THRESHOLD_`` and ``malloc_trim``) while

- ``iter_weights(bucket_bytes=B)`` is consumed by a loop that reads each tensor and drops it (every
  rank receiving, then ``to=0``);
- ``full_state_dict()`` is made and held (what exporting it whole costs);
- (HSDP) one ``full_tensor()`` of the largest parameter alone, torch's own cost of that gather;

and the time of each, and the broadcasts the stream made (one a bucket). Not a timed test: figures for the report
and ``docs/benchmarks.md``. Prints a table and writes JSON (``--out``, default ``bench/out/stream.json``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.scripts.offload import proc_status as _status

MIB = 1 << 20


def _settle() -> int:
    """Resident bytes now, the C heap trimmed and the high-water mark reset to it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _peak(fn) -> tuple[float, float, object]:
    """``(extra peak bytes, seconds, result)`` of ``fn()``, every rank starting together."""
    dist.barrier()
    base = _settle()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    return _status("VmHWM") - base, seconds, result


def _consume(it) -> int:
    """An engine's loop: each tensor read once (an engine copies it into its own weights), then dropped
    before the next is asked for."""
    count = 0
    for _, t in it:
        count += int(t.reshape(-1)[:1].numel())
        del t
    return count


def _model(mib: int):
    torch.manual_seed(0)
    width = 1024
    layers = max(1, (mib * MIB) // (4 * width * width) - 2)
    return torch.nn.Sequential(torch.nn.Linear(width, 2 * width, bias=False),
                               torch.nn.Linear(2 * width, width, bias=False),
                               *[torch.nn.Linear(width, width, bias=False) for _ in range(layers - 2)])


def _rank(rank: int, world: int, store: str, layout: str, mib: int, bucket: int, out: str) -> None:
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from fastema.torch import EMA

    model = _model(mib)
    if layout == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    ema = EMA(model, 0.999, shard_replicas=True)
    for _ in range(2):
        ema.update()
    sizes = [p.numel() * 4 for p in model.parameters()]
    calls: list = []
    op = "broadcast"
    gather = dist.broadcast                                # one a bucket: the split pieces' reads

    def counted(*a, **k):
        calls.append(1)
        return gather(*a, **k)

    row: dict = {"layout": layout, "rank": rank, "model_mib": sum(sizes) / MIB, "largest_mib": max(sizes) / MIB,
                 "bucket_mib": bucket / MIB, "shadow_mib": ema.nbytes / MIB}
    for name, fn in (("stream", lambda: _consume(ema.iter_weights(bucket_bytes=bucket))),
                     ("stream_to0", lambda: _consume(ema.iter_weights(bucket_bytes=bucket, to=0))),
                     ("full_state_dict", ema.full_state_dict)):
        fn()                                                # warm: every page and code path touched once
        setattr(dist, op, counted)
        calls.clear()
        try:
            peak, seconds, result = _peak(fn)
        finally:
            setattr(dist, op, gather)
        del result
        row[f"{name}_peak_mib"] = peak / MIB
        row[f"{name}_s"] = seconds
        row[f"{name}_broadcasts"] = len(calls)
    row["bound_mib"] = (bucket + max(sizes)) / MIB
    row["full_tensor_peak_mib"] = None
    if layout == "hsdp":                                   # what one full_tensor() of the largest costs alone
        largest = max(model.parameters(), key=lambda p: p.numel())
        largest.full_tensor()
        row["full_tensor_peak_mib"] = _peak(largest.full_tensor)[0] / MIB
    with open(os.path.join(out, f"{layout}-{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--bucket-mib", type=float, default=8)
    ap.add_argument("--layouts", default="split,hsdp")
    bench = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(bench, "out", "stream.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))   # large frees go back to the system at once
    bucket, world = int(args.bucket_mib * MIB), 4
    rows = []
    for layout in args.layouts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), layout, args.mib, bucket, tmp),
                               nprocs=world, start_method="spawn")          # joins them
            for r in range(world):
                with open(os.path.join(tmp, f"{layout}-{r}.json")) as f:
                    rows.append(json.load(f))
    head = ("| layout | rank | model MiB | largest MiB | bucket MiB | bound MiB | stream peak MiB | stream to=0 peak "
            "MiB | full_state_dict peak MiB | stream s | full_state_dict s | broadcasts (stream) | one full_tensor() "
            "peak MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['rank']} | {r['model_mib']:.0f} | {r['largest_mib']:.0f} | "
                     f"{r['bucket_mib']:.0f} | {r['bound_mib']:.0f} | {r['stream_peak_mib']:.1f} | "
                     f"{r['stream_to0_peak_mib']:.1f} | {r['full_state_dict_peak_mib']:.1f} | {r['stream_s']:.3f} | "
                     f"{r['full_state_dict_s']:.3f} | {r['stream_broadcasts']} | "
                     f"{'-' if r['full_tensor_peak_mib'] is None else format(r['full_tensor_peak_mib'], '.1f')} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cpus": os.cpu_count(), "world": world, "backend": "gloo",
                   "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
