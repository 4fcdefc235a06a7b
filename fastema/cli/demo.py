"""The main job: train a small real model with an EMA of its weights.

Prints the validation loss of the raw and of the EMA weights, and the time of one
EMA update with fastema against the per-parameter loop most training code uses, and
writes a PNG: validation loss per epoch of the raw and the EMA weights, and the raw
training loss with its fastema.Smoother average. Synthetic data (a noisy teacher
network), CPU, under a minute including compilation.
"""
from __future__ import annotations

import os
import sys
import time

from .._io.files import save_figure
from . import Parser, image_path, integer, number, parse, writable

__all__ = ["main"]


def _timed(fn, repeat):
    fn()
    fn()                                          # compile / warm up outside the timing
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def _parser() -> Parser:
    ap = Parser(prog="python -m fastema demo",
                description="Train a small real model (an MLP on a noisy synthetic task, on the CPU) with an EMA of "
                            "its weights. Prints the validation loss of the raw and of the EMA weights and the time "
                            "of one EMA update against a per-parameter loop, and draws both validation curves and "
                            "the smoothed training loss to an image. Under a minute with the defaults.",
                epilog="Bad arguments are refused before training, in one line naming the argument.")
    ap.add_argument("--steps", type=integer(1), default=1500,
                    help="SGD steps to train, >= 1 (default: %(default)s; 128 steps are one epoch)")
    ap.add_argument("--decay", type=number(lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=0.995,
                    help="the EMA's decay, in [0, 1] (default: %(default)s)")
    ap.add_argument("--seed", type=integer(0, 2 ** 63 - 1), default=0,
                    help="the random seed of the data and the model, >= 0 (default: %(default)s)")
    ap.add_argument("--out", default="fastema-demo.png",
                    help="the image to write; .png is added when the name has no extension "
                         "(default: %(default)s, in the current folder)")
    return ap


def main(argv=None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    try:                                          # every check before the training, not after it
        args.out = image_path("--out", args.out)
        writable("--out", args.out)
        import matplotlib  # noqa: F401
    except ImportError:
        print("python -m fastema demo: error: the demo's plot needs matplotlib: pip install 'fastema[plot]'",
              file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"python -m fastema demo: error: {err}", file=sys.stderr)
        return 2

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

    smoother = fastema.Smoother(span=100)             # the training loss, smoothed on the device
    batch, per_epoch = 64, 8192 // 64
    losses, smoothed, epochs = [], [], []

    def validation():
        with torch.no_grad():
            raw = nn.functional.mse_loss(model(x_val), y_val)
            with ema.average_parameters():            # EMA weights in place; raw weights back on exit
                avg = nn.functional.mse_loss(model(x_val), y_val)
        return raw, avg

    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (batch,))
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()                                  # one launch for every tensor
        loss = loss.detach()
        smoother.update(loss)                         # no host read: the average stays a tensor
        losses.append(loss)
        smoothed.append(smoother.ema)
        if (step + 1) % per_epoch == 0 or step + 1 == args.steps:
            epochs.append(((step + 1) / per_epoch, *validation()))
    train_s = time.perf_counter() - t0

    raw, avg = (v.item() for v in validation())
    png = _plot(args.out, torch.stack(losses).numpy(), torch.stack(smoothed).reshape(-1).numpy(),
                [(e, r.item(), a.item()) for e, r, a in epochs], args.decay, per_epoch)
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
    print(f"plot: {png}")
    return 0


def _plot(path, losses, smoothed, epochs, decay, per_epoch) -> str:
    """Two panels: validation loss per epoch (raw vs EMA weights); training loss (raw vs smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    e, raw, avg = (np.array(c) for c in zip(*epochs))
    left.plot(e, raw, "o-", color="tab:gray", label="raw weights")
    left.plot(e, avg, "o-", color="tab:blue", label=f"EMA weights (decay {decay})")
    left.set(xlabel="epoch", ylabel="validation MSE", title="Validation loss per epoch", yscale="log")
    steps = np.arange(1, len(losses) + 1) / per_epoch
    right.plot(steps, losses, color="0.75", lw=0.6, label="training loss (raw)")
    right.plot(steps, smoothed, color="tab:orange", lw=1.6, label="fastema.Smoother EMA (span 100)")
    right.set(xlabel="epoch", ylabel="training MSE", title="Training loss", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return os.path.abspath(path)


if __name__ == "__main__":
    raise SystemExit(main())
