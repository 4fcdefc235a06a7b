"""The op table: every kernel family's arguments, written once.

An op's arguments are of two sorts. Its *fixed* ones are bound when a launch is prepared
(``group.launch(op, **fixed)``, :func:`fastema._launch.prepare`); its *varying* ones are what
``run(*varying)`` takes at each call, in that order. :data:`OPS` spells both per op; from it come
:data:`VARYING`, the table below (appended to this docstring at import), both targets' ``PREPARE``
tables' keyword signatures (held to it by ``tests/launch/test_op_table.py``) and the variant
enumeration (:mod:`.shipped.variants`, which calls every op by these names). ``made``: keywords
:func:`fastema._launch.prepare` adds itself (the kernel's arithmetic type of host weights), never
given by a caller. Defaults are the keyword defaults of the prepare functions and of a launch.

The kernels' math and their arguments are documented in :mod:`fastema.kernels.cpu`.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

REQUIRED = inspect.Parameter.empty       # no default


class Op(NamedTuple):
    """One kernel family's arguments (see the module docstring)."""
    fixed: tuple[str, ...]          # bound when prepared, in the prepare functions' order
    varying: tuple[str, ...]        # given at each call, in this order
    defaults: dict                  # keyword -> default (fixed and varying); the others are required
    about: str                      # the docstring table's words
    made: tuple[str, ...] = ()      # keywords prepare() adds (not a caller's)


_PLAN = ("state", "params", "decays", "w32", "w64", "flag", "keys")

OPS: dict[str, Op] = {
    "lerp": Op(("flag", "stochastic"), ("weights", "key"), {"flag": None, "stochastic": False, "key": 0},
               "``weights`` (tuple or float32[K] device array), ``flag=None``, ``key=0`` (an int, or an "
               "int64[1] device array), ``stochastic=False``", made=("cast",)),
    "plan_lerp": Op((*_PLAN, "done", "gi", "stochastic"), ("given",), {"stochastic": False},
                    "one ``update()`` of a model EMA with its plan on the device, in one launch: the plan "
                    "arrays (``state``, ``params``, ``decays``, ``w32``, ``w64``, ``flag``, ``keys``; ``done``: "
                    "an int32[1] zero the CUDA kernel counts its finished blocks in), ``gi`` (the group's "
                    "number), ``stochastic``; ``given`` (the training step, -1 for the update count). The group "
                    "must have elements; at most ``PLAN_KEYS_MAX`` groups and ``MAX_ROWS`` rows"),
    "bema": Op(("flag",), ("alpha",), {"flag": None},
               "``alpha`` (a host number), ``flag=None`` (3-row shadows: BEMA's output "
               "``row0 <- row1 + alpha * (row0 - row2)``)"),
    "plan": Op(_PLAN, ("given",), {},
               "the plan arrays (as ``plan_lerp``'s) and ``given``: a model EMA's plan step alone "
               "(``kernels._stats.plan_step``), where no lerp launch carries it"),
    "copy": Op(("to_shadow", "row_lo", "row_hi", "flag"), (), {"flag": None},
               "``to_shadow``, ``row_lo``, ``row_hi``, ``flag=None``"),
    "swap": Op(("mode", "row"), (), {}, "``mode`` (``kinds.EXCHANGE/PACK/UNPACK``), ``row``"),
    "nonfinite": Op(("flag",), (), {}, "``flag`` (set where a source holds inf or NaN)"),
    "window": Op(("ring_kind",), ("ring_addr", "slot", "full", "count", "recompute"), {},
                 "``ring_kind``, ``ring_addr``, ``slot``, ``full``, ``count``, ``recompute``"),
    "streams": Op(("parts", "skip", "weighted"),
                  ("values", "w0", "c", "per_stream", "mode", "d", "ab", "ring_v", "sc", "n", "ring_w", "wsc", "bad",
                   "slot", "filled", "widen"), {},
                  "a smoother's update of K metric streams in one launch (``kernels.cpu.streams_kernel``): "
                  "``values``, ``w0``, ``c``, ``per_stream``, ``mode``, ``d``, the state (``ab``, ``ring_v``, "
                  "``sc``, ``n``; weighted: ``ring_w``, ``wsc``, ``bad``), ``slot``, ``filled``, ``widen``; "
                  "``parts``, ``skip``, ``weighted``"),
}
"""``op -> Op``: every kernel family a launch group can prepare."""

VARYING: dict[str, tuple[str, ...]] = {name: op.varying for name, op in OPS.items()}
"""Per op, the arguments a prepared launch takes at each call, in that order."""


class Spec(NamedTuple):
    """What an owner asks its launch group for, made once (``fastema._launch.spec``) and asked for
    at each step (``group.launch_of(spec)``): the key of the group's launch itself."""
    op: str                         # a name of :data:`OPS`
    fixed: tuple                    # ``(name, value)`` of each fixed argument given; an array by identity


class Kernel:
    """The base of every prepared launch of both targets (``cpu.launch``: ``CpuLerp``,
    ``CpuLaunch``, ``CpuStreams``; ``cuda.launch``: ``CudaKernel``, the base of ``CudaLerp`` and
    ``CudaLaunch``): ``run(*varying)`` takes the op's :data:`VARYING` arguments at each call,
    ``run.once(*varying)`` launches for one call only (``fastema._launch.Launch``). It holds
    nothing: each target keeps what its launches bind."""

    __slots__ = ()


def signature(name: str) -> dict:
    """``keyword -> default`` (:data:`REQUIRED`: none) of op ``name``'s prepare functions: its fixed
    arguments and what :func:`fastema._launch.prepare` adds (``made``)."""
    op = OPS[name]
    return {k: op.defaults.get(k, REQUIRED) for k in (*op.fixed, *op.made)}


def table() -> str:
    """The reST table of the ops and their keyword arguments (fixed, then varying)."""
    width = max(map(len, OPS)) + 6            # ``"name"``
    rule = "=" * width + "  " + "=" * 70
    rows = [rule, "op".ljust(width) + "  keyword arguments", rule]
    for name, op in OPS.items():
        rows.append(f"``{name!r}``".replace("'", '"').ljust(width) + "  " + op.about)
    return "\n".join([*rows, rule])


__doc__ = (__doc__ or "") + "\n" + table() + "\n"
