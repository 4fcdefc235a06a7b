"""Benchmark rows that cannot lie (issue 70 item 7): one helper for the headline, the probe, the
training step and the suite, on the GPU and the CPU.

The 2026-11-26 H100 headline timed ``torch._foreach_lerp_`` on shadows made with
``p.detach().float()``, which for float32 parameters *is* the parameter: the baseline lerped each
tensor into itself, "3830 GB/s", above the run's own device copy, and fastema read 0.77x where it is
1.09x. Three rules make such a row impossible to report:

1. **A baseline agrees with fastema before it is timed** (:func:`agree`, :func:`checked`): each
   baseline is run once from the same inputs as fastema's update (after ``move()`` has moved the
   sources, so that a baseline which does nothing, or copies, cannot pass), its result is compared
   with fastema's in float64 (within ``rtol`` of the result's scale: a few ulps of the result's
   dtype by default), and a result that shares memory with an input (an update written into its
   own sources) or with fastema's result (a baseline reading back fastema's arrays agrees whatever it
   does), or that the baseline's run left as it was (it compared nothing it wrote), is refused
   (issue 77, M8). :class:`Refused` names the row.
2. **No row above the run's device-time ceiling** (:func:`device_ceiling`, :func:`within_ceiling`): the
   ceiling is timed by CUDA events at the run's largest size, never end to end (a call and a sync:
   at 2^24 on the H200 that read 2885 GB/s against the device's 4262, so every "% of a copy" was
   about 1.5x too high, issue 86): the fastest round of the plain streams measured (a copy, 1:1 read
   to write; an in-place ``add_``, 2:1, a lerp's traffic: a read-heavy stream passes a copy by a few
   percent on HBM). A row whose GB/s (the bytes it must move over its median device time) passes it
   is refused; one above the copy but within the ceiling is flagged. On the CPU a torch copy is no
   ceiling (caches, threads: the 2026-11-22 CPU table has lerps at 150-600% of it), so no CPU row
   reads a "% of copy".
3. **A baseline is timed with fastema's checked update in the same rounds**: :func:`checked` keeps
   fastema's update of the check (:func:`take_reference`), which the suite times round for round
   with the baseline (``bench/suite/conftest.py``): a speed-up is read from rounds taken in turn, never
   from two rows timed apart.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Ceiling", "Refused", "agree", "aliased", "checked", "device_ceiling", "is_baseline", "move_sources",
           "same_work", "take_reference", "to_float64", "within_ceiling"]

_REFERENCE: list = []
"""fastema's update of the last check (:func:`checked`, :func:`same_work`), for :func:`take_reference`."""


class Refused(RuntimeError):
    """A benchmark row that would report a false figure; ``row`` names it."""

    def __init__(self, row: str, why: str):
        super().__init__(f"{row}: refused: {why}")
        self.row, self.why = row, why


def is_baseline(name: str) -> bool:
    """Whether a row named ``name`` (an implementation, or ``"scenario | implementation"``) is a
    baseline (checked): not fastema's own, not the copy."""
    impl = name.rsplit(" | ", 1)[-1]
    return not (impl.startswith("fastema") or impl.startswith("copy") or impl.endswith("(ceiling)"))


def to_float64(x) -> np.ndarray:
    """``x`` (a torch tensor, a NumPy array, a device array, a JAX or TensorFlow array) on the host,
    as float64."""
    if hasattr(x, "detach"):                                  # torch
        import torch

        return x.detach().to(torch.float64).cpu().numpy()
    if hasattr(x, "copy_to_host"):                            # numba device array
        x = x.copy_to_host()
    elif hasattr(x, "get") and hasattr(x, "__cuda_array_interface__"):   # CuPy
        x = x.get()
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):          # TensorFlow
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def _span(x) -> tuple[int, int] | None:
    """The byte range of the memory behind ``x`` (its whole storage), or None where unknown."""
    if hasattr(x, "untyped_storage"):                         # torch: the storage, not the view
        st = x.untyped_storage()
        return (st.data_ptr(), st.data_ptr() + st.nbytes()) if st.nbytes() else None
    if isinstance(x, np.ndarray):
        from numpy.lib.array_utils import byte_bounds

        base = x
        while isinstance(base.base, np.ndarray):
            base = base.base
        lo, hi = byte_bounds(base)
        return (lo, hi) if hi > lo else None
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface:
        ptr = iface["data"][0]
        size = int(np.prod(iface["shape"])) * np.dtype(iface["typestr"]).itemsize
        return (ptr, ptr + size) if size else None
    return None


def aliased(outputs: Iterable, inputs: Iterable) -> list[tuple[int, int]]:
    """``(output index, input index)`` of every output whose memory overlaps an input's."""
    spans = [_span(i) for i in inputs]
    found = []
    for k, out in enumerate(outputs):
        s = _span(out)
        if s is None:
            continue
        found += [(k, j) for j, t in enumerate(spans) if t is not None and s[0] < t[1] and t[0] < s[1]]
    return found


def _default_rtol(arrays: Sequence) -> float:
    """A few ulps of the coarsest dtype among ``arrays`` (float32 1e-5; 16-bit 2^-6)."""
    sizes = [getattr(getattr(a, "dtype", None), "itemsize", 4) for a in arrays]
    return 2.0 ** -6 if min(sizes, default=4) <= 2 else 1e-5


def agree(row: str, ours: Callable[[], Sequence], theirs: Callable[[], Sequence], *,
          inputs: Sequence = (), rtol: float | None = None, start: Sequence | None = None,
          prior: Sequence | None = None) -> str:
    """Run ``ours()`` then ``theirs()`` once (each runs its update and returns the arrays it wrote,
    both from the same start) and refuse the baseline row ``row`` (:class:`Refused`) where its
    arrays overlap ``inputs`` (it wrote into what it reads) or fastema's result (it reads back
    fastema's update, whatever it did), differ in number or shape, or differ
    in value by more than ``rtol`` times the largest magnitude of fastema's result. ``start``
    (float64 arrays, as they were before the update) refuses a check that cannot tell an update
    from none: where fastema's update moved its result by no more than twice the tolerance (a 16-bit
    average at decay 0.999 after a small move: a baseline that did nothing agreed). ``prior``
    (float64 arrays: the baseline's result as it was before ``theirs()`` ran) refuses a baseline
    whose run left its result as it was: it vouches for nothing (a copy of fastema's result, arrays
    the baseline does not write). Returns the agreement, in words."""
    raw = list(ours())
    mine = [to_float64(a) for a in raw]
    if start is not None:
        tol = _default_rtol(raw) if rtol is None else rtol
        moved = max((float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), 1e-30)
                     for a, b in zip(mine, start) if a.size and a.shape == np.shape(b)), default=0.0)
        if not moved > 2 * tol:
            raise Refused(row, f"fastema's update moved its result by {moved:.3g} of its scale, within twice "
                               f"the check's tolerance ({tol:.3g}): a baseline that did nothing would agree; "
                               f"move the sources further before the check")
    got = list(theirs())
    clash = aliased(got, inputs)
    if clash:
        raise Refused(row, f"its result {clash[0][0]} is the memory of input {clash[0][1]} (an update "
                           f"written into its own sources; {len(clash)} such pairs): copy the shadow")
    clash = aliased(got, raw)
    if clash:
        raise Refused(row, f"its result {clash[0][0]} is the memory of fastema's result {clash[0][1]} "
                           f"({len(clash)} such pairs): it would read back fastema's update, whatever it "
                           f"did; give the baseline a shadow of its own")
    if prior is not None and len(prior) == len(got) and all(
            np.array_equal(a, to_float64(b), equal_nan=True) for a, b in zip(prior, got)):
        raise Refused(row, f"its {len(got)} result arrays are as they were before it ran: the check would "
                           f"compare what it did not write; return the arrays the baseline writes")
    if len(got) != len(mine):
        raise Refused(row, f"{len(got)} arrays written against fastema's {len(mine)}")
    tol = _default_rtol(raw + got) if rtol is None else rtol
    worst = 0.0
    for k, (a, b) in enumerate(zip(mine, (to_float64(g) for g in got))):
        if a.shape != b.shape:
            raise Refused(row, f"array {k} of shape {b.shape} against fastema's {a.shape}")
        if a.size == 0:
            continue
        both_nan = np.isnan(a) & np.isnan(b)                # a NaN where fastema reads NaN agrees
        a, b = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, b)
        scale = max(float(np.max(np.abs(a))), 1e-30)
        err = float(np.max(np.abs(a - b))) / scale
        if not np.isfinite(err) or err > tol:
            raise Refused(row, f"array {k} differs from fastema's result by {err:.3g} of its scale "
                               f"(tolerance {tol:.3g}): not the same update")
        worst = max(worst, err)
    return f"agrees with fastema within {worst:.2g} of scale (tolerance {tol:.2g})"


def move_sources(params: Sequence, sixteen_bit: bool | None = None) -> None:
    """Torch sources moved once before a check, far enough that one update at decay 0.999 shows
    through the comparison's precision: by 0.1 N(0, 1) where the results are 32-bit, by 100 N(0, 1)
    where they are 16-bit (compared at 2^-6 of their scale). ``sixteen_bit``: whether the results are
    (default: whether the sources are)."""
    import torch

    if sixteen_bit is None:
        sixteen_bit = any(p.element_size() <= 2 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=100.0 if sixteen_bit else 0.1)


def checked(fns: dict, results: dict, *, ours: str, inputs: Sequence = (),
            move: Callable[[], object] | None = None, rtol: float | None = None, before: bool = True) -> dict:
    """``fns`` (row name -> the callable to time), once every baseline row of it (:func:`is_baseline`)
    has agreed with fastema's row ``ours`` (:func:`agree`). ``results``: row name -> a callable
    returning the arrays that row's callable writes; a baseline without one is refused. ``move()``
    runs first (it moves the sources, so the check sees an update: far enough that fastema's result
    moves by more than twice the tolerance, or every baseline is refused, :func:`agree`'s ``start``);
    then ``ours``, then each baseline, once each, from the same start: give each its own shadow, equal
    at the start. A baseline is refused too where its result shares memory with fastema's, or where
    its run left its result as it was (read before and after it: a result that is a copy of
    fastema's, or arrays it does not write, vouch for nothing). ``before=False`` where the results
    can be read only after the update (the swap's parameters while swapped in, a smoother's values
    before its first update): neither before-and-after refusal then."""
    missing = [n for n in fns if is_baseline(n) and n not in results]
    if missing:
        raise Refused(missing[0], "no result to check against fastema's (every baseline row is run "
                                  "once against fastema's result before it is timed)")
    start = [to_float64(a) for a in results[ours]()] if before else None
    if move is not None:
        move()
    fns[ours]()
    reference = list(results[ours]())
    for name, fn in fns.items():
        if is_baseline(name):
            prior = [to_float64(a) for a in results[name]()] if before else None
            agree(name, lambda: reference, lambda fn=fn, name=name: (fn(), results[name]())[1],
                  inputs=inputs, rtol=rtol, start=start, prior=prior)
    same_work(fns[ours])
    return fns


def same_work(fn: Callable[[], object]) -> None:
    """Keep ``fn`` (fastema's update, checked against a baseline: :func:`checked` keeps its own) as
    the one a baseline is timed beside (:func:`take_reference`). A check that calls :func:`agree`
    itself names it so."""
    _REFERENCE[:] = [fn]


def take_reference() -> Callable[[], object] | None:
    """fastema's update the last check kept (:func:`same_work`), or None; forgotten once taken."""
    ref = _REFERENCE[0] if _REFERENCE else None
    _REFERENCE.clear()
    return ref


@dataclass(frozen=True)
class Ceiling:
    """A run's ceiling, by device time at its largest size (:func:`device_ceiling`): ``GBps`` the
    fastest round of its plain streams, ``copy_GBps`` the copy's median (what "% of a copy" divides
    by), ``source`` the stream that set ``GBps``, ``elements`` the size."""

    GBps: float
    copy_GBps: float
    source: str
    elements: int


def device_ceiling(streams: dict, *, elements: int, timing: str = "device") -> Ceiling:
    """The ceiling of a run from its plain streams timed at its largest size: ``streams`` maps a
    name (one starting with ``copy``) to ``(bytes a call, [seconds a call, one a round])``. Only
    device time (CUDA events) makes one: ``timing`` anything else is refused (:class:`Refused`), as
    is a copy missing or timed in fewer than 2 rounds (a median without its spread)."""
    if timing != "device":
        raise Refused("copy (ceiling)", f"a {timing} time is no ceiling: a call and a sync carry the launch "
                                        f"and the sync (the suite's 2^24 copy read 2885 GB/s end to end against "
                                        f"the device's 4262, issue 86); time the copy by CUDA events")
    copy = next((k for k in streams if k.startswith("copy")), None)
    if copy is None:
        raise Refused("copy (ceiling)", f"no copy among the ceiling's streams {sorted(streams)}")
    best, source = 0.0, copy
    for name, (nbytes, seconds) in streams.items():
        if len(seconds) < 2 or min(seconds) <= 0:
            raise Refused(name, f"{len(seconds)} rounds: a ceiling needs at least 2 positive rounds (its spread)")
        if nbytes / min(seconds) / 1e9 > best:
            best, source = nbytes / min(seconds) / 1e9, name
    nbytes, seconds = streams[copy]
    return Ceiling(best, nbytes / float(np.median(seconds)) / 1e9, source, elements)


def within_ceiling(row: str, gbps: float | None, ceiling: Ceiling | None) -> str | None:
    """Refuse ``row`` (:class:`Refused`) where its ``gbps`` (by its median device time) passes the
    run's ``ceiling``; a flag (words) where it passes the copy but not the ceiling; None otherwise,
    or where either is missing (a CPU row, a row that moves no counted bytes)."""
    if not gbps or ceiling is None:
        return None
    if gbps > ceiling.GBps:
        raise Refused(row, f"{gbps:.0f} GB/s is {100 * gbps / ceiling.GBps:.1f}% of this run's ceiling "
                           f"({ceiling.GBps:.0f} GB/s, the fastest round of {ceiling.source} by device "
                           f"time at {ceiling.elements} elements): it cannot move the bytes it is counted for")
    if gbps > ceiling.copy_GBps:
        return (f"{100 * gbps / ceiling.copy_GBps:.0f}% of the copy, within the run's ceiling "
                f"({ceiling.source}, {ceiling.GBps:.0f} GB/s)")
    return None
