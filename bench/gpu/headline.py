#!/usr/bin/env python3
"""fastema's headline GPU figures, each against its baseline in the same process, the batches taken
in turn (the third part of ``bash bench/gpu/run.sh all``, issue 63):

    python3 -m bench.gpu.headline OUTDIR [--budget SECONDS] [--simulate]

1. a flat 2^28-element float32 lerp (``ema_update_``, ``FlatShadow.update``, ``EMA.update``,
   ``torch.lerp_``, ``torch._foreach_lerp_``) against a device copy and an in-place ``add_`` (a
   lerp's 2:1 traffic): GB/s and % of the copy, by device time; first, because those streams set
   the run's ceiling (their fastest round by CUDA events), which no later row may pass
   (``bench/suite/checked.py``);
2. ``EMA.update()`` against ``torch._foreach_lerp_`` at 6 (the RL network), 148 (GPT-2 small) and
   3000 (3000 x 4096) float32 tensors, and against ``_foreach_mul_`` + ``_foreach_add_`` at 148
   bfloat16 tensors into a float32 shadow: host submit time, device time, one call and a sync
   (``measure.interleaved``);
3. the first ``EMA.update()`` of a fresh process (GPT-2 small's 148 tensors, float32) with the
   shipped device code: seconds, and NVVM's calls (0: nothing compiled), in a child process with
   an empty kernel cache (a compile cannot hide behind a cached entry);
4. one training step of a GPT-2-size model, float32 and bfloat16 weights, alone, with fastema's
   update and with the baseline's (``bench/gpu/steps.py``).

Every baseline is run once against fastema's result from the same inputs before it is timed, and
refused (a failed check naming the row) where it differs or writes into its own sources; a row
whose GB/s passes the run's device-time ceiling is refused, one above the copy but within it flagged
(``bench/suite/checked.py``, issue 70 item 7: the 2026-11-26 baseline that lerped each tensor into
itself). Host, device and end-to-end figures stay in their own columns, each median with its
min-max; a host figure taken while the host waited for the GPU reads ``invalid``; a ratio is read
only against a checked baseline of the same interleaved call (``bench/suite/figures.py``, issue 86).

``OUTDIR/headline.json`` is rewritten after every figure (a run cut at its limit keeps what it
measured; the scenario and implementation names are the probe's, so ``bench/gpu/summary.py``
reads either); ``headline.md`` (the ``gpu-summary`` line, then the tables) is written at the end.
A figure started after ``--budget`` seconds (default 80) is recorded ``skipped: out of time``; one
that raises is a failed check (exit status 1). ``--simulate`` (or ``NUMBA_ENABLE_CUDASIM=1``): the
Numba CUDA simulator, torch on the CPU at tiny sizes: plumbing only (CI).
"""
import json
import os
import subprocess
import sys
import tempfile

if "--simulate" in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from bench.gpu import common as G  # noqa: E402
from bench.gpu import measure as M  # noqa: E402
from bench.gpu import steps as gpu_steps  # noqa: E402
from bench.gpu.summary import EMA, FOREACH, HOST_COST, MIXED, read_env, summary_line  # noqa: E402
from bench.suite.checked import checked, move_sources  # noqa: E402
from bench.suite.figures import FIGURES, ratio, table  # noqa: E402

FLAT = 10 if G.SIM else 28
FIRST_UPDATE = r"""
import json, sys, time
t0 = time.perf_counter()
calls = [0]
sim = sys.argv[1] == "sim"
if not sim:
    from numba.cuda.cudadrv import nvvm
    real = nvvm.compile_ir
    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    nvvm.compile_ir = counted
import torch
from torch import nn
from fastema.torch import EMA
from fastema._launch import device_code, drivers
from bench.suite.shapes import gpt2_small
dev = "cpu" if sim else "cuda"
shapes = [(4, 4)] * 148 if sim else gpt2_small()
model = nn.ParameterList([nn.Parameter(torch.randn(s, device=dev)) for s in shapes])
sync = (lambda: None) if sim else torch.cuda.synchronize
sync()
t1 = time.perf_counter()
with torch.no_grad():
    ema = EMA(model, 0.999)
    ema.update()
    sync()
    t2 = time.perf_counter()
    ema.update()
    sync()
t3 = time.perf_counter()
images = [v for v in drivers.current().images.values() if v is not None]
print(json.dumps({"first_update_s": t2 - t1, "second_update_s": t3 - t2, "nvvm_calls": calls[0],
                  "run_time_compiles": len(device_code.COMPILES),
                  "loaded": sorted({v.source for v in images}), "variants_loaded": len(images),
                  "process_s": t3 - t0, "tensors": len(shapes)}))
"""


def _rows(rec, scenario: str) -> dict:
    return rec.data.setdefault("timings", {}).setdefault(scenario, {})


def _ratios(rec, sc: str, ours: str, base: str) -> None:
    """The baseline's host, device and e2e over fastema's, noted under ``host`` (None: invalid)."""
    rows = _rows(rec, sc)
    rec.note("host", f"{sc}: {base} / {ours} (host, device, e2e)",
             [None if (r := ratio(sc, rows, ours, base, f)) is None else round(r, 3) for f in FIGURES])


def _moved(params) -> None:
    """The sources moved once before the baselines' check (an update must show: ``checked.move_sources``)."""
    move_sources(params)


def host_cost(rec, count: int, dt: str) -> None:
    """Row 1 (see the module docstring) for ``count`` tensors of ``dt``; the baseline agrees with
    fastema (``bench.suite.checked``) before it is timed."""
    import torch
    from torch import nn

    from bench.gpu import timings as gpu_timings
    from fastema.torch import EMA as Ema

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    dev = G.torch_device()
    model = nn.ParameterList([nn.Parameter(torch.randn(s, device=dev).to(dtype))
                              for s in gpu_timings.shapes(count)])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    ema = Ema(model, 0.999)
    f32 = [p.detach().to(torch.float32, copy=True) for p in params]    # a copy, whatever the dtype
    if dt == "float32":
        kinds = {EMA: "lerp f32", FOREACH: "lerp f32"}
        fns = {EMA: ema.update, FOREACH: lambda: torch._foreach_lerp_(f32, params, 0.001)}
    else:
        kinds = {EMA: "lerp bf16->f32", MIXED: "mul+add bf16->f32"}
        fns = {EMA: ema.update, MIXED: lambda: (torch._foreach_mul_(f32, 0.999),
                                                torch._foreach_add_(f32, params, alpha=0.001))}
    results = {EMA: lambda: list(ema.averaged_state_dict().values()),
               FOREACH: lambda: f32, MIXED: lambda: f32}
    sc = f"{HOST_COST[count]} {dt}"
    with torch.no_grad():
        checked({f"{sc} | {k}": v for k, v in fns.items()},
                {f"{sc} | {k}": v for k, v in results.items()}, ours=f"{sc} | {EMA}",
                inputs=params, move=lambda: _moved(params))
        rows = M.interleaved(fns)
    M.record_all(rec, sc, rows, kinds, n, (FOREACH, MIXED))
    _ratios(rec, sc, EMA, MIXED if dt == "bf16" else FOREACH)


def flat(rec) -> None:
    """Row 2: one flat float32 tensor of 2^FLAT elements (first: its copy is the run's ceiling).
    Each baseline has its own shadow, equal to ``ema_update_``'s at the start, and agrees with it
    before it is timed."""
    import torch
    from torch import nn

    import fastema
    from fastema.flat import FlatShadow
    from fastema.torch import EMA as Ema

    n = 1 << FLAT
    a, b, c, d, e = (torch.randn(n, device=G.torch_device()) for _ in range(5))
    a1, a2 = a.clone(), a.clone()
    flat_shadow = FlatShadow([b])
    one = nn.Module()
    one.w = nn.Parameter(b, requires_grad=False)              # the same storage as b
    ema = Ema(one, 0.999)
    streams = {"copy (ceiling)": "copy", "add_ (ceiling)": "add_ f32"}
    fns = {"copy (ceiling)": lambda: c.copy_(a), "add_ (ceiling)": lambda: d.add_(e),
           "fastema.ema_update_": lambda: fastema.ema_update_(a, b, decay=0.999),
           "fastema FlatShadow.update": lambda: flat_shadow.update(0.999), EMA: ema.update,
           "torch.lerp_": lambda: a1.lerp_(b, 0.001),
           FOREACH: lambda: torch._foreach_lerp_([a2], [b], 0.001)}
    sc = f"flat float32 2^{FLAT}"
    with torch.no_grad():
        checked({f"{sc} | {k}": v for k, v in fns.items()},
                {f"{sc} | fastema.ema_update_": lambda: [a], f"{sc} | torch.lerp_": lambda: [a1],
                 f"{sc} | {FOREACH}": lambda: [a2]},
                ours=f"{sc} | fastema.ema_update_", inputs=[b])
        rows = M.interleaved(fns, calls=20)
    M.keep_ceiling(rec, M.ceiling(rows, n, streams))
    M.record_all(rec, sc, rows, {k: streams.get(k, "lerp f32") for k in rows}, n, ("torch.lerp_", FOREACH))
    _ratios(rec, sc, "fastema.ema_update_", "torch.lerp_")
    _ratios(rec, sc, EMA, FOREACH)
    rec.note("host", f"{sc}: % of copy (device)",
             {k: round(v.get("pct_of_copy") or 0, 1) for k, v in _rows(rec, sc).items()})


def first_update(rec) -> None:
    """Row 3 (the simulator's child keeps the kernel cache: its CPU kernels would compile)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ) if G.SIM else dict(os.environ, NUMBA_CACHE_DIR=cache)
        args = [sys.executable, "-c", FIRST_UPDATE, "sim" if G.SIM else "gpu"]
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(done.stderr.strip()[-2000:])
    rec.note("first_update", "fresh process", json.loads(done.stdout.strip().splitlines()[-1]))


def steps(rec, dt: str) -> None:
    """Row 4 (``bench/gpu/steps.py``) for ``dt`` weights."""
    import torch

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    rec.note("steps", f"gpt2 {dt}", gpu_steps.step_row(dtype))


def environment(rec) -> None:
    import torch

    env = {"gpu": "simulator" if G.SIM else torch.cuda.get_device_name(0),
           "torch": torch.__version__}
    if not G.SIM:
        props = torch.cuda.get_device_properties(0)
        env.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    for k, v in env.items():
        rec.data["env"][k] = v
    rec.save()


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def report(data: dict, out: str) -> str:
    """``headline.md``: the summary line (with this folder's env.txt and cuda-tests.log), then
    each section as a table."""
    env = dict(data.get("env", {}), **read_env(_read(os.path.join(out, "env.txt")) or ""))
    line = summary_line(data.get("timings", {}), {}, str(data["env"].get("gpu", "")),
                        _read(os.path.join(out, "cuda-tests.log")), env, headline=data)
    c = data.get("env", {}).get("ceiling")
    lines = [line, "", "Ceiling (CUDA events at the largest size): " + (
        f"{c['GBps']:.0f} GB/s ({c['source']}'s fastest round); the copy {c['copy_GBps']:.0f} GB/s (median)"
        if c else "none (no device: the simulator)"), "", table(data.get("timings", {}))]
    for section in ("steps", "first_update", "checks", "host"):
        if data.get(section):
            lines += ["", f"| {section} | value |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in data[section].items()]
    return "\n".join(lines) + "\n"


def _empty_cache() -> None:
    import torch

    torch.cuda.empty_cache()


def main(argv) -> int:
    opts = G.options(argv, __doc__, "headline", 80.0, "figure")
    sections = ["env", "checks", "timings", "steps", "first_update", "host"]
    rec = G.Record(os.path.join(opts.out, "headline.json"), sections)
    rec.data["env"]["budget_s"] = opts.budget
    rec.guarded("checks", "environment", lambda: environment(rec))
    plan = [(f"flat float32 2^{FLAT}", lambda: flat(rec))]          # first: the copy ceiling
    plan += [(f"{HOST_COST[c]} {dt}", lambda c=c, dt=dt: host_cost(rec, c, dt))
             for c, dt in ((6, "float32"), (148, "float32"), (3000, "float32"), (148, "bf16"))]
    plan += [("first update", lambda: first_update(rec)),
             ("gpt2 step float32", lambda: steps(rec, "float32")),
             ("gpt2 step bf16", lambda: steps(rec, "bf16"))]
    rec.run_plan(plan, opts.budget, after=None if G.SIM else _empty_cache)
    rec.note("host", "headline seconds", round(rec.elapsed(), 1))
    G.publish(os.path.join(opts.out, "headline.md"), report(rec.data, opts.out))
    return 1 if G.failed(rec.data["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
