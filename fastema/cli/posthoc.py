"""``python -m fastema posthoc DIR --sigma-rel 0.07 --out ema.safetensors``: synthesise a post-hoc
EMA from the snapshots of :class:`fastema.torch.PostHocEMA` (``--plot profiles.png`` draws the
profiles). The library side is :mod:`fastema.posthoc`.

Bad input prints one line, never a traceback: a bad argument, a snapshot folder that cannot be
read (a missing, truncated, corrupt, forged or foreign file, a FIFO or device named like a
snapshot, runs or shapes mixed), a tensor too large for this machine's memory, a target the
snapshots cannot represent or an output that cannot be written each print ``error: ...``, naming
the file or argument and the fix, and exit with status 1 (2 for usage errors). An error fastema
does not expect (a bug) still prints its traceback."""
from __future__ import annotations

import math
import os
import sys
import tempfile

from .._io.dcp import load_dcp_metadata
from .._io.files import atomic_write
from ..posthoc import MAX_ERROR, kept_key, plot_profiles, pyplot, read_snapshots, run_owns, synthesize
from ..schedules import SIGMA_REL_MAX, gamma_to_sigma_rel
from . import Parser, image_path, number, parse, writable

__all__ = ["main"]


def _gamma_ok(g: float) -> bool:
    try:
        return math.isfinite(g) and g > 0 and gamma_to_sigma_rel(g) > 0
    except (OverflowError, ValueError):
        return False


def main(argv=None) -> int:
    parser = Parser(
        prog="python -m fastema posthoc",
        description="Synthesise a post-hoc EMA from the snapshots of fastema.torch.PostHocEMA (one run's folder). "
                    "Nothing in the folder is executed: a DCP snapshot's pickled metadata is read by a restricted "
                    "unpickler that builds DCP's metadata classes only.",
        epilog="example: python -m fastema posthoc RUN_DIR --sigma-rel 0.07 --out ema.safetensors")
    parser.add_argument("directory", help="the snapshot folder of one PostHocEMA run (its path=)")
    target = parser.add_mutually_exclusive_group()
    width = f"a number in (0, {SIGMA_REL_MAX:.4f})"
    target.add_argument("--sigma-rel", type=number(lambda v: 0 < v < SIGMA_REL_MAX, width),
                        help=f"the target profile's relative width, in (0, {SIGMA_REL_MAX:.4f}) (default: none; "
                             f"--out needs this or --gamma)")
    target.add_argument("--gamma", type=number(_gamma_ok, "a finite number > 0 (up to about 1e100)"),
                        help="the target profile's exponent, > 0, instead of --sigma-rel (default: none)")
    parser.add_argument("--time", type=number(lambda v: 0 < v < math.inf, "a finite number > 0"),
                        help="the time to synthesise at, > 0 (default: the last snapshot's)")
    parser.add_argument("--out", help="write the synthesised weights to this file: .safetensors, else a torch.save "
                                      "file (default: none)")
    parser.add_argument("--plot", help="draw the stored and synthesised profiles to this image file; .png is added "
                                       "when it has no extension (default: none)")
    parser.add_argument("--max-error", type=number(lambda v: v >= 0, "a number >= 0 (inf: any)"),
                        help=f"refuse a target the snapshots represent worse than this relative L2 error, >= 0 "
                             f"(default: {MAX_ERROR}); a plot without --out draws up to 1 unless given, to show "
                             f"how far off a target is")
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.out is None and args.plot is None:
        return _usage(parser, "give --out and/or --plot")
    has_target = args.sigma_rel is not None or args.gamma is not None
    if args.out is not None and not has_target:
        return _usage(parser, "--out needs --sigma-rel or --gamma")
    try:
        sigma = args.sigma_rel if args.gamma is None else gamma_to_sigma_rel(args.gamma)
        plot = None if args.plot is None else image_path("--plot", args.plot)
        for option, path in (("--out", args.out), ("--plot", plot)):
            if path is not None:
                writable(option, path, "ema.safetensors" if option == "--out" else "profiles.png")
                _outside(option, path, args.directory)
                _probe(option, path)
        if args.out is not None and plot is not None and _written_at(args.out) == _written_at(plot):
            raise ValueError(f"--out and --plot name one file ({plot!r}): the image would replace the weights; "
                             f"give each its own name")
        if plot is not None:
            pyplot()                               # matplotlib, before anything is written
        if args.out is not None:
            _storable(args.out, args.directory)
            weights = synthesize(args.directory, args.sigma_rel, gamma=args.gamma, time=args.time,
                                 max_error=MAX_ERROR if args.max_error is None else args.max_error)
            try:
                _write(args.out, weights)
            except OSError as err:
                raise OSError(f"--out {args.out!r} could not be written: {err}") from None
            sol = weights.solution
            print(f"wrote {args.out}: sigma_rel={sol.sigma_rel:.4f} (gamma={sol.gamma:.3f}) at time {sol.time:g}, "
                  f"{len(weights)} tensors, relative error {sol.error:.3g}, condition {sol.condition:.3g}")
        if plot is not None:
            limit = args.max_error if args.max_error is not None else MAX_ERROR if args.out is not None else 1.0
            plot_profiles(args.directory, sigma, plot, time=args.time, max_error=limit)
            print(f"wrote {plot}")
    except (ValueError, OSError, ImportError, MemoryError) as err:  # FileNotFoundError, SnapshotError: OSErrors
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _usage(parser: Parser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    return 2


def _written_at(path: str) -> str:
    """Where a write to ``path`` lands: its folder's links resolved, not a final link's (the write
    replaces the link itself)."""
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def _outside(option: str, path: str, directory: str) -> None:
    """Refuse (ValueError naming the option) an output that would replace what the run keeps in its
    folder: a snapshot, the claim file, a superseded folder's (other files there are not the run's)."""
    real, folder = _written_at(path), os.path.realpath(directory)
    if os.path.commonpath([real, folder]) == folder and real != folder:
        first = os.path.relpath(real, folder).split(os.sep)[0]
        if run_owns(first):
            raise ValueError(f"{option} {path!r} would replace the run's {first!r} in the snapshot folder "
                             f"{directory!r}; write under another name")


def _probe(option: str, path: str) -> None:
    """Refuse (ValueError naming the option) a folder where the write's temporary file cannot be made:
    the permission bits can say yes where the file system says no (root, read-only or special mounts)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".fastema-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path!r}: its folder {parent!r} is not writable ({err.strerror or err}); "
                         f"write somewhere else") from None


def _storable(path: str, directory: str) -> None:
    """Refuse (ValueError naming ``--out``), before the synthesis, a safetensors ``path`` for tensors kept
    as they are of a dtype safetensors has no name for (safetensors snapshots store them as bytes:
    ``raw``; a sharded model's DCP snapshot as they are: its last snapshot's metadata says)."""
    if not path.lower().endswith(".safetensors"):
        return
    import torch
    from safetensors.torch import save

    snaps = read_snapshots(directory)
    kept = {k: v for snap in snaps if snap.meta is not None for k, v in snap.meta.raw.items()}
    dcp = [snap for snap in snaps if snap.kind == "dcp"]
    if dcp:
        md = load_dcp_metadata(os.path.join(dcp[-1].path, ".metadata"))
        kept.update({k: str(m.properties.dtype).removeprefix("torch.") for k, m in md.state_dict_metadata.items()
                     if k.startswith(kept_key("")) and hasattr(m, "properties")})
    for key, dtype in sorted(kept.items()):
        try:
            save({"probe": torch.empty(0, dtype=getattr(torch, dtype))})   # the safetensors _write uses
        except (KeyError, TypeError, ValueError):            # (0.8: KeyError)
            raise ValueError(f"--out {path!r}: the tensor {key.partition(':')[2]!r} is {dtype}, which this "
                             f"safetensors cannot store; write a torch file (--out "
                             f"{os.path.splitext(path)[0]}.pt), or keep the tensor out of the average's copied "
                             f"tensors") from None


def _write(path: str, weights: dict) -> None:
    import torch

    weights = {k: v.contiguous() for k, v in weights.items()}
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save

        data = save(weights, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(weights, f))
