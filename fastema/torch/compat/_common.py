"""What several drop-ins share: the pair lerp (one fastema launch per (device, dtype) group,
torch's own lerp for the pairs the kernels do not take), used by ema-pytorch's and diffusers'."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..._backends import device_of, layout
from ...ops import cached_pairs, update_named_pairs
from .._tensors.slots import bump_versions

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def kernel_pair(t: torch.Tensor, s: torch.Tensor) -> bool:
    """True when fastema's kernels average ``t`` towards ``s`` as ``t.lerp_(s, w)`` does: float
    dtypes, one device, memory (not meta), one dense layout. The kernels pair elements in storage
    order and torch by index, so two layouts (``p.data = p.data.t()`` on a square weight) and a
    slice (``target[:, :8]``: not dense) are left to torch, as the originals compute every pair."""
    return (t.dtype in _KERNEL_DTYPES and s.dtype in _KERNEL_DTYPES and t.device == s.device and not t.is_meta
            and t.stride() == s.stride() and layout(t.shape, t.stride()) is not None)


def kernel_weight(w):
    """A weight as the kernels read it: a float, or a float32 tensor on a GPU (read there: no sync).
    A tensor on the CPU is read as a float (no sync); one of another dtype on a GPU is made float32
    (one small copy a call)."""
    if not isinstance(w, torch.Tensor):
        return w
    if device_of(w) == "cpu":
        return float(w)
    return w if w.dtype == torch.float32 else w.float()


def _torch_lerp(t: torch.Tensor, s: torch.Tensor, weight: float) -> None:
    t.lerp_(s.to(t.device, t.dtype), weight)


def lerp_pairs(targets: list, sources: list, weight: float, check=None, slow=_torch_lerp,
               names: tuple[str, str] = ("target_params", "params"), at: list | None = None) -> None:
    """``targets[i] <- lerp(targets[i], sources[i], weight)`` for every pair: one fastema launch per
    (device, dtype) group for the pairs the kernels take, and ``slow(t, s, weight)`` (torch's own
    lerp by default) under ``torch.no_grad()`` for the rest, as the originals compute them:
    complex dtypes, pairs on two devices (``allow_different_devices``), meta tensors (no memory)
    and pairs laid out differently (see :func:`kernel_pair`).

    The usual step (the same tensors as last time) is one launch per group after a key of the
    addresses (:func:`fastema.ops.cached_pairs`). Otherwise every pair is checked before
    anything is written: both torch tensors (``TypeError`` naming the position in the lists
    ``names``, SB3's argument names by default, at the positions ``at``, default their own; every
    refusal names them so), then ``check(i, t, s, fast)`` (``fast``: the kernels take it), to
    refuse a call."""
    if not targets:
        return
    with torch.no_grad():                           # (its recheck of the targets: as written)
        pairs = cached_pairs(targets, sources, names[0], at)   # the usual step: these pairs, as last time
    if pairs is not None:
        pairs.update(weight=weight)
        bump_versions(targets)                      # as torch's _foreach_lerp_ does
        return
    fast_t, fast_s, fast_i, rest = [], [], [], []
    for i, (t, s) in enumerate(zip(targets, sources)):
        for name, x in zip(names, (t, s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}[{i if at is None else at[i]}] is a {type(x).__name__}, not a torch.Tensor: "
                                f"pass the networks' floating tensors (e.g. net.parameters()), one for one. "
                                f"Nothing was written.")
        fast = kernel_pair(t, s)
        if check is not None:
            check(i, t, s, fast)
        if fast:
            fast_t.append(t)
            fast_s.append(s)
            fast_i.append(i)
        else:
            rest.append((t, s))
    if fast_t:
        with torch.no_grad():                       # as the originals write (their hit path: none)
            where = fast_i if at is None else [at[i] for i in fast_i]
            called = ([f"{names[0]}[{i}]" for i in where], [f"{names[1]}[{i}]" for i in where])
            update_named_pairs(fast_t, fast_s, called, weight=weight)   # caches the layout: the next step hits
    if rest:
        with torch.no_grad():
            for t, s in rest:
                slow(t, s, weight)



def check_module_load(module: torch.nn.Module, state_dict, strict: bool, assign: bool) -> None:
    """What ``module.load_state_dict(state_dict, strict, assign)`` would refuse only after copying
    the rest (torch copies key by key and raises at the end), refused here before anything is
    written, in torch's words: a value that is not a tensor, a meta tensor copied from (no
    values), a shape torch does not take, and under ``strict`` a missing or unexpected key (a batch
    norm's ``num_batches_tracked`` may be missing where torch fills it). An extra state
    (``get_extra_state``) is left to ``set_extra_state``, as torch leaves it."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    mine = module.state_dict(keep_vars=True)
    errors = []
    for key, t in mine.items():
        if key not in state_dict or key.rpartition(".")[2] == "_extra_state":
            continue                     # torch hands an extra state to set_extra_state as it is
        value = state_dict[key]
        if not torch.overrides.is_tensor_like(value):
            errors.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                          f"object from checkpoint but received {type(value)}")
        elif value.is_meta and not assign and not t.is_meta:
            errors.append(f'"{key}" in the checkpoint is a meta tensor, which holds no values: load a '
                          f"checkpoint that holds them")
        elif not (torch.nn.parameter.is_lazy(t) or (t.dim() == 0 and value.dim() == 1)
                  or value.shape == t.shape):
            errors.append(f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, "
                          f"the shape in current model is {t.shape}.")
    if strict:
        unexpected = [k for k in state_dict if k not in mine]
        missing = [k for k in mine if k not in state_dict and not _filled(state_dict, k)]
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if errors:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__}:\n\t" + "\n\t".join(errors)
                           + "\nNothing was loaded (every key is checked before one is written).")


def check_loaded(name: str, t: torch.Tensor, mine: torch.Tensor) -> None:
    """A checkpoint's tensor for one of a drop-in's shadows (torch_ema's, diffusers'), checked
    before anything is loaded: its shape, a real floating dtype where the shadow's is one (a complex
    one lost its imaginary part in the copy, an integer one is no average), and values (a meta
    tensor has none: the copy failed halfway through the list)."""
    if t.shape != mine.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mine.shape)}")
    if mine.is_floating_point() and not t.is_floating_point():
        raise ValueError(f"{name} has dtype {t.dtype}, expected a floating dtype (the averaged parameters' "
                         f"{mine.dtype}): a damaged checkpoint or another's; nothing was loaded")
    if t.is_meta and not mine.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values: load a checkpoint that holds them; "
                         f"nothing was loaded")


def _filled(state_dict, key: str) -> bool:
    """Whether torch fills ``key`` when a checkpoint lacks it: a batch norm's ``num_batches_tracked``
    from a checkpoint saved before it was added (its module's metadata version absent or below 2)."""
    prefix, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    version = (getattr(state_dict, "_metadata", None) or {}).get(prefix, {}).get("version")
    return version is None or version < 2


class AllOrNothingLoad(torch.nn.Module):
    """A drop-in whose ``load_state_dict`` is all or nothing: what torch refuses is refused before a
    tensor is written (:func:`check_module_load`), the user's model too where the state dict holds
    it (ema-pytorch's ``include_online_model``)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        check_module_load(self, state_dict, strict, assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
