"""The probe's timings (``bench/gpu/probe.py``), each row written to probe.json as it is measured:

- ``host_cost_table``: issue 23's table, which the ``gpu-summary`` line reads: ``EMA.update()``,
  ``FlatShadow.update`` and the foreach baseline at 6 tensors (the RL MLP), 148 (GPT-2 small) and
  3000 x 4096, float32 and bfloat16 weights into a float32 shadow; ``TargetNetwork.update``;
  ``EMA.update`` with the plan kernel launched apart (the one-launch update's gain);
- ``flat_sweep``: one flat float32 tensor of 2^20 to 2^28 elements: the copy ceiling, ``ema_update_``
  (the dispatcher and the plain lerp kernel), ``FlatShadow.update`` (a bound launch) and ``EMA.update``
  of a model holding that one parameter (the kernels an EMA runs: the fused plan + lerp), against
  ``torch.lerp_`` and ``torch._foreach_lerp_``;
- ``models``: GPT-2 small and 3000 x 4096 through ``FlatShadow``: float32, two decays, bfloat16 weights
  into a float32 shadow, a bfloat16 shadow with stochastic rounding, against torch's ways and timm's.

See ``bench/gpu/measure.py`` for what each figure means. Two slow baselines ask fewer calls a batch than
200: the per-tensor ``lerp_`` loop at 3000 tensors (10: 3000 launches a call) and timm's stochastic
path (20: about 5 ms a call on an H100); each row's ``calls`` says what was used. A row started after
the probe's time budget is recorded ``{"skipped": "out of time ..."}``; a row that raises is a failed
check ``timing S | I``.
In the simulator the rows run on the CPU at tiny sizes (plumbing only).
"""
from __future__ import annotations

import time

import torch
from torch import nn

import fastema
from bench.gpu import common as G
from bench.gpu.measure import measure, with_bandwidth
from bench.gpu.summary import EMA as EMA_ROW
from bench.gpu.summary import FOREACH, HOST_COST, MIXED
from bench.suite.shapes import RL_TAU, gpt2_small, many_small, rl_networks
from fastema.flat import FlatShadow

DEV = G.torch_device()


class Rows:
    """Writes each timing into ``rec`` (section ``timings``: scenario -> implementation -> figures)."""

    def __init__(self, rec, budget_s: float, quick: bool):
        self.rec, self.budget_s, self.quick = rec, budget_s, quick

    def out_of_time(self) -> bool:
        return self.rec.elapsed() > self.budget_s

    def __call__(self, scenario: str, impl: str, elements: int, kind: str | None, fn, factory=False,
                 **kw) -> None:
        """Time ``fn`` (``factory``: ``fn()`` makes it, inside the guard) as ``scenario | impl``."""
        table = self.rec.data.setdefault("timings", {}).setdefault(scenario, {})
        if self.out_of_time():
            table[impl] = {"skipped": f"out of time (the probe's budget of {self.budget_s:.0f} s was spent)"}
            self.rec.save()
            print(f"[timing] {scenario} | {impl}: skipped, out of time", flush=True)
            return

        def run():
            t0 = time.perf_counter()
            m = with_bandwidth(measure(fn() if factory else fn, **kw), elements, kind)
            m["s"] = round(time.perf_counter() - t0, 2)
            table[impl] = m
            self.rec.save()
            print(f"[timing] {scenario} | {impl}: " + ", ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items() if v is not None),
                flush=True)
        self.rec.guarded("checks", f"timing {scenario} | {impl}", run)


def shapes(count: int) -> list:
    """The parameter shapes of the host-cost scenarios (tiny in the simulator)."""
    if G.SIM:
        return {6: [(16, 16), (16,), (16, 16), (16,), (1, 16), (1,)], 148: [(8,)] * 148, 3000: [(4,)] * 300}[count]
    return {6: [tuple(p.shape) for p in rl_networks(2)[0].parameters()], 148: gpt2_small(),
            3000: many_small()}[count]


def _empty_cache() -> None:
    if not G.SIM:
        torch.cuda.empty_cache()


def _model(shape_list, dtype) -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(s, device=DEV).to(dtype)) for s in shape_list])


def _host_cost(rows: Rows, count: int, dt: str) -> None:
    from fastema.torch import EMA

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    model = _model(shapes(count), dtype)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    ours = "lerp f32" if dt == "float32" else "lerp bf16->f32"           # EMA's shadow: float32
    sc = f"{HOST_COST[count]} {dt}"
    rows(sc, EMA_ROW, n, ours, EMA(model, 0.999).update)
    if count != 3000 and dt == "float32" and not G.SIM:       # issue 23 item 2: the plan in the lerp launch
        def apart():
            ema = EMA(model, 0.999, device_step=True)
            ema._plan_on_device.carriers = {}                 # the plan kernel launched on its own, as before
            return ema.update
        rows(sc, "fastema EMA.update, plan kernel apart", n, ours, apart, factory=True)
    flat = FlatShadow(params)
    rows(sc, "fastema FlatShadow.update", n, ours, lambda: flat.update(0.999))
    with torch.no_grad():
        if dt == "float32":
            shadows = [p.detach().clone() for p in params]
            rows(sc, FOREACH, n, "lerp f32", lambda: torch._foreach_lerp_(shadows, params, 0.001))
        else:
            f32 = [p.detach().float() for p in params]
            rows(sc, MIXED, n, "mul+add bf16->f32",
                 lambda: (torch._foreach_mul_(f32, 0.999), torch._foreach_add_(f32, params, alpha=0.001)))


def _target_network(rows: Rows) -> None:
    from fastema.torch import TargetNetwork

    online, target = (m.to(DEV) for m in rl_networks(2))
    tn = TargetNetwork(online, target.requires_grad_(False), tau=RL_TAU)
    n = sum(p.numel() for p in target.parameters())
    sc = f"{HOST_COST[6]} float32 target network"
    rows(sc, "fastema TargetNetwork.update", n, "lerp f32", tn.update)
    pt, po = list(target.parameters()), list(online.parameters())
    with torch.no_grad():
        rows(sc, FOREACH, n, "lerp f32", lambda: torch._foreach_lerp_(pt, po, RL_TAU))


def _each(rows: Rows, name: str, fn, *args) -> None:
    """``fn(rows, *args)``: a scenario that raises is a failed check ``name``, and the next one runs."""
    rows.rec.guarded("checks", name, lambda: fn(rows, *args))
    _empty_cache()


def host_cost_table(rows: Rows) -> None:
    for count in (6, 148, 3000):
        for dt in ("float32", "bf16"):
            _each(rows, f"{HOST_COST[count]} {dt}", _host_cost, count, dt)
            if count == 6 and dt == "float32":
                _each(rows, "target network", _target_network)


def flat_sizes(quick: bool) -> list:
    """Powers of two of the flat sweep (2^28 always: the summary's flat28 fields read it)."""
    if G.SIM:
        return [8, 10]
    return [24, 28] if quick else [20, 24, 26, 28]


def _flat(rows: Rows, p2: int) -> None:
    from fastema.torch import EMA

    n = 1 << p2
    a, b, c = (torch.randn(n, device=DEV) for _ in range(3))
    sc = f"flat float32 2^{p2}"
    rows(sc, "copy (ceiling)", n, "copy", lambda: c.copy_(a))
    rows(sc, "fastema.ema_update_", n, "lerp f32", lambda: fastema.ema_update_(a, b, decay=0.999))
    flat = FlatShadow([b])
    rows(sc, "fastema FlatShadow.update", n, "lerp f32", lambda: flat.update(0.999))
    one = nn.Module()
    one.w = nn.Parameter(b, requires_grad=False)              # the same storage as b
    rows(sc, "fastema EMA.update", n, "lerp f32", EMA(one, 0.999).update)
    rows(sc, "torch.lerp_", n, "lerp f32", lambda: a.lerp_(b, 0.001))
    rows(sc, "torch._foreach_lerp_", n, "lerp f32", lambda: torch._foreach_lerp_([a], [b], 0.001))


def flat_sweep(rows: Rows) -> None:
    for p2 in flat_sizes(rows.quick):
        _each(rows, f"flat float32 2^{p2}", _flat, p2)


def _float32_model(rows: Rows, name: str, shape_list) -> None:
    params = [torch.randn(s, device=DEV) for s in shape_list]
    n = sum(p.numel() for p in params)
    shadows = [p.clone() for p in params]
    flat = FlatShadow(params)
    sc = f"{name} float32"
    rows(sc, "fastema FlatShadow.update", n, "lerp f32", lambda: flat.update(0.999))
    rows(sc, "torch._foreach_lerp_", n, "lerp f32", lambda: torch._foreach_lerp_(shadows, params, 0.001))
    if name == "3000x4096":
        if not rows.quick:
            def loop():
                for s_, p_ in zip(shadows, params):
                    s_.lerp_(p_, 0.001)
            rows(sc, "per-tensor lerp_", n, "lerp f32", loop, calls=10)
        flat2 = FlatShadow(params, rows=2)
        rows(f"{name} K=2", "fastema rows=2", n, "lerp f32 K=2", lambda: flat2.update([0.999, 0.9999]))
        rows(f"{name} K=2", "torch._foreach_lerp_ x2", n, "foreach lerp f32 x2",
             lambda: (torch._foreach_lerp_(shadows, params, 0.001), torch._foreach_lerp_(shadows, params, 1e-4)))
    t0 = time.perf_counter()
    for _ in range(200):
        flat.refresh()
    rows.rec.note("host", f"{name}: FlatShadow address check (refresh) us", (time.perf_counter() - t0) / 200 * 1e6)


def _bfloat16_model(rows: Rows, name: str, shape_list) -> None:
    from tests.support.baselines import timm_bfloat16_stochastic_update

    bf = [torch.randn(s, device=DEV).bfloat16() for s in shape_list]
    n = sum(p.numel() for p in bf)
    f32 = [p.float() for p in bf]
    fl = FlatShadow(bf, dtype="float32")
    sc = f"{name} bf16 model, f32 shadow"
    rows(sc, "fastema", n, "lerp bf16->f32", lambda: fl.update(0.999))
    rows(sc, "torch._foreach_mul_+_foreach_add_ (timm mixed)", n, "mul+add bf16->f32",
         lambda: (torch._foreach_mul_(f32, 0.999), torch._foreach_add_(f32, bf, alpha=0.001)))
    sr = FlatShadow(bf, dtype="bfloat16")
    ema_bf = [p.clone() for p in bf]
    step = [0]

    def sr_update():
        step[0] += 1                                           # a new key every call: the real per-step work
        sr.update(0.999, rounding="stochastic", seed=1, step=step[0])

    sc = f"{name} bf16 shadow, stochastic rounding"
    rows(sc, "fastema", n, "lerp bf16 shadow", sr_update)
    if not rows.quick:
        rows(sc, "timm bf16 stochastic path", n, "timm stochastic bf16",
             lambda: timm_bfloat16_stochastic_update(ema_bf, bf, 0.999), calls=20)


def models(rows: Rows) -> None:
    for name, count in (("gpt2-small", 148), ("3000x4096", 3000)):
        _each(rows, f"{name} float32", _float32_model, name, shapes(count))
        _each(rows, f"{name} bf16", _bfloat16_model, name, shapes(count))
