"""Run a test body on ``world`` gloo ranks (CPU), and collect what each rank saved.

The ranks are a long-lived world of this size (tests/worlds.py: one per size, per test process, a fresh
one after a test that broke it): spawned, never forked (numba's OpenMP layer is not fork-safe); a
FileStore in the world's temporary folder (no port races); one thread per rank (two ranks on two cores);
a timeout on every collective (``pg_timeout``, set for each test); after each body a collection and a
barrier (a rank tearing gloo down while another still talks, or freeing FSDP2 modules after it, can
abort), and the process-global state the body changed put back. Each rank returns a dict of tensors,
saved as ``rank{r}.pt`` in ``tmp_path``; the parent loads and asserts, so pytest shows the differences.

``fresh=True``: a world spawned for this test alone and ended after it (a body that initialises the
process group with its own options, destroys it, or tests what a fresh process does).
"""
from __future__ import annotations

import os

import torch
import worlds


def run_ranks(fn, tmp_path, world: int = 2, *args, timeout: float = 180.0, pg_timeout: float = 120.0,
              fresh: bool = False) -> list:
    """``fn(rank, world, *args) -> dict`` on every rank; returns the ranks' dicts in rank order. Every
    collective times out after ``pg_timeout`` seconds, the whole body after ``timeout`` (a hang is a
    failure, never a stuck run). ``fn`` must be a module-level function (it is pickled by name)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path)
    for r in range(world):                        # a file of an earlier call never passes for this one's
        try:
            os.remove(os.path.join(out, f"rank{r}.pt"))
        except FileNotFoundError:
            pass
    w = worlds.World(world) if fresh else worlds.world(world)
    try:
        w.run(fn, args, out, timeout, pg_timeout)
    finally:
        if fresh:
            w.close()
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


#: torch.distributed's collectives and point-to-point calls, as :class:`Counted` counts them (by name)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv", "batch_isend_irecv")
GATHERS = ("all_gather_into_tensor", "all_gather_single")


class Counted:
    """Counts every call of torch.distributed's collectives and point-to-point calls while entered
    (``calls``: their names in order), through both ``torch.distributed`` and ``distributed_c10d``."""

    def __enter__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.calls: list = []
        self.saved: list = []
        for mod in (dist, c10d):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is None:
                    continue
                self.saved.append((mod, name, fn))

                def counted(*a, _fn=fn, _name=name, **k):
                    self.calls.append(_name)
                    return _fn(*a, **k)
                setattr(mod, name, counted)
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)

    def gathers(self) -> int:
        """The all-gathers into one tensor counted."""
        return sum(c in GATHERS for c in self.calls)


def deepspeed_on_cpu(rank: int, world: int):
    """DeepSpeed on the CPU accelerator for a rank body (imported in the ranks only, never in pytest's
    process): the environment its launcher would set, and no JIT build of its shared-memory all-reduce.

    DeepSpeed's CPU backend compiles that op (``deepspeed_shm_comm``, 40-100 s of C++ on a 2-core machine)
    at the first ``init_distributed`` of every fresh checkout, with both ranks waiting on one file lock in
    ``~/.cache/torch_extensions``; a world killed mid-build leaves the lock behind and every later DeepSpeed
    test waits on it (CI's failure at 9c2e901). The op only serves all-reduces when ``LOCAL_SIZE`` equals
    the world size, which these tests never set, so gloo carries every collective with or without it."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.pop("LOCAL_SIZE", None)
    import importlib

    import deepspeed

    # by its module's name: ``import deepspeed.comm.torch as m`` binds deepspeed.comm's attribute ``torch``,
    # which is PyTorch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed
