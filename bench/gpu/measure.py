"""How the probe times one implementation (``measure``), how the headline times several against
each other (``interleaved``: the same figures, the implementations' batches taken in turn), and the
bytes each implementation moves.

``measure(fn)`` gives, per call of ``fn``:

- ``host_us``: host submit time, the median of ``BATCHES`` (>= 5) batches of ``calls`` (>= 200) calls,
  each batch queued behind a GPU sleep longer than the batch's host time (1.5x the estimate + 2 ms),
  so the host neither waits for the GPU nor sees it idle. ``host_us_min``/``host_us_max`` give the
  spread. ``host_gpu_caught_up``: batches in which the sleep had ended before the host finished
  (then the launch queue may have filled and the host waited for the GPU: the figure is an upper
  bound). Then the batches are timed again with a quarter of the calls (down to 10: a launch queue
  of about a thousand launches fills behind the sleep at 200 calls of a many-launch baseline);
  ``calls`` is what was used, ``calls_asked`` what was asked. Slow baselines ask fewer calls.
- ``device_us``: CUDA events around ``calls`` calls queued behind a sleep, median of the batches.
  The start event is recorded at the end of the sleep; when it has already completed once the host
  has queued the batch, the GPU waited for the host in that batch and the time is not device time:
  ``host_bound`` (bool) and ``host_bound_batches`` say so.
- ``pipelined_us``: ``calls`` calls back to back, one sync per batch (a training loop's view).
- ``e2e_us``: one call then a sync, median of ``E2E`` calls (an isolated call's latency; it pulls
  the ratios of small updates towards 1).

GB/s are counted from the bytes an implementation actually moves (``BYTES``), not the model's size.
In the simulator every figure is the CPU's (perf_counter, no-op syncs) at tiny sizes: plumbing only.
"""
from __future__ import annotations

import statistics
import time

from bench.gpu import common as G

CALLS, BATCHES, E2E = (3, 2, 3) if G.SIM else (200, 5, 20)
MAX_SLEEP_MS = 3000.0

#: bytes per element each implementation reads + writes in device memory, from its operations
BYTES = {
    "copy": 8,                    # float32 read 4 + write 4
    "lerp f32": 12,               # shadow read + write 8, source read 4 (fastema, lerp_, _foreach_lerp_, loops)
    "lerp f32 K=2": 20,           # fastema rows=2: the source read once 4, two float32 rows read + written 16
    "foreach lerp f32 x2": 24,    # two _foreach_lerp_ passes of 12
    "lerp bf16->f32": 10,         # fastema: float32 shadow 8, bfloat16 source 2
    "mul+add bf16->f32": 18,      # _foreach_mul_(f32): 8; _foreach_add_(f32, bf16): shadow 8 + source 2
    "lerp bf16 shadow": 6,        # fastema: bfloat16 shadow read + write 4, bfloat16 source 2
    # timm's stochastic path: two .float() (2 read + 4 write each) and torch.cat (4 + 4 each): 28;
    # lerp_ 12; randint_like 4; add_ 12; bitwise_and_ 8; .bfloat16() 6; _foreach_copy_ 4
    "timm stochastic bf16": 74,
}


def _host_batch(fn, calls: int, sleep_ms: float) -> tuple[float, bool]:
    """Seconds per call of ``calls`` calls queued behind ``sleep_ms`` of GPU sleep, and whether the
    sleep had ended before the host finished queueing."""
    G.gpu_busy(sleep_ms)
    mark = G.event()
    mark.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    caught_up = mark.query()
    G.sync()
    return dt / calls, bool(caught_up)


def _sleep_for(host_s: float, calls: int) -> float:
    return min(MAX_SLEEP_MS, host_s * calls * 1.5e3 + 2.0)


def measure(fn, calls: int | None = None, batches: int | None = None) -> dict:
    calls = min(calls or CALLS, CALLS)
    batches = max(batches or BATCHES, 1)
    for _ in range(3):                                      # compile and allocate outside the timings
        fn()
    G.sync()
    est, _ = _host_batch(fn, min(calls, 20), 50.0)
    asked = calls
    while True:
        host, caught = [], 0
        for _ in range(batches):
            t, c = _host_batch(fn, calls, _sleep_for(est, calls))
            host.append(t)
            caught += c
            est = max(est, t)
        if not caught or calls <= 10:
            break
        calls = max(10, calls // 4)                         # a full launch queue: fewer calls a batch
    host_s = statistics.median(host)
    pipe = []
    for _ in range(batches):
        G.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        G.sync()
        pipe.append((time.perf_counter() - t0) / calls)
    dev, bound = [], 0
    start, end = G.event(), G.event()
    for _ in range(batches):
        G.gpu_busy(_sleep_for(max(host), calls))
        start.record()                                      # the end of the sleep
        for _ in range(calls):
            fn()
        end.record()
        bound += bool(start.query())                        # the GPU ran dry before the host had queued all
        end.synchronize()
        dev.append(start.elapsed_time(end) * 1e-3 / calls)
    e2e = []
    for _ in range(E2E):
        t0 = time.perf_counter()
        fn()
        G.sync()
        e2e.append(time.perf_counter() - t0)
    us = 1e6
    return dict(calls=calls, calls_asked=asked, batches=batches, host_us=host_s * us, host_us_min=min(host) * us,
                host_us_max=max(host) * us, host_gpu_caught_up=caught, pipelined_us=statistics.median(pipe) * us,
                device_us=statistics.median(dev) * us, host_bound=bound > 0, host_bound_batches=bound,
                e2e_us=statistics.median(e2e) * us)


def _calibrated(fn, calls: int) -> tuple[int, float]:
    """``(calls a batch, host seconds a call)`` for ``fn``: warmed, then the calls a batch cut to a
    quarter (down to 10) while the GPU catches up with the host in a batch (see :func:`measure`)."""
    for _ in range(3):
        fn()
    G.sync()
    est, _ = _host_batch(fn, min(calls, 20), 50.0)
    while True:
        t, caught = _host_batch(fn, calls, _sleep_for(est, calls))
        est = max(est, t)
        if not caught or calls <= 10:
            return calls, est
        calls = max(10, calls // 4)


def interleaved(fns: dict, calls: int | None = None, batches: int | None = None) -> dict:
    """``{name: figures}`` of each implementation of ``fns`` (``name -> fn``), timed as
    :func:`measure` times one (host, device and end-to-end figures, the same keys but
    ``pipelined_us``), with the batches taken in turn (each implementation's first batch, then
    each one's second...): clocks, the other work of the machine and the GPU's state fall on all of
    them alike, so their ratios hold within a run."""
    asked = min(calls or CALLS, CALLS)
    batches = max(batches or BATCHES, 1)
    plan = {name: _calibrated(fn, asked) for name, fn in fns.items()}
    host: dict = {name: [] for name in fns}
    caught: dict = {name: 0 for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            n, est = plan[name]
            t, c = _host_batch(fn, n, _sleep_for(est, n))
            host[name].append(t)
            caught[name] += c
    dev: dict = {name: [] for name in fns}
    bound: dict = {name: 0 for name in fns}
    start, end = G.event(), G.event()
    for _ in range(batches):
        for name, fn in fns.items():
            n = plan[name][0]
            G.gpu_busy(_sleep_for(max(host[name]), n))
            start.record()
            for _ in range(n):
                fn()
            end.record()
            bound[name] += bool(start.query())
            end.synchronize()
            dev[name].append(start.elapsed_time(end) * 1e-3 / n)
    e2e: dict = {name: [] for name in fns}
    for _ in range(E2E):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            G.sync()
            e2e[name].append(time.perf_counter() - t0)
    us = 1e6
    return {name: dict(calls=plan[name][0], calls_asked=asked, batches=batches,
                       host_us=statistics.median(host[name]) * us, host_us_min=min(host[name]) * us,
                       host_us_max=max(host[name]) * us, host_gpu_caught_up=caught[name],
                       device_us=statistics.median(dev[name]) * us, host_bound=bound[name] > 0,
                       host_bound_batches=bound[name], e2e_us=statistics.median(e2e[name]) * us)
            for name in fns}


def with_bandwidth(m: dict, elements: int, kind: str | None) -> dict:
    """``m`` with the bytes moved per call and the GB/s of device time and of end to end."""
    per = BYTES[kind] if kind else 0
    nbytes = per * elements
    m.update(bytes_per_element=per or None, bytes=nbytes or None,
             device_GBps=nbytes / (m["device_us"] * 1e-6) / 1e9 if nbytes and m["device_us"] > 0 else None,
             e2e_GBps=nbytes / (m["e2e_us"] * 1e-6) / 1e9 if nbytes and m["e2e_us"] > 0 else None)
    return m
