"""Live: the optimizer checkpoint with and without an attached average (issue 61 item 5): the size of
``torch.save(optimizer.state_dict())`` and the time of ``optimizer.state_dict()`` + ``torch.save``
to a file, for AdamW over a bfloat16 model with and without ``EMA(model,
shadow_dtype="float32").attach(optimizer)``, on the CPU.

    python -m bench.scripts.attach [--mib 16,64,256] [--reps 5]

Not a timed test: figures for bench/results/LOG.md. Method: the model is bfloat16 ``Linear`` weights of
``--mib`` MiB in all (4 MiB each), AdamW stepped twice (its state made: two moments in the
parameters' dtype, 4 B an element); the two optimizers (one plain, one with the average
attached) are saved alternately ``--reps`` times each into a temporary folder (each file written,
then removed), the medians reported, with the size of each file and its ratio. Expected size:
AdamW's 4 B an element plus the float32 average's 4: 2x, the counters and names aside (the
average's ``state_dict()`` copies the shadow to host tensors first, which the save time
includes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from fastema.torch import EMA


def model(mib: int) -> nn.Module:
    rows = 4 * 2**20 // (2 * 1024)  # a 4 MiB bfloat16 weight of 1024 columns
    layers = max(1, mib // 4)
    return nn.Sequential(*[nn.Linear(1024, rows, bias=False) for _ in range(layers)]).to(
        torch.bfloat16
    )


def stepped(net: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    return opt


def save(opt: torch.optim.Optimizer, path: str) -> tuple[float, int]:
    t = time.perf_counter()
    torch.save(opt.state_dict(), path)
    elapsed = time.perf_counter() - t
    size = os.path.getsize(path)
    os.remove(path)
    return elapsed, size


def measure(mib: int, reps: int, folder: str) -> dict:
    plain_net, attached_net = model(mib), model(mib)
    plain = stepped(plain_net)
    attached = torch.optim.AdamW(attached_net.parameters(), lr=1e-3)
    EMA(attached_net, 0.999, shadow_dtype="float32").attach(attached)
    for _ in range(2):
        for p in attached_net.parameters():
            p.grad = torch.ones_like(p)
        attached.step()
    times: dict = {"plain": [], "attached": []}
    sizes = {}
    for i in range(reps):
        for name, opt in (("plain", plain), ("attached", attached))[:: 1 if i % 2 == 0 else -1]:
            t, size = save(opt, os.path.join(folder, f"{name}.pt"))
            times[name].append(t)
            sizes[name] = size
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "mib": mib,
        "plain_MiB": sizes["plain"] / 2**20,
        "attached_MiB": sizes["attached"] / 2**20,
        "size_ratio": sizes["attached"] / sizes["plain"],
        "plain_ms": 1e3 * med["plain"],
        "attached_ms": 1e3 * med["attached"],
        "time_ratio": med["attached"] / med["plain"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", default="16,64,256", help="bfloat16 model sizes, MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print("| model (bf16) | optimizer.pt | with the average | size ratio | save | with the average "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for mib in map(int, args.mib.split(",")):
            r = measure(mib, args.reps, folder)
            print(f"| {mib} MiB | {r['plain_MiB']:.1f} MiB | {r['attached_MiB']:.1f} MiB "
                  f"| {r['size_ratio']:.3f} | {r['plain_ms']:.1f} ms | {r['attached_ms']:.1f} ms "
                  f"| {r['time_ratio']:.2f} |")


if __name__ == "__main__":
    main()
