#!/usr/bin/env python3
"""The compiled step on a GPU (issue 86 items 2 and 7, ``../shared/design/gpu_speed.md`` section 6.1):

    python3 -m bench.gpu.compiled OUTDIR [--budget SECONDS] [--simulate]

The step is an in-graph parameter update (``torch._foreach_add_`` of a fixed direction) then the EMA
update, ``torch.compile(fullgraph=True)``, 30 tensors of 4096 float32 (``bench/suite/test_bench_compile.py``'s
scenario): fastema's ``EMA.update()`` against ``torch._foreach_lerp_`` of per-tensor shadows in the same
graph. Each compiled step is checked before it is timed: fastema's against the same step run eagerly
(bit for bit where the compiled update is fastema's kernel, within a few ulps where Inductor's lerp is),
the baseline's against fastema's from the same start (``bench/suite/checked.py``).

1. ``default`` mode: the two steps, 21 batches of 20 calls each, their batches in turn
   (``measure.interleaved``: host, device and e2e apart, each with its spread); the target: **fastema's
   step >= 1.0x the foreach step** (e2e; host and device beside it);
2. a ``torch.profiler`` trace (CPU and CUDA) of 10 steps of each (``compiled-trace.json.gz``, fastema's):
   per step the kernels launched, the ``fastema::`` operator calls and the top ops by self CPU time; the
   target: **the EMA adds no kernel and no operator call** (fastema's step launches no more kernels than
   the foreach step, and calls no ``fastema::`` operator);
3. ``mode="reduce-overhead"`` (CUDA graphs; GPU only): 5 replays against 5 eager steps of a twin, equal;
   then both steps timed as in 1.

Whatever the code registers (``custom_op`` today; ``Library`` define + impl, an in-graph lowering
tomorrow) is what runs: nothing here names fastema's operator. ``OUTDIR/compiled.json`` is rewritten after
every part; ``compiled.md`` at the end. ``--simulate``: the simulator's CPU with ``aot_eager`` (no code
generation: plumbing only, no verdict; ``reduce-overhead`` skipped).
"""
import gzip
import os
import shutil
import sys

if "--simulate" in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from bench.gpu import common as G  # noqa: E402
from bench.gpu import measure as M  # noqa: E402
from bench.suite.checked import agree  # noqa: E402
from bench.suite.figures import ratio, table  # noqa: E402

TENSORS, SIZE = (30, 16) if G.SIM else (30, 4096)
ROUNDS = 3 if G.SIM else 21
OURS, FOREACH = "fastema EMA.update in the graph", "torch._foreach_lerp_ in the graph"
DECAY = 0.999
_WORLDS: dict = {}                  # mode -> the compiled steps (the profile reuses the default's: no recompile)


def _world(mode: str):
    """Two models of the same start, each with its compiled step (fastema's, the foreach one), and an
    eager twin of fastema's: ``{name: (step, result)}``."""
    import torch
    from torch import nn

    from fastema.torch import EMA

    torch.manual_seed(0)
    dev = G.torch_device()
    start = [torch.randn(SIZE, device=dev) for _ in range(TENSORS)]
    direction = [torch.full_like(p, 1e-3) for p in start]
    backend = "aot_eager" if G.SIM else "inductor"
    kw = dict(fullgraph=True, backend=backend, **({} if mode == "default" else {"mode": mode}))

    def model():
        return nn.ParameterList([nn.Parameter(p.clone(), requires_grad=False) for p in start])

    mf, me, mb = model(), model(), model()
    ema, twin = EMA(mf, DECAY), EMA(me, DECAY)
    pf, pe, pb = (list(m.parameters()) for m in (mf, me, mb))
    shadows = [p.detach().clone() for p in pb]

    def fastema_step():
        with torch.no_grad():
            torch._foreach_add_(pf, direction)
            ema.update()

    def eager_step():
        with torch.no_grad():
            torch._foreach_add_(pe, direction)
            twin.update()

    def foreach_step():
        with torch.no_grad():
            torch._foreach_add_(pb, direction)
            torch._foreach_lerp_(shadows, pb, 1 - DECAY)

    values = lambda e: list(e.averaged_state_dict().values())      # noqa: E731
    return {OURS: (torch.compile(fastema_step, **kw), lambda: values(ema)),
            "fastema eager twin": (eager_step, lambda: values(twin)),
            FOREACH: (torch.compile(foreach_step, **kw), lambda: shadows)}


def _check(rec, world: dict, mode: str, steps: int = 1) -> None:
    """fastema's compiled step against its eager twin, then the foreach step against fastema's, each
    ``steps`` steps from the same start (``bench.suite.checked.agree``: refused, raised, where they differ)."""
    ours, twin, base = world[OURS], world["fastema eager twin"], world[FOREACH]

    def run(pair):
        for _ in range(steps):
            pair[0]()
        return pair[1]()
    eager = [t.clone() for t in run(twin)]
    rec.note("checks", f"{mode}: fastema's compiled step == its eager twin ({steps} steps)",
             {"ok": True, "detail": agree(f"{mode} | {OURS} (against eager)", lambda: eager, lambda: run(ours))})
    rec.note("checks", f"{mode}: the foreach step agrees with fastema's ({steps} steps)",
             {"ok": True, "detail": agree(f"{mode} | {FOREACH}", lambda: [t.clone() for t in ours[1]()],
                                          lambda: run(base))})


def timed(rec, mode: str) -> None:
    """Part 1 (``default``) or 3 (``reduce-overhead``): checked, then timed with the batches in turn."""
    if mode != "default":
        G.need_torch_cuda("CUDA graphs (reduce-overhead)")
    world = _WORLDS[mode] = _world(mode)
    _check(rec, world, mode, steps=1 if mode == "default" else 5)
    if mode != "default":
        from torch._dynamo.utils import counters

        rec.note("host", f"{mode}: inductor counters (cudagraph skips among them)", dict(counters["inductor"]))
    sc = f"compiled step, {mode}, {TENSORS}x{SIZE} float32"
    fns = {OURS: world[OURS][0], FOREACH: world[FOREACH][0]}
    rows = M.record_all(rec, sc, M.interleaved(fns, calls=20, batches=ROUNDS), {k: "lerp f32" for k in fns},
                        TENSORS * SIZE, (FOREACH,))
    value = ratio(sc, rows, OURS, FOREACH, "e2e")
    out = {"value": None if value is None else round(value, 3), "bound": 1.0, "figure": "e2e", "ok": None,
           "host_device_e2e": [ratio(sc, rows, OURS, FOREACH, f) for f in ("host", "device", "e2e")]}
    out["ok"] = None if G.SIM or value is None else value >= 1.0
    rec.note("targets", f"compiled step ({mode}) with fastema >= 1.0x the foreach step", out)


def _per_step(prof, steps: int) -> dict:
    events = prof.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type) and not e.key.startswith(("Memcpy", "Memset")))
    ops = sum(e.count for e in events if e.key.startswith("fastema::"))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"kernels per step": kernels / steps, "fastema:: calls per step": ops / steps,
            "top ops by self CPU us (10 steps)": {e.key: round(e.self_cpu_time_total, 1) for e in top}}


def profiled(rec, out: str, steps: int = 10) -> None:
    """Part 2: ``torch.profiler`` of ``steps`` steps of each compiled step; fastema's trace kept."""
    from torch.profiler import ProfilerActivity, profile

    world = _WORLDS.get("default") or _world("default")
    acts = [ProfilerActivity.CPU] + ([] if G.SIM else [ProfilerActivity.CUDA])
    found = {}
    for name in (OURS, FOREACH):
        step = world[name][0]
        for _ in range(3):                                      # compiled and warm outside the trace
            step()
        G.sync()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            G.sync()
        found[name] = _per_step(prof, steps)
        rec.note("profile", name, found[name])
        if name == OURS:
            raw = os.path.join(out, "compiled-trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(raw)
    ours, base = found[OURS], found[FOREACH]
    ok = ours["kernels per step"] <= base["kernels per step"] and ours["fastema:: calls per step"] == 0
    rec.note("targets", "the EMA adds no kernel and no operator call to the compiled step",
             {"ok": None if G.SIM else ok, "value": [ours["kernels per step"], ours["fastema:: calls per step"]],
              "bound": [base["kernels per step"], 0], "figure": "kernels and fastema:: calls per step"})


def report(data: dict) -> str:
    lines = ["| target | value | bound | figure | verdict |", "|---|---|---|---|---|"]
    for name, t in data.get("targets", {}).items():
        verdict = {True: "met", False: "MISSED", None: "not judged (simulator, or a figure invalid)"}[t.get("ok")]
        lines.append(f"| {name} | {t.get('value')} | {t.get('bound')} | {t.get('figure')} | {verdict} |")
    lines += ["", table(data.get("timings", {}))]
    lines += ["| part | value |", "|---|---|"] + [f"| {k} | {v} |" for s in ("profile", "checks", "host")
                                                 for k, v in data.get(s, {}).items()]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    opts = G.options(argv, __doc__, "compiled", 200.0, "part")
    rec = G.Record(os.path.join(opts.out, "compiled.json"), ["env", "checks", "targets", "timings", "profile",
                                                              "host"])
    plan = [("default mode", lambda: timed(rec, "default")), ("profile", lambda: profiled(rec, opts.out)),
            ("reduce-overhead", lambda: timed(rec, "reduce-overhead"))]
    rec.run_plan(plan, opts.budget, failed_as="part {}")
    G.publish(os.path.join(opts.out, "compiled.md"), report(rec.data))
    missed = sum(1 for t in rec.data["targets"].values() if t.get("ok") is False)
    return 1 if G.failed(rec.data["checks"]) or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
