"""Run a test body in ``world`` spawned processes on gloo (CPU), and collect what each rank saved.

Spawn, never fork (numba's OpenMP layer is not fork-safe); a FileStore in the test's tmp_path
(no port races); one thread per rank (two ranks on two cores); a collection and a barrier before
teardown (a rank tearing gloo down while another still talks, or freeing FSDP2 modules after it, can
abort). Each rank returns a dict of tensors, saved as ``rank{r}.pt``; the parent loads and
asserts, so pytest shows the differences.
"""
from __future__ import annotations

import datetime
import gc
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, out: str, fn, args, pg_timeout: float = 120.0) -> None:
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))     # every collective times out
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        del result
        gc.collect()            # FSDP2 state (reference cycles) freed before the group, not at exit
        dist.barrier()
    except Exception:
        print(f"[rank {rank}] " + traceback.format_exc(), flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path, world: int = 2, *args, timeout: float = 180.0, pg_timeout: float = 120.0) -> list:
    """``fn(rank, world, *args) -> dict`` on every rank; returns the ranks' dicts in rank order. Every
    collective times out after ``pg_timeout`` seconds (a hang is a failure, never a stuck run)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store, out = str(tmp_path / "store"), str(tmp_path)
    ctx = mp.start_processes(_entry, args=(world, store, out, fn, args, pg_timeout), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks did not finish in {timeout} s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]
