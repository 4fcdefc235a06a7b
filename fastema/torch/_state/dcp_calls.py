"""How an attached average tells DCP's calls from the optimizer's own (``docs/guides/attach.md``,
"How attach() tells DCP's calls"): the one module of ``fastema/torch/`` that reads the stack.

DCP's ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``, ``set_state_dict``,
``get_optimizer_state_dict``, ``set_optimizer_state_dict``, and so ``dcp.save`` / ``dcp.load`` /
``dcp.async_save`` of what they return) reaches the optimizer through its ordinary methods:
``optimizer.step()`` at lr 0 on an optimizer with no state (its dummy step, no update),
``optimizer.state_dict()`` (of which it keeps ``state`` and ``param_groups`` only: the average must
go into the per-parameter entries) and ``optimizer.load_state_dict()``. The hooks cannot tell those
from a trainer's calls by their arguments, so they ask :func:`context`: the private function of
DCP that makes the call, found on the stack. :data:`CONTRACT` is the table of what that relies on
(each function's parameters by name; the ``info`` class ``_StateDictInfo``'s ``full_state_dict``),
drawn from
fastema's one table of third-party private names (:mod:`fastema._privates`, with the torch
versions checked).

One walk per hook call, to the stack's end: any number of frames may stand between DCP and the
hook (user decorators, an LR scheduler's wrapper of ``step``, a profiler, accelerate's wrapper,
``torch.compile``'s runtime). The innermost of DCP's functions is the caller. Its one local read
is ``info`` of ``_get_optim_state_dict`` and ``_load_optim_state_dict`` (their parameter in the
table; read only when asked: a split average refuses ``full_state_dict=True``, and a torch before
2.13 a sharded average's ``broadcast_from_rank0`` load), here and nowhere else.

The table is checked against the loaded module the first time a hook finds DCP loaded (and at
``attach()`` where it is loaded already): where torch moved, renamed or changed one of them, the
hook raises :class:`DCPContractBroken`, naming the torch version and what to do, rather than let
an attached average be dropped from a DCP checkpoint or DCP's dummy step count as an update. The
check is made once per loaded module (:func:`verified`). Nothing of torch's is replaced or
wrapped: the module only reads.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from types import CodeType, FrameType, ModuleType
from typing import Any

import torch

from ... import _privates

__all__ = ["CONTRACT", "GET", "INIT", "LOAD", "LOADER", "MODULE", "TESTED", "DCPContractBroken",
           "DcpCall", "check", "context", "loaded", "loading", "verified"]

MODULE = "torch.distributed.checkpoint.state_dict"
INIT, GET, LOAD = "_init_optim_state", "_get_optim_state_dict", "_load_optim_state_dict"
TESTED = _privates.checked(MODULE)   # the torch versions the table was checked against
#: what the detection relies on: a name in :data:`MODULE` -> (the parameters a function must take,
#: or the fields a dataclass must have, by name; what fastema tells by it)
CONTRACT: dict[str, tuple[tuple[str, ...], str]] = _privates.contract(MODULE)
_SEEN: list = []           # [(module, {function name: its code})]: the module checked last (verified)


class DCPContractBroken(RuntimeError):
    """torch's DCP no longer has what :data:`CONTRACT` names: an attached average cannot tell its
    calls (the message names the torch version and what to do)."""


@dataclasses.dataclass(frozen=True)
class DcpCall:
    """DCP's function that made the optimizer call a hook is in (the innermost on the stack)."""

    function: str             # a function of CONTRACT: INIT, GET or LOAD
    full_state_dict: bool     # GET's ``info.full_state_dict`` (read where asked; else False)
    broadcast_from_rank0: bool = False    # LOAD's ``info.broadcast_from_rank0`` (read where asked)


def check(module: ModuleType) -> dict[str, CodeType]:
    """``{function name: its own code}`` of :data:`CONTRACT`'s functions in ``module`` (DCP's
    ``state_dict`` module, or a stand-in), under their decorators (``@torch.no_grad()``'s wrapper
    is shared by every function it decorates: its code would match any of them); raises
    :class:`DCPContractBroken` naming every name that is gone or changed, and torch's version."""
    codes: dict[str, CodeType] = {}
    broken = []
    for name, (wanted, told) in CONTRACT.items():
        obj = getattr(module, name, None)
        found = _names(obj)
        if found is None or not set(wanted) <= set(found[0]):
            if found is not None:
                had = f"takes ({', '.join(found[0])})"
            else:
                had = "is gone" if obj is None else f"is of type {type(obj).__name__}, not a function"
            broken.append(f"{name}({', '.join(wanted)}) for {told}: it {had}")
        elif found[1] is not None:
            codes[name] = found[1]
    if broken:
        raise DCPContractBroken(
            f"fastema's attach() tells DCP's calls by {MODULE}'s private functions, and torch "
            f"{torch.__version__} changed them: {'; '.join(broken)}. The attached average would be "
            f"dropped from DCP's checkpoints or DCP's dummy step counted as an update, so nothing "
            f"is guessed. Use a torch fastema was checked with ({TESTED}) or a fastema that supports "
            f"this torch; or detach() the average, call ema.update() after each optimizer.step() "
            f"and save ema.state_dict() beside the optimizer's (dcp.save({{'ema': ema, ...}}))")
    return codes


def _names(obj: Any) -> tuple[list[str], CodeType | None] | None:
    """A function's parameter names and own code, a dataclass's field names (no code), or None."""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)], None
    code = getattr(inspect.unwrap(obj), "__code__", None) if callable(obj) else None
    if not isinstance(code, CodeType):
        return None
    return list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]), code


def verified(module: ModuleType) -> dict[str, CodeType]:
    """:func:`check` of ``module``, made once while it stays the module checked last."""
    if not _SEEN or _SEEN[0][0] is not module:
        codes = check(module)               # raises: nothing is kept, the next call checks again
        _SEEN[:] = [(module, codes)]
    return _SEEN[0][1]


def loaded() -> ModuleType | None:
    """DCP's ``state_dict`` module where it is imported (else DCP cannot be calling), checked."""
    module = sys.modules.get(MODULE)
    if module is not None:
        verified(module)
    return module


LOADER = "torch.distributed.checkpoint.state_dict_loader"    # dcp.load's module (public)


def loading() -> bool:
    """Whether DCP's loader (``dcp.load``, in :data:`LOADER`) makes the calling ``state_dict()``
    call: the template it fills, whose every key the checkpoint must hold. The stack walked once
    (each frame's module name), no local read."""
    if LOADER not in sys.modules:
        return False
    at: FrameType | None = sys._getframe(1)
    try:
        while at is not None:
            if at.f_globals.get("__name__") == LOADER:
                return True
            at = at.f_back
        return False
    finally:
        del at


def context(module: ModuleType | None = None, *, info: bool = False) -> DcpCall | None:
    """The DCP call the calling hook runs in: the innermost frame of a :data:`CONTRACT` function
    on this thread's stack, walked once to its end; None where there is none (also where DCP is
    not imported). ``info``: read ``full_state_dict`` off a GET frame's ``info``,
    ``broadcast_from_rank0`` off a LOAD frame's. ``module``:
    DCP's module (default: the loaded one); :class:`DCPContractBroken` where it does not hold
    the contract."""
    module = module if module is not None else sys.modules.get(MODULE)
    if module is None:
        return None
    codes = verified(module)
    by_code = {code: name for name, code in codes.items()}
    at: FrameType | None = sys._getframe(1)
    try:
        while at is not None:
            name = by_code.get(at.f_code)
            if name is not None:
                got = at.f_locals.get("info") if info else None
                full = name == GET and bool(getattr(got, "full_state_dict", False))
                return DcpCall(name, full, name == LOAD and bool(getattr(got, "broadcast_from_rank0", False)))
            at = at.f_back
        return None
    finally:
        del at                              # no frame kept alive by this one
