"""Live: the EMA step of diffusers' UNet at the user's thread count (reliability review T2): fastema's
diffusers drop-in against diffusers' own ``EMAModel``, both at ``torch.set_num_threads(n)``.

    python -m bench.scripts.threads [--models small,big] [--threads 1,2] [--calls 200,15] [--load 0]
                                  [--out bench/results/cpu-DATE-threads.md]

The models are ``diffusers.UNet2DModel``s of ``examples/unconditional_image_generation/
train_unconditional.py``'s block layout (6 down and 6 up blocks, attention at the 5th down and
2nd up, 450 tensors): ``big`` is the script's default (block_out_channels (128, 128, 256, 256,
512, 512), layers_per_block 2: 113.7M parameters), ``small`` the same layout at (4, 8, 16, 16,
16, 16) channels (178k parameters). Both EMAs are made as the script makes its own (decay 0.9999,
``use_ema_warmup``, inv_gamma 1, power 3/4) and ``step(model.parameters())`` is timed, the
implementations interleaved call by call in one process (order alternating), after a warm-up
that compiles and loads fastema's kernels; min and median of ``--calls`` steps each, and the
1-minute load average at the row's end (``load``: what exceeds the threads timed is others' work). Columns:

- ``fastema``: ``fastema.torch.compat.EMAModel.step``, its CPU kernels on the user's thread
  count (torch's);
- ``fastema, every core``: the same with ``FASTEMA_NUM_THREADS`` at numba's whole pool, as every
  parallel update ran before T2 (only where that differs from torch's count);
- ``diffusers``: ``diffusers.training_utils.EMAModel.step`` (its default per-tensor loop, as the
  script runs it), ``diffusers foreach``: with ``foreach=True``.

``--load K`` keeps K busy processes spinning meanwhile (other ranks of a node, a shared machine).
Not a timed test: figures for docs/guides/processes.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numba
import torch

DOWN = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
MODELS = {  # train_unconditional.py's UNet2DModel: its default, and its layout at a tiny width
    "big": dict(sample_size=64, layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512)),
    "small": dict(sample_size=32, layers_per_block=2, block_out_channels=(4, 8, 16, 16, 16, 16), norm_num_groups=4),
}


def unet(name: str) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(in_channels=3, out_channels=3, down_block_types=DOWN, up_block_types=UP, **MODELS[name])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def _check(emas: dict, params: list) -> None:
    """Each baseline's step agrees with fastema's from the same start before anything is timed
    (``bench/suite/checked.py``; refused otherwise): a first step each (the warm-up's decay is 0: a
    copy), the weights moved, then a second step (decay 0.41), compared."""
    from bench.suite.checked import checked

    steps = {k: (lambda e=e: e.step(params)) for k, e in emas.items()}
    for step in steps.values():
        step()

    def move():
        with torch.no_grad():
            torch._foreach_mul_(params, -0.5)
    checked(steps, {k: (lambda e=e: e.shadow_params) for k, e in emas.items()}, ours="fastema", inputs=params,
            move=move)


def bench(name: str, threads: list[int], calls: int) -> list[str]:
    from diffusers.training_utils import EMAModel as DiffusersEMA

    from fastema._launch import config
    from fastema.torch.compat import EMAModel as FastEMA

    model = unet(name)
    params = list(model.parameters())
    kw = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)   # the script's EMA
    emas = {"fastema": FastEMA(params, **kw), "diffusers": DiffusersEMA(params, **kw),
            "diffusers foreach": DiffusersEMA(params, foreach=True, **kw)}
    _check(emas, params)
    every_core = numba.config.NUMBA_NUM_THREADS
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        steps = {k: (lambda e=e: e.step(params)) for k, e in emas.items()}
        if n != every_core:
            def pool_step(e=emas["fastema"]) -> None:
                config.CPU_THREADS = every_core        # FASTEMA_NUM_THREADS: numba's whole pool, as before T2
                try:
                    e.step(params)
                finally:
                    config.CPU_THREADS = None
            steps["fastema, every core"] = pool_step
        for step in steps.values():                    # compiled, loaded and warm
            for _ in range(3):
                step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        order = list(steps)
        for i in range(calls):
            for k in (order if i % 2 == 0 else order[::-1]):
                times[k].append(_timed(steps[k]))
        assert torch.get_num_threads() == n
        ms = {k: (min(v) * 1e3, statistics.median(v) * 1e3) for k, v in times.items()}
        cell = {k: f"{lo:.2f} / {med:.2f}" for k, (lo, med) in ms.items()}
        fast = ms["fastema"][1]
        rows.append(f"| {name} | {sum(p.numel() for p in params) / 1e6:.3f}M | {len(params)} | {n} | "
                    f"{cell['fastema']} | {cell.get('fastema, every core', '=')} | {cell['diffusers']} | "
                    f"{cell['diffusers foreach']} | {ms['diffusers'][1] / fast:.2f} | "
                    f"{ms['diffusers foreach'][1] / fast:.2f} | {os.getloadavg()[0]:.2f} |")
        print(rows[-1], flush=True)
    return rows


HEADER = ("| model | parameters | tensors | torch threads | fastema ms (min / median) | fastema, every core "
          "(pre-T2) ms | diffusers ms | diffusers foreach ms | diffusers / fastema | foreach / fastema | load |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,big")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calls", default="200,15", help="steps timed per implementation, per model")
    ap.add_argument("--load", type=int, default=0, help="busy processes spinning meanwhile")
    ap.add_argument("--out", default=None, help="also write the table and the machine here (markdown)")
    args = ap.parse_args()
    models = args.models.split(",")
    calls = [int(c) for c in args.calls.split(",")]
    calls += calls[-1:] * (len(models) - len(calls))
    threads = [int(t) for t in args.threads.split(",")]
    import diffusers

    import fastema

    machine = (f"{_cpu_name()}, nproc {len(os.sched_getaffinity(0))}; "
               f"python {platform.python_version()}, torch {torch.__version__}, numba {numba.__version__} "
               f"(NUMBA_NUM_THREADS {numba.config.NUMBA_NUM_THREADS}), diffusers {diffusers.__version__}, "
               f"fastema {fastema.__version__}; load: {args.load} busy process(es); "
               f"nice {os.nice(0)}; load average at the start {os.getloadavg()[0]:.2f} (the last column: at the row's "
               "end; other users' processes share these cores)")
    print(machine)
    print(HEADER)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    time.sleep(1 if spinners else 0)                   # spinning before the first timing
    try:
        rows = [r for m, c in zip(models, calls) for r in bench(m, threads, c)]
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# {' '.join(['bench/scripts/threads.py', *sys.argv[1:]])}\n\n{machine}\n\n{HEADER}\n"
                    + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
