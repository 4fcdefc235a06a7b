"""What ``ema.attach(optimizer)`` refuses (``docs/guides/attach.md``, "What is refused"; among it an
optimizer whose state dicts bypass torch's, :func:`bypasses`): checked at
``attach()`` before any hook is registered, again at the first step after the model's
registrations changed (:func:`missed`), and torch's own refusal of a load made before the average
is checked (:func:`check_groups`)."""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch

from ... import _privates
from . import attached as _params
from . import dcp_calls as _dcp
from .attached import Attachable

__all__ = ["KEY", "bypasses", "check", "check_groups", "has_hooks", "hooked", "missed", "overrides",
           "skip_refusal"]

KEY = "fastema"                     # the optimizer state dict's top-level key of the average


def has_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has torch's optimizer hooks (its ``__init__`` ran
    ``torch.optim.Optimizer``'s): what ``attach()`` registers on."""
    return hasattr(optimizer, _privates.attribute("torch.optim.optimizer:Optimizer",
                                                  "_optimizer_step_post_hooks"))


def hooked(optimizer: Any) -> Any:
    """The optimizer whose hooks run: a wrapper that subclasses ``torch.optim.Optimizer`` without
    running its ``__init__`` (so without hooks of its own) and forwards ``step``, ``state_dict``
    and ``load_state_dict`` to the optimizer it holds as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, what ``accelerator.prepare`` returns) is attached through that one."""
    inner = getattr(optimizer, "optimizer", None)
    while (isinstance(optimizer, torch.optim.Optimizer) and not has_hooks(optimizer)
           and isinstance(inner, torch.optim.Optimizer)):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def check(kind: str, face: Attachable, optimizer: Any, sources: list, attached: Any) -> None:
    """Refuse what an attachment cannot carry, before any hook is registered (``attached``:
    optimizer -> its attachment)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not has_hooks(optimizer):
        raise TypeError(f"this {type(optimizer).__name__} has no optimizer hooks (its __init__ did "
                        f"not run torch.optim.Optimizer's): attach() the torch optimizer it wraps")
    _refuse_bypass(kind, optimizer)
    other = attached.get(optimizer)
    if other is not None:
        raise ValueError(f"this optimizer already carries an attached {other.kind}: one average "
                         f"per optimizer (its state dict holds one under {KEY!r}); detach() it "
                         f"first")
    _refuse_fsdp1(kind, optimizer, sources)
    why = _params.refusal(face) if face.sharded else None
    if why is not None:
        raise ValueError(f"attach() does not take a sharded {kind} {why}: its optimizer entries "
                         f"are DTensors of the parameters' layout (FSDP2, HSDP, tensor parallel). "
                         f"Save it beside the optimizer: dcp.save({{'ema': ema, ...}})")
    if face.source != "parameters":
        raise ValueError(f"attach() takes a {kind} of the model's parameters, not of {face.source}")
    if face.sharded:                     # its sources are the local shards: the parameters by name
        sources = list(_params.tracked(face).values())
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not stepped.intersection(map(id, sources)):
        raise ValueError(f"the optimizer steps none of the tensors this {kind} averages: attach "
                         f"it to the optimizer of its model")
    missed(kind, face, optimizer, "")
    _refuse_dropping(kind, face, optimizer)


def missed(kind: str, face: Attachable, optimizer: Any, when: str) -> None:
    """attach()'s rule, checked at attach and at the first step after the model's registrations
    changed: every trainable parameter the average tracks is stepped by this optimizer."""
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missed = [n for n, p in _params.tracked(face).items()
              if p.requires_grad and id(p) not in stepped]
    if missed:
        cls = RuntimeError if when else ValueError
        raise cls(f"the model's trainable parameters {missed[:5]} are averaged by this {kind} "
                  f"but not stepped by this optimizer{' ' + when if when else ''}: they would be "
                  f"read at its steps only{'; nothing was stepped' if when else ''}. Make one "
                  f"average per optimizer, of the part it steps (EMA(part)), or exclude= them, "
                  f"or freeze them{', or add them to the optimizer' if when else ''}")


_STATE_DICTS = ("state_dict", "load_state_dict")


def bypasses(cls: type) -> dict[str, type]:
    """``{method: the class whose override of it never reaches torch.optim.Optimizer's}`` for
    ``state_dict`` and ``load_state_dict`` (empty: both run torch's, and so its hooks). An
    override reaches the base where its code calls ``super().<method>`` (or names a base class
    and the method), and the next override up the MRO does too; an override that makes its own
    form (torchtitan's ``OptimizersContainer``: DCP's getter of each optimizer it holds, flat,
    FQN-keyed) never runs the hooks ``attach()`` registers."""
    out = {}
    for method in _STATE_DICTS:
        mro = cls.__mro__
        at = 0
        while True:
            owner = next((k for k in mro[at:] if method in vars(k)), None)
            if owner is None or owner is torch.optim.Optimizer:
                break
            names = _names_in(vars(owner)[method])
            bases = {k.__name__ for k in mro[mro.index(owner) + 1:]}
            if method not in names or not ({"super"} | bases) & names:
                out[method] = owner
                break
            at = mro.index(owner) + 1
    return out


def _names_in(fn: Any) -> set:
    """The global and attribute names a function's code (nested code too) reads."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
    names: set = set()
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


def _refuse_bypass(kind: str, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer whose ``state_dict`` / ``load_state_dict`` bypass torch's (and so the hooks
    ``attach()`` registers): its checkpoints would hold no average, and a resume would start it
    over without a word (issue 79). Refused by name, with what to use."""
    found = bypasses(type(optimizer))
    if not found:
        return
    cls = type(optimizer)
    what = " and ".join(f"{m}() (in {k.__module__}.{k.__qualname__})" for m, k in found.items())
    titan = cls.__module__.split(".")[0] == "torchtitan"
    use = ("use fastema.torchtitan.EMA, which registers the average where torchtitan's "
           "CheckpointManager saves state" if titan else
           "attach the average to each torch optimizer it holds (one average per optimizer, of "
           "the part it steps), or keep the average beside it (ema.update() after each step, "
           "ema.state_dict() saved with the checkpoint; dcp.save({'ema': ema, ...})); for "
           "torchtitan's OptimizersContainer, fastema.torchtitan.EMA")
    raise TypeError(f"attach() does not take this {cls.__name__}: its {what} "
                    f"{'does' if len(found) == 1 else 'do'} not run torch.optim.Optimizer's, so "
                    f"the state-dict hooks that carry the attached {kind} would never run: its "
                    f"checkpoints would hold no average and a resume would start the average over "
                    f"without a word. Nothing was attached; {use}")


def overrides(optimizer: torch.optim.Optimizer) -> list:
    """The overrides of ``state_dict`` that run before torch.optim.Optimizer's, none of torch's own:
    the instance's, then each class's below torch.optim.Optimizer in the MRO. Where there is none,
    torch's returns what the hooks return, and the post-hook ``attach()`` registers last puts the
    average in it."""
    mro = type(optimizer).__mro__
    below = mro[:mro.index(torch.optim.Optimizer)] if torch.optim.Optimizer in mro else mro
    found = [k for k in below if "state_dict" in vars(k) and k.__module__.split(".")[0] != "torch"]
    return (["the instance's"] if "state_dict" in vars(optimizer) else []) + found


_PROBE = {"fastema: attach()'s check": True}   # stands for the average in the one state_dict() call


def _refuse_dropping(kind: str, face: Attachable, optimizer: torch.optim.Optimizer) -> None:
    """An override of ``state_dict`` that runs torch's (and so the hooks) but drops the entry the
    average rides (``{"state": ..., "param_groups": ...}`` of ``super().state_dict()``): its
    checkpoints would hold no average, and a resume would start it over with one warning. Checked
    by one ``optimizer.state_dict()`` with a stand-in of a few bytes where the average goes (the
    top-level key, or for a sharded average the per-parameter entries): no tensor of the average
    copied, nothing gathered, the optimizer's state untouched; only where an override outside
    torch runs (torch's own keep every entry: ``ZeroRedundancyOptimizer``'s, which needs a
    collective ``consolidate_state_dict()`` first, is never called)."""
    found = overrides(optimizer)
    if not found:
        return
    per_param = face.sharded and not face.split
    placed: list = []

    def probe(opt: Any, state_dict: dict) -> dict:
        if not per_param:
            placed.append(KEY)
            return {**state_dict, KEY: _PROBE}
        return _params.probed(KEY, face, opt, state_dict, _PROBE, placed)

    k = found[0]
    owner = k if isinstance(k, str) else f"in {k.__module__}.{k.__qualname__}"
    handle = optimizer.register_state_dict_post_hook(probe)
    try:
        out = optimizer.state_dict()
    except Exception as err:     # the override's own failure (a state not consolidated yet, ...)
        raise RuntimeError(
            f"attach() calls this {type(optimizer).__name__}'s state_dict() ({owner}) once, to "
            f"check that it keeps the entry the attached {kind} rides, and it raised "
            f"{type(err).__name__}: {str(err)[:300]}. Nothing was attached; attach where its "
            f"state_dict() works (after its consolidate_state_dict() on every rank, for a "
            f"ZeroRedundancyOptimizer subclass), or keep the average beside the optimizer") from err
    finally:
        handle.remove()
    if not placed or _kept(out, per_param):
        return                     # (no trainable parameter to ride: the save itself says so)
    where = ("per-parameter 'state' entries that carry" if per_param else
             f"top-level {KEY!r} entry that carries")
    keeps = f"keys {sorted(map(str, out))[:6]}" if isinstance(out, dict) else type(out).__name__
    raise TypeError(
        f"attach() does not take this {type(optimizer).__name__}: its state_dict() ({owner}) "
        f"runs torch.optim.Optimizer's but drops the {where} the attached {kind} "
        f"(it returns {keeps}), so its checkpoints would hold no average and a resume would "
        f"start the average over. Nothing was attached; return every entry of "
        f"super().state_dict() (add yours to it), or keep the average beside the optimizer "
        f"(ema.update() after each step, ema.state_dict() saved with the checkpoint)")


def _kept(out: Any, per_param: bool) -> bool:
    """Whether ``state_dict()``'s output still holds the stand-in where the average goes."""
    if not isinstance(out, dict):
        return False
    if not per_param:
        return out.get(KEY) == _PROBE
    state = out.get("state")
    return isinstance(state, dict) and any(
        isinstance(v, dict) and v.get(KEY) == _PROBE for v in state.values())


def _refuse_fsdp1(kind: str, optimizer: torch.optim.Optimizer, sources: list) -> None:
    """An average made before its model was wrapped by FSDP1 (``EMA(FSDP1(model))`` is refused
    when it is made): its tensors, or the optimizer's, are FSDP1's flat-parameter pieces."""
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    flag = _privates.attribute("torch.distributed.fsdp._common_utils", "_fsdp_flattened")
    if any(getattr(t, flag, False) for t in (*sources, *stepped)):
        raise TypeError(f"attach() does not take this {kind}: its model (or the optimizer's) is "
                        f"wrapped by FSDP1 (FullyShardedDataParallel): its parameters are "
                        f"rank-dependent pieces of flat parameters, which fastema cannot average "
                        f"(its first step would raise, after the optimizer's). Shard the model "
                        f"with FSDP2 (torch.distributed.fsdp.fully_shard): its average is sharded "
                        f"as its parameters are, and attach() carries it through DCP")


BROADCAST_FIXED = (2, 13)     # the first torch whose DCP broadcasts a non-contiguous tensor right


def check_broadcast(entry: dict | None) -> None:
    """Refuse, on a torch before :data:`BROADCAST_FIXED`, a DCP load with ``broadcast_from_rank0=True``
    of an entry holding a sharded stack of two rows or more (several decays, a window's ring): DCP
    gathers it cut from its padding (not contiguous), and torch 2.12's broadcast (2.10-2.11's too)
    sends that memory as if it were contiguous, so the other ranks' rows land shifted (seen on
    2.12.1; ``docs/install.md``, "Which framework release"). Every rank holds the same entry after
    the broadcast: each refuses alike, before anything is written."""
    from ... import _floors

    found = _floors.release(torch.__version__)
    if entry is None or found is None or found >= BROADCAST_FIXED:
        return
    rows = [v.shape[0] for part in ("averaged", "ring") if isinstance(entry.get(part), dict)
            for v in entry[part].values() if hasattr(v, "full_tensor") and v.dim() >= 2 and v.shape[0] > 1]
    call = _dcp.context(info=True) if rows else None
    if call is not None and call.broadcast_from_rank0:
        raise ValueError(f"a DCP load with broadcast_from_rank0=True of this sharded average of "
                         f"{rows[0]} rows comes back wrong on torch {torch.__version__} (its "
                         f"broadcast sends the gathered average, which is not contiguous, as if it "
                         f"were): nothing was loaded. Load with broadcast_from_rank0=False (every "
                         f"rank reads the file), or upgrade torch (pip install -U 'torch>=2.13')")


def check_groups(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """The refusal ``Optimizer.load_state_dict`` makes itself, made before the average is loaded."""
    saved = state_dict.get("param_groups")
    groups = optimizer.param_groups
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                         "of optimizer's group")


def skip_refusal(skipping: Callable | None, core: Any, shadow: Any) -> str | None:
    """Why a face cannot take GradScaler's ``found_inf`` as a device-side skip flag, or None."""
    if core is None or skipping is None:
        return "its update takes no device-side skip flag"
    if core.device_plan is not None:
        return "device_step=True: its plan steps on the device; make it with device_step=False"
    if shadow.host_plan_only:
        return "its folds run on a host thread (offload)"
    if core.plan.debias or core.options.is_bema:
        return "debias or BEMA: its normalisers would count a skipped step"
    return None
