"""Time, fastema over its baseline, both in this process, interleaved, min of N (:func:`measure_ratio`).
fastema and ``bench/shapes.py`` are imported when a scenario is set up: call
:func:`~bench.gates.common.use_tree` first."""
from __future__ import annotations

import time

from .common import DECAY

RATIOS = {
    "flat float32 2^20 (in cache): ema_update_ / torch.lerp_": "flat",
    "GPT-2 small float32: FlatShadow.update / torch._foreach_lerp_": "gpt2",
    "bfloat16 model -> float32 shadow, 3000 x 4096: FlatShadow.update / _foreach_mul_ + _foreach_add_": "bf16",
    "3000 x 4096 float32: FlatShadow.update / torch._foreach_lerp_": "many",
    "swap for evaluation, 3000 x 4096: EMA.swap() x2 / torch_ema store + copy_to + restore": "swap",
    "smoother, 10^6 streams: Smoother.update / torch ops": "smooth",
}
ROUNDS = {"flat": 31, "gpt2": 7, "bf16": 11, "many": 15, "swap": 11, "smooth": 7}   # by a call's cost


def ratio_setup(kind: str):
    """``(fastema, baseline)``: two callables doing the same update, on the same inputs."""
    import torch

    import fastema
    from fastema.smooth import Smoother
    from fastema.torch import EMA

    g = torch.Generator().manual_seed(0)

    def params(shapes, dtype=torch.float32):
        return [torch.randn(s, generator=g).to(dtype) for s in shapes]

    many = [(4096,)] * 3000
    if kind == "flat":                                # in cache: 2^24 moved 0.75-2.1 with the VM's load, 2^20 by 8%
        shadow, src = torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)
        base = shadow.clone()
        return (lambda: fastema.ema_update_(shadow, src, decay=DECAY)), (lambda: base.lerp_(src, 1 - DECAY))
    if kind in ("gpt2", "many", "bf16"):
        from shapes import gpt2_small

        ps = params(gpt2_small() if kind == "gpt2" else many, torch.bfloat16 if kind == "bf16" else torch.float32)
        flat = fastema.FlatShadow(ps, dtype="float32") if kind == "bf16" else fastema.FlatShadow(ps)
        shadows = [p.float() if kind == "bf16" else p.clone() for p in ps]
        if kind == "bf16":
            def base():                               # timm ModelEmaV3's mixed-dtype path
                torch._foreach_mul_(shadows, DECAY)
                torch._foreach_add_(shadows, ps, alpha=1 - DECAY)
        else:
            def base():
                torch._foreach_lerp_(shadows, ps, 1 - DECAY)
        return (lambda: flat.update(DECAY)), base
    if kind == "swap":
        model = torch.nn.Module()
        model.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params(many)])
        ema = EMA(model, DECAY)
        plist = list(model.parameters())
        shadow = [p.detach().clone() for p in plist]
        held: list = []

        def fast():
            ema.swap()
            ema.swap()

        def base():                                   # torch_ema 0.3's store / copy_to / restore, written out
            held[:] = [p.clone() for p in plist]
            for s, p in zip(shadow, plist):
                p.data.copy_(s.data)
            for c, p in zip(held, plist):
                p.data.copy_(c.data)
        return fast, base
    if kind == "smooth":
        from baselines import TorchSmoother  # bench/test_bench_smooth.py's baseline

        values = torch.randn(10 ** 6, generator=g)
        s, t = Smoother(decay=0.99, window=50), TorchSmoother(0.99, 50, 10 ** 6, "cpu")
        return (lambda: s.update(values)), (lambda: t.update(values))
    raise ValueError(kind)


def measure_ratio(name: str, again: bool = False, rounds: int | None = None) -> tuple[float, dict]:
    """fastema's time over its baseline's, each the minimum of ``rounds`` (:data:`ROUNDS`; twice as many
    ``again``, a rerun) single calls, interleaved (the order alternating each round) in this process, on
    one thread. The time is the thread's CPU time (both sides run on this thread only: one torch thread,
    fastema's serial kernels): on a shared machine a call preempted by other processes is not charged for
    the wait (wall time moved the 10^6-stream smoother's ratio 6.0-9.6 at a load of 8 on 2 cores, CPU
    time 6.6-7.5), memory stalls are. The wall-time ratio is kept beside it."""
    import gc

    import torch

    torch.set_num_threads(1)
    rounds = rounds or ROUNDS[RATIOS[name]] * (2 if again else 1)
    fast, base = ratio_setup(RATIOS[name])
    for fn in (fast, base, fast, base):               # compile, first touch
        fn()
    cpu: dict = {fast: [], base: []}
    wall: dict = {fast: [], base: []}
    clock, wall_clock = time.thread_time, time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for fn in ((fast, base) if r % 2 == 0 else (base, fast)):
                w, c = wall_clock(), clock()
                fn()
                c, w = clock() - c, wall_clock() - w
                cpu[fn].append(c)
                wall[fn].append(w)
    finally:
        gc.enable()
    out = {"fastema_ms": round(min(cpu[fast]) * 1e3, 3), "baseline_ms": round(min(cpu[base]) * 1e3, 3),
           "wall_ratio": round(min(wall[fast]) / min(wall[base]), 4), "rounds": rounds}
    ratio = min(cpu[fast]) / min(cpu[base])
    del fast, base, cpu, wall
    gc.collect()
    return ratio, out
