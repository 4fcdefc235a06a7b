"""``python -m fastema posthoc DIR --sigma-rel 0.07 --out ema.safetensors``: synthesise a post-hoc
EMA from the snapshots of :class:`fastema.torch.PostHocEMA` (``--plot profiles.png`` draws the
profiles). The library side is :mod:`fastema.posthoc`."""
from __future__ import annotations

import argparse
import sys

from .._files import atomic_write
from ..posthoc import MAX_ERROR, plot_profiles, synthesize
from ..schedules import SIGMA_REL_MAX, gamma_to_sigma_rel

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastema posthoc",
                                     description="Synthesise a post-hoc EMA from the snapshots of "
                                                 "fastema.torch.PostHocEMA.")
    parser.add_argument("directory")
    parser.add_argument("--sigma-rel", type=float, help=f"target relative width, in (0, {SIGMA_REL_MAX:.4f})")
    parser.add_argument("--gamma", type=float, help="target exponent (instead of --sigma-rel)")
    parser.add_argument("--time", type=float, help="target time (default: the last snapshot's)")
    parser.add_argument("--out", help="write the synthesised weights here (.safetensors, or a torch.save file)")
    parser.add_argument("--plot", help="draw the profiles to this PNG")
    parser.add_argument("--max-error", type=float, default=MAX_ERROR,
                        help="refuse a target the snapshots represent worse than this (relative L2)")
    args = parser.parse_args(argv)
    if args.out is None and args.plot is None:
        parser.error("give --out and/or --plot")
    target = args.sigma_rel is not None or args.gamma is not None
    if args.out is not None and not target:
        parser.error("--out needs --sigma-rel or --gamma")
    try:
        if args.out is not None:
            weights = synthesize(args.directory, args.sigma_rel, gamma=args.gamma, time=args.time,
                                 max_error=args.max_error)
            _write(args.out, weights)
            sol = weights.solution
            print(f"wrote {args.out}: sigma_rel={sol.sigma_rel:.4f} (gamma={sol.gamma:.3f}) at time {sol.time:g}, "
                  f"{len(weights)} tensors, relative error {sol.error:.3g}, condition {sol.condition:.3g}")
        if args.plot is not None:
            sigma = args.sigma_rel if args.gamma is None else gamma_to_sigma_rel(args.gamma)
            plot_profiles(args.directory, sigma, args.plot, time=args.time)
            print(f"wrote {args.plot}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _write(path: str, weights: dict) -> None:
    import torch

    weights = {k: v.contiguous() for k, v in weights.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save(weights, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(weights, f))
