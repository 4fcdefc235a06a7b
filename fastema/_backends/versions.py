"""autograd's rules of an in-place write, for the tensors the array functions write (the torch
backend's :meth:`~fastema._backends.torch.Torch.version_bump`, ``inplace_refusal`` and
``inplace_moded``): the version counters bumped after it, and what torch refuses before it."""
from __future__ import annotations

import functools


@functools.cache
def bump_versions():
    """``bump(tensors)``: tell autograd that fastema's kernels wrote ``tensors`` in place, as torch's own
    in-place operations do (also under ``no_grad``): a backward through a graph that saved their old
    values raises "modified by an inplace operation" instead of using the new ones. One C call for a
    list where this torch has it, else one tensor at a time (torch < 2.5). No sync, no allocation
    (~0.03 us a tensor)."""
    import torch

    from .. import _privates

    bump = torch.autograd.graph.increment_version
    try:
        bump([])                        # no tensor made: this runs at fastema.torch's import
        return _privates.find("torch._C:_increment_version") or bump
    except TypeError:
        return lambda tensors: [bump(t) for t in tensors]


_NO_GRAD = ("Nothing was written. Call it under torch.no_grad() (as an EMA update is), or pass a "
            "tensor that does not require grad (t.detach(), or t.requires_grad_(False) on a leaf)")


def refusal(t, what: str) -> str | None:
    """Why torch refuses to write the tensor ``t`` in place now, as its ``lerp_`` (and every
    in-place op) does, in torch's words and with the fix; None where torch writes it. Refused:
    an inference tensor outside ``torch.inference_mode()``; with grad mode on, a tensor that
    requires grad and is a leaf, or a view of a leaf, or a view made in ``no_grad`` or inference
    mode, by a function returning several views or in a custom Function (torch's
    ``check_inplace``, in its order). What is read is never refused (``lerp_`` reads any tensor as
    ``end``). Attribute reads only (a tensor that requires grad, in grad mode: two calls more)."""
    import torch

    if t.is_inference():
        if torch.is_inference_mode_enabled():
            return None
        return (f"{what} is an inference tensor (made under torch.inference_mode()) and inference "
                f"mode is off: torch refuses to update it in place (\"Inplace update to inference "
                f"tensor outside InferenceMode is not allowed\"), and so does fastema. Nothing was "
                f"written. Call it inside torch.inference_mode(), or pass a normal tensor "
                f"(t.clone() outside inference mode)")
    if not t.requires_grad or not torch.is_grad_enabled():
        return None
    from .. import _privates

    if getattr(t, _privates.attribute("torch:Tensor", "_is_view"))():   # torch's order: views first
        meta = _privates.get("torch._C._autograd:_get_creation_meta")(t)
        if meta.name != "DEFAULT":
            how = {"NO_GRAD_MODE": "in no_grad mode", "INFERENCE_MODE": "in inference mode",
                   "MULTI_OUTPUT_NODE": "by a function returning several views (unbind, split...)",
                   "IN_CUSTOM_FUNCTION": "in a custom autograd Function"}.get(meta.name, meta.name)
            return (f"{what} is a view made {how} of a tensor that requires grad, and grad mode is "
                    f"on: torch refuses to modify it in place, and so does fastema. Nothing was "
                    f"written. Call it under torch.no_grad(), or pass a tensor of its own "
                    f"(t.clone())")
        if getattr(t, _privates.attribute("torch:Tensor", "_base")).is_leaf:
            return (f"{what} is a view of a leaf tensor, requires grad, and grad mode is on: torch "
                    f"refuses it in an in-place operation (\"a view of a leaf Variable that "
                    f"requires grad is being used in an in-place operation\"), and so does fastema. "
                    f"{_NO_GRAD}")
    return _leaf(what) if t.is_leaf else None   # (computed from others: torch writes it)


def _leaf(what: str) -> str:
    return (f"{what} is a leaf tensor that requires grad (a parameter?) and grad mode is on: torch "
            f"refuses it in an in-place operation (\"a leaf Variable that requires grad is being "
            f"used in an in-place operation\"), and so does fastema. {_NO_GRAD}")


def moded(t) -> bool:
    """Whether :func:`refusal` of ``t`` may change with grad mode or inference mode while ``t``'s
    layout guard holds (which sees ``requires_grad`` and whether it is an inference tensor, not
    the modes): ``t`` requires grad, or is an inference tensor, or inference mode is on now (a
    guard made in it cannot tell an inference tensor from a normal one)."""
    import torch

    return t.requires_grad or t.is_inference() or torch.is_inference_mode_enabled()


def traced_leaves(written: list, names: list) -> None:
    """:func:`refusal` of a leaf that requires grad, written in grad mode (every such leaf is
    refused), in code ``torch.compile`` traces (the array functions' operators), where the eager
    functions run in a custom op's autograd forward, under ``no_grad``, and cannot see it: the trace
    reads the flags (guards of its graph) and, where ``lerp_``'s trace refuses, raises the eager
    refusal outside the graph. A view of such a leaf is refused in eager code only."""
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad and t.is_leaf for t in written):
        torch.compiler.disable(_refuse)(written, names)   # (dynamo imported: it is tracing)


def _refuse(written: list, names: list) -> None:
    for t, name in zip(written, names):
        why = refusal(t, name)
        if why is not None:
            raise RuntimeError(why)
