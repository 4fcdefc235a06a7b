"""Live: what shipping the CUDA device code saves a GPU user's process (issue 54 item 6), measured on this
CPU.

    .venv/bin/python -m bench.scripts.device_code [--out FILE.md]

1. (The build's own seconds per variant are printed by ``python -m fastema warm --into``.)
2. The variants a fresh process's first two ``EMA.update()`` calls bind, for a float32 and a
bfloat16
   model (the RL network of the probe, on the fake GPU of ``testkit`` (an sm_90 device under
   fastema's real kernels and shipped code), and what compiling them costs here, one after another
   in one process: NVVM to LTO-IR, then nvJitLink for sm_90 (what numba-cuda does at a first
   launch). Before issue 54 every process paid that at its first update (each of 8 ranks on a node,
   again at every restart); now 0 NVVM calls (counted).
3. The host time of ``EMA(model)`` and that first update in a fresh process with the shipped code
   (index read, xz decompressed, entries found; the driver's load is faked, so a GPU adds its
   module loads).

No GPU needed. Results go to stdout (a Markdown table) and, with ``--out``, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import numba.cuda.cudadrv.nvvm as nvvm
calls = [0]
real = nvvm.compile_ir
def counted(*a, **k):
    calls[0] += 1
    return real(*a, **k)
nvvm.compile_ir = counted
import torch
from testkit import fake_gpu as G
from fastema.torch import EMA
with G.fake_gpu() as fake:
    model = G.rl_mlp()
    if sys.argv[2] == "bf16":
        model = model.to(torch.bfloat16)
    t1 = time.perf_counter()
    ema = EMA(model, 0.99)
    with torch.no_grad():
        ema.update()
    t2 = time.perf_counter()
    with torch.no_grad():
        ema.update()
    entries = [e[2] for e in fake.launches if e[0] == "load"]
print(json.dumps({"entries": entries, "nvvm_calls": calls[0], "first_update_s": t2 - t1,
                  "process_s": time.perf_counter() - t0}))
"""


def first_update(model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), model], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_seconds(keys: list) -> list:
    """``[(key, seconds)]``: each variant compiled as numba-cuda compiles it at a first launch on an sm_90
    device (NVVM to LTO-IR, nvJitLink with link-time optimisation: the run-time compiler,
    ``fastema._launch.cuda.compiler.current()``, which this exercises)."""
    from fastema._launch.cuda import compiler
    from fastema._launch.shipped.variants import every_variant

    variants, out = every_variant(), []
    for key in keys:
        dispatcher, types = variants[key]
        t = time.perf_counter()
        kind, code, _, _ = compiler.current().compile(dispatcher, types, ("sm_90",))["sm_90"]
        assert kind == "cubin" and code[:4] == b"\x7fELF", key
        out.append((key, time.perf_counter() - t))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from fastema._launch.cuda import device_code

    index = device_code.sets()["cu13"].index
    by_entry = {device_code.entry("cu13", k, "sm_90").name: k for k in index["variants"]}
    lines = [f"# Shipped CUDA device code: what a first update no longer compiles ({time.strftime('%Y-%m-%d')})",
             "", f"Machine: {os.cpu_count()} CPU cores, no GPU. The CUDA 13 set, built by "
             f"{index['built_by'].get('toolchain')}.", "",
             "## 2-3. A fresh process's first `EMA.update()` (RL network, fake sm_90 GPU)", "",
              "| model | variants bound | NVVM calls now | their compile before (NVVM + LTO link, s) "
              "| `EMA(model)` + first update now (host s) |",
              "|---|---|---|---|---|"]
    detail = []
    for model in ("fp32", "bf16"):
        run = first_update(model)
        keys = sorted({by_entry[e] for e in run["entries"]})
        cost = compile_seconds(keys)
        before = sum(sec for _, sec in cost)
        lines.append(f"| {model} | {len(keys)} | {run['nvvm_calls']} | {before:.1f} | {run['first_update_s']:.3f} |")
        detail += [f"- {model}: `{k}` {sec:.1f} s" for k, sec in cost]
    lines += ["", "Variants compiled for the 'before' column:", ""] + detail + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
