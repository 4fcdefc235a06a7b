"""Array-level operations: one buffer against one buffer, in place.

Each function accepts NumPy arrays, torch tensors (CPU or CUDA) and other
array-interface / DLPack producers, checks everything before writing anything,
and makes one kernel launch on the buffers' device (on torch's current stream
for torch CUDA tensors). For many tensors at once use :class:`fastema.FlatShadow`.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import _backends, _checks, _launch, pairs
from ._backends import Buf, describe
from ._backends.kept import KeptLRU, cheap_key
from ._checks import MAX_DECAYS, pair, resolve_weights, same_shape, sr_key, stochastic_rounding  # noqa: F401
from .kernels import kinds

__all__ = ["ema_update_", "ema_update_multi_", "ema_update_many_", "copy_", "swap_", "flag_nonfinite_",
           "MAX_DECAYS"]


# Inside torch.compile the array functions go through PyTorch custom operators, which
# fastema.torch registers here when it is imported (this module knows nothing of torch):
# "compiling" -> torch.compiler.is_compiling, "dynamo" -> torch.compiler.is_dynamo_compiling (Dynamo
# tracing: no road), and function name -> its operator call.
COMPILED: dict = {}

# Their loader, given by the package root (fastema/__init__.py) under "torch": it imports
# fastema.torch's operators. An array function that finds torch loaded and _READY empty
# (fastema.torch not imported yet) calls it through _loaded first, so that torch.compile never
# traces the eager path (numba, the addresses, the roads): Dynamo calls _loaded for real while it
# traces and takes its result as a constant (what torch.compiler.assume_constant_result marks,
# marked here without torch: fastema._privates). _READY is read before COMPILED: Dynamo's view of a
# dict it read stays as read.
LOADERS: dict = {}
_READY: list = []
_MODULES = sys.modules


def _loaded() -> bool:
    """Whether :data:`COMPILED` holds the operators, loaded here where it does not yet (where
    fastema.torch cannot be imported, an older torch say, a warning once: the calls run eagerly)."""
    if not COMPILED and "torch" in LOADERS:
        try:
            LOADERS["torch"]()
        except (ImportError, AttributeError) as e:      # fastema.torch's import, or torch's API
            del LOADERS["torch"]
            warnings.warn(f"fastema: fastema.torch could not be imported ({type(e).__name__}: "
                          f"{e}), so the array functions are not routed to its operators inside "
                          f"torch.compile; outside it they run as before", RuntimeWarning,
                          stacklevel=3)
    if COMPILED and not _READY:
        _READY.append(True)
    return bool(COMPILED)


_loaded._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _compilable(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if (_READY or _MODULES.get("torch") is not None and _loaded()) and COMPILED["compiling"]():
            return COMPILED[fn.__name__](*args, **kwargs)
        return fn(*args, **kwargs)

    call.eager = fn
    return call


class _Prepared(NamedTuple):
    """What a call's cheap key finds again (:data:`_KEPT`): the pair group's prepared launch, and the
    framework's version bump of the arrays it writes (None: nothing to tell, a NumPy array)."""
    run: _launch.Launch
    bump: Callable[[list], None] | None


# The pairs' launch groups, by their descriptions (device, framework, addresses, count, kinds): a pair
# is a group of one segment, uploaded once (CUDA) and kept with its launches (group.launch). Pinned:
# this cache may drop a group while a CUDA graph that captured one of its launches replays, so its
# CUDA launches keep their tables for good when captured. Only numbers and fastema's own tables.
_GROUPS: KeptLRU[_launch.Group] = KeptLRU(256, _launch.CHOSEN_DRIVERS)

# The array functions' prepared launches, found again by the arrays' cheap key (_backends.address_key:
# torch's data_ptr, a NumPy array's identity; arrays of one framework) and kept with the arrays'
# layout guard (_backends.layout_guard: dtype, shape, strides, device, writability; the NumPy arrays
# themselves, by weak reference): a hit is the same memory in the same layout, every check of the first
# call holding now, so it launches with no description of the arrays. Arrays with no cheap key (CuPy,
# JAX, DLPack producers, a NumPy and a torch array together) are checked at every call and find their
# pair's group by its description instead. Numbers, weak references and fastema's groups only.
_KEPT: KeptLRU[_Prepared] = KeptLRU(256, _launch.CHOSEN_DRIVERS)

# ema_update_'s pairs that the framework's own op updates with fastema's bits (torch's lerp_ of
# a pair of one dtype, nearest rounding: _backends/torch_lerp.py), by the shadow object's identity,
# each a road (_backends.Road) whose guard (both tensors' types, layouts, autograd flags and
# addresses) ema_update_ checks before the op writes, where the decay is a Python float in (0.5, 1]
# (torch's FMA branch, w < 0.5: above it the CPU's scalar tail gives a zero's other sign,
# tests/array/test_lerp_zero_sign.py) and the call is not being traced (Dynamo: the operator). Kept
# after a first call's every check, where no stand-in driver or adapter is given, and read only there
# (_ROAD: the entry as kept, one C call).
_ROADS: KeptLRU[_backends.Road] = KeptLRU(256, _launch.CHOSEN_DRIVERS)
_ROAD = _ROADS.entry
_ROAD_TYPES: set = set()                   # the shadows' types a road was kept for: others skip _ROADS
_CHOSEN, _GIVEN = _launch.CHOSEN_DRIVERS, _backends.GIVEN.chosen   # stand-ins given: no road


def clear() -> None:
    """Forget every pair's group and prepared launch (:func:`fastema.clear_caches`)."""
    _GROUPS.clear()
    _KEPT.clear()
    _ROADS.clear()


def _group(shadow: Buf | None, x: Buf) -> _launch.Group:
    """The launch group of one pair (``shadow`` None: the sources alone), on the stream of the
    framework whose arrays are written (the shadow's, else the source's): from :data:`_GROUPS`, else
    made and kept there. The table is addresses and a count only, the same for every layout: the
    callers check the pair's shapes and layouts (``same_shape``) before they use it."""
    out = x if shadow is None else shadow
    key = (out.device, out.framework, 0 if shadow is None else shadow.address, x.address, x.numel,
           None if shadow is None else shadow.kind, x.kind)
    g = _GROUPS.hit(key, [])
    if g is None:
        stream = _backends.stream_getter(out.framework, out.device)
        t = _launch.tables([x.address], [x.numel], [key[2]], x.device, stream, follow=False)
        g = _GROUPS.keep(key, _launch.Group(out.device, key[5], x.kind, t, stream, pins=True))
    return g


def _keep(key: tuple | None, arrays: list, run: _launch.Launch, written: int = 1) -> _launch.Launch:
    """``run`` kept under the arrays' cheap ``key`` (none: nothing kept) with their layout guard, and the
    version bump of their framework (every array of a cheap key is of one). Where the framework's
    refusal of an in-place write of ``arrays[:written]`` depends on its modes (torch: a tensor that
    requires grad, an inference tensor, or inference mode on now), the guard rechecks it: a hit in a
    mode that refuses them is a miss, refused by the first call's checks."""
    if key is not None:
        guard = _backends.layout_guard(arrays)
        if any(map(_checks.moded, arrays[:written])):
            guard = functools.partial(_rechecked, guard, written)
        _KEPT.keep(key, _Prepared(run, _backends.version_bump(arrays[0])), guard)
    return run


_UNNAMED = ("", "")


def _rechecked(guard, written: int, arrays: list) -> bool:
    """``guard`` passes ``arrays``, and their framework writes ``arrays[:written]`` in place now (else a
    miss: the first call's checks refuse it, by name)."""
    return guard(arrays) and _checks.written_refusal(arrays[:written], _UNNAMED) is None


def _rerun(tag: tuple, arrays: list, written: int) -> tuple:
    """``(key, ran)``: ``arrays``' cheap key under ``tag``, and whether the launch kept for them (the same
    memory in the same layout) ran now, all the call had to do; then ``arrays[:written]`` are bumped
    (the arrays it wrote: first in the list)."""
    key = cheap_key(tag, arrays)
    found = _KEPT.hit(key, arrays) if key is not None else None
    if found is None:
        return key, False
    found.run()
    if found.bump is not None:
        found.bump(arrays if written == 2 else [arrays[0]])
    return key, True


def _update(shadow, src, decays, weights, rows, rounding, seed, step, skip_if):
    arrays = [shadow, src]
    host = skip_if is None and weights is None and decays is not None and rounding.__class__ is str
    key = cheap_key(("lerp", rows, rounding), arrays) if host else None
    found = _KEPT.hit(key, arrays) if key is not None else None
    if found is not None:
        w = _fast_weights(decays)
        if w:                                    # (no decay: the full check says what is wrong)
            run, bump = found
            run(w, sr_key(seed, step) if rounding != "nearest" else 0)
            if bump is not None:
                bump([shadow])
            return shadow
    if rows and not 1 <= rows <= MAX_DECAYS:
        raise ValueError(f"1 to {MAX_DECAYS} decays in one pass (at most {MAX_DECAYS}), got {rows}; "
                         f"split them over several shadows")
    s, x = pair(shadow, src, "shadow", "src")
    same_shape(s, x, (rows,) + x.shape if rows else x.shape, "shadow", "src")
    _checks.check_written([shadow], ["shadow"])
    single, rows = not rows, rows or 1
    w = resolve_weights(decays, weights, rows, s.device, written=functools.partial(_backends.overlaps, s))
    stochastic = stochastic_rounding(rounding, s.kind)
    sr = sr_key(seed, step) if stochastic else 0
    flag = None if skip_if is None else _backends.control_view(skip_if, "skip_if", np.int32, 1, s.device, False)
    g = _group(s, x)
    if found is not None or not host:            # a hit with unusual weights; a flag or device weights
        _launch.launch("lerp", g, weights=w, flag=flag, key=sr, stochastic=stochastic)
    else:
        _keep(key, arrays, g.launch("lerp", stochastic=stochastic))(w, sr)
        if single and not stochastic and not _CHOSEN and not _GIVEN:
            road = _backends.backend_of(shadow).lerp_road(shadow, src)
            if road is not None:
                _ROADS.keep(id(shadow), road)
                _ROAD_TYPES.add(shadow.__class__)
    _backends.bump_versions(arrays[:1])
    return shadow


def _fast_weights(decays) -> tuple | None:
    """``1 - decay`` of each decay when every one is a Python float (or int) in [0, 1], else None (the
    full check says what is wrong)."""
    out = []
    for v in decays:
        if type(v) is not float and type(v) is not int or not 0.0 <= v <= 1.0:
            return None
        out.append(1.0 - v)
    return tuple(out)


def ema_update_(shadow, src, decay: float | None = None, *, weight: Any = None,
                rounding: str = "nearest", seed: int = 0, step: int = 0, skip_if: Any = None):
    """Exponential moving average in place: ``shadow <- decay * shadow + (1 - decay) * src``.

    Computed in float32 as ``torch.lerp`` does (``shadow + w * (src - shadow)`` with
    ``w = 1 - decay``, one FMA), so a float32 result equals ``shadow.lerp_(src, w)`` bit
    for bit on the CPU. bfloat16/float16 values are widened exactly and the result is
    rounded to nearest even (or stochastically).

    A float32 or float64 torch pair (one dtype) with a Python float ``decay`` above 0.5,
    nearest rounding and no ``weight`` or ``skip_if`` is updated by torch's own
    ``shadow.lerp_(src, 1 - decay)``
    from its second call on (after the first call's checks, while the same two tensors keep
    their layout, autograd flags and memory), which gives the kernel's bits
    (``tests/array/test_ops_torch_road.py``) at torch's own cost: on a GPU, no launch of
    fastema's. On the CPU only where torch runs its AVX2 or AVX-512 kernels.

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
    # torch's lerp_, where it gives these bits; never traced (Dynamo reads neither _ROAD_TYPES,
    # which the first run's kernel changes, nor the roads)
    if (_READY and not COMPILED["dynamo"]() and shadow.__class__ in _ROAD_TYPES
            and decay.__class__ is float and 0.5 < decay <= 1.0 and weight is None
            and skip_if is None and rounding == "nearest" and not _CHOSEN and not _GIVEN):
        found = _ROAD(id(shadow))
        if found is not None:
            check, address, at_s, at_x, lerp = found.value
            if check(shadow, src) and address(shadow) == at_s and address(src) == at_x:
                lerp(shadow, src, 1.0 - decay)
                return shadow
    if (_READY or _MODULES.get("torch") is not None and _loaded()) and COMPILED["compiling"]():
        return COMPILED["ema_update_"](shadow, src, decay, weight=weight, rounding=rounding, seed=seed, step=step,
                                       skip_if=skip_if)
    return _update(shadow, src, None if decay is None else (decay,), weight, 0, rounding, seed, step,
                   skip_if)


def ema_update_eager(shadow, src, decay: float | None = None, *, weight: Any = None,
                     rounding: str = "nearest", seed: int = 0, step: int = 0, skip_if: Any = None):
    """:func:`ema_update_` as its operator runs it inside compiled code: fastema's kernel, no
    compile check and no torch road (the other array functions' ``.eager``)."""
    return _update(shadow, src, None if decay is None else (decay,), weight, 0, rounding, seed, step, skip_if)


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
    if rows == 0:                       # (0 reads as ema_update_'s one average below)
        raise ValueError(f"ema_update_multi_ needs 1 to {MAX_DECAYS} averages (a decay or weight each, the "
                         f"shadow's leading dimension), got none: for one average use ema_update_")
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
    arrays = [dst, src]
    key, ran = _rerun(("copy",), arrays, 1)
    if ran:
        return dst
    d, x = pair(dst, src, "dst", "src")
    same_shape(d, x, x.shape, "dst", "src")
    _checks.check_written([dst], ["dst"])
    _keep(key, arrays, _group(d, x).launch("copy", to_shadow=True, row_lo=0, row_hi=1))()
    _backends.bump_versions(arrays[:1])
    return dst


@_compilable
def swap_(a, b, *, lossy: bool = False):
    """Exchange the contents of ``a`` and ``b`` in place, element by element (no temporary).

    Equal dtypes swap bits exactly. Different dtypes are converted both ways, which
    rounds the wider side and cannot be undone: that needs ``lossy=True``.
    (:meth:`fastema.FlatShadow.swap` keeps a float32 shadow exact against bfloat16.)
    """
    arrays = [a, b]
    key, ran = _rerun(("swap", lossy), arrays, 2)
    if ran:
        return
    s, x = pair(a, b, "a", "b", write_b=True)
    same_shape(s, x, x.shape, "a", "b")
    if s.kind != x.kind and not lossy:
        raise ValueError(
            f"a is {s.dtype_name} and b is {x.dtype_name}: exchanging them rounds values and cannot "
            f"be undone; pass lossy=True to accept that, or keep the shadow in a fastema.FlatShadow, "
            f"whose swap() is exact for a float32 shadow and bfloat16 sources")
    _checks.check_written(arrays, ["a", "b"])
    _keep(key, arrays, _group(s, x).launch("swap", mode=kinds.EXCHANGE, row=0), 2)()
    _backends.bump_versions(arrays)


@_compilable
def flag_nonfinite_(flag, src):
    """Set ``flag[0] = 1`` (on the device, no host sync) if ``src`` holds any inf or NaN.

    ``flag`` is a 1-element int32 array or tensor on ``src``'s device; it is never
    cleared here (zero it yourself, e.g. ``flag.zero_()``), so several sources can
    share one flag. Pass it as ``skip_if=`` to skip an update. Returns ``flag``.
    """
    arrays = [flag, src]
    key, ran = _rerun(("nonfinite",), arrays, 1)
    if ran:
        return flag
    x = describe(src, "src")
    f = _backends.control_view(flag, "flag", np.int32, 1, x.device, writable=True)
    _checks.check_written([flag], ["flag"])
    if key is None:                              # a flag view of this call: not kept
        _launch.launch("nonfinite", _group(None, x), flag=f)
    else:                                        # kept with the call's key (the flag's view in it)
        _keep(key, arrays, _group(None, x).launch("nonfinite", flag=f))()
    _backends.bump_versions(arrays[:1])
    return flag


# ------------------------------------------------------------------ many pairs, caller-owned shadows

def cached_pairs(shadows: list, sources: list, called: str = "shadows", at: Sequence[int] | None = None
                 ) -> pairs.PairShadow | None:
    """The :class:`fastema.pairs.PairShadow` of an earlier :func:`ema_update_many_` call over the same
    memory in the same dtypes, shapes and strides, or None: a miss, arrays with no cheap key, or
    inside ``torch.compile``. The drop-ins' per-step path (then ``.update(...)``); ``called``: what
    the list ``shadows`` is called in a refusal, ``at``: their positions there (``target_params[3]``)."""
    if (_READY or _MODULES.get("torch") is not None and _loaded()) and COMPILED["compiling"]():
        return None
    return pairs.cached(shadows, sources, called, at)


def update_named_pairs(shadows: list, sources: list, names: tuple[list, list], *, weight: Any) -> None:
    """:func:`ema_update_many_` with a weight, its refusals naming ``shadows[i]`` and ``sources[i]``
    by ``names`` (the drop-ins' arguments, ``target_params[3]``); inside ``torch.compile`` its
    operator, which names positions."""
    if (_READY or _MODULES.get("torch") is not None and _loaded()) and COMPILED["compiling"]():
        COMPILED["ema_update_many_"](shadows, sources, weight=weight)
        return
    pairs.update_many(list(shadows), list(sources), None, names, weight=weight)


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
    pairs.update_many(list(shadows), list(sources), decay, weight=weight, rounding=rounding, seed=seed, step=step)
