"""The plan of a merge, made and checked before anything is written: every input against the
first (names, shapes, dtypes, tied tensors), what each entry becomes, and the output's files.

What each entry of the first input becomes (:class:`Item`):

- ``average``: a floating tensor (float64, float32, bfloat16, float16), the weighted sum of
  every input's, accumulated in float32 (float64 on request, always for float64 tensors),
  written in the input dtype or the one asked for;
- ``copy``: copied byte for byte from the ``copy_from`` input, never averaged: integers and
  booleans (step counters, token counts), float8 tensors and their scales (names ending in
  ``weight_scale``, ``weight_scale_inv``, ``input_scale``, ``scale_inv``, ``amax``,
  ``amax_history``, ``k_scale``, ``v_scale``: each checkpoint's own), Transformer Engine's
  ``_extra_state``, and floating tensors that ``only``/``exclude`` leave out;
- ``object``: an entry that is not a tensor (a torch file's step count, a string): taken from the
  ``copy_from`` input where the output format holds it, else listed as not written.

Tensors that share storage in the first input (tied weights, a torch file's ``lm_head.weight``
and ``embed_tokens.weight``) are one item, written once; its other names are its ``aliases``.
Optimizer state was left out when the inputs were read (:mod:`._torch_inputs`), unless asked.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from .._io.safetensors import ITEMSIZE
from ..kernels.kinds import BF16, F16, F32, F64
from ._source import OBJECT, MergeError

__all__ = ["Item", "Plan", "make_plan", "copy_index", "shards"]

#: the dtypes that are averaged -> their storage kind in the kernels
KIND = {"float32": F32, "bfloat16": BF16, "float16": F16, "float64": F64}
#: what ``dtype=`` takes for the averaged tensors ("same": each tensor's input dtype)
OUTPUT_DTYPES = ("same", "float32", "bfloat16", "float16")
_KEPT = re.compile(r"(^|[._/])(_extra_state|weight_scale|weight_scale_inv|input_scale|scale_inv|amax|amax_history|"
                   r"k_scale|v_scale)$")


def averaged(dtype: str) -> bool:
    """True for a dtype fastema averages (float64, float32, bfloat16, float16); float8, integers,
    booleans, complex numbers and objects are copied."""
    return dtype in KIND


class Item(NamedTuple):
    """What one entry of the output is and where it comes from."""
    name: str
    action: str          # "average", "copy" or "object"
    dtype: str           # the inputs' dtype
    out_dtype: str       # the dtype written
    shape: tuple
    nbytes: int          # bytes written
    why: str = ""        # a copy's reason
    aliases: tuple = ()  # names tied to this one (not written again)


class Plan(NamedTuple):
    """Every output entry, in the first input's order, with the sizes the merge reads and writes."""
    items: list
    copy_from: int
    bytes_read: int
    bytes_written: int


def copy_index(copy_from, count: int) -> int:
    """The input index ``copy_from`` names: ``"last"``, ``"first"``, or an index (negative counts
    from the end; its form checked by :class:`~._options.MergeOptions`, its range here)."""
    if copy_from == "last":
        return count - 1
    if copy_from == "first":
        return 0
    i = int(copy_from)
    if not -count <= i < count:
        raise MergeError(f"copy_from {copy_from!r} names no input: there are {count}; give 'last', 'first' or an "
                         f"index in [0, {count}) (negative counts from the end)")
    return i % count


def _selector(only, exclude):
    keep = re.compile(only) if only else None           # (both checked by MergeOptions)
    drop = re.compile(exclude) if exclude else None

    def why_not(name: str) -> str:
        if keep is not None and not keep.search(name):
            return "not matched by only"
        if drop is not None and drop.search(name):
            return "matched by exclude"
        return ""

    return why_not


def make_plan(sources: list, options, readers: int | None = None) -> Plan:
    """The plan of merging ``sources`` with ``options`` (a checked :class:`~._options.MergeOptions`:
    ``dtype``, ``copy_from``, ``only``, ``exclude``), checked: MergeError naming the input and the
    tensor; ``readers``: how many inputs an averaged tensor is read from (those of nonzero weight;
    default all), for ``bytes_read``."""
    dtype = options.dtype
    first = sources[0]
    src_index = copy_index(options.copy_from, len(sources))
    aliases = _ties(first)
    for s in sources[1:]:
        _check_against_first(first, s, aliases)
    why_not = _selector(options.only, options.exclude)
    items, read, written = [], 0, 0
    for name, e in first.entries.items():
        if name in aliases:
            continue
        tied = tuple(a for a, to in aliases.items() if to == name)
        if e.dtype == OBJECT:
            items.append(Item(name, "object", OBJECT, OBJECT, (), 0, "not a tensor", tied))
            continue
        kept = _KEPT.search(name)
        why = first.copied.get(name) or ("not a floating dtype" if not averaged(e.dtype) else
                                         f"kept per checkpoint ({kept.group(2)})" if kept else why_not(name))
        if why:
            items.append(Item(name, "copy", e.dtype, e.dtype, e.shape, e.nbytes, why, tied))
            read += e.nbytes
            written += e.nbytes
            continue
        out = e.dtype if dtype == "same" else dtype
        nbytes = math.prod(e.shape) * ITEMSIZE[out]
        items.append(Item(name, "average", e.dtype, out, e.shape, nbytes, "", tied))
        read += e.nbytes * (len(sources) if readers is None else readers)
        written += nbytes
    if not any(it.action == "average" for it in items):
        raise MergeError("nothing to average: no floating tensor of the inputs is selected (check only= / exclude=)")
    if options.stochastic_rounding and not any(it.action == "average" and it.out_dtype == "bfloat16" for it in items):
        raise MergeError("stochastic_rounding rounds bfloat16 outputs, and no averaged tensor is written as bfloat16 "
                         "here: drop it, or pass dtype='bfloat16'")
    style = options.weights
    if options.seed and not options.stochastic_rounding and not (
            isinstance(style, str) and style.strip().partition("__")[2] == "scramble"):
        raise MergeError(f"seed={options.seed} seeds stochastic_rounding and __scramble weights, and this merge has "
                         f"neither: drop it")
    if options.optimizer and not any(it.why == "optimizer state" for it in items):
        raise MergeError("optimizer=True keeps the optimizer state of torch inputs, and these inputs hold none: "
                         "no optimizer tensor (an optimizer's param_groups are no tensors, which the output "
                         "does not hold): drop it")
    return Plan(items, src_index, read, written)


def _ties(src) -> dict:
    """alias -> the first name of the tensors sharing its storage (in the file's order)."""
    first_of: dict = {}
    aliases = {}
    for name, e in src.entries.items():
        if e.storage is None:
            continue
        if e.storage in first_of:
            aliases[name] = first_of[e.storage]
        else:
            first_of[e.storage] = name
    return aliases


def _tied(src, a: str, b: str) -> bool:
    """``a`` and ``b`` share storage in ``src`` (a file that records none, safetensors, ties nothing)."""
    ea, eb = src.entries.get(a), src.entries.get(b)
    return ea is not None and eb is not None and ea.storage is not None and ea.storage == eb.storage


def _check_ties(one, aliases: dict, other) -> None:
    """MergeError when ``one`` ties an alias to a tensor (``aliases``) that ``other`` stores apart:
    averaging it once would drop ``other``'s alias unread, apart it would read ``one``'s twice, and
    which of the two happened depended on the inputs' order."""
    for alias, to in aliases.items():
        if alias in other.entries and to in other.entries and not _tied(other, alias, to):
            raise MergeError(f"tensor {alias!r}: {other.label} stores it apart from {to!r}, which {one.label} ties "
                             f"to it (shared storage); merge checkpoints of one model (a safetensors file cannot "
                             f"record ties: save it without {alias!r} if they are one tensor)")


def _check_against_first(first, other, aliases: dict) -> None:
    ref = first.label
    theirs = _ties(other)
    names = [n for n in first.entries if n not in aliases]
    mine = {n for n in first.entries if n not in aliases}
    _check_ties(first, aliases, other)                # a tie in either input, stored apart in the other
    _check_ties(other, theirs, first)
    missing = [n for n in names if n not in other.entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MergeError(f"tensor {missing[0]!r}{more} of {ref} is missing from {other.label}; merge checkpoints of "
                         f"one model (or select tensors with only= / exclude=)")
    extra = [n for n in other.entries if n not in mine and n not in aliases and n not in theirs]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MergeError(f"tensor {extra[0]!r}{more} of {other.label} is not in {ref}; merge checkpoints of one "
                         f"model")
    for n in names:
        a, b = first.entries[n], other.entries[n]
        if (a.dtype == OBJECT) != (b.dtype == OBJECT):
            raise MergeError(f"{n!r} is a {'tensor' if b.dtype != OBJECT else 'non-tensor entry'} in {other.label} "
                             f"but not in {ref}")
        if a.dtype == OBJECT:
            continue
        if tuple(a.shape) != tuple(b.shape):
            raise MergeError(f"tensor {n!r} has shape {list(b.shape)} in {other.label} but {list(a.shape)} in {ref}; "
                             f"merge checkpoints of one model")
        if a.dtype != b.dtype:
            raise MergeError(f"tensor {n!r} is {b.dtype} in {other.label} but {a.dtype} in {ref}; convert the "
                             f"checkpoints to one dtype first (dtype= sets only the output's)")


def shards(plan: Plan, layout: dict | None, max_shard_bytes: int) -> list:
    """``[(file name, [item names])]`` of a folder output: the ``copy_from`` input's shards when it
    is a Hugging Face folder (``layout``: tensor -> file), else ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a larger tensor
    alone)."""
    names = [it for it in plan.items if it.action != "object"]
    if layout is not None and all(it.name in layout for it in names):
        files: dict = {}
        for it in names:
            files.setdefault(layout[it.name], []).append(it.name)
        return list(files.items())
    groups: list = [[]]
    size = 0
    for it in names:
        if groups[-1] and size + it.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(it.name)
        size += it.nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
