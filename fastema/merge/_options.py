"""A merge's options (:class:`MergeOptions`), each written once: its default, its check, its text.

:func:`fastema.merge.merge_checkpoints` builds one from its keywords and passes it down; its
docstring's option list and the flags of ``python -m fastema merge`` (:mod:`fastema.cli.merge`) are
made from the fields: the help of each is its field's ``metadata``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import textwrap
from typing import Any, Callable

from ..schedules import as_python
from ._plan import OUTPUT_DTYPES
from ._source import MergeError
from ._weights import STYLES, parse_style

__all__ = ["MergeOptions", "SEED_MAX"]

#: the largest ``seed`` (stochastic rounding's and ``__scramble``'s)
SEED_MAX = 2**32 - 1
_ACCUMULATE = ("float32", "float64")
_READS = ("pread", "mmap")


def _problem(name: str, expected: str, value: Any) -> MergeError:
    return MergeError(f"{name} must be {expected}, got {value!r}")


def _weights(value):
    if not isinstance(value, str):
        try:
            value = tuple(as_python(v) for v in value)
        except TypeError:
            pass                              # parse_style names it
    try:
        parse_style(value)
    except ValueError as err:
        raise MergeError(str(err)) from None
    return value


def _choice(name: str, choices: tuple) -> Callable:
    def check(value):
        if not (isinstance(value, str) and value in choices):
            raise _problem(name, " or ".join(repr(c) for c in choices) if len(choices) == 2 else
                           "one of " + ", ".join(choices), value)
        return value
    return check


def _copy_from(value):
    if isinstance(value, str) and (value in ("last", "first") or re.fullmatch(r"\s*[-+]?\d+\s*", value)):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _problem("copy_from", "'last', 'first' or an input index (an int; negative counts from the end)", value)
    return int(value)


def _regex(name: str) -> Callable:
    def check(value):
        if value is None:
            return None
        if not isinstance(value, str):
            raise _problem(name, "None or a regular expression (a str)", value)
        try:
            re.compile(value)
        except re.error as err:
            raise MergeError(f"{name}: {value!r} is not a regular expression ({err})") from None
        return value
    return check


def _steps(value):
    if value is None:
        return None
    try:
        steps = tuple(as_python(v) for v in value) if not isinstance(value, (str, bytes)) else None
    except TypeError:
        steps = None
    if steps is None or not all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in steps):
        raise _problem("steps", "None or a list of numbers, one per input (None where an input's is not known)",
                       value)
    return steps


def _flag(name: str) -> Callable:
    def check(value):
        if not isinstance(value, bool):
            raise _problem(name, "True or False", value)
        return value
    return check


def _seed(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise _problem("seed", f"an int in [0, {SEED_MAX}]", value)
    return int(value)


def _progress(value):
    if value is not None and not isinstance(value, bool):
        raise _problem("progress", "True, False or None (when stderr is a terminal)", value)
    return value


def _max_error(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise _problem("max_error", "None (0.05) or a number >= 0", value)
    return float(value)


def _numbers(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MergeError(f"must be numbers separated by commas, got {text!r}") from None


def _integer(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text                           # the check names it


def _number(text: str) -> float | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if not math.isnan(value) else text


def _option(default, check: Callable, text: str, *, default_text: str | None = None, parse: Callable | None = None,
            flag: dict | None = None, flag_text: str | None = None) -> Any:
    """A field of :class:`MergeOptions` (see there for the metadata)."""
    return dataclasses.field(default=default, metadata={
        "check": check, "text": text, "default_text": default_text, "parse": parse, "flag": flag or {},
        "flag_text": flag_text})


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """The options of one merge, each checked once here (:class:`MergeError` naming it, its value
    and what it takes); their meanings are :func:`fastema.merge.merge_checkpoints`'s. Sequences
    are kept as tuples.

    Each field's ``metadata``: ``check`` (the value, checked and normalised, or MergeError),
    ``text`` (what it does; ``{name}`` names another option, spelled ``name`` in Python and
    ``--name`` on the command line), ``default_text`` (the default in words, where its value says
    less), and for ``python -m fastema merge``: ``parse`` (the flag's text to a value), ``flag``
    (``add_argument`` keywords: ``action``, ``choices``, ``metavar``, the flag's name) and
    ``flag_text`` (the flag's help, where it is not ``text``).
    """

    weights: str | tuple = _option(
        "uniform", _weights,
        "the weight style, one of " + ", ".join(STYLES) + " (linear and minus-sqrt also with Megatron-LM's "
        "__reverse or __scramble; W0,W1,...: one number per input, or a list of numbers; the formulas: {formulas}). "
        "An input of weight 0 is not read and does not enter the sums (an inf or nan in it changes nothing)")
    dtype: str = _option(
        "same", _choice("dtype", OUTPUT_DTYPES),
        "the averaged tensors' output dtype: same (each tensor's input dtype), float32, bfloat16 or float16",
        flag={"choices": OUTPUT_DTYPES})
    copy_from: str | int = _option(
        "last", _copy_from,
        "the input that integer, boolean, float8 and non-tensor entries, and the tensors {only} / {exclude} leave "
        "out, are copied from: last, first or an index")
    only: str | None = _option(
        None, _regex("only"),
        "a regular expression (re.search): average only the tensors whose names match; the others are copied from "
        "the {copy_from} input", default_text="every floating tensor", flag={"metavar": "REGEX"})
    exclude: str | None = _option(
        None, _regex("exclude"),
        "a regular expression (re.search): copy the tensors whose names match from the {copy_from} input instead "
        "of averaging them", default_text="none", flag={"metavar": "REGEX"})
    steps: tuple | None = _option(
        None, _steps, "each input's training step, one number per input (comma-separated on the command line), "
        "for ema: and wsm: weights",
        default_text="read from the checkpoints or their names", parse=_numbers, flag={"metavar": "S0,S1,..."})
    allow_negative: bool = _option(
        False, _flag("allow_negative"), "accept negative weights (extrapolation; sigma_rel: often needs them)",
        default_text="refused", flag={"action": "store_true"})
    stochastic_rounding: bool = _option(
        False, _flag("stochastic_rounding"),
        "round bfloat16 outputs stochastically, reproducibly from {seed} (refused where no averaged tensor is "
        "written as bfloat16)",
        default_text="to nearest even", flag={"action": "store_true"})
    seed: int = _option(
        0, _seed, f"the seed of {{stochastic_rounding}} and of __scramble, an integer in [0, {SEED_MAX}]",
        parse=_integer)
    accumulate: str = _option(
        "float32", _choice("accumulate", _ACCUMULATE),
        "the sums' dtype, float32 or float64 (float64 tensors are always summed in float64)",
        flag={"choices": _ACCUMULATE})
    optimizer: bool = _option(
        False, _flag("optimizer"), "keep the optimizer state of torch inputs, copied from the {copy_from} input "
        "(a .safetensors output holds tensors only)", default_text="left out", flag={"action": "store_true"})
    verify: bool = _option(
        False, _flag("verify"), "read the output back before it is published and check every tensor (names, "
        "dtypes, shapes, a CRC-32 of its bytes) against what was written", default_text="off",
        flag={"action": "store_true"})
    dry_run: bool = _option(
        False, _flag("dry_run"), "check the inputs and print the weights; write nothing", default_text="off",
        flag={"action": "store_true"})
    overwrite: bool = _option(
        False, _flag("overwrite"), "replace an existing {out} (a file by a file, a folder by a folder)",
        default_text="refused", flag={"action": "store_true"})
    progress: bool | None = _option(
        None, _progress, "a tqdm progress bar with bytes/s: True, False, or None (when stderr is a terminal and "
        "tqdm is installed)", flag={"action": "store_const", "const": False, "name": "--no-progress"},
        flag_text="no progress bar (default: a bar with bytes/s when stderr is a terminal and tqdm is installed)")
    read: str = _option(
        "pread", _choice("read", _READS),
        "how safetensors and torch inputs are read: pread, in 512 KiB pieces copied into small buffers (an input "
        "truncated during the merge is an error naming it); mmap, in place, memory-mapped, in 4 MiB pieces (no "
        "copy; 0.7x pread's time on one 2-core VM, 1.6x on another: measure), but a file another program shrinks "
        "while it is mapped (a trainer rewriting a checkpoint in place) can kill the merge with SIGBUS, leaving "
        "its temporary folder behind: only for inputs nothing else writes", flag={"choices": _READS})
    max_error: float | None = _option(
        None, _max_error, "the largest relative L2 error of sigma_rel: weights (refused with other weights)",
        default_text="0.05",
        parse=_number)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = f.metadata["check"](value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    @classmethod
    def names(cls) -> tuple:
        """The options' names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def text(cls, name: str, *, flag: bool = False) -> str:
        """What option ``name`` does, in words: for Python (``flag=False``: options named ``name``),
        or for the command line (options named ``--name``, ending with the default)."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        meta = f.metadata
        if flag and meta["flag_text"]:
            return meta["flag_text"]
        spell = (lambda n: "--" + n.replace("_", "-")) if flag else (lambda n: f"``{n}``")
        words = meta["text"].format(out="OUT" if flag else "``out``", **{n: spell(n) for n in cls.names()},
                                    formulas="docs/guides/merging.md" if flag else ":func:`merge_weights`")
        if flag:
            return words + f" (default: {meta['default_text'] or '%(default)s'})"
        return words + (f" (default: {meta['default_text']})" if meta["default_text"] else "") + "."

    @classmethod
    def docs(cls, indent: int) -> str:
        """Every option as a Google-style ``Args:`` entry, indented by ``indent`` spaces."""
        pad = " " * indent
        return "\n".join(textwrap.fill(f"{n}: {cls.text(n)}", 100, initial_indent=pad, subsequent_indent=pad + "    ",
                                       break_on_hyphens=False) for n in cls.names())
