#!/usr/bin/env python3
"""Round 8's GPU targets (issue 70), each figure with its baseline in the same process and its verdict
(``bash bench/gpu/run.sh targets``, a window of its own, issue 78 item 8):

- ``ema_update_`` of a 4096-element torch CUDA pair: host <= 10 us;
- ``EMA.update()`` host <= 8 us at 6 tensors (the RL MLP) and <= 12 us at 148 (GPT-2 small);
- ``Smoother(decay, window=50).update`` >= 1.0x torch ops (``lerp_`` of the EMA, the ring slot's copy and the
  window's sum) at 1 and 10^6 streams;
- ``TargetNetwork.update`` >= 1.0x ``torch._foreach_lerp_`` under ``no_grad`` at 6 and 30 tensors;
- the swap's round trip (``average_parameters()`` in and out) at 3000 x 4096 float32: >= 80% of a device copy's
  GB/s (it moves 32 bytes an element: two exchanges, each reading and writing both arrays).

A ratio "x >= 1.0" is the baseline's end-to-end time (one call and a sync, ``bench.gpu.measure``) over
fastema's. Each row is timed by ``measure.interleaved`` (the implementations' batches in turn).

    python3 -m bench.gpu.targets OUTDIR [--budget SECONDS] [--simulate]

``OUTDIR/targets.json`` is rewritten after each row (``checks``: per target, ``ok`` True/False, the figure
and its bound; ``timings``: the rows); ``targets.md`` at the end. A row started after ``--budget`` seconds is
recorded skipped. ``--simulate``: the Numba CUDA simulator at tiny sizes, verdicts not given (None): plumbing
only (CI). Exit status 1 when a target was missed or a row failed.
"""
import os
import sys

if "--simulate" in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from bench.gpu import common as G  # noqa: E402
from bench.gpu import measure as M  # noqa: E402

COPY_BYTES, SWAP_BYTES = 8, 32        # per float32 element: a copy; the swap's round trip (two exchanges)


def _verdict(rec, target: str, value: float, bound: float, at_most: bool) -> None:
    ok = None if G.SIM else (value <= bound if at_most else value >= bound)
    rec.note("checks", target, {"ok": ok, "value": round(value, 3), "bound": bound,
                                **({"skipped": "simulator: figures are the CPU's"} if G.SIM else {})})


def _rows(rec, name: str, fns: dict) -> dict:
    rows = M.interleaved(fns)
    rec.note("timings", name, {k: {f: round(v, 2) if isinstance(v, float) else v for f, v in m.items()}
                               for k, m in rows.items()})
    return rows


def ema_update_(rec) -> None:
    import torch

    import fastema

    dev = G.torch_device()
    a, b = torch.zeros(4096, device=dev), torch.ones(4096, device=dev)
    rows = _rows(rec, "ema_update_ 4096", {"fastema.ema_update_": lambda: fastema.ema_update_(a, b, decay=0.99)})
    _verdict(rec, "ema_update_ host us <= 10", rows["fastema.ema_update_"]["host_us"], 10.0, True)


def ema_host(rec, count: int, bound: float) -> None:
    import torch
    from torch import nn

    from bench.gpu import timings
    from fastema.torch import EMA

    dev = G.torch_device()
    model = nn.ParameterList([nn.Parameter(torch.randn(s, device=dev)) for s in timings.shapes(count)])
    ema = EMA(model, 0.999)
    with torch.no_grad():
        rows = _rows(rec, f"EMA.update {count} tensors", {"fastema EMA.update": ema.update})
    _verdict(rec, f"EMA.update() host us at {count} tensors <= {bound:g}", rows["fastema EMA.update"]["host_us"],
             bound, True)


def smoother(rec, streams: int) -> None:
    import torch

    import fastema

    dev = G.torch_device()
    streams = min(streams, 4096) if G.SIM else streams
    x = torch.rand(streams, device=dev, dtype=torch.float64)
    sm = fastema.Smoother(decay=0.9, window=50)
    ema, total = torch.zeros_like(x), torch.zeros_like(x)
    ring = torch.zeros(50, streams, device=dev, dtype=torch.float64)
    slot = [0]

    def torch_ops():                                       # the EMA and a running window sum, no host sync
        ema.lerp_(x, 0.1)
        i = slot[0] % 50
        total.sub_(ring[i]).add_(x)
        ring[i].copy_(x)
        slot[0] += 1
    rows = _rows(rec, f"Smoother.update {streams} streams", {"fastema Smoother.update": lambda: sm.update(x),
                                                              "torch ops": torch_ops})
    ratio = rows["torch ops"]["e2e_us"] / rows["fastema Smoother.update"]["e2e_us"]
    _verdict(rec, f"Smoother.update vs torch ops at {streams} streams >= 1.0x", ratio, 1.0, False)


def target_network(rec, count: int) -> None:
    import copy

    import torch
    from torch import nn

    from bench.suite.shapes import RL_TAU
    from fastema.torch import TargetNetwork

    dev = G.torch_device()
    online = nn.Sequential(*[nn.Linear(16 if G.SIM else 256, 16 if G.SIM else 256) for _ in range(count // 2)]).to(dev)
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=RL_TAU)
    base_t = [p.detach().clone() for p in target.parameters()]
    base_o = [p.detach() for p in online.parameters()]
    with torch.no_grad():
        rows = _rows(rec, f"TargetNetwork.update {count} tensors",
                     {"fastema TargetNetwork.update": tn.update,
                      "torch._foreach_lerp_": lambda: torch._foreach_lerp_(base_t, base_o, RL_TAU)})
    ratio = rows["torch._foreach_lerp_"]["e2e_us"] / rows["fastema TargetNetwork.update"]["e2e_us"]
    _verdict(rec, f"TargetNetwork.update vs _foreach_lerp_ at {count} tensors >= 1.0x", ratio, 1.0, False)


def swap(rec) -> None:
    import torch
    from torch import nn

    from fastema.torch import EMA

    dev = G.torch_device()
    shape = (30, 64) if G.SIM else (3000, 4096)
    model = nn.ParameterList([nn.Parameter(torch.randn(shape[1], device=dev)) for _ in range(shape[0])])
    ema = EMA(model, 0.999)
    ema.update()
    src = torch.randn(shape[0] * shape[1], device=dev)
    dst = torch.empty_like(src)

    def round_trip():
        with ema.average_parameters():
            pass
    rows = _rows(rec, "swap round trip 3000x4096", {"fastema swap in+out": round_trip,
                                                    "copy (ceiling)": lambda: dst.copy_(src)})
    n = shape[0] * shape[1]
    swap_gbps = SWAP_BYTES * n / rows["fastema swap in+out"]["device_us"] / 1e3
    copy_gbps = COPY_BYTES * n / rows["copy (ceiling)"]["device_us"] / 1e3
    _verdict(rec, "swap round trip % of a copy >= 80", 100.0 * swap_gbps / copy_gbps, 80.0, False)


def report(data: dict) -> str:
    lines = ["| target | figure | bound | verdict |", "|---|---|---|---|"]
    for name, c in data["checks"].items():
        verdict = {True: "met", False: "MISSED", None: c.get("skipped", "not measured")}[c.get("ok")]
        lines.append(f"| {name} | {c.get('value', '-')} | {c.get('bound', '-')} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    opts = G.options(argv, __doc__, "targets", 270.0, "row")
    rec = G.Record(os.path.join(opts.out, "targets.json"), ["checks", "timings", "host"])
    plan = [("ema_update_", lambda: ema_update_(rec)), ("EMA.update 6", lambda: ema_host(rec, 6, 8.0)),
            ("EMA.update 148", lambda: ema_host(rec, 148, 12.0)),
            ("Smoother 1", lambda: smoother(rec, 1)), ("Smoother 10^6", lambda: smoother(rec, 10 ** 6)),
            ("TargetNetwork 6", lambda: target_network(rec, 6)), ("TargetNetwork 30", lambda: target_network(rec, 30)),
            ("swap", lambda: swap(rec))]
    rec.run_plan(plan, opts.budget, failed_as="row {}")
    G.publish(os.path.join(opts.out, "targets.md"), report(rec.data))
    return 1 if G.failed(rec.data["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
