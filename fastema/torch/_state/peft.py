"""Adapters (LoRA and the other PEFT methods): the one message of ``trainable_only=None`` on a PEFT
model (:func:`announce`), and :func:`export_peft`, which writes an average's adapter in PEFT's own
format (``adapter_model.safetensors`` + ``adapter_config.json``) for
``peft.PeftModel.from_pretrained`` from the average's checkpoint side (``TorchAverage.export_peft``
calls it). Which models are PEFT models, and what ``trainable_only=None``
means for them, is the model side's (:func:`fastema.torch._tensors.selection.is_peft_model`).

peft is imported only by ``export_peft()``.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Literal

import torch
from torch import nn

from ..._io.files import atomic_write
from ..._io.safetensors import stream_safetensors
from .._tensors.hooks import unwrap
from .._tensors.selection import is_peft_model
from .checkpoint import TorchCheckpoint

__all__ = ["announce", "export_peft"]

WEIGHTS_NAME = "adapter_model.safetensors"     # peft.utils.SAFETENSORS_WEIGHTS_NAME
CONFIG_NAME = "adapter_config.json"            # peft.utils.CONFIG_NAME


def announce(kind: str, shadow) -> None:
    """The one message of ``trainable_only=None`` on a PEFT model: what is averaged (``shadow``, the
    average ``kind`` made), how to change it."""
    sources = shadow.sources
    weights = sum(t.numel() * t.element_size() for t in sources)
    warnings.warn(f"{kind}(model) of a PEFT model averages only its trainable parameters (the adapters): "
                  f"{len(sources)} tensors, {weights} bytes of weights, a {shadow.nbytes}-byte shadow; the "
                  f"frozen base model is left out. Pass trainable_only=True to silence this, or "
                  f"trainable_only=False to average every parameter.", UserWarning, stacklevel=4)


def _active_adapter(inner: nn.Module) -> str:
    active = getattr(inner, "active_adapter", None)
    if callable(active):                               # transformers' PeftAdapterMixin: a method
        active = None
    listed = getattr(inner, "active_adapters", None)
    if active is None and callable(listed):
        names = listed()
        if len(names) != 1:
            raise ValueError(f"the model has {len(names)} active adapters ({names}); name the one to export: "
                             f"export_peft(directory, adapter_name=...)")
        active = names[0]
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"the model has {len(active)} active adapters ({list(active)}); name the one to "
                             f"export: export_peft(directory, adapter_name=...)")
        active = active[0]
    return active if isinstance(active, str) else "default"


def export_peft(checkpoint: TorchCheckpoint, directory: str | os.PathLike, row: int = 0, *,
                adapter_name: str | None = None, save_embedding_layers: bool | Literal["auto"] = "auto") -> None:
    """``TorchAverage.export_peft`` (see there) from the average's checkpoint side."""
    checkpoint.swap.refuse("export_peft()")
    model = checkpoint.side.model
    inner = unwrap(model)
    configs = getattr(inner, "peft_config", None)
    if not is_peft_model(model) or not isinstance(configs, dict):
        raise TypeError(f"export_peft() writes a PEFT adapter, and the model is a {type(inner).__name__} with no "
                        f"adapters (no peft_config): use save(path) or averaged_state_dict() for a plain model. "
                        f"Nothing was written.")
    if checkpoint.sharded:
        raise TypeError("export_peft() writes the adapter from one process, and this average is sharded (FSDP2 / "
                        "tensor parallel): gather it with full_state_dict(rank0_only=True) and save the adapter "
                        "with PEFT on rank 0. Nothing was written.")
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError as err:
        raise ImportError('export_peft() needs peft: pip install "fastema[peft]"') from err
    name = _active_adapter(inner) if adapter_name is None else adapter_name
    if name not in configs:
        raise ValueError(f"adapter_name={name!r} is not one of the model's adapters {sorted(configs)}; "
                         f"nothing was written")
    entries = checkpoint.entries(row)                      # checks the row and the model's tensors
    checkpoint.nonfinite.refuse("export_peft()", row)
    # a distinct object per name: PEFT's picks, by id (not a module's extra state)
    own = {n: t.detach() for n, t, _, _ in entries if isinstance(t, torch.Tensor)}
    by_id = {id(t): n for n, t in own.items()}
    picked = get_peft_model_state_dict(inner, state_dict=own, adapter_name=name,
                                       save_embedding_layers=save_embedding_layers)
    value_of = {n: (t, value) for n, t, _, value in entries}
    untraced = [k for k, v in picked.items() if id(v) not in by_id]
    if untraced or not picked:
        raise ValueError(f"PEFT's state dict of adapter {name!r} holds {untraced[:3] or 'no tensors'}, which "
                         f"export_peft() cannot trace to the model's tensors; save the adapter with "
                         f"PEFT (with the average swapped in: with ema.average_parameters(): "
                         f"model.save_pretrained(...)). Nothing was written.")
    missing = [by_id[id(v)] for v in picked.values() if value_of[by_id[id(v)]][1] is None]
    if missing:
        raise ValueError(f"this {checkpoint.kind} does not hold {len(missing)} of adapter {name!r}'s "
                         f"{len(picked)} tensors ({missing[:3]}): they were frozen when it was made "
                         f"(trainable_only=True averages the parameters with requires_grad=True then; another "
                         f"adapter's are frozen), or exclude=-d. Make the average with them trainable, or "
                         f"export the adapter it holds. Nothing was written.")
    tensors = {k: (value_of[by_id[id(v)]][1](), value_of[by_id[id(v)]][0].dtype) for k, v in picked.items()}
    config_text = _config_json(inner, configs[name], PeftModel)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"export_peft() writes into a directory, and {directory!r} is a file; nothing was written")
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME),
                 lambda f: stream_safetensors(f, tensors, {"format": "pt"}))
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda f: f.write(config_text.encode()))


def _config_json(inner: nn.Module, config, peft_model_type) -> str:
    """``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it; the model's config is read,
    not changed. ``to_dict()`` of the config itself, with no copy of it first: a set field (such
    as ``target_modules``) is then listed in the order PEFT's own save lists it (a set copied once
    more may iterate in another order, which depends on the string hash seed)."""
    out = config.to_dict()
    if config.base_model_name_or_path is None:             # as PeftModel.save_pretrained fills it in
        base = getattr(inner, "base_model", inner)
        holder = base if config.is_prompt_learning else getattr(base, "model", base)
        out["base_model_name_or_path"] = holder.__dict__.get("name_or_path", None) or None
    out["inference_mode"] = True
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = list(value)
    if config.task_type is None and isinstance(inner, peft_model_type):
        base_class = inner._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        out["auto_mapping"] = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    return json.dumps(out, indent=2, sort_keys=True)
