"""``python -m fastema merge OUT INPUT... --weights minus-sqrt``: the weighted average of saved
checkpoints (:func:`fastema.merge.merge_checkpoints`).

The weights are printed before the merge. Bad input prints one line, never a traceback, and exits
with status 1 (2 for usage errors): inputs that do not match, a truncated or damaged file, a pickle
that is not a state dict, refused weights, too little disk. A Ctrl-C exits with 130; while the
command runs, a SIGTERM (``kill``, ``timeout``, Slurm, Kubernetes) or SIGHUP takes the same path and
exits with 128 + its number (143, 129): the temporary folder is removed and nothing is published
(one that arrives while the output is renamed into place waits until it is). Either way nothing is
written and no input changes. An error fastema does not expect (a bug) still prints its
traceback."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

from . import Parser, integer, number, parse

__all__ = ["main"]


def _parser() -> Parser:
    from ..merge.weights import STYLES

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
    p.add_argument("--weights", default="uniform",
                   help=f"the weight style: {', '.join(STYLES)}; linear and minus-sqrt also with Megatron-LM's "
                        f"__reverse or __scramble (default: %(default)s)")
    p.add_argument("--dtype", default="same", choices=("same", "float32", "bfloat16", "float16"),
                   help="the averaged tensors' output dtype; same: each tensor's input dtype (default: %(default)s)")
    p.add_argument("--copy-from", default="last",
                   help="the input that integer, boolean, float8 and non-tensor entries, and tensors --only/--exclude "
                        "leave out, are copied from: last, first or an index (default: %(default)s)")
    p.add_argument("--only", metavar="REGEX", help="average only the tensors whose names match (others are copied "
                                                   "from --copy-from) (default: every floating tensor)")
    p.add_argument("--exclude", metavar="REGEX", help="copy the tensors whose names match from --copy-from instead of "
                                                      "averaging them (default: none)")
    p.add_argument("--steps", help="each input's training step, comma-separated, for ema: and wsm: weights "
                                   "(default: read from the checkpoints or their names)")
    p.add_argument("--allow-negative", action="store_true",
                   help="accept negative weights (extrapolation; sigma_rel: often needs it) (default: refused)")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="round bfloat16 outputs stochastically, reproducibly from --seed (default: to nearest even)")
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0,
                   help="seed of --stochastic-rounding and of __scramble (default: %(default)s)")
    p.add_argument("--accumulate", default="float32", choices=("float32", "float64"),
                   help="the sums' dtype (float64 tensors are always summed in float64) (default: %(default)s)")
    p.add_argument("--optimizer", action="store_true",
                   help="keep the optimizer state of torch inputs, copied from --copy-from (default: left out)")
    p.add_argument("--verify", action="store_true",
                   help="read the output back and check every tensor before it is published (default: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs and print the weights; write nothing (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (default: refused)")
    p.add_argument("--read", default="pread", choices=("pread", "mmap"),
                   help="how safetensors and torch inputs are read: pread, in pieces copied into small buffers (an "
                        "input truncated during the merge is an error naming it); mmap, in place, memory-mapped "
                        "(no copy, faster on some machines; but a file another program shrinks while it is mapped "
                        "can kill the merge with SIGBUS: only for inputs nothing else writes) (default: %(default)s)")
    p.add_argument("--max-error", type=number(lambda v: v >= 0, "a number >= 0"), default=None,
                   help="the largest relative L2 error sigma_rel: weights may have (default: 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar with bytes/s when "
                                                              "stderr is a terminal and tqdm is installed)")
    return p


def _steps(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps must be numbers separated by commas, got {text!r}") from None


def main(argv=None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    from ..merge import MergeError, merge_checkpoints

    received: list = []
    try:
        with _terminating_as_ctrl_c(received):
            report = merge_checkpoints(
                args.inputs, args.out, args.weights, args.dtype, copy_from=args.copy_from, only=args.only,
                exclude=args.exclude, steps=_steps(args.steps), allow_negative=args.allow_negative,
                stochastic_rounding=args.stochastic_rounding, seed=args.seed, accumulate=args.accumulate,
                optimizer=args.optimizer, verify=args.verify, dry_run=args.dry_run, overwrite=args.overwrite,
                progress=False if args.no_progress else None, log=print, read=args.read, max_error=args.max_error)
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
