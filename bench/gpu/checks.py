"""The GPU plan's checks, shared by ``bench/gpu/smoke.py`` (a few, small) and ``bench/gpu/probe.py``
(all of them): each returns ``(ok, detail)`` or raises :class:`common.Skip` where it needs torch
CUDA and runs in the simulator (see ``bench/gpu/common.py`` for the two modes).

- kernels: the GPU (or simulator) kernels against fastema's CPU kernels on NumPy arrays, bit for bit;
- streams, host syncs and CUDA graphs: torch CUDA only;
- launch costs: host us of the whole update, the bound launch and numba's ``kernel[grid, block](...)``.
"""
from __future__ import annotations

import time

import numpy as np
from numba import cuda

import fastema
from bench.gpu import common as G
from fastema import FlatShadow, WindowShadow

#: source sizes of the kernel checks: tails, the vector path's 16-byte alignment, several blocks
SIZES = [1, 7, 231, 70] if G.SIM else [1, 7, 231, 4096, 4097, 65541, (1 << 20) + 3]
LERP_CASES = [("float32", "float32", 1, "nearest"), ("float32", "float32", 3, "nearest"),
              ("bfloat16", "float32", 1, "nearest"), ("bfloat16", "float32", 2, "nearest"),
              ("float16", "float32", 1, "nearest"), ("bfloat16", "bfloat16", 1, "nearest"),
              ("bfloat16", "bfloat16", 2, "stochastic"), ("float32", "bfloat16", 1, "stochastic"),
              ("float16", "float16", 1, "nearest")]


def small_launches_in_the_simulator() -> None:
    """The simulator runs every thread as a Python thread: fewer threads and smaller chunks (as the
    CUDA tests do), so tails, several blocks and the grid-stride loop still run, in seconds."""
    if G.SIM:
        from fastema._launch import config

        config.CUDA_CHUNK, config.CUDA_THREADS, config.CUDA_MAX_BLOCKS = 64, 16, 3


# ------------------------------------------------------------------ kernels against the CPU


def _add_one(x):
    i = cuda.grid(1)  # type: ignore[call-arg]  # a module global: the simulator swaps it for its own
    if i < x.size:
        x[i] += 1.0


def compile_and_launch():
    """A plain numba kernel compiled and run (numba-cuda and NumPy work together), then fastema's
    ``ema_update_`` on device arrays against the CPU kernel."""
    t0 = time.perf_counter()
    add_one = cuda.jit(_add_one)
    x = cuda.to_device(np.arange(5, dtype=np.float32))
    add_one[1, 32](x)
    plain = bool(np.array_equal(x.copy_to_host(), np.arange(1, 6, dtype=np.float32)))
    t1 = time.perf_counter()
    a, b = G.host_arrays("float32", [1000, 1000], 11)
    da, db = G.to_device(a), G.to_device(b)
    fastema.ema_update_(da, db, decay=0.9)
    fastema.ema_update_(a, b, decay=0.9)
    G.sync()
    ours = G.same_bits(da, a)
    return plain and ours, (f"numba kernel compiled and ran: {plain} ({t1 - t0:.1f} s); fastema ema_update_ "
                            f"equals the CPU kernel: {ours} ({time.perf_counter() - t1:.1f} s)")


def _refill(cpu, dev, dtype, seed):
    for c, d, new in zip(cpu, dev, G.host_arrays(dtype, [c.size for c in cpu], seed)):
        c[...] = new
        G.write(d, new)


def lerp_case(src, shadow, rows, rounding, sizes=None, skip=False):
    def run():
        if G.SIM and shadow == "bfloat16":
            raise G.Skip("not in the simulator: a bfloat16 shadow on the GPU needs torch tensors as sources")
        sz = SIZES if sizes is None else sizes
        cpu = G.host_arrays(src, sz, 1)
        dev = [G.to_device(a) for a in cpu]
        fc, fg = FlatShadow(cpu, rows=rows, dtype=shadow), FlatShadow(dev, rows=rows, dtype=shadow)
        decays = [0.9, 0.5, 0.999][:rows]
        for step in range(3):
            _refill(cpu, dev, src, 100 + step)
            kw = dict(rounding=rounding, seed=3, step=step, skip_nonfinite=skip)
            fc.update(decays, **kw)
            fg.update(decays, **kw)
        G.sync()
        bad = [(i, r) for r in range(rows) for i in range(len(sz)) if not G.same_bits(fc.view(i, r), fg.view(i, r))]
        return not bad, f"sizes {sz}; (tensor, row) pairs differing from the CPU kernel: {bad[:6]}"
    return run


def swap_case():
    """A float32 shadow of bfloat16 sources swapped in and back: the exact round trip."""
    cpu = G.host_arrays("bfloat16", SIZES, 2)
    dev = [G.to_device(a) for a in cpu]
    fc, fg = FlatShadow(cpu), FlatShadow(dev)
    _refill(cpu, dev, "bfloat16", 7)
    fc.update(0.5)
    fg.update(0.5)
    _refill(cpu, dev, "bfloat16", 8)
    before = [G.to_host(d).copy() for d in dev]
    fc.swap()
    fg.swap()
    G.sync()
    ok_in = all(G.same_bits(c, d) for c, d in zip(cpu, dev))
    fc.swap()
    fg.swap()
    G.sync()
    ok_back = all(G.same_bits(b, d) for b, d in zip(before, dev)) and all(
        G.same_bits(fc.view(i), fg.view(i)) for i in range(len(SIZES)))
    return ok_in and ok_back, f"swapped-in sources equal the CPU's: {ok_in}; exact round trip: {ok_back}"


def guard_case():
    cpu = G.host_arrays("float32", SIZES, 3)
    dev = [G.to_device(a) for a in cpu]
    flat = FlatShadow(dev)
    before = [G.to_host(v).copy() for v in flat.views().values()]
    k = min(3, len(cpu) - 1)
    poisoned = cpu[k].copy()
    poisoned[min(17, poisoned.size - 1)] = np.nan
    G.write(dev[k], poisoned)
    flat.update(0.5, skip_nonfinite=True)
    G.sync()
    unchanged = all(G.same_bits(b, v) for b, v in zip(before, flat.views().values()))
    flag = int(G.to_host(next(iter(flat.skipped.values())))[0])
    return unchanged and flag == 1, f"shadow unchanged: {unchanged}; flag: {flag}"


def window_case():
    cpu = G.host_arrays("float32", SIZES, 4)
    dev = [G.to_device(a) for a in cpu]
    wc, wg = WindowShadow(cpu, 3), WindowShadow(dev, 3)
    for k in range(5):
        _refill(cpu, dev, "float32", 200 + k)
        wc.push()
        wg.push()
    G.sync()
    f64 = lambda a: G.to_host(a).astype(np.float64)          # noqa: E731
    diff = max(float(np.max(np.abs(f64(wc.view(i)) - f64(wg.view(i))))) for i in range(len(SIZES)))
    exact = all(G.same_bits(wc.view(i), wg.view(i)) for i in range(len(SIZES)))
    return diff <= 1e-6, f"max |cpu - gpu| = {diff:.3g}; bit-identical: {exact}"


def array_level_case():
    """``ema_update_`` on device arrays against torch's ``lerp_`` (on the GPU; the CPU in the simulator)."""
    import torch

    n = 1000 if G.SIM else 1 << 20
    a, b = G.host_arrays("float32", [n, n], 5)
    ref = torch.from_numpy(a.copy()).to(G.torch_device()).lerp_(torch.from_numpy(b).to(G.torch_device()), 0.001)
    da, db = G.to_device(a), G.to_device(b)
    fastema.ema_update_(da, db, decay=0.999)
    G.sync()
    return G.same_bits(da, ref), "ema_update_ == torch lerp_ bit for bit"


def kernel_checks(rec) -> None:
    for case in LERP_CASES:
        rec.check("lerp %s->%s rows=%d %s" % case, lerp_case(*case))
    rec.check("lerp float32 with skip_nonfinite (no NaN)", lerp_case("float32", "float32", 1, "nearest", skip=True))
    rec.check("swap float32 shadow <-> bfloat16 sources (exact round trip)", swap_case)
    rec.check("skip_nonfinite with a NaN skips the update", guard_case)
    rec.check("WindowShadow push x5 (W=3) vs CPU", window_case)
    rec.check("array level ema_update_ == torch.lerp_", array_level_case)


# ------------------------------------------------------------------ streams, host syncs, graphs (torch CUDA)


def stream_case(made_on_side: bool, n: int = 1 << 20):
    """The update under ``torch.cuda.stream(side)`` runs after that stream's writes (``_sleep`` then
    ``fill_``), whether the shadow was made on the default stream or on the side one."""
    def run():
        G.need_torch_cuda()
        import torch

        params = [torch.randn(n, device="cuda") for _ in range(4)]
        side = torch.cuda.Stream()
        if made_on_side:
            with torch.cuda.stream(side):
                flat = FlatShadow(params)
        else:
            flat = FlatShadow(params)
        torch.cuda.synchronize()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            G.gpu_busy(50)                                   # the side stream is busy ~50 ms
            for p in params:
                p.fill_(1.0)
            flat.update(0.0)                               # weight 1: the shadow must become exactly 1.0
        torch.cuda.synchronize()
        ok = all(bool((v == 1.0).all()) for v in flat.views().values())
        return ok, "ordered after the side stream's writes" if ok else \
            "RACE: the update did not run on the caller's current stream"
    return run


def busy_after(fn, ms: float = 300) -> tuple[bool, float]:
    """Run ``fn`` behind ~``ms`` of GPU sleep: (the GPU still busy when it returned, its host seconds)."""
    G.gpu_busy(ms)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    busy = not G.gpu_idle()
    G.sync()
    return busy, dt


def no_sync(fn, warm=True):
    def run():
        G.need_torch_cuda("a busy GPU")
        if warm:
            fn()
            G.sync()
        busy, dt = busy_after(fn)
        return busy and dt < 0.1, f"call took {dt * 1e3:.2f} ms on the host; GPU still busy after it: {busy}"
    return run


def no_sync_checks(rec) -> None:
    """Steady-state updates, a new pair, rebinds (B3: a rewrite waits only when every staging slot
    still has a copy queued) and the torch EMA, each behind a busy GPU."""
    try:
        G.need_torch_cuda("a busy GPU")
    except G.Skip as s:                                      # one note for the lot
        rec.note("checks", "no host sync (updates, new pair, rebinds, EMA)", {"ok": None, "skipped": str(s)})
        return
    import torch

    from fastema._launch import config
    params = [torch.randn(s, device="cuda") for s in [(768, 768), (768,), (3072, 768)] * 4]
    flat = FlatShadow(params)
    wt = torch.full((1,), 0.01, device="cuda")
    rec.check("no host sync: FlatShadow.update(0.99)", no_sync(lambda: flat.update(0.99)))
    rec.check("no host sync: FlatShadow.update(weight=device tensor)", no_sync(lambda: flat.update(weight=wt)))
    rec.check("no host sync: FlatShadow.update(skip_nonfinite=True)",
              no_sync(lambda: flat.update(0.99, skip_nonfinite=True)))
    a, b = torch.randn(1 << 20, device="cuda"), torch.randn(1 << 20, device="cuda")
    rec.check("no host sync: ema_update_ (cached pair)", no_sync(lambda: fastema.ema_update_(a, b, decay=0.99)))
    rec.check("no host sync: ema_update_ on a NEW pair (table upload)",
              no_sync(lambda: fastema.ema_update_(torch.zeros(4096, device="cuda"), torch.ones(4096, device="cuda"),
                                                  decay=0.5), warm=False))

    def rebind():
        params[0].data = torch.randn_like(params[0])      # re-allocated: the address changes
        flat.update(0.99)

    slots = getattr(config, "CUDA_STAGING_SLOTS", None)
    rec.check("no host sync: update after param.data = new tensor (table rewrite)", no_sync(rebind, warm=False))
    if slots:
        rec.check(f"no host sync: {slots} rebinds in a row (CUDA_STAGING_SLOTS={slots}: a free pinned slot each)",
                  no_sync(lambda: [rebind() for _ in range(slots)], warm=False))

        def one_more():
            busy, dt = busy_after(lambda: [rebind() for _ in range(slots + 1)])
            rec.note("host", f"{slots + 1} rebinds in a row behind a busy GPU (B3: by design the {slots + 1}th waits "
                             f"for the first rewrite's copy to run; not a check)",
                     {"host_waited": (not busy) or dt > 0.1, "host_ms": round(dt * 1e3, 2)})
        rec.guarded("host", f"{slots + 1} rebinds in a row", one_more)

    def ema_module():
        from torch import nn

        from fastema.torch import EMA
        model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Linear(256, 8)).cuda()
        ema = EMA(model, 0.999)
        return ema.update

    rec.check("no host sync: fastema.torch.EMA.update (BatchNorm buffers copied)", no_sync(ema_module()))


def graph_case(sizes=(4096,) * 10, replays=(0.5, 0.25)):
    """``FlatShadow.update(weight=tensor)`` captured once and replayed; the sources move before the
    capture and every replay, so neither an eager run during capture nor a dead replay passes."""
    G.need_torch_cuda("CUDA graphs")
    import torch

    params = [torch.randn(s, device="cuda") for s in sizes]
    flat = FlatShadow(params)
    w = torch.full((1,), 0.1, device="cuda")
    torch._foreach_add_(params, 1.0)
    flat.update(weight=w)
    torch._foreach_add_(params, 1.0)
    torch.cuda.synchronize()
    before = [v.clone() for v in flat.views().values()]
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        flat.update(weight=w)
    torch.cuda.synchronize()
    eager = any(not torch.equal(b, v) for b, v in zip(before, flat.views().values()))
    exp = [v.clone() for v in flat.views().values()]
    for wv in replays:
        torch._foreach_add_(params, 1.0)
        w.fill_(wv)
        g.replay()
        exp = [e.lerp(p, wv) for e, p in zip(exp, params)]
    torch.cuda.synchronize()
    replay = all(torch.allclose(v, e, rtol=1e-6, atol=1e-6) for v, e in zip(flat.views().values(), exp))
    return (not eager) and replay, (f"ran eagerly during capture: {eager}; {len(replays)} replays apply the "
                                    f"update: {replay}")


def ema_graph_case():
    """EMA.update() captured once and replayed 9 times against 9 eager calls, bit for bit (warm-up,
    update_every and the stochastic-rounding key advance on the device)."""
    G.need_torch_cuda("CUDA graphs")
    import torch
    from torch import nn

    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8)).cuda().bfloat16()
    kw = dict(decay=PowerWarmup(0.999), update_every=2, shadow_dtype="bfloat16", rounding="stochastic")
    graphed, eager = EMA(model, **kw), EMA(model, **kw)
    params = list(model.parameters())
    torch.cuda.synchronize()
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        graphed.update()
    for i in range(9):
        with torch.no_grad():                                # leaf parameters: moved as an optimizer does
            torch._foreach_add_(params, 0.01 * (i + 1))
        g.replay()
        eager.update()
    torch.cuda.synchronize()
    a, b = graphed.state_dict(), eager.state_dict()
    same = a["updates"] == b["updates"] and all(torch.equal(a["averaged"][k], v) for k, v in b["averaged"].items())
    return same, f"replays == eager calls bit for bit (updates {a['updates']} vs {b['updates']})"


def stream_and_graph_checks(rec) -> None:
    rec.check("stream order: FlatShadow made on default stream, updated on a side stream", stream_case(False))
    rec.check("stream order: FlatShadow made and updated on the side stream", stream_case(True))
    no_sync_checks(rec)
    rec.check("CUDA graph capture of FlatShadow.update(weight=tensor)", graph_case)
    rec.check("CUDA graph capture of EMA.update() with a warm-up schedule and stochastic rounding", ema_graph_case)


# ------------------------------------------------------------------ launch costs (host us)


def per_call_us(fn, n: int) -> float:
    for _ in range(min(n, 50)):
        fn()
    G.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    G.sync()
    return dt / n * 1e6


def launch_costs(n: int = 2000) -> dict:
    """Host us per call of a ``FlatShadow.update`` of 10 tiny sources, of its group's bound lerp launch
    (``fastema._launch.prepare("lerp", ...)``) and of numba's ``kernel[grid, block](...)`` with the same
    arguments, and whether the cached launch is in use (``cached_launch_available``)."""
    from fastema import _launch
    from fastema._launch import config
    from fastema._launch.cuda import drivers, kernel_refs
    from fastema._launch.cuda import tables as launch_cuda
    from fastema._launch.cuda.launch import cached_launch_available

    dev = [G.to_device(a) for a in G.host_arrays("float32", [16] * 10, 6)]
    f = FlatShadow(dev)
    f.update(0.9)
    G.sync()
    g = f.layout.groups[0]
    k = kernel_refs.kernels().lerp_kernel(g.shadow_kind, g.src_kind, False)
    flag = launch_cuda._zero_flag(g.device)
    cfg = k[1, config.CUDA_THREADS]
    w = (np.float32(0.1),)
    run, w32 = _launch.prepare("lerp", g), (0.1,)           # the same weights object: the cached path's steady state
    out = {"cached_launch": cached_launch_available(),
           "FlatShadow.update, 10 tiny tensors (whole call) us": per_call_us(lambda: f.update(0.9), n),
           "the group's bound lerp launch alone us": per_call_us(lambda: run(w32), n),
           "numba kernel[grid, block](...) of the same kernel us":
               per_call_us(lambda: cfg(*g.tables.args(), w, flag, np.uint32(0)), n)}
    if not G.SIM:
        import torch

        def ctx():
            with cuda.gpus[0]:
                pass

        t = torch.randn(16, device="cuda")
        out["with cuda.gpus[0]: pass us"] = per_call_us(ctx, n)
        driver = drivers.current()
        out["cuCtxGetCurrent (the bound launch's context check) us"] = \
            per_call_us(driver.current_context, n)
        out["the primary context is current (no push per launch)"] = \
            driver.current_context() == driver.primary_context(0)
        out["torch.cuda.current_stream().cuda_stream us"] = per_call_us(lambda: torch.cuda.current_stream().cuda_stream,
                                                                        n)
        out["torch lerp_ on a tiny tensor us"] = per_call_us(lambda: t.lerp_(t, 0.1), n)
        try:
            from fastema import _backends
            _backends.describe(t, "x")                     # warm the adapter
            out["a torch group's current_stream() us"] = per_call_us(_backends.stream_getter("torch", "cuda:0"), n)
        except Exception as e:                             # noqa: BLE001 - an internal that moved
            out["a torch group's current_stream() us"] = f"unavailable ({type(e).__name__}: {e})"
    return out
