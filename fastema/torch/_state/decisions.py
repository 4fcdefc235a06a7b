"""The ranks' decisions that are no read: the other half of the agreement (:mod:`.agree`, the read
protocol).

A post-hoc run's snapshot folder, which rank 0 alone looks into, the casts each rank made for a sharded
snapshot, a DCP save's steps that rank 0 alone makes, an attached average's load (whether every rank
of its mesh holds its entries): :func:`findings` exchanges every rank's finding (one object all-gather;
:func:`mesh_findings` over a mesh, dimension by dimension), and :func:`refuse_together` raises on every
rank, in the words of a refused read ("... refused on rank N (its global rank), so on every rank:
reason"); :func:`decided` is both. Every collective here runs under the process group's timeout
(``init_process_group(timeout=...)``): none sets its own; where a decision knows what a rank that never
joins means, it says so when that wait ends (:func:`timed_out`). No other module of fastema but
:mod:`.agree` makes a collective decision (a test holds the library to it).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

from .agree import Disagreement

__all__ = ["decided", "findings", "found_together", "joined", "mesh_findings", "refuse_together",
           "timed_out"]


def findings(mine: object, group=None, waiting: str | None = None) -> list:
    """Every rank's ``mine`` (a small picklable value: what a rank's check found, None for nothing)
    in ``group``'s rank order (default: every rank), on every rank: one object all-gather.
    ``waiting``: what a rank that never joins means, and what to do (:func:`timed_out`)."""
    import torch.distributed as dist

    found: list = [None] * dist.get_world_size(group)
    with timed_out(waiting):
        dist.all_gather_object(found, mine, group=group)
    return found


def mesh_findings(mine: object, groups: list, waiting: str | None = None) -> dict:
    """Every rank's ``mine`` over the mesh of ``groups`` (:meth:`Agreement.groups`), by global
    rank, on every rank: a :func:`findings` per dimension, each rank handing on what it learnt
    before (as :func:`agree`). Empty ``groups``: this rank's alone."""
    import torch.distributed as dist

    known = {dist.get_rank() if dist.is_available() and dist.is_initialized() else 0: mine}
    for group, *_ in groups:
        for theirs in findings(known, group, waiting):
            known.update(theirs)
    return dict(sorted(known.items()))


def found_together(find: Callable[[], dict], groups: list, what: str, waiting: str,
                   names: Sequence[str]) -> dict[str, list[int]]:
    """``find()`` (this rank's ``name -> rows``, of inf or NaN to repair) made on every rank of the
    mesh of ``groups`` together: a rank whose ``find()`` raised makes every rank raise (its own
    error there, a ``Disagreement`` naming ``what`` and its reason on the others), and every rank
    gets every rank's rows, joined, in ``names``' order. Empty ``groups``: ``find()``'s own."""
    try:
        mine = find()
    except Exception as err:
        if not groups:
            raise
        mesh_findings(({}, f"{type(err).__name__}: {err}"), groups)
        raise
    if not groups:
        return mine
    every = mesh_findings((mine, None), groups, waiting=waiting)
    refuse_together(what, {rank: e for rank, (_, e) in every.items()})
    return joined([theirs for theirs, _ in every.values()], names)


def joined(founds: Iterable[dict], names: Sequence[str]) -> dict[str, list[int]]:
    """Every rank's ``name -> rows`` in one, in the average's order (``names``)."""
    union: dict[str, set] = {}
    for found in founds:
        for n, rows in found.items():
            union.setdefault(n, set()).update(rows)
    return {n: sorted(union[n]) for n in names if n in union}


@contextlib.contextmanager
def timed_out(waiting: str | None) -> Iterator[None]:
    """The block's collective, whose failure (the process group's timeout: a ``RuntimeError`` on
    gloo, NCCL's ``DistBackendError`` one too) raises :class:`Disagreement` saying ``waiting`` (what
    a rank that never joined means, what to do); ``None``: torch's error as it is."""
    try:
        yield
    except RuntimeError as failed:
        if waiting is None:
            raise
        raise Disagreement(f"the ranks' agreement failed on this rank ({failed}): where it timed "
                           f"out, a rank did not join it: {waiting}") from failed


def refuse_together(what: str, problems: list | dict, error: type[Exception] = Disagreement,
                    group=None) -> None:
    """Raise ``error`` on every rank when a rank found a problem (``problems``: every rank's, None
    where none: a list as :func:`findings` gives them, a dict by global rank as
    :func:`mesh_findings`), naming the lowest such rank and its reason: ``"{what} refused on rank
    N (its global rank), so on every rank: reason"``. ``error``: what the caller's callers catch
    (:class:`Disagreement` by default; an ``OSError`` for a file that could not be written)."""
    ranked = problems.items() if isinstance(problems, dict) else enumerate(problems)
    for k, problem in ranked:
        if problem is not None:
            rank = k
            if group is not None and not isinstance(problems, dict):
                import torch.distributed as dist

                rank = dist.get_global_rank(group, k)
            raise error(f"{what} refused on rank {rank} (its global rank), so on every rank: "
                        f"{problem}")


def decided(what: str, problem: str | None, error: type[Exception] = Disagreement,
            group=None) -> None:
    """Every rank joins with its ``problem`` (None: none), and every rank raises when one has one
    (:func:`findings`, then :func:`refuse_together`): a rank that refuses never leaves the others
    in a collective alone."""
    refuse_together(what, findings(problem, group), error, group)
