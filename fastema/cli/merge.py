"""``python -m fastema merge OUT INPUT... --weights minus-sqrt``: the weighted average of saved
checkpoints (:func:`fastema.merge.merge_checkpoints`).

Its flags are the options of :class:`fastema.merge.MergeOptions`, one each, their help the
options' own text; a flag's value is checked by its option's check (a usage error, status 2).

The weights are printed before the merge. Bad input prints one line, never a traceback, and exits
with status 1 (2 for usage errors): inputs that do not match, a truncated or damaged file, a pickle
that is not a state dict, refused weights, too little disk. A Ctrl-C exits with 130; while the
command runs, a SIGTERM (``kill``, ``timeout``, Slurm, Kubernetes) or SIGHUP takes the same path and
exits with 128 + its number (143, 129): the temporary folder is removed and nothing is published
(one that arrives while the output is renamed into place waits until it is). Either way nothing is
written and no input changes. An error fastema does not expect (a bug) still prints its
traceback."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
from typing import Callable, Iterator

from . import Parser, parse

__all__ = ["main"]


def _parser() -> Parser:
    from ..merge import MergeOptions

    p = Parser(prog="python -m fastema merge",
               description="Merge checkpoints: every floating tensor becomes the weighted average of the inputs' "
                           "(accumulated in float32), read one tensor at a time through a compiled kernel and written "
                           "into a temporary folder renamed into place. Inputs: safetensors files, Hugging Face model "
                           "folders, torch .pt/.bin state dicts (weights_only=True), torch DCP folders, post-hoc "
                           "snapshot folders; nothing in them is executed.",
               epilog="example: python -m fastema merge merged/ run/checkpoint-800 run/checkpoint-900 "
                      "run/checkpoint-1000 --weights wsm:1-sqrt --verify")
    p.add_argument("out", help="the output: a .safetensors file, or a folder (a Hugging Face model folder, with the "
                               "--copy-from input's config and tokenizer when it is one)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="the checkpoints, oldest first")
    for f in dataclasses.fields(MergeOptions):          # one flag per option, its help the option's own text
        flag = dict(f.metadata["flag"])
        name = flag.pop("name", "--" + f.name.replace("_", "-"))
        if "action" not in flag and "choices" not in flag:
            flag["type"] = _checked(f.metadata["parse"], f.metadata["check"])
        p.add_argument(name, dest=f.name, default=f.default, help=MergeOptions.text(f.name, flag=True), **flag)
    return p


def _checked(parse: Callable | None, check: Callable) -> Callable:
    """An argparse ``type``: the flag's text parsed (``parse``, else kept as text) and checked by the
    option's own check; a refusal is a usage error naming the flag."""
    def option(text: str):
        try:
            return check(parse(text) if parse is not None else text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return option


def main(argv=None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    from ..merge import MergeError, MergeOptions, merge_checkpoints

    received: list = []
    try:
        with _terminating_as_ctrl_c(received):
            report = merge_checkpoints(args.inputs, args.out, log=print,
                                       **{name: getattr(args, name) for name in MergeOptions.names()})
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        by = f" by {signal.Signals(signum).name}" if received else ""
        print(f"interrupted{by}: nothing was written", file=sys.stderr)
        return 128 + signum
    except (MergeError, ValueError, OSError, MemoryError, ImportError) as err:
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


@contextlib.contextmanager
def _terminating_as_ctrl_c(received: list) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise KeyboardInterrupt (the Ctrl-C path: the merge
    removes its temporary folder), their numbers appended to ``received``; the handlers before are
    put back after. An ignored signal (``nohup``'s SIGHUP) stays ignored, and so does one whose
    handler was not installed from Python; outside the main thread nothing changes (Python runs
    handlers there only)."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        def interrupt(signum, frame):
            received.append(signum)
            if len(received) == 1:          # a second one lets the cleanup of the first finish
                raise KeyboardInterrupt

        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) not in (signal.SIG_IGN, None):
                old[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
