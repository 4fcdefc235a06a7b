"""fastema's array-level functions (``fastema.ema_update_`` & co.) on torch tensors inside compiled
code: each has an operator (``torch.library``, defined as :mod:`.compiled` defines the averages'
ones) whose kernel runs the eager function on the tensors it is handed (no state of its own to
re-base), and a route, the call of its operator, installed in ``fastema.ops.COMPILED`` when this
module is imported (by :mod:`fastema.torch`)."""
from __future__ import annotations

import torch

from ... import ops
from ..._backends.versions import traced_leaves as _leaves
from .compiled import bump, operator

__all__ = ["install"]

# fastema.ema_update_ & co. on torch tensors inside compiled code: each operator runs the
# eager function on the tensors it is handed (no state of its own to re-base).

def _weight(weight):
    """(float, tensor) of a ``weight=`` argument: a float, floats, or a device tensor."""
    if weight is None:
        return None, None
    if isinstance(weight, torch.Tensor):
        return None, weight
    return ([float(w) for w in weight] if isinstance(weight, (list, tuple)) else [float(weight)]), None


def _weight_back(floats, tensor, single: bool):
    if tensor is not None or floats is None:
        return tensor
    return floats[0] if single else floats


@operator("array_ema_update_(Tensor(a0!) shadow, Tensor src, float[]? decays, "
          "float[]? weight_floats, Tensor? weight_tensor, bool multi, str rounding, SymInt seed, "
          "SymInt step, Tensor? skip_if) -> ()")
def array_ema_update_(shadow: torch.Tensor, src: torch.Tensor, decays: list[float] | None,
                      weight_floats: list[float] | None, weight_tensor: torch.Tensor | None, multi: bool,
                      rounding: str, seed: int, step: int, skip_if: torch.Tensor | None) -> None:
    if multi:
        ops.ema_update_multi_.eager(shadow, src, decays, weights=_weight_back(weight_floats, weight_tensor, False),
                                    rounding=rounding, seed=seed, step=step, skip_if=skip_if)
    else:
        ops.ema_update_eager(shadow, src, None if decays is None else decays[0],
                             weight=_weight_back(weight_floats, weight_tensor, True), rounding=rounding,
                             seed=seed, step=step, skip_if=skip_if)
    bump(shadow)


@operator("array_ema_update_many_(Tensor(a0!)[] shadows, Tensor[] sources, float? decay, "
          "float[]? weight_floats, Tensor? weight_tensor, str rounding, SymInt seed, SymInt step) "
          "-> ()")
def array_ema_update_many_(shadows: list[torch.Tensor], sources: list[torch.Tensor], decay: float | None,
                           weight_floats: list[float] | None, weight_tensor: torch.Tensor | None, rounding: str,
                           seed: int, step: int) -> None:
    ops.ema_update_many_.eager(shadows, sources, decay, weight=_weight_back(weight_floats, weight_tensor, True),
                               rounding=rounding, seed=seed, step=step)
    bump(shadows)


@operator("array_copy_(Tensor(a0!) dst, Tensor src) -> ()")
def array_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    ops.copy_.eager(dst, src)
    bump(dst)


@operator("array_swap_(Tensor(a0!) a, Tensor(a1!) b, bool lossy) -> ()")
def array_swap_(a: torch.Tensor, b: torch.Tensor, lossy: bool) -> None:
    ops.swap_.eager(a, b, lossy=lossy)
    bump([a, b])


@operator("array_flag_nonfinite_(Tensor(a0!) flag, Tensor src) -> ()")
def array_flag_nonfinite_(flag: torch.Tensor, src: torch.Tensor) -> None:
    ops.flag_nonfinite_.eager(flag, src)
    bump(flag)


def _ema_update_(shadow, src, decay=None, *, weight=None, rounding="nearest", seed=0, step=0, skip_if=None):
    _leaves([shadow], ["shadow"])
    floats, tensor = _weight(weight)
    torch.ops.fastema.array_ema_update_(shadow, src, None if decay is None else [float(decay)], floats, tensor,
                                        False, rounding, seed, step, skip_if)
    return shadow


def _ema_update_multi_(shadow, src, decays=None, *, weights=None, rounding="nearest", seed=0, step=0,
                       skip_if=None):
    _leaves([shadow], ["shadow"])
    floats, tensor = _weight(weights)
    torch.ops.fastema.array_ema_update_(shadow, src, None if decays is None else [float(d) for d in decays],
                                        floats, tensor, True, rounding, seed, step, skip_if)
    return shadow


def _ema_update_many_(shadows, sources, decay=None, *, weight=None, rounding="nearest", seed=0, step=0):
    _leaves(list(shadows), [f"shadows[{i}]" for i in range(len(shadows))])
    floats, tensor = _weight(weight)
    torch.ops.fastema.array_ema_update_many_(list(shadows), list(sources), None if decay is None else float(decay),
                                             floats, tensor, rounding, seed, step)


def _copy_(dst, src):
    _leaves([dst], ["dst"])
    torch.ops.fastema.array_copy_(dst, src)
    return dst


def _swap_(a, b, *, lossy=False):
    _leaves([a, b], ["a", "b"])
    torch.ops.fastema.array_swap_(a, b, lossy)


def _flag_nonfinite_(flag, src):
    _leaves([flag], ["flag"])
    torch.ops.fastema.array_flag_nonfinite_(flag, src)
    return flag


def install() -> None:
    """Route the array-level functions through the operators above inside compiled code."""
    ops.COMPILED.update(compiling=torch.compiler.is_compiling, ema_update_=_ema_update_,
                        ema_update_multi_=_ema_update_multi_, ema_update_many_=_ema_update_many_,
                        copy_=_copy_, swap_=_swap_, flag_nonfinite_=_flag_nonfinite_,
                        dynamo=torch.compiler.is_dynamo_compiling)


install()
