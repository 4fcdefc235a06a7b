"""``python -m fastema plot LOG``: raw, SMA and EMA curves of a logged metric, to a PNG.

LOG is a CSV file with a header (Keras ``CSVLogger``, Lightning ``CSVLogger``'s
metrics.csv, pandas ``to_csv``...) or a plain list of numbers (one per line, or separated
by commas or spaces). Rows where the column is empty are left out; x is the ``step``
(or ``epoch``) column when there is one, else the row number. The averages are computed
by :class:`fastema.Smoother` (debiased EMA, SMA with ``min_periods=1``, non-finite values
skipped), so they equal what the callbacks log. Needs matplotlib (``fastema[plot]``).
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import sys

import numpy as np

from .._io.files import save_figure
from .._io.safe_files import open_regular
from ..smooth import Smoother
from ..track import _ema_kwargs
from . import Parser, image_path, integer, number, parse, writable

__all__ = ["main"]


def read_log(path: str, column: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, values, name) of one column of a CSV log, or of a plain list of numbers."""
    with open_regular(path) as f:           # a FIFO or device named as the log: refused by name
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")                          # numbers are ASCII in any 8-bit encoding
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    lines = [ln for _, ln in numbered]
    if not lines:
        raise ValueError(f"{path} is empty")
    first = lines[0].replace(",", " ").split()
    if all(_is_number(tok) for tok in first):                 # a plain list of numbers
        if column is not None:
            raise ValueError(f"{path} has no header, so no column {column!r}; leave --column out")
        values = []
        for i, ln in numbered:
            for tok in ln.replace(",", " ").split():
                if not _is_number(tok):
                    raise ValueError(f"{path} line {i}: {tok[:40]!r} is not a number (a list of numbers has "
                                     f"only numbers; a CSV log needs a header line)")
                values.append(float(tok))
        return np.arange(len(values)), np.array(values), os.path.splitext(os.path.basename(path))[0]
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as err:
        raise ValueError(f"{path} is not a readable CSV log: {err}") from None
    header = list(rows[0].keys()) if rows else first
    if column is None:
        column = "loss" if "loss" in header else next(
            (h for h in header if h not in ("step", "epoch") and any(_is_number(r.get(h) or "") for r in rows)), None)
        if column is None:
            raise ValueError(f"{path} has no numeric column; its header is {header}")
    if column not in header:
        raise ValueError(f"{path} has no column {column!r}; it has {header}")
    xcol = "step" if "step" in header else "epoch" if "epoch" in header else None
    keep = [r for r in rows if _is_number(r.get(column) or "")]
    if not keep:
        raise ValueError(f"column {column!r} of {path} has no numbers")
    values = np.array([float(r[column]) for r in keep])
    x = np.array([float(r[xcol]) for r in keep]) if xcol and all(_is_number(r.get(xcol) or "") for r in keep) \
        else np.arange(len(keep))
    return x, values, column


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def smooth_series(values, ema=0.9, sma: int | None = 50) -> dict[str, np.ndarray]:
    """{"ema": ..., "sma": ...} of a 1-D series, point by point as a training run would log them."""
    s = Smoother(**_ema_kwargs(ema), window=sma)
    out = {k: np.empty(len(values)) for k, on in (("ema", ema is not None), ("sma", sma is not None)) if on}
    for i, v in enumerate(np.asarray(values, np.float64)):
        s.update(np.array([v]))
        for k in out:
            out[k][i] = getattr(s, k)[0]
    return out


def plot(path: str, out: str | None = None, column: str | None = None, ema=0.9, sma: int | None = 50,
         logy: bool = False) -> str:
    """Draw the raw values and their averages; returns the PNG's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("python -m fastema plot needs matplotlib (pip install 'fastema[plot]')") from None
    x, values, name = read_log(path, column)
    curves = smooth_series(values, ema, sma)
    out = out or os.path.splitext(path)[0] + f"-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(x, values, color="0.7", lw=0.8, label=f"{name} (raw)")
    if "sma" in curves:
        ax.plot(x, curves["sma"], lw=1.6, label=f"SMA, window {sma}")
    if "ema" in curves:
        label = "EMA, " + ", ".join(f"{k} {v}" for k, v in _ema_kwargs(ema).items())
        ax.plot(x, curves["ema"], lw=1.6, label=label)
    finite = values[np.isfinite(values)]
    if logy and finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(f"{os.path.basename(path)}: {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def _parser() -> Parser:
    ap = Parser(
        prog="python -m fastema plot",
        description="Draw a logged metric with its EMA and SMA to an image. LOG is a CSV file with a header line "
                    "(Keras or Lightning CSVLogger, pandas to_csv) or a plain list of numbers (one per line, or "
                    "separated by commas or spaces); rows where the column is empty are left out, and x is the step "
                    "(or epoch) column when there is one, else the row number. The averages are fastema.Smoother's "
                    "(debiased EMA; SMA with min_periods=1; non-finite values skipped), so they equal what the "
                    "callbacks log. Needs matplotlib (pip install 'fastema[plot]').",
        epilog="example: python -m fastema plot lightning_logs/version_0/metrics.csv --column loss --span 50 --sma 100")
    ap.add_argument("log", help="a CSV log with a header line, or a list of numbers")
    ap.add_argument("--column", help="the CSV column to draw (default: loss, else the first numeric column)")
    ap.add_argument("--out", help="the image to write; .png is added when the name has no extension "
                                  "(default: LOG's name with -COLUMN.png, beside LOG)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--decay", type=number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
                       help="the EMA's decay, in [0, 1) (default: 0.9 when no --span, --halflife or --no-ema)")
    group.add_argument("--span", type=number(lambda v: 1 <= v < math.inf, "a number >= 1"),
                       help="the EMA's span instead, >= 1, pandas' meaning: decay = 1 - 2 / (span + 1) (default: none)")
    group.add_argument("--halflife", type=number(lambda v: 0 < v < math.inf, "a number > 0"),
                       help="the EMA's half-life in points instead, > 0 (default: none)")
    group.add_argument("--no-ema", action="store_true", help="draw no EMA (default: off)")
    ap.add_argument("--sma", type=integer(0), default=50,
                    help="the SMA's window in points, >= 0; 0 draws no SMA (default: %(default)s)")
    ap.add_argument("--logy", action="store_true", help="a log-scale y axis when every value is > 0 (default: off)")
    return ap


def main(argv=None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    if args.no_ema:
        ema = None
    elif args.span is not None:
        ema = {"span": args.span}
    elif args.halflife is not None:
        ema = {"halflife": args.halflife}
    else:
        ema = 0.9 if args.decay is None else args.decay
    if ema is None and not args.sma:
        print("python -m fastema plot: error: --no-ema with --sma 0 leaves nothing to draw; drop one of them",
              file=sys.stderr)
        return 2
    try:
        if not os.path.isfile(args.log):
            raise ValueError(f"LOG {args.log!r} " + ("is a directory: give the log file in it" if os.path.isdir(
                args.log) else "does not exist: give the path of a CSV log or a list of numbers"))
        if args.out is not None:
            args.out = image_path("--out", args.out)
            writable("--out", args.out)
        out = plot(args.log, args.out, args.column, ema, args.sma or None, args.logy)
    except (OSError, ValueError, TypeError) as e:
        print(f"python -m fastema plot: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0
