"""Which of a model's tensors a torch model average reads: the face's arguments
(:class:`Selection`), PEFT models (:func:`is_peft_model`, :func:`resolve_trainable_only`: only the
trainable parameters by default), the selection itself (:func:`select`: averaged, copied, integer
buffers, local shards) and the options' text (:data:`SELECTION_DOCS`), for
:class:`~fastema.torch._tensors.model.TorchModel`."""
from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..._backends.torch import refuse_foreign as _refuse_foreign_torch
from .._sharding import params as _sharded
from .hooks import any_matches, names_of, unwrap
from .slots import storage_key

__all__ = ["SELECTION_DOCS", "Selection", "frozen", "is_peft_model", "resolve_trainable_only",
           "select"]


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (bare or DDP- / torch.compile-wrapped) and for any model with
    adapters in a ``peft_config`` dict (transformers models after ``add_adapter`` /
    ``load_adapter``). Does not import peft."""
    inner = unwrap(model)
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(inner, getattr(peft, "PeftModel", ())):
        return True
    config = getattr(inner, "peft_config", None)
    return isinstance(config, dict) and bool(config)


def resolve_trainable_only(model: nn.Module, trainable_only: bool | None) -> tuple[bool, bool]:
    """``(trainable_only, defaulted)``: ``None`` means True for a PEFT model (``defaulted`` is
    then True: the average says so once it is made), False for any other model."""
    if trainable_only is None:
        peft = is_peft_model(model)
        return peft, peft
    if not isinstance(trainable_only, bool):
        raise TypeError("trainable_only must be True, False or None (True for PEFT models), got "
                        f"{trainable_only!r}")
    return trainable_only, False


class Selection(NamedTuple):
    """What a model average reads of a model: the face's arguments (see
    :class:`fastema.torch.EMA`)."""

    buffers: str = "copy"                        # floating buffers: "copy", "average" or "ignore"
    exclude: Sequence[str] = ()                  # name patterns left out
    copy: Sequence[str] = ()                     # name patterns copied instead of averaged
    trainable_only: bool | None = None           # None: True for a PEFT model


def frozen(model: nn.Module, kind: str, name: str, t: torch.Tensor) -> bool:
    """What ``trainable_only=True`` leaves out: a parameter with ``requires_grad=False``, a buffer
    of a module with no trainable parameter of its own (a frozen base model's statistics)."""
    if kind == "parameter":
        return not t.requires_grad
    prefix = name.rpartition(".")[0]
    owner = model.get_submodule(prefix) if prefix else model
    return not any(p is not None and p.requires_grad for p in owner._parameters.values())


def select(model: nn.Module, exclude: tuple, copy: tuple, buffers: str, trainable_only: bool,
           specs: dict, int_buffers: dict) -> tuple[dict, dict]:
    """``(averaged, copied)``: ``name -> tensor`` of what a model average reads of ``model`` (its
    ``exclude`` and ``copy`` patterns, ``buffers``, ``trainable_only``): local shards of sharded
    tensors (their layouts into ``specs``); integer and complex-copied tensors go to
    ``int_buffers`` (``name -> (the model's, a copy)``)."""
    averaged, copied = {}, {}
    wrapped = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module." in n]
    if wrapped:
        raise TypeError("the model is wrapped by FSDP1 (FullyShardedDataParallel; "
                        f"{wrapped[0]!r}): its parameters are rank-dependent pieces of flat "
                        "parameters. Use FSDP2 (torch.distributed.fsdp.fully_shard), or make "
                        "the EMA of an unwrapped copy of the model. Nothing was written.")
    # a tie's every name selects it (a pattern that matches no name is taken: it may name tensors added later)
    names = names_of(model)
    # storage key -> first name: a tie or alias is averaged once
    seen: dict = {}
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            every = names.get(id(t), [name])       # (read before a shard stands for t)
            if any_matches(every, exclude) or (trainable_only and frozen(model, kind, name, t)):
                continue
            # FSDP2 / tensor parallel / ZeRO-3: this rank's local shard
            if _sharded.is_sharded(t):
                t, specs[name] = _sharded.local(t, f"{kind} {name!r}")
            _refuse_foreign_torch(t, f"{kind} {name!r}")   # lazy, ZeRO-3...: by name, first
            key = storage_key(t)
            if key is not None and key in seen:
                # the same memory under another name: exported under both
                continue
            if key is not None:
                seen[key] = name
            if t.is_complex():
                if kind == "buffer" and buffers == "ignore" and not any_matches(every, copy):
                    continue                       # as TargetNetwork(buffers="ignore") leaves it
                if not any_matches(every, copy):
                    raise TypeError(f"{kind} {name!r} is complex ({t.dtype}): fastema averages "
                                    "real floating tensors; list it in copy= to carry its "
                                    "latest value, or exclude= it")
                int_buffers[name] = (t, t.detach().clone())
            elif not t.is_floating_point():   # integer tensors travel as copies
                int_buffers[name] = (t, t.detach().clone())
            elif kind == "buffer" and buffers == "ignore":
                continue
            elif any_matches(every, copy) or (kind == "buffer" and buffers == "copy"):
                copied[name] = t
            else:
                averaged[name] = t
    return averaged, copied


#: The model-selection options' text, written once (see :func:`fastema.average._options.document`).
SELECTION_DOCS = {
    "buffers": """buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default),
    ``"average"`` or ``"ignore"``. Integer buffers are always copied.""",
    "exclude": """exclude: name patterns (fnmatch, normalised names) left out entirely.""",
    "copy": """copy: name patterns copied instead of averaged.""",
    "trainable_only": """trainable_only: average only the parameters with ``requires_grad=True``
    at construction (LoRA and other adapters: the shadow holds the adapters, not the frozen base
    model), and
    only the buffers of modules with a trainable parameter of their own (a frozen module's
    BatchNorm statistics are left alone, as its weights are). The set is fixed at
    construction, as ``exclude=``'s is: a parameter unfrozen later is not averaged (its own
    value is exported), one frozen later is still averaged. ``None`` (default): True for a
    PEFT model (``peft.PeftModel``, or a model with adapters in ``peft_config``), saying so
    once with what is averaged; False for any other model. ``export_peft()`` writes the
    averaged adapter in PEFT's format.""",
}
