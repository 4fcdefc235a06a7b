"""``python -m fastema warm``: fill this machine's kernel caches, for container builds and job prologs.

The CPU kernels a model average's first uses need are found by making those first uses, through the
public paths, on tiny inputs: for each dtype pair of :data:`AVERAGES` (float32, bfloat16 and float16
models with float32 averages, bfloat16 averages of bfloat16 and float32 models in both roundings,
float64 models), ``fastema.torch.EMA``'s first update, swap in and back (``average_parameters``:
exchanged, packed or through a backup, as the pair needs) and ``copy_to``; then two decays,
``skip_nonfinite``, the plan on the device (``device_step=True``: the plan-carrying kernels) and
``WindowAverage`` over a float32 model, and ``FlatShadow``, ``WindowShadow``
and ``Smoother`` over NumPy arrays. Each runs twice: as is (the serial kernels) and with the launch
tunables shrunk so that the same tiny inputs take the parallel kernels a real model takes. No kernel
is listed by hand, so the set follows the launchers. ``--dtypes`` keeps the first uses of some
dtypes only. Every kernel numba compiles is counted at numba's compile event (a kernel loaded from
the cache is not).

Where a CUDA GPU is visible, the CUDA variants not shipped for it are compiled too, into this node's
store (``fastema._launch.shipped.variants.warm``).

``--into DIR --set cu12|cu13`` fills a compiled set of a shipped store instead (the build of
``kernels/device``: ``fastema._launch.shipped.store``), for every image of the set or those of ``--arch``;
no GPU is needed, only the set's toolchain (CONTRIBUTING.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from . import Parser, parse

__all__ = ["main"]

PROG = "python -m fastema warm"

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtypes(text: str) -> tuple:
    """``--dtypes``' type: a comma list of :data:`DTYPES`, else a usage error naming the bad."""
    chosen = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in chosen if d not in DTYPES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(DTYPES)}, "
                                         f"got {text!r}")
    return tuple(d for d in DTYPES if d in chosen)


def _parser() -> Parser:
    ap = Parser(prog=PROG,
                description="Compile fastema's kernels into the caches of this machine, so that a training job's "
                            "first update loads them instead of compiling (seconds per kernel, in every process "
                            "started on an empty cache). Run it in a container build or a job prolog, as the "
                            "user and with the environment (NUMBA_CACHE_DIR, TMPDIR) of the jobs.",
                epilog="Exits 1 with the reason where the kernels cannot be cached (no writable folder, or one "
                       "others can write). Running it again compiles nothing.")
    ap.add_argument("--cpu-only", action="store_true", help="do not compile CUDA kernels even where a GPU is visible")
    ap.add_argument("--dtypes", type=_dtypes, default=None, metavar="LIST",
                    help=f"comma list of the model (and array) dtypes whose first uses to make, "
                         f"of {', '.join(DTYPES)} (default: all); a bfloat16 job needs bfloat16")
    ap.add_argument("--into", metavar="DIR", help="build a compiled set of the CUDA kernels into the shipped "
                    "store DIR (kernels/device) instead of warming this machine's caches; no GPU needed")
    ap.add_argument("--set", choices=("cu12", "cu13"), help="with --into: which set (its toolchain: "
                    "CONTRIBUTING.md)")
    ap.add_argument("--arch", metavar="LIST", help="with --into: comma list of the set's images to build "
                    "(sm_90,compute_80; default: all of them)")
    ap.add_argument("--jobs", type=_jobs, default=None, help="with --into: worker processes, an int >= 1 "
                    "(default: this machine's CPU count)")
    return ap


def _jobs(text: str) -> int:
    """``--jobs``' type: an int >= 1, else a usage error."""
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return jobs


def _mixed(args) -> str | None:
    """Why the options given do not go together (None: they do): ``--set``, ``--arch`` and ``--jobs``
    build a shipped set (``--into``), ``--cpu-only`` and ``--dtypes`` warm this machine's caches."""
    into = [o for o, v in (("--set", args.set), ("--arch", args.arch), ("--jobs", args.jobs)) if v is not None]
    warm = [o for o, v in (("--cpu-only", args.cpu_only), ("--dtypes", args.dtypes)) if v]
    if args.into and warm:
        return f"{' and '.join(warm)} warm this machine's caches, not --into's build: drop {' and '.join(warm)}"
    if not args.into and into:
        return f"{' and '.join(into)} go with --into DIR (a shipped set's build): add --into, or drop them"
    return None


def _build(args) -> int:
    """``--into``: one compiled set of the shipped store (``fastema._launch.shipped.store``)."""
    if not args.set:
        print(f"{PROG}: error: --into needs --set cu12 or --set cu13", file=sys.stderr)
        return 2
    from fastema._launch.shipped.store import build

    archs = [a.strip() for a in args.arch.split(",") if a.strip()] if args.arch else None
    try:
        build(args.into, args.set, archs, jobs=args.jobs or os.cpu_count() or 1)
    except (ValueError, FileNotFoundError) as err:       # an unknown image, a toolchain not there
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


class _Compiles:
    """numba's compile events of fastema's kernels: ``(qualname, cache folder or None)`` each."""

    def __init__(self):
        self.seen: list = []

    def __enter__(self):
        from numba.core import event

        compiles = self

        class Listener(event.Listener):
            def on_start(self, ev):
                dispatcher = ev.data["dispatcher"]
                if dispatcher.py_func.__module__.startswith("fastema.kernels"):
                    compiles.seen.append((dispatcher.py_func.__qualname__, dispatcher.stats.cache_path))

            def on_end(self, ev):
                pass

        self._listener = Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        from numba.core import event

        event.unregister("numba:compile", self._listener)


def _numpy_updates():
    """``(name, dtype, first use)`` of the NumPy paths."""
    import numpy as np

    import fastema

    def arrays(dtype):
        return [np.linspace(-1, 1, 96, dtype=dtype).reshape(8, 12), np.ones(24, dtype)]

    def smoother():
        s = fastema.Smoother(decay=0.9, window=4)
        s.update(np.linspace(0, 1, 64))

    f32, f64 = np.float32, np.float64
    yield "FlatShadow, float32", "float32", lambda: fastema.FlatShadow(arrays(f32)).update(0.99)
    yield "FlatShadow, float64", "float64", lambda: fastema.FlatShadow(
        arrays(f64), dtype="same").update(0.99)
    yield "FlatShadow, two decays, skip_nonfinite", "float32", lambda: fastema.FlatShadow(
        arrays(f32), rows=2).update((0.9, 0.99), skip_nonfinite=True)
    yield "WindowShadow", "float32", lambda: fastema.WindowShadow(arrays(f32), 4).push()
    yield "Smoother (EMA and SMA)", "float64", smoother


AVERAGES = (
    ("float32", {}),
    ("bfloat16", {}),
    ("float16", {}),
    ("bfloat16", {"shadow_dtype": "bfloat16"}),
    ("bfloat16", {"shadow_dtype": "bfloat16", "rounding": "stochastic"}),
    ("float32", {"shadow_dtype": "bfloat16"}),
    ("float32", {"shadow_dtype": "bfloat16", "rounding": "stochastic"}),
    ("float64", {}),
)
"""The model averages whose first uses :func:`_first_uses` makes: ``(model dtype, EMA options)``:
float32, bfloat16 and float16 models with float32 averages, bfloat16 averages of bfloat16 and
float32 models (round to nearest, stochastic rounding), float64 models with float64 averages."""


def _average_name(dtype: str, options: dict) -> str:
    shadow = options.get("shadow_dtype", "float64" if dtype == "float64" else "float32")
    rounding = ", stochastic rounding" if options.get("rounding") == "stochastic" else ""
    return f"EMA, {dtype} model, {shadow} average{rounding}"


def _first_uses(model, EMA, options: dict) -> None:
    """A model average's first uses, each of which may need kernels of its own: an update, the swap
    in and back of an evaluation block, a ``copy_to``."""
    ema = EMA(model, **options)
    ema.update()
    with ema.average_parameters():
        pass
    ema.copy_to()


def _torch_updates():
    """``(name, dtype, first use)`` of the fastema.torch paths."""
    import torch
    from torch import nn

    from fastema.torch import EMA, WindowAverage

    def model(dtype="float32"):
        return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8)).to(getattr(torch, dtype))

    for dtype, options in AVERAGES:
        yield (_average_name(dtype, options), dtype,
               lambda d=dtype, o=options: _first_uses(model(d), EMA, o))
    yield "EMA, float32 model, two decays", "float32", lambda: EMA(
        model(), decay=(0.99, 0.999)).update()
    yield "EMA, float32 model, skip_nonfinite", "float32", lambda: EMA(
        model(), skip_nonfinite=True).update()
    yield "EMA, float32 model, plan on the device", "float32", lambda: EMA(
        model(), device_step=True).update()
    yield "WindowAverage, float32 model", "float32", lambda: WindowAverage(model(), 4).update()


def _updates(say, dtypes: tuple = DTYPES) -> list:
    """``(name, first use)`` of every path whose dtype is one of ``dtypes``."""
    out = list(_numpy_updates())
    try:
        out += list(_torch_updates())
    except ImportError:
        say("  (torch is not installed: the fastema.torch updates are skipped)")
    return [(name, use) for name, dtype, use in out if dtype in dtypes]


def _parallel():
    """The launch tunables shrunk so tiny inputs take the parallel kernels (on 2 threads), put back
    after (``config.tuned``)."""
    from fastema._launch import config

    return config.tuned(CPU_SERIAL_BELOW=0, CPU_STREAMS_SERIAL_BELOW=0, CPU_CHUNK=16, CPU_THREADS=2)


def _warm_cpu(say, dtypes: tuple = DTYPES) -> tuple[int, list, list]:
    """Make every first update twice (serial, parallel), stopping at the first kernel that is not cached;
    returns (kernels compiled, their cache folders (None: not cached), the RuntimeWarnings raised meanwhile)."""
    import numba

    passes = [("serial", None)]
    if numba.config.NUMBA_NUM_THREADS >= 2:
        passes.append(("parallel", _parallel))
    else:
        say("  (NUMBA_NUM_THREADS=1: parallel kernels never run here, so they are not compiled)")
    updates = _updates(say, dtypes)
    total, folders = 0, []
    with warnings.catch_warnings(record=True) as caught, _Compiles() as compiles:
        warnings.simplefilter("always", RuntimeWarning)
        for mode, context in passes:
            for name, update in updates:
                before, t = len(compiles.seen), time.perf_counter()
                if context is None:
                    update()
                else:
                    with context():
                        update()
                got = compiles.seen[before:]
                total += len(got)
                folders += [folder for _, folder in got]
                what = f"{len(got)} compiled" if got else "cached"
                say(f"  {name + ', ' + mode:<58} {what:>12}  {time.perf_counter() - t:6.2f} s")
                if None in folders:                  # not cached: no use compiling the rest
                    break
            if None in folders:
                break
    return total, folders, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _why_not_cached(warned: list) -> str:
    """Why the kernels were not cached: NUMBA_CACHE_DIR refused by the trust rules, or the launch layer's
    warning (said at import, so perhaps above this), or numba's want of a writable folder."""
    import os

    folder = os.environ.get("NUMBA_CACHE_DIR")
    if folder:
        from fastema._launch.config import cache_folder_problem

        problem = cache_folder_problem(os.path.realpath(folder))
        if problem is not None:
            return f"NUMBA_CACHE_DIR={folder} is not used, as {problem} (the cache files are pickles, run as code)"
    said = next((w.removeprefix("fastema: ") for w in warned if "cache" in w), None)
    return said.rstrip(".") if said else "numba found no writable cache folder (see the warning above)"


def _warm_cuda(say) -> int:
    """The CUDA variants not shipped for the visible GPU (``fastema._launch.shipped.variants.warm``);
    the exit status."""
    try:
        from numba import cuda

        visible = cuda.is_available()
    except ImportError:                    # numba-cuda missing (no driver: is_available() says False)
        visible = False
    if not visible:
        say("CUDA: no GPU visible, nothing to compile")
        return 0
    from fastema._launch.shipped.variants import warm
    t = time.perf_counter()
    try:
        compiled = warm()
    except Exception as err:               # the device code's own failure, said in one line
        print(f"{PROG}: error: the CUDA kernels could not be compiled ({type(err).__name__}: {err}); run the "
              f"CUDA check of docs/install.md, or pass --cpu-only", file=sys.stderr)
        return 1
    for variant, seconds in compiled:
        say(f"  {variant:<58} {seconds:6.2f} s")
    say(f"CUDA: {len(compiled)} variant(s) compiled in {time.perf_counter() - t:.1f} s")
    return 0


def main(argv=None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    mixed = _mixed(args)
    if mixed is not None:
        print(f"{PROG}: error: {mixed}", file=sys.stderr)
        return 2
    if args.into:
        return _build(args)
    dtypes = args.dtypes or DTYPES

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        import numba  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as err:
        print(f"{PROG}: error: {err.name or err} is not installed; fastema's kernels need numpy and numba: "
              f"pip install 'numba>=0.59'", file=sys.stderr)
        return 1
    say("CPU kernels (the first uses of fastema's public paths, on tiny inputs"
        + ("" if dtypes == DTYPES else f"; {', '.join(dtypes)} only") + "):")
    t = time.perf_counter()
    total, folders, warned = _warm_cpu(say, dtypes)
    uncached = [f for f in folders if f is None]
    cached_in = sorted({f for f in folders if f is not None})
    if uncached:
        print(f"{PROG}: error: {len(uncached)} kernel(s) were compiled but cannot be cached, so every process "
              f"will compile them again: {_why_not_cached(warned)}. Set NUMBA_CACHE_DIR to a folder only you can "
              f"write (mkdir -m 700 -p ~/.cache/fastema-numba), or leave it unset for fastema's default, then run "
              f"'{PROG}' again.", file=sys.stderr)
        return 1
    if total:
        say(f"CPU: {total} kernel(s) compiled in {time.perf_counter() - t:.1f} s, cached in "
            f"{', '.join(cached_in)}")
    else:
        say(f"CPU: nothing to compile, every kernel was in the cache already ({time.perf_counter() - t:.1f} s)")
    return 0 if args.cpu_only else _warm_cuda(say)
