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

See ``bench/gpu/measure.py`` for what each figure means. The rows of a scenario are timed together,
their batches in turn (``measure.interleaved``, :meth:`Rows.group`). Two slow baselines ask fewer calls a
batch than 200: the per-tensor ``lerp_`` loop at 3000 tensors (10: 3000 launches a call) and timm's
stochastic path (20: about 5 ms a call on an H100); each row's ``calls`` says what was used. A scenario
started after the probe's time budget is recorded ``{"skipped": "out of time ..."}``; one that raises is a
failed check ``timing S``.
Every baseline is run once against fastema's result from the same inputs before it is timed, and
no row may pass the run's device-time ceiling (a copy and an ``add_`` at 2^28 by CUDA events, measured
first, ``Rows.ceiling``; ``bench/suite/checked.py``), nor print a host figure that waited for the GPU or a
median without its spread (``bench/suite/figures.py``): a refused row is recorded ``{"refused": ...}`` and
its check fails.
In the simulator the rows run on the CPU at tiny sizes (plumbing only).
"""
from __future__ import annotations

import time

import torch
from torch import nn

import fastema
from bench.gpu import common as G
from bench.gpu import measure as M
from bench.gpu.measure import with_bandwidth
from bench.gpu.summary import EMA as EMA_ROW
from bench.gpu.summary import FOREACH, HOST_COST, MIXED
from bench.suite.checked import Refused, checked, is_baseline, move_sources
from bench.suite.shapes import RL_TAU, gpt2_small, many_small, rl_networks
from fastema.flat import FlatShadow

DEV = G.torch_device()


class Rows:
    """Writes each scenario's timings into ``rec`` (section ``timings``: scenario -> implementation ->
    figures), its rows timed together (:meth:`group`).

    A baseline row (``bench.suite.checked.is_baseline``) is timed only after :meth:`agree` has run it once
    against fastema's result from the same inputs (it is then ``checked``), and no row may pass the
    run's device-time ceiling (:meth:`ceiling`, measured first) or break ``bench.suite.figures``' rules:
    else the row is recorded ``{"refused": ...}`` and its check fails, naming it."""

    def __init__(self, rec, budget_s: float, quick: bool):
        self.rec, self.budget_s, self.quick = rec, budget_s, quick
        self.agreed: set = set()

    def out_of_time(self) -> bool:
        return self.rec.elapsed() > self.budget_s

    def ceiling(self) -> None:
        """The run's ceiling: a copy and an in-place ``add_`` of 2^28 float32 (2^10 in the simulator,
        where none is kept: a CPU copy is no ceiling), by CUDA events (``measure.ceiling``);
        ``env.copy_GBps`` the copy's median. Not measured where no row has time left to run."""
        if self.out_of_time():
            return
        n = 1 << (10 if G.SIM else 28)
        src, dst, a, b = (torch.randn(n, device=DEV) for _ in range(4))
        streams = {"copy (ceiling)": "copy", "add_ (ceiling)": "add_ f32"}
        rows = M.interleaved({"copy (ceiling)": lambda: dst.copy_(src), "add_ (ceiling)": lambda: a.add_(b)},
                             calls=20)
        M.keep_ceiling(self.rec, M.ceiling(rows, n, streams))
        _empty_cache()

    def agree(self, scenario: str, fns: dict, results: dict, ours: str, inputs=(), move=None,
              rtol=None) -> None:
        """Each baseline of ``fns`` (impl -> fn) run once against ``ours`` from the same inputs
        (``bench.suite.checked.checked``); those that agree may be timed. A refusal is raised."""
        if self.out_of_time():
            return                                            # its rows are skipped: nothing to check
        name = f"{scenario} | "
        checked({name + k: v for k, v in fns.items()}, {name + k: v for k, v in results.items()},
                ours=name + ours, inputs=inputs, move=move, rtol=rtol)
        self.agreed |= {(scenario, k) for k in fns if is_baseline(k)}

    def group(self, scenario: str, entries: list) -> None:
        """Time the rows ``entries`` (``(impl, elements, kind, fn)``, or with a fifth item, the calls a
        batch that row asks) together, their batches in turn (``measure.interleaved``)."""
        table = self.rec.data.setdefault("timings", {}).setdefault(scenario, {})
        if self.out_of_time():
            for impl, *_ in entries:
                table[impl] = {"skipped": f"out of time (the probe's budget of {self.budget_s:.0f} s was spent)"}
            self.rec.save()
            print(f"[timing] {scenario}: skipped, out of time", flush=True)
            return

        def run():
            for impl, *_ in entries:
                if is_baseline(impl) and (scenario, impl) not in self.agreed:
                    table[impl] = {"refused": "not checked against fastema's result before it was timed"}
                    self.rec.save()
                    raise Refused(f"{scenario} | {impl}", table[impl]["refused"])
            t0 = time.perf_counter()
            rows = M.interleaved({e[0]: e[3] for e in entries},
                                 calls={e[0]: e[4] for e in entries if len(e) > 4})
            seconds = round(time.perf_counter() - t0, 2)
            refused = None
            for impl, elements, kind, *_ in entries:
                m = with_bandwidth(rows[impl], elements, kind)
                m["s"] = seconds
                try:
                    M.record(self.rec, scenario, impl, m, checked=(scenario, impl) in self.agreed)
                except Refused as err:
                    refused = refused or err
                    continue
                print(f"[timing] {scenario} | {impl}: " + ", ".join(
                    f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                    if v is not None and k != "device_s"), flush=True)
            if refused is not None:
                raise refused
        self.rec.guarded("checks", f"timing {scenario}", run)


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


def _moved(params) -> None:
    """The sources moved once before a check (an update must show in it: ``checked.move_sources``)."""
    move_sources(params)


def _views(flat, count: int, rows: int = 1) -> list:
    return [flat.view(i, r) for r in range(rows) for i in range(count)]


def _host_cost(rows: Rows, count: int, dt: str) -> None:
    from fastema.torch import EMA

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    model = _model(shapes(count), dtype)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    ours = "lerp f32" if dt == "float32" else "lerp bf16->f32"           # EMA's shadow: float32
    sc = f"{HOST_COST[count]} {dt}"
    ema = EMA(model, 0.999)
    shadows = [p.detach().to(torch.float32, copy=True) for p in params]  # equal to EMA's at the start
    if dt == "float32":
        base, kind = FOREACH, "lerp f32"

        def baseline():
            torch._foreach_lerp_(shadows, params, 0.001)
    else:
        base, kind = MIXED, "mul+add bf16->f32"

        def baseline():
            torch._foreach_mul_(shadows, 0.999)
            torch._foreach_add_(shadows, params, alpha=0.001)
    with torch.no_grad():
        rows.agree(sc, {EMA_ROW: ema.update, base: baseline},
                   {EMA_ROW: lambda: list(ema.averaged_state_dict().values()), base: lambda: shadows},
                   EMA_ROW, inputs=params, move=lambda: _moved(params))
    entries = [(EMA_ROW, n, ours, ema.update)]
    if count != 3000 and dt == "float32" and not G.SIM:       # issue 23 item 2: the plan in the lerp launch
        apart = EMA(model, 0.999, device_step=True)
        apart._plan_on_device.apart()                         # the plan kernel launched on its own, as before
        entries.append(("fastema EMA.update, plan kernel apart", n, ours, apart.update))
    flat = FlatShadow(params)
    entries += [("fastema FlatShadow.update", n, ours, lambda: flat.update(0.999)), (base, n, kind, baseline)]
    with torch.no_grad():
        rows.group(sc, entries)


def _target_network(rows: Rows) -> None:
    from fastema.torch import TargetNetwork

    online, target = (m.to(DEV) for m in rl_networks(2))
    tn = TargetNetwork(online, target.requires_grad_(False), tau=RL_TAU)
    n = sum(p.numel() for p in target.parameters())
    sc = f"{HOST_COST[6]} float32 target network"
    po = list(online.parameters())
    pt = [p.detach().clone() for p in target.parameters()]   # the baseline's own target, equal at the start
    with torch.no_grad():
        rows.agree(sc, {"fastema TargetNetwork.update": tn.update,
                        FOREACH: lambda: torch._foreach_lerp_(pt, po, RL_TAU)},
                   {"fastema TargetNetwork.update": lambda: list(target.parameters()), FOREACH: lambda: pt},
                   "fastema TargetNetwork.update", inputs=po, move=lambda: _moved(po))   # target == online
    with torch.no_grad():
        rows.group(sc, [("fastema TargetNetwork.update", n, "lerp f32", tn.update),
                        (FOREACH, n, "lerp f32", lambda: torch._foreach_lerp_(pt, po, RL_TAU))])


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
    a1, a2 = a.clone(), a.clone()                             # each baseline's own shadow
    sc = f"flat float32 2^{p2}"
    lerp = lambda: a1.lerp_(b, 0.001)                         # noqa: E731
    foreach = lambda: torch._foreach_lerp_([a2], [b], 0.001)  # noqa: E731
    rows.agree(sc, {"fastema.ema_update_": lambda: fastema.ema_update_(a, b, decay=0.999),
                    "torch.lerp_": lerp, "torch._foreach_lerp_": foreach},
               {"fastema.ema_update_": lambda: [a], "torch.lerp_": lambda: [a1],
                "torch._foreach_lerp_": lambda: [a2]}, "fastema.ema_update_", inputs=[b])
    flat = FlatShadow([b])
    one = nn.Module()
    one.w = nn.Parameter(b, requires_grad=False)              # the same storage as b
    rows.group(sc, [("copy (ceiling)", n, "copy", lambda: c.copy_(a)),
                    ("fastema.ema_update_", n, "lerp f32", lambda: fastema.ema_update_(a, b, decay=0.999)),
                    ("fastema FlatShadow.update", n, "lerp f32", lambda: flat.update(0.999)),
                    ("fastema EMA.update", n, "lerp f32", EMA(one, 0.999).update),
                    ("torch.lerp_", n, "lerp f32", lerp), ("torch._foreach_lerp_", n, "lerp f32", foreach)])


def flat_sweep(rows: Rows) -> None:
    for p2 in flat_sizes(rows.quick):
        _each(rows, f"flat float32 2^{p2}", _flat, p2)


def _float32_model(rows: Rows, name: str, shape_list) -> None:
    params = [torch.randn(s, device=DEV) for s in shape_list]
    n = sum(p.numel() for p in params)
    shadows = [p.clone() for p in params]
    looped = [p.clone() for p in params]
    flat = FlatShadow(params)
    sc = f"{name} float32"

    def loop():
        for s_, p_ in zip(looped, params):
            s_.lerp_(p_, 0.001)

    foreach = lambda: torch._foreach_lerp_(shadows, params, 0.001)   # noqa: E731
    slow = name == "3000x4096" and not rows.quick
    rows.agree(sc, {"fastema FlatShadow.update": lambda: flat.update(0.999), "torch._foreach_lerp_": foreach,
                    **({"per-tensor lerp_": loop} if slow else {})},
               {"fastema FlatShadow.update": lambda: _views(flat, len(params)),
                "torch._foreach_lerp_": lambda: shadows, "per-tensor lerp_": lambda: looped},
               "fastema FlatShadow.update", inputs=params, move=lambda: _moved(params))
    rows.group(sc, [("fastema FlatShadow.update", n, "lerp f32", lambda: flat.update(0.999)),
                    ("torch._foreach_lerp_", n, "lerp f32", foreach),
                    *([("per-tensor lerp_", n, "lerp f32", loop, 10)] if slow else [])])
    if name == "3000x4096":
        flat2 = FlatShadow(params, rows=2)
        s1, s2 = [p.clone() for p in params], [p.clone() for p in params]     # one shadow a decay
        two = lambda: (torch._foreach_lerp_(s1, params, 0.001), torch._foreach_lerp_(s2, params, 1e-4))  # noqa: E731
        rows.agree(f"{name} K=2", {"fastema rows=2": lambda: flat2.update([0.999, 0.9999]),
                                   "torch._foreach_lerp_ x2": two},
                   {"fastema rows=2": lambda: _views(flat2, len(params), 2),
                    "torch._foreach_lerp_ x2": lambda: s1 + s2},
                   "fastema rows=2", inputs=params, move=lambda: _moved(params))
        rows.group(f"{name} K=2", [("fastema rows=2", n, "lerp f32 K=2", lambda: flat2.update([0.999, 0.9999])),
                                   ("torch._foreach_lerp_ x2", n, "foreach lerp f32 x2", two)])
    t0 = time.perf_counter()
    for _ in range(200):
        flat.refresh()
    rows.rec.note("host", f"{name}: FlatShadow address check (refresh) us", (time.perf_counter() - t0) / 200 * 1e6)


def _bfloat16_model(rows: Rows, name: str, shape_list) -> None:
    from testkit.baselines import timm_bfloat16_stochastic_update

    bf = [torch.randn(s, device=DEV).bfloat16() for s in shape_list]
    n = sum(p.numel() for p in bf)
    f32 = [p.float() for p in bf]
    fl = FlatShadow(bf, dtype="float32")
    sc = f"{name} bf16 model, f32 shadow"
    mixed = "torch._foreach_mul_+_foreach_add_ (timm mixed)"
    timm_mixed = lambda: (torch._foreach_mul_(f32, 0.999), torch._foreach_add_(f32, bf, alpha=0.001))  # noqa: E731
    rows.agree(sc, {"fastema": lambda: fl.update(0.999), mixed: timm_mixed},
               {"fastema": lambda: _views(fl, len(bf)), mixed: lambda: f32}, "fastema", inputs=bf,
               move=lambda: _moved(bf))
    rows.group(sc, [("fastema", n, "lerp bf16->f32", lambda: fl.update(0.999)),
                    (mixed, n, "mul+add bf16->f32", timm_mixed)])
    sr = FlatShadow(bf, dtype="bfloat16")
    ema_bf = [p.clone() for p in bf]
    step = [0]

    def sr_update():
        step[0] += 1                                           # a new key every call: the real per-step work
        sr.update(0.999, rounding="stochastic", seed=1, step=step[0])

    sc = f"{name} bf16 shadow, stochastic rounding"
    timm_sr = "timm bf16 stochastic path"
    if not rows.quick:                                         # checked from the common start
        rows.agree(sc, {"fastema": sr_update, timm_sr: lambda: timm_bfloat16_stochastic_update(ema_bf, bf, 0.999)},
                   {"fastema": lambda: _views(sr, len(bf)), timm_sr: lambda: ema_bf}, "fastema", inputs=bf,
                   move=lambda: _moved(bf))
    rows.group(sc, [("fastema", n, "lerp bf16 shadow", sr_update),
                    *([(timm_sr, n, "timm stochastic bf16",
                        lambda: timm_bfloat16_stochastic_update(ema_bf, bf, 0.999), 20)] if not rows.quick else [])])


def models(rows: Rows) -> None:
    for name, count in (("gpt2-small", 148), ("3000x4096", 3000)):
        _each(rows, f"{name} float32", _float32_model, name, shapes(count))
        _each(rows, f"{name} bf16", _bfloat16_model, name, shapes(count))
