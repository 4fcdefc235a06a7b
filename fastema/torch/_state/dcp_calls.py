"""How an attached average tells DCP's calls from the optimizer's own (``docs/guides/attach.md``,
"How attach() tells DCP's calls").

DCP's ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``, ``set_state_dict``,
``get_optimizer_state_dict``, ``set_optimizer_state_dict``, and so ``dcp.save`` / ``dcp.load`` /
``dcp.async_save`` of what they return) reaches the optimizer through its ordinary methods:
``optimizer.step()`` at lr 0 on an optimizer with no state (its dummy step, no update),
``optimizer.state_dict()`` (of which it keeps ``state`` and ``param_groups`` only: the average must
go into the per-parameter entries) and ``optimizer.load_state_dict()``. The hooks cannot tell those
from a trainer's calls by their arguments, so they look for the private function of DCP that makes
each a few frames up: :data:`CONTRACT` is the one table of what that relies on (each function's
parameters by name; the ``info`` class's ``full_state_dict``), written against torch 2.13.

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

__all__ = ["CONTRACT", "MODULE", "TESTED", "DCPContractBroken", "called_by", "check", "frame",
           "verified"]

MODULE = "torch.distributed.checkpoint.state_dict"
TESTED = "2.13"            # the torch the table was written against (test_attach_dcp_calls.py)
#: what the detection relies on: a name in :data:`MODULE` -> (the parameters a function must take,
#: or the fields a dataclass must have, by name; what fastema tells by it)
CONTRACT: dict[str, tuple[tuple[str, ...], str]] = {
    "_init_optim_state": (("optim",), "DCP's lr-0 dummy step (not an update)"),
    "_get_optim_state_dict": (("optimizers", "info"),
                              "get_state_dict / get_optimizer_state_dict (the average goes into "
                              "the per-parameter entries)"),
    "_load_optim_state_dict": (("optimizers", "state_dict", "info"),
                               "set_state_dict / set_optimizer_state_dict (the live keys a "
                               "flattened load rebuilds from)"),
    "_StateDictInfo": (("full_state_dict",), "full_state_dict=True (refused for a split average)"),
}
DEPTH = 14                 # frames looked through: the hook's, torch's wrappers, DCP's caller
_SEEN: list = []           # [(module, {function name: its code})]: the module checked last


class DCPContractBroken(RuntimeError):
    """torch's DCP no longer has what :data:`CONTRACT` names: an attached average cannot tell its
    calls (the message names the torch version and what to do)."""


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
            f"is guessed. Use the torch fastema was tested with ({TESTED}) or a fastema that supports "
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


def frame(what: str, module: ModuleType | None = None) -> FrameType | None:
    """The frame of DCP's ``what`` (a function of :data:`CONTRACT`) within :data:`DEPTH` frames
    up, or None (also where DCP is not imported). ``module``: DCP's module (default: the loaded
    one); :class:`DCPContractBroken` where it does not hold the contract."""
    module = module if module is not None else sys.modules.get(MODULE)
    if module is None:
        return None
    code = verified(module)[what]
    at: FrameType | None = sys._getframe(1)
    for _ in range(DEPTH):
        if at is None:
            return None
        if at.f_code is code:
            return at
        at = at.f_back
    return None


def called_by(what: str = "_init_optim_state", module: ModuleType | None = None) -> bool:
    """Whether DCP's ``what`` is running a few frames up (:func:`frame`)."""
    return frame(what, module) is not None
