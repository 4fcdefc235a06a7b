"""The ranks' agreement before a read or a load of a split or sharded average.

A split (``shard_replicas``) or sharded average is read and loaded by collectives: each rank
gathers the others' slices. Two things break that silently or hang it, and this module stops both:

- a rank that refuses (a bad argument, a model changed on that rank alone, a missing or damaged
  file) before the collective leaves the others waiting in it until the process group's timeout
  (30 minutes on gloo). Here it joins a small exchange *refusing*, with its reason, and every rank
  raises at once, naming that rank;
- ranks whose slices are not of one state (a rank skipped an ``update()``, loaded another save's
  file) gather a mix of two steps. Each rank's :class:`Stamp` (``update()`` calls, the split's run
  id, a digest of the counters of what it loads) travels in the same exchange, and every rank
  refuses alike, naming the ranks and what differs.

The exchange is one all-gather of :data:`SIZE` bytes per rank and group, made at the start of each
gathering read (swap of a split average, ``copy_to``, ``full_state_dict``, ``save``, a gathered
``state_dict``) and each load (where it replaces the load's own refusal all-reduce): the header
travels alone, before the first bucket, so that a rank refusing before it knows what it would
have sent still joins. Never in ``update()``: a step stays free of collectives.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Iterator, NamedTuple

import torch

__all__ = ["SIZE", "Disagreement", "Stamp", "agree", "agreed", "load_stamp"]

_FIELDS = 4                         # int64: refused, calls, run, digest
_TEXT = 224                         # bytes of a refusal's reason (UTF-8, cut there)
SIZE = _FIELDS * 8 + _TEXT          # bytes each rank sends


class Disagreement(RuntimeError, ValueError):
    """The ranks of a split or sharded average refused a read or a load together: one of them refused
    (its reason is in the message), or their averages are not of one state. Also a ``ValueError``, what
    a refused load raises on the rank that refused it, so ``except ValueError`` around a load catches it
    on every rank."""


class Stamp(NamedTuple):
    """What a rank's slice is: ``update()`` calls so far, the split's run id (agreed at construction;
    0 where there is none), and a digest of the counters of the state it reads or loads (0: none)."""
    calls: int
    run: int = 0
    digest: int = 0


def _int64(v: int) -> int:
    return (int(v) + 2**63) % 2**64 - 2**63


def agree(groups: list, mine: Stamp, what: str, refusal: BaseException | str | None = None) -> None:
    """Exchange ``mine`` (and ``refusal``, this rank's reason for refusing) with every rank of each of
    ``groups`` (``(process group, device type[, compare the run id])``, every rank in the same order); raise
    :class:`Disagreement` on every rank when a rank refused or the stamps differ. ``what``: the read
    or load, for the message. A rank that refused raises the same error (chained to its own)."""
    import torch.distributed as dist

    text = b"" if refusal is None else (str(refusal) or type(refusal).__name__).encode("utf-8", "replace")[:_TEXT]
    head = torch.tensor([int(refusal is not None), _int64(mine.calls), _int64(mine.run), _int64(mine.digest)],
                        dtype=torch.int64)
    payload = torch.zeros(SIZE, dtype=torch.uint8)
    payload[:_FIELDS * 8] = head.view(torch.uint8)
    payload[_FIELDS * 8:_FIELDS * 8 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) \
        if text else payload[:0]
    for group, device, *run_here in groups:
        ranks = dist.get_world_size(group)
        sent = payload.to(device, copy=True)
        if run_here and not run_here[0]:         # the run id is agreed over the replica group only (HSDP)
            sent[16:24] = 0
        got = torch.empty(ranks * SIZE, dtype=torch.uint8, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(got, sent, group=group)
        rows = got.cpu().view(ranks, SIZE)
        heads = rows[:, :_FIELDS * 8].contiguous().view(torch.int64).view(ranks, _FIELDS).tolist()
        where = lambda r: _where(group, r)          # noqa: E731
        refused = [r for r in range(ranks) if heads[r][0]]
        if refused:
            r = refused[0]
            reason = bytes(rows[r, _FIELDS * 8:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
            others = f" (and {len(refused) - 1} other rank(s))" if len(refused) > 1 else ""
            err = Disagreement(f"{what} refused on {where(r)}{others}, so on every rank: {reason}")
            raise err from (refusal if isinstance(refusal, BaseException) else None)
        stamps = [tuple(h[1:]) for h in heads]
        if any(s != stamps[0] for s in stamps):
            raise Disagreement(_differ(what, stamps, where))


def _where(group, r: int) -> str:
    import torch.distributed as dist

    try:
        g = dist.get_global_rank(group, r)
    except (RuntimeError, ValueError):
        return f"rank {r} of the group"
    return f"rank {r} of the group (global rank {g})" if g != r else f"rank {r}"


def _differ(what: str, stamps: list, where) -> str:
    first = stamps[0]
    odd = [r for r, s in enumerate(stamps) if s != first]
    said = ", ".join(f"{where(r)}: {stamps[r][0]} update() calls" for r in [0, *odd[:4]])
    if any(s[0] != first[0] for s in stamps):
        why = ("a rank skipped update() (call it on every rank after every optimizer step, whatever that rank's "
               "batch gave: skip_nonfinite=True skips a bad step on the device) or loaded another save")
    elif any(s[1] != first[1] for s in stamps):
        why = "the ranks loaded checkpoints of different runs, or made their averages separately"
    else:
        why = "the ranks loaded different saves (their counters differ)"
    return (f"{what}: the ranks' slices of the average are not of one state ({said}; {why}). Each slice would "
            f"be read from another step, so nothing was read or changed, on every rank. Load one checkpoint "
            f"on every rank to go on.")


@contextlib.contextmanager
def agreed(groups: list, mine: Stamp, what: str) -> Iterator[None]:
    """Run the block (a read's or a load's checks), then :func:`agree`: when the block raises, this rank
    joins refusing and its error goes on; when it does not, every rank checks the others. No
    exchange when ``groups`` is empty."""
    if not groups:
        yield
        return
    try:
        yield
    except Exception as err:
        try:
            agree(groups, mine, what, err)
        except Disagreement:
            pass                                        # every rank raises: this one its own error
        raise
    agree(groups, mine, what)


def load_stamp(state) -> Stamp:
    """What a loading rank's checkpoint is (:class:`Stamp`): its update count, split
    run id and a digest of its counters, so ranks loading different saves refuse alike. Never raises
    (a state that is no checkpoint is refused by the checks)."""
    if not isinstance(state, dict):
        return Stamp(-1)
    calls, run = state.get("calls"), state.get("split_id", 0)
    counters = [state.get(k) for k in ("calls", "updates", "schedules", "snapshots", "pushes", "first_time",
                                       "last_time")]       # not PostHocEMA's run_id: each rank draws its own
    return Stamp(calls if type(calls) is int else -1, run if type(run) is int else -1,
                 zlib.crc32(repr(counters).encode()))
