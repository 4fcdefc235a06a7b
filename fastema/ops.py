"""Array-level operations: one buffer against one buffer, in place.

Each function accepts NumPy arrays, torch tensors (CPU or CUDA) and other
array-interface / DLPack producers, checks everything before writing anything,
and makes one kernel launch on the buffers' device (on torch's current stream
for torch CUDA tensors). For many tensors at once use :class:`fastema.FlatShadow`.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from . import _backends, _launch
from ._backends import READ_ONLY_HINTS, Buf, describe, disjoint, layout, overlaps
from ._checks import MAX_DECAYS, resolve_weights, sr_key, stochastic_rounding  # noqa: F401 (re-exported)
from .kernels import kinds
from .kernels._bits import BF16

__all__ = ["ema_update_", "ema_update_multi_", "ema_update_many_", "copy_", "swap_", "flag_nonfinite_",
           "MAX_DECAYS"]



# Inside torch.compile the array functions go through PyTorch custom operators, which
# fastema.torch registers here when it is imported (this module knows nothing of torch):
# "compiling" -> torch.compiler.is_compiling, and function name -> its operator call.
COMPILED: dict = {}


def _compilable(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if COMPILED and COMPILED["compiling"]():
            return COMPILED[fn.__name__](*args, **kwargs)
        return fn(*args, **kwargs)

    call.eager = fn
    return call


def _pair(a, b, a_name: str, b_name: str, write_b: bool = False) -> tuple[Buf, Buf]:
    s, x = describe(a, a_name), describe(b, b_name)
    for buf, name, write in ((s, a_name, True), (x, b_name, write_b)):
        if write and not buf.writable:
            hint = READ_ONLY_HINTS.get(buf.framework, "pass a writable array (it is updated in place)")
            raise ValueError(f"{name} is read-only: {hint}")
    if s.device != x.device:
        raise ValueError(f"{a_name} is on {s.device} but {b_name} is on {x.device}; "
                         f"put both on one device")
    if overlaps(s, x):
        raise ValueError(f"{a_name} and {b_name} share memory; give the shadow a buffer of its own")
    return s, x


def _same_shape(s: Buf, x: Buf, expected: tuple, a_name: str, b_name: str):
    if s.shape != expected:
        raise ValueError(f"{b_name} has shape {x.shape} so {a_name} must have shape {expected}, "
                         f"got {s.shape}")
    if not s.strides and not x.strides:               # both C order: (K, *shape) rows of C-order sources
        return
    rows = len(expected) - len(x.shape)              # 1 for a (K, *shape) shadow of K rows
    order = layout(expected, (x.numel,) + x.order) if rows else x.order
    if s.order != order:
        raise ValueError(
            f"{a_name} and {b_name} are laid out differently in memory ({a_name} strides "
            f"{s.strides or 'C order'}, {b_name} strides {x.strides or 'C order'}): fastema walks both in "
            f"storage order, so give {a_name} the layout of {b_name} (torch.empty_like(src) or "
            f".to(memory_format=...) keeps it)")


@functools.lru_cache(maxsize=256)
def _single_tables(device: str, framework: str, shadow_address: int, src_address: int, numel: int):
    # A flat buffer pair is a group of one segment; cached so CUDA uploads once per pair. The
    # table is addresses and a count only, the same for every layout and dtype: the callers check
    # the pair's shapes and layouts (_same_shape) at every call, before the table is used.
    return _launch.tables([src_address], [numel], [shadow_address], device,
                          _backends.stream_getter(framework, device), follow=False)


def _group(shadow: Buf | None, x: Buf, t) -> _launch.Group:
    """The launch group of one pair (``shadow`` None: the sources alone), on the stream of the
    framework whose arrays are written (the shadow's, else the source's)."""
    out = x if shadow is None else shadow
    return _launch.Group(out.device, None if shadow is None else shadow.kind, x.kind, t,
                         _backends.stream_getter(out.framework, out.device))


def _update(shadow, src, decays, weights, rows, rounding, seed, step, skip_if):
    if rows and not 1 <= rows <= MAX_DECAYS:
        raise ValueError(f"1 to {MAX_DECAYS} decays in one pass (at most {MAX_DECAYS}), got {rows}; "
                         f"split them over several shadows")
    s, x = _pair(shadow, src, "shadow", "src")
    _same_shape(s, x, (rows,) + x.shape if rows else x.shape, "shadow", "src")
    rows = rows or 1
    w = resolve_weights(decays, weights, rows, s.device)
    stochastic = stochastic_rounding(rounding, s.kind)
    key = sr_key(seed, step) if stochastic else 0
    flag = None if skip_if is None else _backends.control_view(skip_if, "skip_if", np.int32, 1, s.device, False)
    t = _single_tables(x.device, s.framework, s.address, x.address, x.numel)
    _launch.launch("lerp", _group(s, x, t), weights=w, flag=flag, key=key, stochastic=stochastic)
    return shadow


@_compilable
def ema_update_(shadow, src, decay: float | None = None, *, weight: Any = None,
                rounding: str = "nearest", seed: int = 0, step: int = 0, skip_if: Any = None):
    """Exponential moving average in place: ``shadow <- decay * shadow + (1 - decay) * src``.

    Computed in float32 as ``torch.lerp`` does (``shadow + w * (src - shadow)`` with
    ``w = 1 - decay``, one FMA), so a float32 result equals ``shadow.lerp_(src, w)`` bit
    for bit on the CPU. bfloat16/float16 values are widened exactly and the result is
    rounded to nearest even (or stochastically).

    Args:
        shadow: float32, bfloat16 or float16 array or tensor, updated in place.
        src: the new values: same shape and device, any of the three dtypes.
        decay: Python float in ``[0, 1]``.
        weight: instead of ``decay``, ``w = 1 - decay``: a float, or a 1-element float32
            array/tensor on the shadow's device that the kernel reads (no host sync;
            a CUDA graph that captured the call replays the current value).
        rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 shadows): adds 16 random
            bits before truncating, so updates far below bfloat16's resolution still
            move the shadow on average.
        seed, step: key of the stochastic rounding; equal keys give equal bits on every
            device and rank.
        skip_if: optional int32 1-element flag on the device; when it is non-zero the
            kernel writes nothing (see :func:`flag_nonfinite_`).

    Returns:
        ``shadow``.
    """
    return _update(shadow, src, None if decay is None else [decay], weight, 0, rounding, seed, step,
                   skip_if)


@_compilable
def ema_update_multi_(shadow, src, decays: Sequence[float] | None = None, *, weights: Any = None,
                      rounding: str = "nearest", seed: int = 0, step: int = 0, skip_if: Any = None):
    """K moving averages of one source in one pass: ``shadow[k] <- lerp(shadow[k], src, 1 - decays[k])``.

    ``shadow`` has shape ``(K, *src.shape)`` with ``1 <= K <= 8``; the source is read once.
    ``weights`` may be K floats or a K-element float32 device array. Other arguments as in
    :func:`ema_update_`. Returns ``shadow``.
    """
    if decays is not None and not isinstance(decays, (list, tuple)):
        raise TypeError(f"decays must be a list or tuple of floats, got {type(decays).__name__}")
    rows = len(decays) if decays is not None else (
        len(weights) if isinstance(weights, (list, tuple)) else _leading(shadow))
    return _update(shadow, src, decays, weights, rows, rounding, seed, step, skip_if)


def _leading(a) -> int:
    shape = describe(a, "shadow").shape
    if not shape:
        raise ValueError("shadow must have a leading dimension of K rows, got a 0-d array")
    return shape[0]


@_compilable
def copy_(dst, src):
    """``dst <- src`` with conversion (round to nearest even); equal dtypes copy bits exactly.

    Same shape and device; returns ``dst``.
    """
    d, x = _pair(dst, src, "dst", "src")
    _same_shape(d, x, x.shape, "dst", "src")
    t = _single_tables(x.device, d.framework, d.address, x.address, x.numel)
    _launch.launch("copy", _group(d, x, t), to_shadow=True, row_lo=0, row_hi=1)
    return dst


@_compilable
def swap_(a, b, *, lossy: bool = False):
    """Exchange the contents of ``a`` and ``b`` in place, element by element (no temporary).

    Equal dtypes swap bits exactly. Different dtypes are converted both ways, which
    rounds the wider side and cannot be undone: that needs ``lossy=True``.
    (:meth:`fastema.FlatShadow.swap` keeps a float32 shadow exact against bfloat16.)
    """
    s, x = _pair(a, b, "a", "b", write_b=True)
    _same_shape(s, x, x.shape, "a", "b")
    if s.kind != x.kind and not lossy:
        raise ValueError(
            f"a is {s.dtype_name} and b is {x.dtype_name}: exchanging them rounds values and cannot "
            f"be undone; pass lossy=True to accept that, or keep the shadow in a fastema.FlatShadow, "
            f"whose swap() is exact for a float32 shadow and bfloat16 sources")
    t = _single_tables(x.device, s.framework, s.address, x.address, x.numel)
    _launch.launch("swap", _group(s, x, t), mode=kinds.EXCHANGE, row=0)


def flag_nonfinite_(flag, src):
    """Set ``flag[0] = 1`` (on the device, no host sync) if ``src`` holds any inf or NaN.

    ``flag`` is a 1-element int32 array or tensor on ``src``'s device; it is never
    cleared here (zero it yourself, e.g. ``flag.zero_()``), so several sources can
    share one flag. Pass it as ``skip_if=`` to skip an update. Returns ``flag``.
    """
    x = describe(src, "src")
    f = _backends.control_view(flag, "flag", np.int32, 1, x.device, writable=True)
    t = _single_tables(x.device, x.framework, 0, x.address, x.numel)
    _launch.launch("nonfinite", _group(None, x, t), flag=f)
    return flag


# ------------------------------------------------------------------ many pairs, caller-owned shadows

class _PairGroup:
    """One (device, shadow dtype, source dtype) group of a list of (shadow, source) pairs."""

    def __init__(self, device, shadow_kind, src_kind, shadows, sources):
        self.device, self.shadow_kind, self.src_kind = device, shadow_kind, src_kind
        self.framework = shadows[0].framework        # what a DevicePlan over these groups allocates in
        self.current_stream = _backends.stream_getter(shadows[0].framework, device)
        self.tables = _launch.tables([x.address for x in sources], [x.numel for x in sources],
                                     [s.address for s in shadows], device, self.current_stream, follow=False)


def pair_groups(shadows: list, sources: list, names: tuple[list, list] | None = None) -> list:
    """Validate ``(shadows[i], sources[i])`` pairs and group them for one launch per (device,
    dtype) group. A pair given twice (a tied weight listed under two names) is kept once, so
    its shadow is averaged once; shadows that otherwise share memory are refused. ``names``:
    ``(what shadows[i] is called, what sources[i] is called)`` in the messages (a target
    network's parameter names), else the positions ``shadows[i]`` and ``sources[i]``."""
    if len(shadows) != len(sources):
        raise ValueError(f"got {len(shadows)} shadows but {len(sources)} sources; pass them pairwise")
    if names is None:
        names = ([f"shadows[{i}]" for i in range(len(shadows))], [f"sources[{i}]" for i in range(len(sources))])
    groups: dict = {}
    seen: dict = {}
    kept, kept_names = [], []
    for i, (a, b) in enumerate(zip(shadows, sources)):
        s, x = _pair(a, b, names[0][i], names[1][i])
        _same_shape(s, x, x.shape, names[0][i], names[1][i])
        key = (s.device, s.address, s.kind, s.shape, s.order)
        if s.numel and key in seen:
            j, first = seen[key]
            if (x.address, x.kind, x.order) != (first.address, first.kind, first.order):
                raise ValueError(f"{names[0][i]} is {names[0][j]} again but with another source "
                                 f"({names[1][i]} is not {names[1][j]}); pass each shadow once")
            continue                                  # the same pair again: averaged once
        seen[key] = (i, x)
        kept.append(s)
        kept_names.append(names[0][i])
        groups.setdefault((s.device, s.kind, x.kind), ([], []))
        groups[(s.device, s.kind, x.kind)][0].append(s)
        groups[(s.device, s.kind, x.kind)][1].append(x)
    disjoint(kept, kept_names)
    return [_PairGroup(dev, sk, xk, ss, xs) for (dev, sk, xk), (ss, xs) in groups.items()]


def launch_pairs(groups: list, decay, weight, rounding: str, seed: int, step: int, *,
                 bf16_stochastic: bool = False) -> None:
    """One lerp launch per group of :func:`pair_groups`; every argument is checked first.

    ``bf16_stochastic=True`` (the compat drop-ins only: timm's ``stochastic_rounding=True``)
    rounds the bfloat16 shadows stochastically and the others to nearest, whatever ``rounding``
    says; otherwise ``rounding`` is ``"nearest"`` or ``"stochastic"`` (bfloat16 shadows only)."""
    weights = {}
    for g in groups:                                  # every check before any launch
        if g.device not in weights:
            weights[g.device] = resolve_weights(None if decay is None else [decay], weight, 1, g.device)
        if not bf16_stochastic:
            stochastic_rounding(rounding, g.shadow_kind)
    key = sr_key(seed, step) if rounding != "nearest" or bf16_stochastic else 0
    for g in groups:
        stochastic = rounding == "stochastic" or (bf16_stochastic and g.shadow_kind == BF16)
        _launch.launch("lerp", g, weights=weights[g.device], key=key, stochastic=stochastic)


# Layouts of recent ema_update_many_ calls, found by every tensor's address and kept with a
# check of every tensor's dtype, shape and strides: a hit needs both, i.e. the same memory in
# the same layout, so the cached storage-order walk is right for the tensors passed now. (An
# address is not enough: a.view(3, 4).t() is a's memory in another order, which an uncached call
# refuses.) Anything else misses and gets the full check. The key is tuples of ints (untracked
# by the garbage collector: a key per call costs no collections) and the check compares without
# keeping what it reads; the cache holds numbers only, never a tensor or a storage. Arrays with no
# cheap key (not torch) are keyed by their full descriptions and need no further check.
_PAIRS: "OrderedDict[tuple, tuple]" = OrderedDict()     # key -> (groups, layout check or None)
_PAIRS_MAX = 32


def _cheap_key(shadows: list, sources: list) -> tuple | None:
    a = _backends.address_key(shadows)          # torch: data_ptr, one C-level map
    b = _backends.address_key(sources) if a is not None else None
    return None if b is None else (a, b)


def _described_key(tensors) -> tuple:
    return tuple((b.device, b.address, b.kind, b.shape, b.order) for b in
                 (describe(t, "tensor") for t in tensors))


def _hit(key: tuple, tensors: list) -> list | None:
    entry = _PAIRS.get(key)
    if entry is None or (entry[1] is not None and not entry[1](tensors)):
        return None
    _PAIRS.move_to_end(key)
    return entry[0]


def cached_pair_groups(shadows: list, sources: list) -> list | None:
    """The groups of an earlier :func:`ema_update_many_` call over the same memory in the same
    dtypes, shapes and strides (every check passed then and holds now), or None: a miss, or
    arrays with no cheap key, or inside ``torch.compile``. The drop-ins' per-step path: a hit
    needs no look at the pairs beyond the key and the layout check; hand the groups to
    :func:`launch_pairs`."""
    if COMPILED and COMPILED["compiling"]():
        return None
    key = _cheap_key(shadows, sources)
    return None if key is None else _hit(key, shadows + sources)


def _pair_groups(shadows: list, sources: list) -> list:
    tensors = shadows + sources
    cheap = _cheap_key(shadows, sources)
    key = (_described_key(shadows), _described_key(sources)) if cheap is None else cheap
    groups = _hit(key, tensors)
    if groups is not None:
        return groups
    groups = pair_groups(shadows, sources)
    _PAIRS[key] = (groups, None if cheap is None else _backends.layout_guard(tensors))
    while len(_PAIRS) > _PAIRS_MAX:
        _PAIRS.popitem(last=False)
    return groups


@_compilable
def ema_update_many_(shadows: Sequence, sources: Sequence, decay: float | None = None, *, weight: Any = None,
                     rounding: str = "nearest", seed: int = 0, step: int = 0) -> None:
    """``shadows[i] <- lerp(shadows[i], sources[i], 1 - decay)`` for every pair, one launch per
    (device, dtype) group: a drop-in for ``torch._foreach_lerp_(shadows, sources, 1 - decay)``
    where the shadows belong to the caller (another model's parameters, say).

    The pairs' layout is validated once and cached by every tensor's address, with a check of
    its dtype, shape and strides (the last 32 layouts; numbers only, no tensor is kept alive),
    so later calls with the same tensors cost about 0.1 us a tensor; the same memory in another
    shape or layout is checked again as a new call. A pair listed twice (tied
    weights) is averaged once; shadows that otherwise overlap are refused. Other arguments
    as in :func:`ema_update_`.
    """
    launch_pairs(_pair_groups(list(shadows), list(sources)), decay, weight, rounding, seed, step)
