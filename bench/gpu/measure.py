"""How the GPU plan times its rows: :func:`interleaved` times several implementations against each
other (their batches taken in turn, in one call: one ``run`` id), :func:`measure` one (the probe), and
the bytes each implementation moves (:data:`BYTES`).

Per implementation and call, three figures kept apart (``bench/suite/figures.py``), each a median with
its spread (``{figure}_us``, ``_us_min``, ``_us_max``, ``{figure}_rounds``):

- ``host``: host submit time, ``BATCHES`` (7) batches of ``calls`` (<= 200) calls, each batch queued
  behind a GPU sleep longer than the batch's host time (1.5x the estimate + 2 ms), so that the host
  neither waits for the GPU nor sees it idle. A batch in which the sleep had ended before the host
  finished saw the GPU catch up: the launch queue may have filled (about a thousand launches) or the
  call synchronised, and the host waited. The calls a batch are cut to a quarter (down to 10) while
  that happens in the calibration; where it still happens in a timed batch (``host_waited`` > 0),
  the host figure is **invalid**: ``host_us`` is None and ``host_invalid`` says why (the H200's
  bfloat16 baseline read "40 ms" of host time: the GPU sleep it waited behind);
- ``device``: CUDA events around the batch's calls queued behind a sleep. The start event is recorded
  at the end of the sleep; where it has completed once the host has queued the batch, the GPU waited
  for the host in that batch (``host_bound_batches``): that time is not device time (no ratio is read
  from it: ``bench.suite.figures.ratio``);
- ``e2e``: one call then a sync, ``E2E`` (21) times.

:func:`measure` adds ``pipelined_us`` (``calls`` calls back to back, one sync a batch). GB/s are
counted from the bytes an implementation actually moves (``BYTES``), not the model's size. In the
simulator every figure is the CPU's (perf_counter, no-op syncs) at tiny sizes: plumbing only.
"""
from __future__ import annotations

import itertools
import time

from bench.gpu import common as G
from bench.suite.figures import spread

CALLS, BATCHES, E2E = (3, 2, 3) if G.SIM else (200, 7, 21)
MAX_SLEEP_MS = 3000.0
_RUNS = itertools.count(1)

#: bytes per element each implementation reads + writes in device memory, from its operations
BYTES = {
    "copy": 8,                    # float32 read 4 + write 4
    "add_ f32": 12,               # a.add_(b): read 8, write 4 (a lerp's traffic, the 2:1 ceiling stream)
    "lerp f32": 12,               # shadow read + write 8, source read 4 (fastema, lerp_, _foreach_lerp_, loops)
    "lerp f32 K=2": 20,           # fastema rows=2: the source read once 4, two float32 rows read + written 16
    "foreach lerp f32 x2": 24,    # two _foreach_lerp_ passes of 12
    "lerp bf16->f32": 10,         # fastema: float32 shadow 8, bfloat16 source 2
    "mul+add bf16->f32": 18,      # _foreach_mul_(f32): 8; _foreach_add_(f32, bf16): shadow 8 + source 2
    "lerp bf16 shadow": 6,        # fastema: bfloat16 shadow read + write 4, bfloat16 source 2
    "swap round trip f32": 32,    # two exchanges, each reading and writing both float32 arrays
    # timm's stochastic path: two .float() (2 read + 4 write each) and torch.cat (4 + 4 each): 28;
    # lerp_ 12; randint_like 4; add_ 12; bitwise_and_ 8; .bfloat16() 6; _foreach_copy_ 4
    "timm stochastic bf16": 74,
}


def _host_batch(fn, calls: int, sleep_ms: float) -> tuple[float, bool]:
    """Seconds per call of ``calls`` calls queued behind ``sleep_ms`` of GPU sleep, and whether the
    sleep had ended before the host finished queueing (the host may have waited for the GPU)."""
    G.gpu_busy(sleep_ms)
    mark = G.event()
    mark.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    waited = mark.query()
    G.sync()
    return dt / calls, bool(waited)


def _sleep_for(host_s: float, calls: int) -> float:
    return min(MAX_SLEEP_MS, host_s * calls * 1.5e3 + 2.0)


def _calibrated(fn, calls: int) -> tuple[int, float]:
    """``(calls a batch, host seconds a call)`` for ``fn``: warmed, then the calls a batch cut to a
    quarter (down to 10) while the GPU catches up with the host in a batch."""
    for _ in range(3):                                      # compile and allocate outside the timings
        fn()
    G.sync()
    est, _ = _host_batch(fn, min(calls, 20), 50.0)
    while True:
        t, waited = _host_batch(fn, calls, _sleep_for(est, calls))
        est = max(est, t)
        if not waited or calls <= 10:
            return calls, est
        calls = max(10, calls // 4)


def _figures(name: str, calls: int, asked: int, run: int, host: list, waited: int, dev: list, bound: int,
             e2e: list) -> dict:
    m: dict = dict(calls=calls, calls_asked=asked, batches=len(host), run=run, host_waited=waited,
                   host_bound=bound > 0, host_bound_batches=bound, device_s=list(dev))
    for figure, values in (("host", host), ("device", dev), ("e2e", e2e)):
        s = spread(values)
        m.update({f"{figure}_us": s["median"], f"{figure}_us_min": s["min"], f"{figure}_us_max": s["max"],
                  f"{figure}_rounds": s["rounds"]})
    if waited:
        m.update(host_us=None, host_us_min=None, host_us_max=None,
                 host_invalid=f"{name}: the host waited for the GPU in {waited} of {len(host)} batches "
                              f"(the GPU caught up before the host had queued {calls} calls): no host cost")
    return m


def interleaved(fns: dict, calls: int | dict | None = None, batches: int | None = None) -> dict:
    """``{name: figures}`` of each implementation of ``fns`` (``name -> fn``; see the module
    docstring), with the batches taken in turn (each implementation's first batch, then each one's
    second...): clocks, the other work of the machine and the GPU's state fall on all of them alike, so
    their ratios hold within a run. Every row carries this call's ``run`` id. ``calls``: the calls a
    batch asked (at most ``CALLS``), for all, or per name (a slow baseline asks fewer)."""
    per = calls if isinstance(calls, dict) else {}
    asked = {name: min(per.get(name) or (calls if isinstance(calls, int) else None) or CALLS, CALLS)
             for name in fns}
    batches = max(batches or BATCHES, 1)
    run = next(_RUNS)
    plan = {name: _calibrated(fn, asked[name]) for name, fn in fns.items()}
    host: dict = {name: [] for name in fns}
    waited: dict = {name: 0 for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            n, est = plan[name]
            t, w = _host_batch(fn, n, _sleep_for(est, n))
            host[name].append(t)
            waited[name] += w
    dev: dict = {name: [] for name in fns}
    bound: dict = {name: 0 for name in fns}
    start, end = G.event(), G.event()
    for _ in range(batches):
        for name, fn in fns.items():
            n = plan[name][0]
            G.gpu_busy(_sleep_for(max(host[name]), n))
            start.record()                                  # the end of the sleep
            for _ in range(n):
                fn()
            end.record()
            bound[name] += bool(start.query())              # the GPU ran dry before the host had queued all
            end.synchronize()
            dev[name].append(start.elapsed_time(end) * 1e-3 / n)
    e2e: dict = {name: [] for name in fns}
    for _ in range(E2E):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            G.sync()
            e2e[name].append(time.perf_counter() - t0)
    return {name: _figures(name, plan[name][0], asked[name], run, host[name], waited[name], dev[name], bound[name],
                           e2e[name]) for name in fns}


def measure(fn, calls: int | None = None, batches: int | None = None) -> dict:
    """One implementation's figures (:func:`interleaved` of ``fn`` alone), and ``pipelined_us``:
    ``calls`` calls back to back, one sync a batch (a training loop's view)."""
    m = interleaved({"row": fn}, calls, batches)["row"]
    pipe = []
    for _ in range(m["batches"]):
        G.sync()
        t0 = time.perf_counter()
        for _ in range(m["calls"]):
            fn()
        G.sync()
        pipe.append((time.perf_counter() - t0) / m["calls"])
    s = spread(pipe)
    m.update(pipelined_us=s["median"], pipelined_us_min=s["min"], pipelined_us_max=s["max"])
    return m


def ceiling(rows: dict, elements: int, kinds: dict):
    """The run's ceiling (``bench.suite.checked.device_ceiling``) from the plain streams ``kinds``
    (``name -> BYTES key``: a copy, an ``add_``) among ``rows`` (:func:`interleaved`'s), timed by CUDA
    events at ``elements``; None in the simulator (a CPU copy is no ceiling: caches)."""
    from bench.suite.checked import device_ceiling

    if G.NO_DEVICE:
        return None
    return device_ceiling({k: (BYTES[kind] * elements, rows[k]["device_s"]) for k, kind in kinds.items()},
                          elements=elements)


def with_bandwidth(m: dict, elements: int, kind: str | None) -> dict:
    """``m`` with the bytes moved per call and the GB/s of device time and of end to end."""
    per = BYTES[kind] if kind else 0
    nbytes = per * elements
    m.update(bytes_per_element=per or None, bytes=nbytes or None,
             device_GBps=nbytes / (m["device_us"] * 1e-6) / 1e9 if nbytes and m["device_us"] > 0 else None,
             e2e_GBps=nbytes / (m["e2e_us"] * 1e-6) / 1e9 if nbytes and m["e2e_us"] > 0 else None)
    return m


def run_ceiling(rec):
    """The ceiling ``rec`` holds (``env.ceiling``, set by the run's first row), or None."""
    from bench.suite.checked import Ceiling

    c = rec.data.get("env", {}).get("ceiling")
    return Ceiling(**c) if c else None


def keep_ceiling(rec, c) -> None:
    """``c`` (``bench.suite.checked.Ceiling`` or None) as the run's ceiling, and the copy's GB/s."""
    rec.data.setdefault("env", {}).update(ceiling=vars(c) if c else None, copy_GBps=c.copy_GBps if c else None)
    rec.save()


def record(rec, sc: str, impl: str, m: dict, checked: bool = False) -> dict:
    """Row ``sc | impl`` written into ``rec`` (``timings``), ``checked`` where it is a baseline run
    against fastema's result before it was timed, its % of the copy by device time; refused
    (``bench.suite.checked.Refused``, raised once the row is written down as refused) where its GB/s
    passes the run's ceiling or a figure breaks ``bench.suite.figures``' rules."""
    from bench.suite.checked import Refused, within_ceiling
    from bench.suite.figures import check_row

    table = rec.data.setdefault("timings", {}).setdefault(sc, {})
    if checked:
        m["checked"] = True
    try:
        check_row(f"{sc} | {impl}", m)
        flag = within_ceiling(f"{sc} | {impl}", m.get("device_GBps"), run_ceiling(rec))
    except Refused as err:
        table[impl] = {"refused": str(err)}
        rec.save()
        raise
    if flag:
        m["above_copy"] = flag
    copy = rec.data.get("env", {}).get("copy_GBps")
    m["pct_of_copy"] = 100 * m["device_GBps"] / copy if copy and m.get("device_GBps") else None
    table[impl] = m
    rec.save()
    return m


def record_all(rec, sc: str, rows: dict, kinds: dict, elements: int, checked_rows=()) -> dict:
    """Every row of ``rows`` (:func:`interleaved`'s) through :func:`record`, its GB/s from ``kinds``
    (impl -> :data:`BYTES` key; none: no bytes); a refusal raised once all are written down. Returns
    the scenario's table."""
    from bench.suite.checked import Refused

    refused = None
    for impl, m in rows.items():
        try:
            record(rec, sc, impl, with_bandwidth(m, elements, kinds.get(impl)), checked=impl in checked_rows)
        except Refused as err:
            refused = refused or err
    if refused is not None:
        raise refused
    return rec.data["timings"][sc]
