"""The ``python -m fastema COMMAND`` verbs, one module each (not part of the library namespace):

- :mod:`.demo`: train a small model with an EMA of its weights;
- :mod:`.plot`: raw, SMA and EMA curves of a logged metric, to a PNG;
- :mod:`.posthoc`: synthesise a post-hoc EMA from ``PostHocEMA`` snapshots;
- :mod:`.merge`: merge saved checkpoints (the weighted average of their tensors);
- :mod:`.warm`: compile the kernels into this machine's caches (container builds, job prologs).

Each has ``main(argv) -> int``; :mod:`fastema.__main__` dispatches to them. What the commands
share is here: :data:`COMMANDS` (the one-line summaries ``--help`` lists) and the argument
checks that make bad input one line naming the argument and the fix, never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from .._io.safe_files import writable

__all__ = ["COMMANDS", "Parser", "number", "integer", "parse", "image_path", "writable"]

# name -> one line for `python -m fastema --help` (the module is fastema.cli.<name>)
COMMANDS = {
    "demo": "train a small model with an EMA of its weights; print both validation losses, draw a PNG",
    "plot": "draw raw, SMA and EMA curves of a logged metric (a CSV log or a list of numbers) to a PNG",
    "posthoc": "synthesise a post-hoc EMA from the snapshots of fastema.torch.PostHocEMA",
    "merge": "merge saved checkpoints: the weighted average of their tensors (uniform, minus-sqrt, EMA, WSM, ...)",
    "warm": "compile fastema's kernels into this machine's caches, for container builds and job prologs",
}


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (the argument, what it must be, where the help is),
    exit status 2, and each option's default shown in its help (written into the help texts)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse(parser: argparse.ArgumentParser, argv, known: bool = False):
    """``parser.parse_args(argv)`` (``known=True``: ``parse_known_args``, the arguments and the
    rest), or the exit status where argparse would exit (``--help``: 0, a usage error: 2, its one
    line already printed), so ``main(argv)`` returns it."""
    try:
        return parser.parse_known_args(argv) if known else parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


def number(accepts: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse ``type``: a float that ``accepts(value)``, else a usage error (argparse names
    the argument: ``argument --decay: must be a number in [0, 1], got '2'``)."""
    def parse_number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value
    return parse_number


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an int in ``[low, high]``, else a usage error (as :func:`number`)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse_integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value
    return parse_integer


def image_path(option: str, path: str) -> str:
    """The image file an ``--out``/``--plot`` path names: ``.png`` added when it has no
    extension; ValueError naming ``option`` for a directory or a format matplotlib cannot write."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory: give a file name in it, e.g. "
                         f"{os.path.join(path, 'out.png')!r}")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        return path + ".png"
    formats = {"png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "pgf", "raw", "rgba"}
    if ext not in formats:
        raise ValueError(f"{option} {path!r}: matplotlib cannot write .{ext} files; give a .png (or .pdf, .svg) name")
    return path


