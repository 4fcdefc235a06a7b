"""Time, fastema over its baseline, both in this process on one thread, interleaved, min of N,
each call charged its wall time less its waits for other processes (:func:`measure_ratio`).
fastema and ``bench/suite/shapes.py`` are imported when a scenario is set up: call
:func:`~bench.gates.common.use_tree` first."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from .common import DECAY

RATIOS = {
    "flat float32 2^20 (in cache): ema_update_ / torch.lerp_": "flat",
    "GPT-2 small float32: FlatShadow.update / torch._foreach_lerp_": "gpt2",
    "bfloat16 model -> float32 shadow, 3000 x 4096: FlatShadow.update / _foreach_mul_ + _foreach_add_": "bf16",
    "3000 x 4096 float32: FlatShadow.update / torch._foreach_lerp_": "many",
    "swap for evaluation, 3000 x 4096: EMA.swap() x2 / torch_ema store + copy_to + restore": "swap",
    "smoother, 10^6 streams: Smoother.update / torch ops": "smooth",
    "16 elements, torch (x200): ema_update_ / torch.lerp_": "small torch",
    "16 elements, NumPy (x200): ema_update_ / torch.lerp_": "small numpy",
    "compiled step, 30 x 4096 float32 (x20): ema.update() / torch._foreach_lerp_ in the graph": "compile",
}
ROUNDS = {"flat": 31, "gpt2": 7, "bf16": 11, "many": 15, "swap": 11, "smooth": 7, "small torch": 31,
          "small numpy": 31, "compile": 21}   # by a call's cost
SMALL_CALLS = 200
"""The "small" scenarios time a loop of this many calls (one call, ~2-10 us, is near the clocks' own cost):
the per-call host cost of an array function (issue 70: at most 3x ``torch.lerp_``'s)."""


@dataclasses.dataclass
class Pair:
    """fastema's update and its baseline's, with what each writes: :func:`measure_ratio` runs both once
    from the same start and refuses the baseline where it does other work than fastema
    (:func:`bench.suite.checked.checked`, the suite's own check) before either is timed.

    ``ours`` / ``theirs``: the arrays ``fast`` / ``base`` write; ``inputs``: what they read (a result
    in their memory is refused); ``move()``: moves the sources first (an update from a shadow equal to
    its sources would pass a baseline that does nothing); ``once``: ``(fastema's, baseline's)`` calls
    checked in place of ``fast`` and ``base`` where the timed call's result hides its work (the swap's
    round trip: the check captures the parameters between the two ways)."""

    fast: Callable[[], object]
    base: Callable[[], object]
    ours: Callable[[], Sequence]
    theirs: Callable[[], Sequence]
    inputs: Sequence = ()
    move: Callable[[], object] | None = None
    once: tuple | None = None
    before: bool = True          # ``ours()`` readable before the update (``bench.suite.checked.checked``)

    def check(self, name: str) -> None:
        """Refuse (:class:`bench.suite.checked.Refused`, naming ``name``'s baseline) a baseline whose
        result is not fastema's from the same start."""
        from bench.suite.checked import checked

        fast, base = self.once or (self.fast, self.base)
        ours, theirs = f"{name} | fastema", f"{name} | baseline"
        checked({ours: fast, theirs: base}, {ours: self.ours, theirs: self.theirs}, ours=ours,
                inputs=self.inputs, move=self.move, before=self.before)


def ratio_setup(kind: str) -> Pair:
    """fastema's and its baseline's updates of the same inputs (:class:`Pair`); torch on one thread
    (fastema's one thread: ``FASTEMA_NUM_THREADS=1``, see :func:`measure_ratio`)."""
    import torch

    import fastema
    from fastema.smooth import Smoother
    from fastema.torch import EMA

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def params(shapes, dtype=torch.float32):
        return [torch.randn(s, generator=g).to(dtype) for s in shapes]

    many = [(4096,)] * 3000
    if kind == "flat":                                # in cache: 2^24 moved 0.75-2.1 with the VM's load, 2^20 by 8%
        shadow, src = torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)
        base = shadow.clone()
        return Pair(lambda: fastema.ema_update_(shadow, src, decay=DECAY), lambda: base.lerp_(src, 1 - DECAY),
                    lambda: [shadow], lambda: [base], inputs=[src])
    if kind in ("gpt2", "many", "bf16"):
        from bench.suite.shapes import gpt2_small

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
        return Pair(lambda: flat.update(DECAY), base, lambda: [flat.view(i) for i in range(len(ps))],
                    lambda: shadows, inputs=ps, move=lambda: torch._foreach_neg_(ps))
    if kind == "swap":
        model = torch.nn.Module()
        model.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params(many)])
        ema = EMA(model, DECAY)
        plist = list(model.parameters())
        shadow = [p.detach().clone() for p in plist]
        held: list = []
        between: dict = {}                            # the parameters while swapped in, for the check

        def fast():
            ema.swap()
            ema.swap()

        def base_in():                                # torch_ema 0.3's store / copy_to / restore, written out
            held[:] = [p.clone() for p in plist]
            for s, p in zip(shadow, plist):
                p.data.copy_(s.data)

        def base_out():
            for c, p in zip(held, plist):
                p.data.copy_(c.data)

        def base():
            base_in()
            base_out()

        def captured(side, first, then):
            def run():
                first()
                between[side] = [p.detach().clone() for p in plist]
                then()
            return run

        def move():
            with torch.no_grad():
                torch._foreach_neg_(plist)            # the parameters trained away from both averages
        return Pair(fast, base, lambda: between.pop("fastema"), lambda: between.pop("baseline"), move=move,
                    once=(captured("fastema", ema.swap, ema.swap), captured("baseline", base_in, base_out)),
                    before=False)
    if kind == "smooth":
        from testkit.baselines import TorchSmoother  # test_bench_smooth.py's baseline

        values = torch.randn(10 ** 6, generator=g)
        s, t = Smoother(decay=0.99, window=50), TorchSmoother(0.99, 50, 10 ** 6, "cpu")
        return Pair(lambda: s.update(values), lambda: t.update(values), lambda: [s.ema, s.sma],
                    lambda: list(t.read()), inputs=[values], before=False)   # no value before the first update
    if kind in ("small torch", "small numpy"):
        return _small(kind == "small numpy", g)
    if kind == "compile":
        return _compiled(g)
    raise ValueError(kind)


def _small(numpy: bool, g):
    """``ema_update_`` on a 16-element float32 pair (torch tensors or NumPy arrays) against
    ``torch.lerp_`` on torch's, each :data:`SMALL_CALLS` calls a round."""
    import torch

    import fastema

    shadow, src = torch.randn(16, generator=g), torch.randn(16, generator=g)
    base = shadow.clone()
    a, b = (shadow.numpy(), src.numpy()) if numpy else (shadow, src)
    calls = range(SMALL_CALLS)
    update, w = fastema.ema_update_, 1 - DECAY

    def fast():
        for _ in calls:
            update(a, b, DECAY)

    def baseline():
        for _ in calls:
            base.lerp_(src, w)
    return Pair(fast, baseline, lambda: [a], lambda: [base], inputs=[b, src])


COMPILED_CALLS = 20
"""The compiled-step scenario times a loop of this many calls a round (one call, ~0.2-0.3 ms on the CPU)."""


def _compiled(g):
    """The compiled step (:func:`bench.gates.scenarios.compiled_steps`), :data:`COMPILED_CALLS` calls a
    round a side. Both are compiled here (Inductor's C++: tens of seconds on 2 cores, its cache kept
    between runs)."""
    import torch

    from .scenarios import compiled_steps

    steps = compiled_steps(g)
    with_ema, with_foreach, ours, theirs = steps.with_ema, steps.with_foreach, steps.ours, steps.theirs
    calls = range(COMPILED_CALLS)

    def fast():
        for _ in calls:
            with_ema()

    def base():
        for _ in calls:
            with_foreach()

    def move():                                       # both sides' parameters, away from their averages
        with torch.no_grad():
            torch._foreach_neg_(ours)
            torch._foreach_neg_(theirs)
    return Pair(fast, base, lambda: list(steps.ema.averaged_state_dict().values()), lambda: steps.shadows,
                inputs=ours + theirs, move=move, once=(with_ema, with_foreach))


CLOCK = ("one thread each; a call charged its thread's CPU time where it ran on that thread "
         "alone, else its wall time")
ALONE = 0.02        # on the calling thread alone: the other threads' CPU time <= 2% of its own


def charged(wall: float, thread: float, process: float) -> tuple[float, str]:
    """The time one call is charged, and the clock it was read on: its thread's CPU time where
    the call ran on the calling thread alone (the process's other threads used <= :data:`ALONE`
    of that, or 20 us), which is its wall time less the time other processes held the core;
    else its wall time (a call other threads worked for: a parallel kernel, a worker; their CPU
    time is not the calling thread's, and their sum is not the time the call took)."""
    if process - thread <= max(ALONE * thread, 20e-6):
        return thread, "thread CPU"
    return wall, "wall"


def measure_ratio(name: str, again: bool = False, rounds: int | None = None,
                  setup=None) -> tuple[float, dict]:
    """fastema's time over its baseline's, each the minimum of ``rounds`` (:data:`ROUNDS`; twice
    as many ``again``, a rerun) single calls, interleaved (the order alternating each round) in
    this process.

    The time is what the benchmark the scenario stands for measures, the call's wall time, as an
    unloaded machine would give it: each call is charged by :func:`charged`, its thread's CPU
    time where it ran on the calling thread alone (not the waits while other processes ran: at a
    load of 11 on 2 cores the wall times were 3-4x the CPU times), else its wall time (a
    multi-threaded call is never timed on one thread's clock). Both sides on one thread: torch's
    count set by :func:`ratio_setup`, fastema's by ``FASTEMA_NUM_THREADS=1``, which the command
    line sets before fastema is imported. The ratios run beside the valgrind process, one core
    each on a 2-core machine; with two threads a side, a load of 5 moved the wall-time ratios
    2-4x run to run. Each side's clocks and wall time are kept beside the ratio. ``setup``:
    ``kind -> Pair`` (default :func:`ratio_setup`). The baseline is run once against fastema's result
    first (:meth:`Pair.check`) and refused, before anything is timed, where it does other work."""
    import gc

    rounds = rounds or ROUNDS[RATIOS[name]] * (2 if again else 1)
    pair = (setup or ratio_setup)(RATIOS[name])
    pair.check(name)
    fast, base = pair.fast, pair.base
    for fn in (fast, base, fast, base):               # compile, first touch
        fn()
    times: dict = {fast: [], base: []}
    walls: dict = {fast: [], base: []}
    clocks: dict = {fast: set(), base: set()}
    wall_clock, thread_clock, process_clock = time.perf_counter, time.thread_time, time.process_time
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for fn in ((fast, base) if r % 2 == 0 else (base, fast)):
                p, c, w = process_clock(), thread_clock(), wall_clock()
                fn()
                w, c, p = wall_clock() - w, thread_clock() - c, process_clock() - p
                t, clock = charged(w, c, p)
                times[fn].append(t)
                walls[fn].append(w)
                clocks[fn].add(clock)
    finally:
        gc.enable()
    ratio = min(times[fast]) / min(times[base])
    out: dict = {"rounds": rounds, "wall_ratio": round(min(walls[fast]) / min(walls[base]), 4)}
    for side, fn in (("fastema", fast), ("baseline", base)):
        out[f"{side}_ms"] = round(min(times[fn]) * 1e3, 3)
        out[f"{side}_clock"] = " and ".join(sorted(clocks[fn]))
        out[f"{side}_wall_ms"] = round(min(walls[fn]) * 1e3, 3)
    del fast, base, pair, times, walls, clocks
    gc.collect()
    return ratio, out
