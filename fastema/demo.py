"""The main job: train a small real model with an EMA of its weights.

Prints the validation loss of the raw and of the EMA weights, and the time of one
EMA update with fastema against the per-parameter loop most training code uses.
Synthetic data (a noisy teacher network), CPU, under a minute including compilation.
"""
from __future__ import annotations

import argparse
import time


def _timed(fn, repeat):
    fn()
    fn()                                          # compile / warm up outside the timing
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastema demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--decay", type=float, default=0.995)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from torch import nn

    import fastema
    from fastema.torch import EMA

    torch.manual_seed(args.seed)
    dim, hidden = 32, 256
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))
    x_train, x_val = torch.randn(8192, dim), torch.randn(4096, dim)
    with torch.no_grad():
        y_train = teacher(x_train) + 0.3 * torch.randn(8192, 1)    # noisy labels
        y_val = teacher(x_val)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = dict(model.named_parameters())
    ema = EMA(model, decay=args.decay)                # float32 shadow, starts as the weights

    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (64,))
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()                                  # one launch for every tensor
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        raw = nn.functional.mse_loss(model(x_val), y_val).item()
        with ema.average_parameters():                # EMA weights in place; raw weights back on exit
            avg = nn.functional.mse_loss(model(x_val), y_val).item()
    n_params = sum(p.numel() for p in params.values())
    print(f"fastema {fastema.__version__} demo: MLP with {n_params:,} parameters in {len(params)} tensors, "
          f"{args.steps} SGD steps on noisy data ({train_s:.1f} s)")
    print(f"validation loss   raw weights: {raw:.5f}   EMA weights (decay {args.decay}): {avg:.5f}"
          f"   ({(1 - avg / raw) * 100:.1f}% lower)" if avg < raw else
          f"validation loss   raw weights: {raw:.5f}   EMA weights (decay {args.decay}): {avg:.5f}")

    # One EMA update: fastema against the per-parameter loop (torch_ema / ema-pytorch style).
    shadows = [p.detach().clone() for p in params.values()]
    plist = list(params.values())

    @torch.no_grad()
    def loop_update():
        for s, p in zip(shadows, plist):
            s.mul_(args.decay).add_(p, alpha=1 - args.decay)

    ours, theirs = _timed(ema.update, 200), _timed(loop_update, 200)
    print(f"EMA update, this model:        fastema {ours * 1e6:8.1f} us   per-parameter loop "
          f"{theirs * 1e6:8.1f} us   ({theirs / ours:.1f}x)")
    many = [torch.randn(4096) for _ in range(2000)]
    flat = fastema.FlatShadow(many)
    shadows, plist = [p.clone() for p in many], many
    ours, theirs = _timed(lambda: flat.update(args.decay), 20), _timed(loop_update, 20)
    print(f"EMA update, 2000 x 4096 tensors: fastema {ours * 1e3:6.2f} ms   per-parameter loop "
          f"{theirs * 1e3:6.2f} ms   ({theirs / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
