"""Per update, natively: kernel launches, host syncs, allocations, collectives, the Python heap blocks left
behind, and under the fake GPU the bytes uploaded and the blocks launched (:func:`measure_counts`)."""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile

from .common import ROOT, use_tree
from .scenarios import HOST, WHERE, build, host_names

SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                "synchronize", "_local_scalar_dense"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
               "gather_object", "scatter_object_list", "batch_isend_irecv")


@contextlib.contextmanager
def _process_group(notes: list):
    """A one-rank gloo group, so that a collective on a per-step path runs (and is counted)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    folder = tempfile.mkdtemp(prefix="fastema-gates-pg-")
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
    except Exception as err:                          # noqa: BLE001 - no gloo here: count the calls only
        notes.append(f"counts: no one-rank gloo group ({err.__class__.__name__}: {err}); collectives counted at "
                     "torch.distributed's functions only")
        shutil.rmtree(folder, ignore_errors=True)
        yield
        return
    try:
        yield
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)


class _Counters:
    """What one update does, counted while it runs: torch's functions (syncs), the ops that make a new
    storage (allocations), collectives (c10d ops and torch.distributed's functions), the CPU kernels'
    entry points (C calls into ``fastema.kernels``) and, under the fake GPU, its log."""

    def __init__(self, fake):
        self.fake = fake
        self.c = {"launches": 0, "host_syncs": 0, "device_allocs": 0, "host_allocs": 0, "collectives": 0,
                  "uploaded_bytes": 0}

    @contextlib.contextmanager
    def active(self):
        import torch
        import torch.distributed as dist
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        c = self.c

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in SYNC_METHODS:
                    c["host_syncs"] += 1
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ns = func.namespace
                if ns in ("c10d", "_c10d_functional", "c10d_functional") and depth[0] == 0:
                    c["collectives"] += 1                 # one torch.distributed did not see
                ptrs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
                for t in _tensors(out):                 # a storage no input had: a new allocation
                    s = t.untyped_storage()
                    if s.nbytes() and s.data_ptr() not in ptrs:
                        ptrs.add(s.data_ptr())
                        c["device_allocs"] += 1
                return out

        def _tensors(obj):
            if isinstance(obj, torch.Tensor):
                yield obj
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    yield from _tensors(o)
            elif isinstance(obj, dict):
                for o in obj.values():
                    yield from _tensors(o)

        kernels = str(ROOT / "kernels")

        def profile(frame, event, arg):
            # A CPU kernel runs either through its bound entry point (a C function of module
            # fastema.kernels.*) or through numba's dispatcher, which reports a "call" of the kernel's
            # Python code to a profiler (the compiled code runs, not the Python).
            if event == "c_call":
                if str(getattr(arg, "__module__", "") or "").startswith("fastema.kernels"):
                    c["launches"] += 1
            elif event == "call" and frame.f_code.co_name == "kernel" and frame.f_code.co_filename.startswith(kernels):
                c["launches"] += 1

        patched = []

        def patch(obj, name, value):
            patched.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        depth = [0]                                   # one count per outermost call (wrappers call inner ones)
        for mod in (dist, getattr(dist, "distributed_c10d", None)):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None) if mod is not None else None
                if callable(fn):
                    def counted(*a, _fn=fn, **k):
                        c["collectives"] += depth[0] == 0
                        depth[0] += 1
                        try:
                            return _fn(*a, **k)
                        finally:
                            depth[0] -= 1
                    patch(mod, name, counted)
        if self.fake is not None:                     # the fake driver counts uploads, waits
            counters0 = dict(self.fake.counters)
            launches0 = len(self.fake.launches)
        try:
            with Calls(), Ops():
                sys.setprofile(profile)
                try:
                    yield c
                finally:
                    sys.setprofile(None)
        finally:
            for obj, name, old in reversed(patched):
                setattr(obj, name, old)
        if self.fake is not None:
            launched = [e for e in self.fake.launches[launches0:] if e[0] in ("launch", "dispatcher")]
            c["launches"] += len(launched)
            c["blocks_launched"] = sum(int(e[2]) for e in launched if e[0] == "launch" and isinstance(e[2], int))
            for name in ("device_allocs", "uploaded_bytes", "host_allocs", "host_syncs"):
                c[name] += self.fake.counters[name] - counters0.get(name, 0)


HEAP_WINDOW = 16


class _Discard(list):
    def append(self, item):
        pass


def count_one(update, fake, reps: int = 4) -> dict:
    """Per update (``reps`` of them after a warm-up), every counter of :class:`_Counters`, and the net
    Python heap blocks an update leaves behind (``heap_blocks``: 0 for a path that frees what it makes)."""
    import gc

    for _ in range(5):
        update()
    counters = _Counters(fake)
    with counters.active():
        for _ in range(reps):
            update()
    blocks = []
    kept = (fake.log, fake.launches) if fake is not None else None
    if fake is not None:                              # the fake's own records are not the update's
        fake.log, fake.launches = _Discard(), _Discard()
    try:
        gc.collect()
        for _ in range(3):
            blocks.append(sys.getallocatedblocks())
            for _ in range(HEAP_WINDOW):
                update()
            gc.collect()
        blocks.append(sys.getallocatedblocks())
    finally:
        if kept is not None:
            fake.log, fake.launches = kept
    out = {k: (v // reps if v % reps == 0 else round(v / reps, 2)) for k, v in counters.c.items()}
    # a leak of L blocks an update grows every window by L x HEAP_WINDOW; a cache resizing or letting go
    # of a block once moves one window by a block or two: the smaller of the last two, rounded
    out["heap_blocks"] = round(min(blocks[2] - blocks[1], blocks[3] - blocks[2]) / HEAP_WINDOW)
    return out


def measure_counts(notes: list, names: list | None = None) -> dict:
    use_tree()
    from testkit import fake_gpu as G

    wanted = set(names or host_names())
    out = {}
    with _process_group(notes):
        for where in WHERE:
            fake_ctx = G.fake_gpu(record=True) if where == "fake-gpu" else contextlib.nullcontext()
            with fake_ctx as fake:
                for what, n in HOST:
                    name = f"{where} {what}, {n} tensors"
                    if name not in wanted:
                        continue
                    update, moved = build(what, n, where == "fake-gpu")
                    figures = count_one(update, fake)
                    figures["bytes_moved"] = moved
                    if where == "cpu":
                        for k in ("uploaded_bytes",):
                            figures.pop(k, None)
                    out[name] = figures
    return out
