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

The exchange is one all-gather of :data:`SIZE` (512) bytes per rank and group, made at the start of each
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

_FIELDS = 11      # int64: refused, its global rank, what differs (1 calls, 2 run, 4 digest), calls: lowest and its
                  # global rank, highest and its global rank; run id: lowest, highest; digest: lowest, highest
_TEXT = 424       # bytes of a refusal's reason (UTF-8, cut there)
SIZE = _FIELDS * 8 + _TEXT          # bytes each rank sends (512)


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


def agree(groups: list, mine: Stamp, what: str, refusal: BaseException | str | None = None,
          differs: str | None = None) -> None:
    """Exchange ``mine`` (and ``refusal``, this rank's reason for refusing) with every rank of each of
    ``groups`` (``(process group, device type[, compare the run id])``, every rank in the same order); raise
    :class:`Disagreement` on every rank when a rank refused or the stamps differ. ``what``: the read
    or load, for the message. A rank that refused raises the same error (chained to its own).

    Every group is exchanged before anything is raised, and what a rank learnt (a refusal, the lowest
    and highest stamps) travels on in its next groups' exchanges: over the groups of a mesh's dimensions,
    one after the other, that reaches every rank of the mesh (as an all-reduce by dimensions), so no
    rank is left waiting in an exchange that another has left. The run id is compared over the groups
    that agreed it (the replica group: put first), and a difference there travels on as a flag. ``differs``:
    what a difference of the digests means (default: the counters of what the ranks load)."""
    import torch.distributed as dist

    me = dist.get_rank()
    text = b"" if refusal is None else (str(refusal) or type(refusal).__name__).encode("utf-8", "replace")[:_TEXT]
    c, r, d = _int64(mine.calls), _int64(mine.run), _int64(mine.digest)
    state = [int(refusal is not None), me, 0, c, me, c, me, r, r, d, d]
    ordered = sorted(groups, key=lambda g: not (g[2] if len(g) > 2 else True))    # the run id's groups first
    for group, device, *run_here in ordered:
        with_run = run_here[0] if run_here else True
        ranks = dist.get_world_size(group)
        sent = torch.zeros(SIZE, dtype=torch.uint8)
        sent[:_FIELDS * 8] = torch.tensor(state, dtype=torch.int64).view(torch.uint8)
        if text:
            sent[_FIELDS * 8:_FIELDS * 8 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        got = torch.empty(ranks * SIZE, dtype=torch.uint8, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(got, sent.to(device), group=group)
        rows = got.cpu().view(ranks, SIZE)
        heads = rows[:, :_FIELDS * 8].contiguous().view(torch.int64).view(ranks, _FIELDS).tolist()
        for k, h in enumerate(heads):
            if h[0] and (not state[0] or h[1] < state[1]):     # the refusal of the lowest global rank
                state[0], state[1] = 1, h[1]
                text = bytes(rows[k, _FIELDS * 8:].tolist()).rstrip(b"\0")
            state[2] |= h[2]
            if (h[3], h[4]) < (state[3], state[4]):
                state[3], state[4] = h[3], h[4]
            if (h[5], -h[6]) > (state[5], -state[6]):
                state[5], state[6] = h[5], h[6]
            if with_run:
                state[7], state[8] = min(state[7], h[7]), max(state[8], h[8])
            state[9], state[10] = min(state[9], h[9]), max(state[10], h[10])
        state[2] |= (state[3] != state[5]) | (state[7] != state[8]) << 1 | (state[9] != state[10]) << 2
    if state[0]:
        reason = text.decode("utf-8", "replace")
        err = Disagreement(f"{what} refused on rank {state[1]} (its global rank), so on every rank: {reason}")
        raise err from (refusal if isinstance(refusal, BaseException) else None)
    if state[2]:
        raise Disagreement(_differ(what, state, differs))


def _differ(what: str, state: list, differs: str | None = None) -> str:
    mask, lo, lo_rank, hi, hi_rank = state[2:7]
    if mask & 1:
        said = f"rank {lo_rank}: {lo} update() calls, rank {hi_rank}: {hi} update() calls"
        why = ("a rank skipped update() (call it on every rank after every optimizer step, whatever that rank's "
               "batch gave: skip_nonfinite=True skips a bad step on the device) or loaded another save")
    elif mask & 2:
        said = f"{lo} update() calls on every rank, split run ids differ"
        why = "the ranks loaded checkpoints of different runs, or made their averages separately"
    elif differs is not None:                    # the read's own arguments (iter_weights: dtype, bucket, to)
        return (f"{what}: the ranks called it with other {differs} ({lo} update() calls on every rank). Every "
                f"rank joins each gather of the read, so pass the same {differs} on every rank (to= names the "
                f"ranks that keep the tensors). Nothing was read or changed, on every rank.")
    else:
        said = f"{lo} update() calls on every rank, other counters differ"
        why = "the ranks loaded different saves"
    return (f"{what}: the ranks' slices of the average are not of one state ({said}, global ranks; {why}). "
            f"Each slice would be read from another step, so nothing was read or changed, on every rank. Load "
            f"one checkpoint on every rank to go on.")


@contextlib.contextmanager
def agreed(groups: list, mine: Stamp, what: str, differs: str | None = None) -> Iterator[None]:
    """Run the block (a read's or a load's checks), then :func:`agree`: when the block raises, this rank
    joins refusing and its error goes on; when it does not, every rank checks the others. No
    exchange when ``groups`` is empty."""
    if not groups:
        yield
        return
    try:
        yield
    except BaseException as err:                        # a Ctrl-C in the checks too: the others must not wait
        try:
            agree(groups, mine, what, err, differs)
        except Disagreement:
            pass                                        # every rank raises: this one its own error
        raise
    agree(groups, mine, what, differs=differs)


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
