"""PairShadow: moving averages kept in the caller's own tensors, as (shadow, source) pairs.

:class:`fastema.FlatShadow` owns its shadow (flat buffers it swaps, exports and offloads);
here the shadows are the caller's tensors (a target network's parameters, a drop-in's
``shadow_params``), so what remains is the pairs, checked once and grouped per (device, shadow
dtype, source dtype), and the same per-step launches as a flat shadow's
(:class:`fastema._steps.StepLaunches`: the checked update, the non-finite scan, the copy).

:func:`fastema.ema_update_many_` is a one-shot PairShadow, found again by address in the pair
cache (:func:`of`, :func:`cached`) at its next call. A PairShadow holds addresses (launch
tables), never a tensor: the caller keeps its tensors alive and tells when they move.
"""
from __future__ import annotations

import bisect
import numbers
from typing import Any, Callable, NamedTuple, Sequence

from . import _backends, _launch
from ._backends import describe, disjoint, first_shared
from ._backends.kept import KeptLRU, cheap_key
from ._checks import (
    check_rounding,
    check_written,
    moded,
    pair,
    resolve_weights,
    same_shape,
    sr_key,
    stochastic_rounding,
)
from ._shadow import Capabilities, table_parts
from ._steps import LERP, StepLaunches
from .kernels.kinds import BF16

__all__ = ["PairShadow"]


class PairGroup(_launch.Launches):
    """One (device, shadow dtype, source dtype) group of (shadow, source) pairs: a launch group
    (:class:`fastema._launch.Launches`: the fields a launch reads, device, kinds, tables,
    current_stream, and the launches it keeps) and the framework a flag or a device plan for it
    is made in. Addresses only, no tensor."""

    def __init__(self, device, shadow_kind, src_kind, shadows: list, sources: list):
        self.device, self.shadow_kind, self.src_kind = device, shadow_kind, src_kind
        self.framework = shadows[0].framework
        self.current_stream = _backends.stream_getter(shadows[0].framework, device)
        self.tables = _launch.tables([x.address for x in sources], [x.numel for x in sources],
                                     [s.address for s in shadows], device, self.current_stream, follow=False)
        self.size = len(shadows)
        # the shadows' bytes, by address: disjoint (pair_groups), so their ends rise too (writes())
        self.spans = sorted((s.address, s.address + s.nbytes) for s in shadows if s.numel and s.address)
        self.buffer = None               # the averages are the caller's tensors
        self.scan = self                 # what the non-finite scan walks: the sources themselves
        self._kept: dict = {}            # the launches (Launches)


def pair_groups(shadows: list, sources: list, names: tuple[list, list] | None = None) -> list[PairGroup]:
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
    kept, kept_names, read, read_names = [], [], [], []
    for i, (a, b) in enumerate(zip(shadows, sources)):
        s, x = pair(a, b, names[0][i], names[1][i])
        same_shape(s, x, x.shape, names[0][i], names[1][i])
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
        read.append((x.device, x.address, x.nbytes))
        read_names.append(names[1][i])
        groups.setdefault((s.device, s.kind, x.kind), ([], []))
        groups[(s.device, s.kind, x.kind)][0].append(s)
        groups[(s.device, s.kind, x.kind)][1].append(x)
    disjoint(kept, kept_names)
    shared = first_shared([(s.device, s.address, s.nbytes) for s in kept], read)
    if shared is not None:                            # its own source: refused by pair()
        i, j = shared
        raise ValueError(f"{kept_names[i]} shares memory with {read_names[j]}, another pair's "
                         f"source, which the update reads while it writes {kept_names[i]} (the "
                         f"result would depend on their order); average into a tensor no pair "
                         f"reads. Nothing was written.")
    return [PairGroup(dev, sk, xk, ss, xs) for (dev, sk, xk), (ss, xs) in groups.items()]


class _Groups:
    """A pair shadow's layout: its groups."""

    __slots__ = ("groups",)

    def __init__(self, groups: list[PairGroup]):
        self.groups = groups

    def writes(self, buf) -> bool:
        """Whether ``buf`` shares a byte with a shadow: the last shadow that starts before ``buf``
        ends is the only one that can (one bisection a group on its device)."""
        if not buf.numel or not buf.address:
            return False
        lo, hi = buf.address, buf.address + buf.nbytes
        for g in self.groups:
            if g.device == buf.device:
                i = bisect.bisect_left(g.spans, (hi,)) - 1
                if i >= 0 and g.spans[i][1] > lo:
                    return True
        return False

    def swap_exact(self) -> bool:
        return False                     # no swap: the averages are the caller's tensors


class PairShadow(Capabilities, StepLaunches):
    """Averages kept in the caller's tensors: ``shadows[i] <- lerp(shadows[i], sources[i], w)``.

    One launch per (device, shadow dtype, source dtype) group, computed as ``torch.lerp`` does
    (float32 arithmetic, float64 for float64 pairs), so a float32 shadow equals
    ``torch._foreach_lerp_`` bit for bit on the CPU. The pairs are checked at construction
    (:func:`pair_groups`); the caller follows its tensors and calls :meth:`regroup` when they
    move. One average (``rows = 1``).

    Args:
        shadows: the tensors written (the averages), one per source.
        sources: the tensors read, same shapes, devices and layouts.
        names: ``(shadow names, source names)`` for the messages (default: positions).
    """

    rows = 1
    layout: _Groups

    def __init__(self, shadows: Sequence, sources: Sequence, names: tuple[list, list] | None = None, *,
                 groups: list | None = None):
        self.layout = _Groups(pair_groups(list(shadows), list(sources), names) if groups is None else groups)
        self.names: list = list(names[0]) if names is not None else [f"shadows[{i}]" for i in range(len(shadows))]
        self._views: dict = {}          # the made-here flags' kernel views (StepLaunches)
        self.skipped: dict[str, Any] = {}

    @property
    def groups(self) -> list[PairGroup]:
        """The launch groups (addresses only)."""
        return self.layout.groups

    def __len__(self) -> int:
        return sum(g.size for g in self.layout.groups)

    def __repr__(self) -> str:
        return f"PairShadow({len(self)} pairs, {len(self.layout.groups)} groups)"

    def parts(self, what: str = "shadow") -> list:
        """``(part, array)`` of what this holds: the launch tables (the averages are the caller's)."""
        return table_parts(*(g.tables for g in self.layout.groups))

    def written(self) -> list:
        return []                       # the caller's tensors: theirs to name

    def regroup(self, groups: list[PairGroup]) -> None:
        """Follow the pairs to new addresses: ``groups`` from :func:`pair_groups` over the tensors
        as they are now (their launches are prepared at the next update)."""
        self.layout = _Groups(groups)

    def view(self, source: int | str, row: int | None = 0) -> Any:
        """Refused: the averages are the caller's own tensors (read them there)."""
        raise TypeError("a PairShadow keeps its averages in the caller's tensors (the shadows it was given): "
                        "read them there")

    def update(self, decay: float | Sequence[float] | None = None, *, weight: Any = None,
               rounding: str = "nearest", seed: int = 0, step: int = 0, skip_nonfinite: bool = False,
               sources: Any = None, bf16_stochastic: bool = False) -> None:
        """One lerp launch per group, every argument checked first; the key of the stochastic
        rounding is ``sr_key(seed, step)`` for every group (:func:`fastema.ema_update_many_`).

        ``bf16_stochastic=True`` (the compat drop-ins only: timm's ``stochastic_rounding=True``)
        rounds the bfloat16 shadows stochastically and the others to nearest, whatever ``rounding``
        says; otherwise ``rounding`` is ``"nearest"`` or ``"stochastic"`` (bfloat16 shadows only).
        ``skip_nonfinite`` and ``sources`` are refused (the pairs are the caller's to follow and scan:
        :meth:`regroup`, :meth:`scan_nonfinite` then ``update_checked``)."""
        if skip_nonfinite or sources is not None:
            raise TypeError("a PairShadow follows no sources of its own and scans only when asked: call regroup() "
                            "with the moved pairs, or scan_nonfinite() and then update_checked(..., skip_if=flags); "
                            "nothing was written")
        groups = self.layout.groups
        decays = [decay] if decay is not None and not isinstance(decay, (list, tuple)) else decay
        weights = {}
        for g in groups:                                  # every check before any launch
            if g.device not in weights:
                weights[g.device] = resolve_weights(decays, weight, 1, g.device, self.layout.writes)
            if not bf16_stochastic:
                stochastic_rounding(rounding, g.shadow_kind)
        if not groups:                                    # no pairs: the arguments checked all the same
            _check_alone(decays, weight, rounding if not bf16_stochastic else "nearest")
        key = sr_key(seed, step) if rounding != "nearest" or bf16_stochastic else 0
        for g in groups:                                  # each group's launch, kept by the group
            stochastic = rounding == "stochastic" or (bf16_stochastic and g.shadow_kind == BF16)
            g.launch_of(LERP[stochastic])(weights[g.device], key)

    def scan_nonfinite(self, flags: dict | None = None) -> dict:
        """Scan every source for inf/NaN on its device, no host sync: ``device -> int32[1]`` flags
        (added to ``flags`` when given), kept in ``self.skipped``. The caller has followed its
        tensors (the addresses are current)."""
        return self.scan_groups(flags)


def _check_alone(decays, weight, rounding) -> None:
    """The checks of an update with no pairs (``ema_update_many_([], [])``) that a call with pairs
    makes per group: the decay or weight (a device weight on its own device) and the rounding (the
    seed and step are checked after, as with pairs)."""
    if decays is not None or weight is None or isinstance(weight, (list, tuple, numbers.Real)):
        resolve_weights(decays, weight, 1, "cpu")
    else:
        resolve_weights(None, weight, 1, describe(weight, "weight").device)
    if rounding != "nearest":
        check_rounding(rounding, "bfloat16")


# Pairs of recent ema_update_many_ calls (the one KeptLRU of _backends.kept): found by every tensor's
# address (arrays of one framework) and kept with a check of every tensor's dtype, shape, strides and
# writability: a hit needs both, i.e. the same memory in the same layout, so the cached storage-order
# walk is right for the tensors passed now. (An address is not enough: a.view(3, 4).t() is a's memory in
# another order, which an uncached call refuses.) Anything else misses and gets the full check. The key is
# tuples of ints (untracked by the garbage collector: a key per call costs no collections) and the check
# compares without keeping what it reads; the cache holds numbers only, never a tensor or a storage.
# Arrays with no cheap key (not torch or NumPy, or of two frameworks) are keyed by their full
# descriptions, writability and framework included: a hit passes every check a first call made.
class _Kept(NamedTuple):
    """A kept pair layout: its PairShadow, what bumps the shadows' versions after an update (their
    framework's, one call; None: nothing to tell, NumPy), and the shadows :func:`update_many` checks
    again at every call: those whose framework's refusal of an in-place write depends on its modes
    (torch: grad mode, inference mode; every shadow, for a described key, which holds no
    ``requires_grad``). Only they can be refused: the others passed the first call's check, and the
    layout guard holds what it read."""
    pairs: PairShadow
    bump: Callable[[list], None] | None
    recheck: tuple = ()


_PAIRS: KeptLRU[_Kept] = KeptLRU(32, _launch.CHOSEN_DRIVERS)


def _cheap_key(shadows: list, sources: list) -> tuple | None:
    return cheap_key((len(shadows),), shadows + sources)     # torch: data_ptr, one C-level map


def _described_key(tensors) -> tuple:
    return tuple((b.device, b.address, b.kind, b.shape, b.order, b.writable, b.framework) for b in
                 (describe(t, "tensor") for t in tensors))


def cached(shadows: list, sources: list, called: str = "shadows", at: Sequence[int] | None = None
           ) -> PairShadow | None:
    """The PairShadow of an earlier :func:`of` over the same memory in the same dtypes, shapes and
    strides (every check passed then and holds now), or None: a miss, or arrays with no cheap key.
    The drop-ins' per-step path: a hit needs no look at the pairs beyond the key and the layout
    check. ``called``: what the list ``shadows`` is called in a refusal, ``at``: the positions there of
    ``shadows`` (default: their own): ``target_params[at[i]]``."""
    key = _cheap_key(shadows, sources)
    found = None if key is None else _PAIRS.hit(key, shadows + sources)
    if found is None:
        return None
    if found.recheck:               # what the framework refuses to write in place now (as lerp_)
        check_written([shadows[i] for i in found.recheck],
                      [f"{called}[{i if at is None else at[i]}]" for i in found.recheck])
    return found.pairs


def _of(shadows: list, sources: list, names: tuple[list, list] | None = None) -> _Kept:
    tensors = shadows + sources
    cheap = _cheap_key(shadows, sources)
    key = (_described_key(shadows), _described_key(sources)) if cheap is None else cheap
    found = _PAIRS.hit(key, tensors)
    if found is not None:
        return found
    made = PairShadow(shadows, sources, names)
    if cheap is not None:           # arrays of one framework: its bump, one call
        recheck = tuple(i for i, s in enumerate(shadows) if moded(s))
        kept = _Kept(made, _backends.version_bump(shadows[0]) if shadows else None, recheck)
        return _PAIRS.keep(key, kept, _backends.layout_guard(tensors))
    every = tuple(range(len(shadows)))
    return _PAIRS.keep(key, _Kept(made, _backends.bump_versions, every))   # several: each its own


def of(shadows: list, sources: list) -> PairShadow:
    """The PairShadow of these pairs: from the cache (the last 32 layouts), else checked and kept."""
    return _of(shadows, sources).pairs


def update_many(shadows: list, sources: list, decay, names: tuple[list, list] | None = None, **options) -> None:
    """``shadows[i] <- lerp(shadows[i], sources[i], 1 - decay)`` through :func:`of`'s PairShadow
    (:func:`fastema.ema_update_many_`), then the written shadows' versions bumped (torch: as
    ``_foreach_lerp_`` bumps them). ``names``: as :class:`PairShadow`'s, for a first call's
    refusals (a hit's pairs passed them)."""
    kept = _of(shadows, sources, names)
    if kept.recheck:                # what the framework refuses to write in place now (as lerp_)
        check_written([shadows[i] for i in kept.recheck],
                      [f"shadows[{i}]" if names is None else names[0][i] for i in kept.recheck])
    kept.pairs.update(decay, **options)
    if kept.bump is not None:
        kept.bump(shadows)


def clear() -> None:
    """Forget every cached pair layout (:func:`fastema.clear_caches`)."""
    _PAIRS.clear()
