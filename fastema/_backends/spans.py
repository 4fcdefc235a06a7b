"""Where arrays' bytes are: overlap checks (:func:`overlaps`, :func:`disjoint`,
:func:`first_shared`), a cheap key of arrays' addresses and the guard that their layouts held
(:func:`address_key`, :func:`layout_guard`), and the version bumps that tell a framework its
arrays were written in place (:func:`bump_versions`). The package (:mod:`fastema._backends`) names
them all.
"""
from __future__ import annotations

from ._buf import Buf
from .dispatch import backend_of


def overlaps(a: Buf, b: Buf) -> bool:
    """True when two buffers on the same device share any byte."""
    if a.device != b.device or not a.numel or not b.numel or not a.address or not b.address:
        return False
    return a.address < b.address + b.nbytes and b.address < a.address + a.nbytes


def disjoint(bufs: list, names: list) -> None:
    """ValueError naming two of ``bufs`` that share memory (tied or aliased tensors, the same
    tensor twice): an in-place update or swap would then touch those bytes twice."""
    spans = sorted((b.device, b.address, b.address + b.nbytes, i) for i, b in enumerate(bufs)
                   if b.numel and b.address)
    end, last = None, None
    for device, lo, hi, i in spans:
        if end is not None and device == end[0] and lo < end[1]:
            a, b = names[last], names[i]
            raise ValueError(f"{a} and {b} share memory (the same tensor twice, tied weights or a "
                             f"view of another source); pass each tensor once. Nothing was "
                             f"written.")
        if end is None or device != end[0] or hi > end[1]:
            end, last = (device, hi), i


def first_shared(a: list, b: list) -> tuple[int, int] | None:
    """``(i, j)`` of a span ``a[i]`` that shares a byte with a span ``b[j]``, or None: the check
    that one list of tensors writes nothing another reads (spans within one list may overlap).
    A span is ``(device, address, nbytes)`` (:func:`.torch.span` of a tensor of any dtype); empty
    ones and address 0 are skipped. One sort of both lists, then one sweep."""
    spans = sorted((dev, lo, lo + n, side, i) for side, spans in enumerate((a, b))
                   for i, (dev, lo, n) in enumerate(spans) if n and lo)
    reach: list = [None, None]      # per list: (device, end, i) of its furthest-reaching span
    for dev, lo, hi, side, i in spans:
        other = reach[1 - side]
        if other is not None and other[0] == dev and lo < other[1]:
            return (i, other[2]) if side == 0 else (other[2], i)
        mine = reach[side]
        if mine is None or mine[0] != dev or hi > mine[1]:
            reach[side] = (dev, hi, i)
    return None


def address_key(objs: list) -> tuple | None:
    """A cheap key of ``objs``' addresses (see :meth:`Backend.address_key`), or None."""
    if not objs:
        return ()
    backend = backend_of(objs[0])
    return None if backend is None else backend.address_key(objs)


def layout_guard(objs: list):
    """A check that arrays at ``objs``' addresses (equal :func:`address_key`) still have their
    dtypes, shapes and strides (see :meth:`Backend.layout_guard`)."""
    return backend_of(objs[0]).layout_guard(objs) if objs else _none_again


def _none_again(objs: list) -> bool:
    return not objs


def version_bump(x):
    """The function that tells ``x``'s framework that fastema's kernels wrote a list of its arrays
    in place (torch: autograd's version counters), or None where nothing is told
    (:meth:`Backend.version_bump`)."""
    backend = backend_of(x)
    return None if backend is None else backend.version_bump()


def bump_versions(objs: list) -> None:
    """Tell each array's framework that fastema's kernels wrote ``objs`` in place, as its own
    in-place operations do (torch: autograd's version counters, so that a pending backward that
    saved one raises rather than using the new values; nothing for NumPy, JAX...). One call where
    every array is of one type (the usual case); no sync."""
    if not objs:
        return
    if len(set(map(type, objs))) == 1:
        bump = version_bump(objs[0])
        if bump is not None:
            bump(objs)
        return
    for x in objs:                                        # several frameworks: one array at a time
        bump = version_bump(x)
        if bump is not None:
            bump([x])
