"""Live: a reference / teacher sync under DeepSpeed ZeRO-3 (issue 52 item 2): fastema's shard-local sync
(``TargetNetwork.update()``, what ``fastema.trl.RefSyncCallback`` runs) against TRL's
``SyncRefModelCallback.sync_target_model`` (its ZeRO-3 path: every parameter of both models gathered
with ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``, the sync on rank 0, a broadcast back
on exit), in the same run.

    python -m bench.scripts.teacher_sync [--mib 8] [--calls 10] [--rounds 5] [--out bench/out/teacher_sync.json]

2 spawned ranks on gloo, DeepSpeed on its CPU accelerator (``DS_ACCELERATOR=cpu``), one thread a rank. A
float32 MLP of ``--mib`` MiB (``Linear(512, 512)`` layers: the weights partitioned, the biases under
DeepSpeed's default ``stage3_param_persistence_threshold``, persistent) is the policy, an engine with SGD;
two references are engines made with the same stage-3 config and no optimizer (TRL's ``prepare_deepspeed``),
one synced by each method, each after two forwards (the persistent parameters gathered, as in training).
Per rank:

- time per sync: the best of ``--rounds`` rounds of ``--calls`` back-to-back syncs each, the methods
  interleaved, the ranks in step (a barrier before each round), after a warm-up (compile excluded); beside
  them, torch's ``_foreach_lerp_`` of the same partitions (copies: the floor a local lerp costs);
- collectives per sync: torch.distributed's functions counted (DeepSpeed's go through them);
- bytes allocated per sync: every new tensor storage an op makes during one sync (a ``TorchDispatchMode``
  sees every op, factory functions included): deterministic;
- peak extra resident memory: ``VmHWM`` reset (``/proc/self/clear_refs``: 5) right before one sync, its
  value after minus ``VmRSS`` before. glibc's mmap threshold is fixed at 64 KiB
  (``MALLOC_MMAP_THRESHOLD_``), so every buffer over it is mapped when allocated and unmapped when freed:
  no reuse of freed heap memory hides an allocation, and the high-water mark is the sync's own peak.

Prints a table; writes the figures as JSON. Not a timed test: figures for the guide and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.scripts.offload import proc_status as _status
from bench.suite.checked import checked

ALPHA = 0.05                     # SDPO/SDFT's teacher_update_rate; any rate costs the same
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "send", "recv", "isend", "irecv", "_all_gather_base", "_reduce_scatter_base")


def _deepspeed(rank: int, world: int):
    """DeepSpeed on the CPU accelerator, as its launcher would set it, and no JIT build of its shared-memory
    all-reduce (tests/dist.py's deepspeed_on_cpu: gloo carries every collective here)."""
    import importlib

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.pop("LOCAL_SIZE", None)
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


@contextlib.contextmanager
def _counted():
    """``{"collectives": n, "alloc_bytes": n}`` of what runs while entered."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {"collectives": 0, "alloc_bytes": 0}
    saved = []
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            saved.append((name, fn))

            def counted(*a, _fn=fn, **k):
                seen["collectives"] += 1
                return _fn(*a, **k)
            setattr(dist, name, counted)

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from tensors(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from tensors(o)

    class Allocs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
            for t in tensors(out):
                s = t.untyped_storage()
                if s.nbytes() and s.data_ptr() not in ins:
                    ins.add(s.data_ptr())
                    seen["alloc_bytes"] += s.nbytes()
            return out

    try:
        with Allocs():
            yield seen
    finally:
        for name, fn in saved:
            setattr(dist, name, fn)


def _peak(fn) -> int:
    """Resident bytes above the start that one call of ``fn`` reached (see the module docstring)."""
    import gc

    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                       # VmHWM := VmRSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _rank(rank: int, world: int, store: str, mib: int, calls: int, rounds: int, out: str) -> None:
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    deepspeed = _deepspeed(rank, world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import trl
    import trl.trainer.callbacks as trl_callbacks
    from trl.trainer.callbacks import SyncRefModelCallback

    from fastema.torch import TargetNetwork

    width = 512
    layers = max(1, (mib << 20) // (4 * width * width))

    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3}}
    policy = mlp(0)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(policy.parameters(), lr=0.01),
                                      config=cfg)
    theirs, *_ = deepspeed.initialize(model=mlp(1), config=cfg)
    ours, *_ = deepspeed.initialize(model=mlp(1), config=cfg)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x).square().mean())
    engine.step()
    with torch.no_grad():
        for _ in range(2):
            theirs(x), ours(x)                             # traced; then the persistent parameters stay gathered
    # TRL takes its ZeRO-3 path when accelerate's state says stage 3, as a trainer launched on ZeRO-3 sets it
    trl_callbacks.AcceleratorState = lambda: type("S", (), {"deepspeed_plugin": type("P", (), {"zero_stage": 3})})()
    network = TargetNetwork(engine, ours, tau=ALPHA)

    def trl_sync():
        SyncRefModelCallback.sync_target_model(policy, theirs.module, ALPHA)

    before = [p.ds_tensor.clone() for p in ours.module.parameters()]
    spare = [b.clone() for b in before]
    online = [p.ds_tensor for p in policy.parameters()]
    sizes = [max(0, min(b.numel(), p.ds_numel - rank * b.numel())) for b, p in zip(before, ours.module.parameters())]

    def floor():                                           # the same bytes lerped by torch: no check, no plan
        torch._foreach_lerp_(spare, online, ALPHA)

    def valid(tensors):                                    # this rank's elements of each partition
        return [t[:n] for t, n in zip(tensors, sizes)]

    methods = {"fastema": network.update, "trl": trl_sync, "torch _foreach_lerp_ (floor)": floor}
    # each baseline once against fastema's result from the same start (the two references made alike,
    # spare a copy of the partitions): refused before it is timed where it does other work
    checked(methods, {"fastema": lambda: valid([p.ds_tensor for p in ours.module.parameters()]),
                      "trl": lambda: valid([p.ds_tensor for p in theirs.module.parameters()]),
                      "torch _foreach_lerp_ (floor)": lambda: valid(spare)}, ours="fastema", inputs=online)
    for b, p, q, n in zip(before, ours.module.parameters(), policy.parameters(), sizes):
        assert torch.equal(p.ds_tensor[:n], torch.lerp(b[:n], q.ds_tensor[:n], ALPHA))   # a float32 lerp
        assert not torch.equal(p.ds_tensor[:n], b[:n])
    figures: dict = {}
    for name, fn in methods.items():
        with _counted() as c:
            fn()                                           # the first: compiles, and what one sync does
        peak = _peak(fn)
        figures[name] = {"collectives": c["collectives"], "alloc_bytes": c["alloc_bytes"], "peak_rss_bytes": peak}
    best = {name: float("inf") for name in methods}
    for r in range(rounds):
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(calls):
                methods[name]()
            best[name] = min(best[name], (time.perf_counter() - t) / calls)
    for name in methods:
        figures[name]["seconds"] = best[name]
    parts = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in ours.module.parameters())
    full = sum(p.ds_numel * p.ds_tensor.element_size() for p in ours.module.parameters())
    persistent = sum(p.ds_numel * p.ds_tensor.element_size() for p in ours.module.parameters() if p.ds_persist)
    result = {"rank": rank, "model_bytes": full, "partition_bytes": parts, "persistent_bytes": persistent,
              "tensors": len(list(ours.module.parameters())), "figures": figures,
              "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "trl": trl.__version__}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=8, help="the model's float32 parameters, MiB")
    ap.add_argument("--calls", type=int, default=10, help="syncs per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out",
                                                  "teacher_sync.json"))
    args = ap.parse_args(argv)
    world = 2
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)   # the ranks inherit it (see the module docstring)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), args.mib, args.calls, args.rounds, tmp),
                 nprocs=world)
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    mib = 2 ** 20
    first = ranks[0]
    print(f"ZeRO-3 reference sync, {world} gloo ranks, DeepSpeed CPU accelerator: a {first['model_bytes'] / mib:.1f} "
          f"MiB float32 model ({first['tensors']} tensors; {first['partition_bytes'] / mib:.1f} MiB a rank "
          f"partitioned, {first['persistent_bytes'] / 1024:.0f} KiB persistent)\n")
    print("| rank | method | ms / sync | collectives / sync | MiB allocated / sync | peak extra RSS, MiB |")
    print("|---|---|---|---|---|---|")
    for r in ranks:
        for name, f in r["figures"].items():
            print(f"| {r['rank']} | {name} | {f['seconds'] * 1e3:.2f} | {f['collectives']} | "
                  f"{f['alloc_bytes'] / mib:.2f} | {f['peak_rss_bytes'] / mib:.2f} |")
    speed = [r["figures"]["trl"]["seconds"] / r["figures"]["fastema"]["seconds"] for r in ranks]
    print(f"\nfastema's sync is {min(speed):.0f}-{max(speed):.0f}x faster than TRL's gathered sync here")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "python": sys.version.split()[0], "world": world, "alpha": ALPHA,
                   "calls": args.calls, "rounds": args.rounds, "ranks": ranks}, f, indent=1)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
