"""The ranks' agreement before a collective read or load: one protocol for every one of them.

A split (``shard_replicas``) or sharded average is read and loaded by collectives: each rank gathers
the others' slices. What breaks that silently or hangs it, and how this module stops it:

- a rank that refuses (a bad argument, a model changed on that rank alone, a missing or damaged
  file, an allocation that failed) before the collective would leave the others waiting in it until
  the process group's timeout (30 minutes on gloo). Here it joins a small exchange *refusing*, with
  its reason, and every rank raises at once, naming that rank. So whatever can fail on one rank (the
  checks, and the buffers a read allocates: a swap's raw window, the gather buckets) runs inside the
  agreed block;
- ranks making different reads (one swaps back while another copies the average out, other rows or
  directions) would pair gathers of different things and mix raw and averaged slices. Each rank's
  :class:`Read` (its kind, direction and row) travels in the exchange, and every rank refuses,
  naming both;
- ranks whose slices are not of one state (a rank skipped an ``update()``, passed another
  ``update(step=)``, loaded another save's file) would gather a mix of two steps. Each rank's
  :class:`Stamp` (``update()`` calls, the split's run id, a digest of the counters of what it loads,
  one of its average's counters) travels in the same exchange, and every rank refuses alike;
- ranks out of step (a read that ran on some ranks only, a rank still inside another collective)
  would pair an exchange with another rank's gather bucket and read data as a header. The header
  starts with a magic number and the average's sequence number (:class:`Sequence`: the exchanges
  this average made, the same on every rank): a row without the magic is no header, and sequence
  numbers that differ mean a read ran on some ranks only. Both are reported as "collectives out of
  step", naming both reads, never read as a refusal; the sequence numbers are then made equal again
  on every rank, so the next read works.

The exchange is one all-gather of :data:`SIZE` bytes per rank and group, made at the start of each
gathering read (a split average's swap in and back and ``copy_to``, ``full_state_dict``, ``save``, a
gathered ``state_dict``, ``averaged_state_dict``, a stream, a sharded snapshot) and each load (where
it replaces the load's own refusal all-reduce), and at the end of the whole reads that hand out
nothing until every rank finished (``full_state_dict``, ``save``: a failure on one rank after the
start, such as the file that could not be written, is then raised on every rank). The header travels
alone, before the first bucket, so that a rank refusing before it knows what it would have sent
still joins. Never in ``update()``: a step stays free of collectives.

The decisions that are no read are :mod:`.decisions`' (the other half of the agreement). Every
collective of both runs under the process group's timeout (``init_process_group(timeout=...)``):
none sets its own, so one rule bounds every wait. No other module of fastema makes a collective
decision (a test holds the library to it); the data gathers of a read
(:mod:`fastema.torch._placement.gather`) and a sharded load's broadcasts run after an agreement.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Callable, Iterator, NamedTuple

import torch

__all__ = ["KINDS", "MAGIC", "SIZE", "Agreement", "Disagreement", "Read", "Sequence", "Stamp",
           "agree", "agreed", "load_stamp", "plan_digest"]

#: the collective reads and loads, by the method making them (what :class:`Read`'s ``kind`` names)
KINDS = ("swap()", "copy_to()", "averaged_state_dict()", "full_state_dict()", "state_dict()",
         "load_state_dict()", "save()", "iter_weights()", "snapshot()",
         "start()")       # start(): a training loop's start (fastema.torch.target.made_on_every_rank)
MAGIC = int.from_bytes(b"fastema\x07", "little")   # every header's first field (an int64 > 0)
_FIELDS = 26      # int64: see _fresh_state
_NAME = 80        # bytes of a read's name; four of them: the lowest and highest read's, the lowest
                  # and highest sequence number's
SIZE = 1024       # bytes a rank sends: the fields, the names, then a refusal's reason (UTF-8, cut)
_TEXT = SIZE - _FIELDS * 8 - 4 * _NAME


class Disagreement(RuntimeError, ValueError):
    """The ranks of a split or sharded average refused a read or a load together: one of them
    refused (its reason is in the message), their averages are not of one state, they make
    different reads, or their collectives are out of step. Also a ``ValueError``, what a refused
    load raises on the rank that refused it, so ``except ValueError`` around a load catches it on
    every rank."""


class Stamp(NamedTuple):
    """What a rank's slice is: ``update()`` calls so far, the split's run id (agreed at construction;
    0 where there is none), a digest of the counters of the state it loads or of the read's arguments
    (0: none), and a digest of the counters of the average it reads (:func:`plan_digest`; 0: none)."""
    calls: int
    run: int = 0
    digest: int = 0
    plan: int = 0


class Read(NamedTuple):
    """Which collective read (or load) a rank makes: what every rank must make alike."""
    kind: str                    # one of KINDS: the method ("swap()", "copy_to()", ...)
    direction: str = ""          # "in" / "back" (swap), "end" (a whole read's last agreement), ...
    row: int | None = None       # the average read (None: the read names no row)
    owner: str = ""              # the face's class name ("EMA"): the checkpoint side sets it

    def __str__(self) -> str:
        name = f"{self.owner}.{self.kind}" if self.owner else self.kind
        name += f" {self.direction}" if self.direction else ""
        return name + (f" of row {self.row}" if self.row is not None else "")


class Sequence:
    """The exchanges an average made (``count``: the same on every rank, as every rank makes each)
    and the read every rank agreed last (``last``: what a rank still in a read's collectives is
    in)."""

    def __init__(self) -> None:
        self.count = 0
        self.last: str | None = None


def _int64(v: int) -> int:
    return (int(v) + 2**63) % 2**64 - 2**63


def _cut(text: str, size: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``size`` bytes at a character's end."""
    data = text.encode("utf-8", "replace")
    return data if len(data) <= size else data[:size].decode("utf-8", "ignore").encode()


def _fresh_state(me: int, seq: int, read: int, refused: bool, stamp: Stamp) -> list:
    c, r, d, p = _int64(stamp.calls), _int64(stamp.run), _int64(stamp.digest), _int64(stamp.plan)
    return [MAGIC,
            seq, me, seq, me,        # 1-4 sequence number: lowest, its global rank, highest, its
            read, me, read, me,      # 5-8 the read's digest: the same
            int(refused), me,        # 9-10 refused, and the refusing global rank
            0,                       # 11 what differs: 1 calls, 2 run id, 4 digest, 8 plan
            c, me, c, me,            # 12-15 calls: lowest, its rank, highest, its rank
            r, r, d, d,              # 16-19 run id: lowest, highest; digest: lowest, highest
            -1, -1,                  # 20-21 a rank that received no header, and its sender
            p, me, p, me]            # 22-25 the plan's digest: lowest, its rank, highest, its rank


def agree(groups: list, read: Read, mine: Stamp, seq: Sequence,
          refusal: BaseException | str | None = None, differs: str | None = None) -> None:
    """Exchange ``read``, ``mine`` and ``seq``'s next number (and ``refusal``, this rank's reason
    for refusing) with every rank of each of ``groups`` (``(process group, device type[, compare the
    run id])``, every rank in the same order); raise :class:`Disagreement` on every rank when a rank
    refused, the reads or stamps differ, or the collectives are out of step. A rank that refused
    raises the same error (chained to its own). ``differs``: what a difference of the stamps'
    digests means (default: the counters of what the ranks load).

    Every group is exchanged before anything is raised, and what a rank learnt (a refusal, the
    lowest and highest values) travels on in its next groups' exchanges: over the groups of a mesh's
    dimensions, one after the other, that reaches every rank of the mesh (as an all-reduce by
    dimensions), so no rank is left waiting in an exchange that another has left. The run id is
    compared over the groups that agreed it (the replica group: put first), and a difference there
    travels on as a flag."""
    import torch.distributed as dist

    if read.kind not in KINDS:
        raise ValueError(f"unknown read kind {read.kind!r}: one of {KINDS}")
    me = dist.get_rank()
    name = str(read)
    seq.count += 1
    text = b"" if refusal is None else _cut(str(refusal) or type(refusal).__name__, _TEXT)
    state = _fresh_state(me, seq.count, zlib.crc32(name.encode()), refusal is not None, mine)
    names = [_cut(name, _NAME)] * 4          # the lowest and highest read's, number's
    ordered = sorted(groups, key=lambda g: not (g[2] if len(g) > 2 else True))   # run id's first
    for group, device, *run_here in ordered:
        rows = _exchange(group, device, state, names, text)
        for k, row in enumerate(rows):
            h = row[:_FIELDS * 8].contiguous().view(torch.int64).tolist()
            if h[0] != MAGIC:                 # no header: that rank is inside another collective
                if state[20] < 0:
                    state[20], state[21] = me, dist.get_global_rank(group, k)
                continue
            at = _FIELDS * 8
            got = [bytes(row[at + i * _NAME:at + (i + 1) * _NAME].tolist()).rstrip(b"\0")
                   for i in range(4)]
            text = _merge(state, names, h, got, row, text, run_here[0] if run_here else True)
    _raise(name, state, names, text, seq, refusal, differs)


def _exchange(group, device, state: list, names: list, text: bytes) -> torch.Tensor:
    """One all-gather of every rank's header over ``group``: ``(ranks, SIZE)`` bytes on the host."""
    import torch.distributed as dist

    sent = torch.zeros(SIZE, dtype=torch.uint8)
    at = _FIELDS * 8
    sent[:at] = torch.tensor(state, dtype=torch.int64).view(torch.uint8)
    for i, n in enumerate(names + [text]):     # the reason after the four names
        if n:
            start = at + i * _NAME
            sent[start:start + len(n)] = torch.frombuffer(bytearray(n), dtype=torch.uint8)
    ranks = dist.get_world_size(group)
    got = torch.empty(ranks * SIZE, dtype=torch.uint8, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(got, sent.to(device), group=group)
    return got.cpu().view(ranks, SIZE)


def _merge(state: list, names: list, h: list, got: list, row: torch.Tensor, text: bytes,
           with_run: bool) -> bytes:
    """``state`` and ``names`` with one rank's header ``h`` (its names ``got``) taken in; returns
    the refusal's reason (the lowest refusing rank's)."""
    for at, lo, hi in ((1, 2, 3), (5, 0, 1)):        # the sequence number, then the read
        if (h[at], h[at + 1]) < (state[at], state[at + 1]):
            state[at], state[at + 1], names[lo] = h[at], h[at + 1], got[lo]
        if (h[at + 2], -h[at + 3]) > (state[at + 2], -state[at + 3]):
            state[at + 2], state[at + 3], names[hi] = h[at + 2], h[at + 3], got[hi]
    if h[9] and (not state[9] or h[10] < state[10]):   # the refusal of the lowest global rank
        state[9], state[10] = 1, h[10]
        text = bytes(row[_FIELDS * 8 + 4 * _NAME:].tolist()).rstrip(b"\0")
    state[11] |= h[11]
    if (h[12], h[13]) < (state[12], state[13]):
        state[12], state[13] = h[12], h[13]
    if (h[14], -h[15]) > (state[14], -state[15]):
        state[14], state[15] = h[14], h[15]
    if with_run:
        state[16], state[17] = min(state[16], h[16]), max(state[17], h[17])
    state[18], state[19] = min(state[18], h[18]), max(state[19], h[19])
    if state[20] < 0 <= h[20]:
        state[20], state[21] = h[20], h[21]
    if (h[22], h[23]) < (state[22], state[23]):
        state[22], state[23] = h[22], h[23]
    if (h[24], -h[25]) > (state[24], -state[25]):
        state[24], state[25] = h[24], h[25]
    state[11] |= ((state[12] != state[14]) | (state[16] != state[17]) << 1
                  | (state[18] != state[19]) << 2 | (state[22] != state[24]) << 3)
    return text


def _raise(name: str, state: list, names: list, text: bytes, seq: Sequence,
           refusal: BaseException | str | None, differs: str | None) -> None:
    said = [n.decode("utf-8", "replace") for n in names]
    chained = refusal if isinstance(refusal, BaseException) else None
    nothing = "Nothing was read or changed, on every rank"
    if state[20] >= 0:                       # a rank received no header: no exchange was paired
        seq.count -= 1
        last = (f"most likely still in the collectives of {seq.last} (read {seq.count} of this "
                f"average, the last one every rank agreed), which stopped on the ranks sending "
                f"headers after its agreement" if seq.last is not None else
                "this average made no read before: a collective of another average or of the "
                "training loop")
        raise Disagreement(f"{name}: collectives out of step: rank {state[20]} received no "
                           f"agreement's header from rank {state[21]} (global ranks), which is "
                           f"inside another collective, {last}, while this rank began {name}. "
                           f"Nothing was read or changed here. Every rank must make the same reads "
                           f"in the same order; a read that stops on one rank after its agreement "
                           f"is a bug of fastema's (please report it)") from chained
    if state[1] != state[3]:                 # a read ran on some ranks only: count alike again
        seq.count = state[3]
        raise Disagreement(f"{name}: collectives out of step: rank {state[2]} makes read "
                           f"{state[1]} of this average ({said[2]}), rank {state[4]} read "
                           f"{state[3]} ({said[3]}) (global ranks): a read ran on some ranks "
                           f"only. {nothing}; the ranks count alike again, so the next read made "
                           f"on every rank works") from chained
    if state[5] != state[7]:
        also = "" if not state[9] else (f" Rank {state[10]} also refused its read: "
                                        f"{text.decode('utf-8', 'replace')}.")
        raise Disagreement(f"{name}: the ranks make different reads ({said[0]} on rank {state[6]}, "
                           f"{said[1]} on rank {state[8]}, global ranks). Every rank joins each "
                           f"gather of one read, so every rank must make the same read (kind, "
                           f"direction and row) in the same order: a read on some ranks only would "
                           f"pair raw with averaged slices.{also} {nothing}") from chained
    if state[9]:
        reason = text.decode("utf-8", "replace")
        raise Disagreement(f"{name} refused on rank {state[10]} (its global rank), so on every "
                           f"rank: {reason}") from chained
    if state[11]:
        raise Disagreement(_differ(name, state, differs))
    seq.last = name


def _differ(what: str, state: list, differs: str | None = None) -> str:
    mask, lo, lo_rank, hi, hi_rank = state[11:16]
    if mask & 1:
        said = f"rank {lo_rank}: {lo} update() calls, rank {hi_rank}: {hi} update() calls"
        why = ("a rank skipped update() (call it on every rank after every optimizer step, "
               "whatever that rank's batch gave: skip_nonfinite=True skips a bad step on the "
               "device) or loaded another save")
    elif mask & 2:
        said = f"{lo} update() calls on every rank, split run ids differ"
        why = "the ranks loaded checkpoints of different runs, or made their averages separately"
    elif mask & 8:
        said = (f"{lo} update() calls on every rank, but the counters of rank {state[23]}'s average (its "
                f"updates, the first and last update's step, its schedules) differ from rank {state[25]}'s")
        why = ("the ranks passed different update(step=), each folding its slice with another decay: "
               "pass the same step on every rank (the global step, not a count of this rank's samples), "
               "or they updated differently")
    elif differs is not None:             # the read's own arguments (iter_weights: dtype, to...)
        return (f"{what}: the ranks called it with other {differs} ({lo} update() calls on every "
                f"rank). Every rank joins each gather of the read, so pass the same {differs} on "
                f"every rank (to= names the ranks that keep the tensors). Nothing was read or "
                f"changed, on every rank.")
    else:
        said = f"{lo} update() calls on every rank, other counters differ"
        why = "the ranks loaded different saves"
    return (f"{what}: the ranks' slices of the average are not of one state ({said}, global ranks; "
            f"{why}). Each slice would be read from another step, so nothing was read or changed, "
            f"on every rank. Load one checkpoint on every rank to go on.")


@contextlib.contextmanager
def agreed(groups: list, read: Read, mine: Stamp, seq: Sequence,
           differs: str | None = None) -> Iterator[None]:
    """Run the block (a read's or a load's checks and allocations), then :func:`agree`: when the
    block raises, this rank joins refusing and its error goes on; when it does not, every rank
    checks the others. No exchange when ``groups`` is empty."""
    if not groups:
        yield
        return
    try:
        yield
    except BaseException as err:         # a Ctrl-C in the checks too: the others must not wait
        try:
            agree(groups, read, mine, seq, err, differs)
        except Disagreement:
            pass                         # every rank raises: this one its own error
        raise
    agree(groups, read, mine, seq, differs=differs)


def plan_digest(state: dict, times: bool = True) -> int:
    """A digest of a plan's counters (``Plan.state()``, a checkpoint's): its calls, updates, first
    and last update's time (``times``: where its decays read them), schedules, a post-hoc run's
    snapshots and pushes. Host numbers only."""
    keys = ("calls", "updates", "schedules", "snapshots", "pushes") + (("first_time", "last_time") if times else ())
    return zlib.crc32(repr([state.get(k) for k in keys]).encode())


def load_stamp(state) -> Stamp:
    """What a loading rank's checkpoint is (:class:`Stamp`): its update count, split
    run id and a digest of its counters, so ranks loading different saves refuse alike. Never raises
    (a state that is no checkpoint is refused by the checks)."""
    if not isinstance(state, dict):
        return Stamp(-1)
    calls, run = state.get("calls"), state.get("split_id", 0)
    return Stamp(calls if type(calls) is int else -1, run if type(run) is int else -1,
                 plan_digest(state))                 # not PostHocEMA's run_id


class Agreement:
    """One average's agreement: the groups its collective reads span (:meth:`groups`) and the block
    each read's checks run in (:meth:`agreed`), numbered by one :class:`Sequence` for every read of
    the average: its checkpoint side's, its swaps' and copy-outs' (both hold this object).

    Args:
        side: the model side (its shadow's replica group, its sharded tensors' meshes).
        kind: the face's class name (every read's owner, in the messages).
        calls: ``update()`` calls so far (what every rank must agree on before a read gathers);
            ``calls(True)``: the device's count (one sync on a GPU: CUDA graph replays count there);
            ``calls(None)``: the host's as it is.
        plan: a digest of the host plan's counters (:func:`plan_digest`; 0: none), what every rank's
            read compares besides the calls (ranks that passed other ``update(step=)``): host
            numbers, read at reads only.
    """

    def __init__(self, side, kind: str, calls: Callable[..., int], plan: Callable[[], int] = lambda: 0):
        self.side, self.kind, self.calls, self.plan = side, kind, calls, plan
        self.sequence = Sequence()          # the agreements made, alike on every rank
        self.refusal: BaseException | None = None   # this rank's, raised in the next agreement (refusing())

    def groups(self, swap: bool = False) -> list:
        """``(process group, device type)`` of every group a collective read or load of this
        average spans (every mesh dimension of its sharded tensors); ``swap``: the groups a swap or
        ``copy_to`` gathers over (a split average's replica group; none for a sharded one, which
        swaps its own shards). Empty without a process group."""
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            return []
        side = self.side
        if swap:
            group = side.avg.group                        # split over replicas: its reads gather
            return [] if group is None else [(group, _replica_device(group))]
        groups: list = []
        specs = side.specs
        replicas = side.avg.group
        for n in side.avg.names + (side.copy.names if side.copy is not None else []):
            spec = specs.get(n)
            if spec is None:
                continue
            for dim in range(spec.mesh.ndim):
                group = spec.mesh.get_group(dim)
                if all(group is not g[0] for g in groups):    # the split's run id: its replicas'
                    split = spec.replica_dim
                    here = split == dim if split is not None else replicas is not None
                    groups.append((group, spec.mesh.device_type, here))
        return groups

    def agreed(self, read: Read, *, swap: bool = False, gathers: bool = True,
               stamp: Stamp | None = None, differs: str | None = None, checked: bool = False):
        """A block of ``read``'s checks and allocations after which every rank of :meth:`groups`
        agrees: a rank whose block raises makes every rank refuse at once, and ranks making other
        reads or whose stamps differ (a rank skipped an ``update()``) refuse alike (:func:`agreed`,
        this average's :class:`Sequence`). No exchange where the read makes no collective
        (``gathers`` False, or no group), unless ``checked``: the block checks what each rank holds
        (an average holding inf or NaN, :mod:`.nonfinite`), so a sharded average's ranks agree over
        its mesh even where the read gathers nothing. ``differs``: what differing stamp digests
        mean."""
        mine = stamp if stamp is not None else Stamp(self.calls(), self.split_id, 0, self.plan())
        groups = self.groups(swap) if gathers else []
        if checked and not groups:
            groups = self.groups()
        block = agreed(groups, read._replace(owner=self.kind), mine, self.sequence, differs)
        refusal, self.refusal = self.refusal, None
        return block if refusal is None else _raising(block, refusal)

    def alone(self) -> contextlib.AbstractContextManager:
        """The block of a read that makes no agreement here (an unsplit swap): a refusal left for the
        read's agreement (:meth:`refusing`) is raised now, before it."""
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            raise refusal
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def refusing(self, err: BaseException) -> Iterator[None]:
        """The block of a read whose argument this rank refuses (``err``) before the read agrees:
        ``err`` is raised inside the block's first agreement (:meth:`agreed`), so every rank of a split
        or sharded average raises at once (never a hang), or at its end where it made none. Raised at
        once where the average spans no group."""
        if not (self.groups(swap=True) or self.groups()):
            raise err
        before, self.refusal = self.refusal, err
        try:
            yield
        finally:
            left, self.refusal = self.refusal, before
        if left is err:                     # no agreement made: nothing collective
            raise err

    @property
    def split_id(self) -> int:
        """The split's run id: rank 0's, agreed at construction; ``load_state_dict()`` takes its
        checkpoint's (``dcp.load``'s template asks none: an unsplit or FSDP2 save has none)."""
        return int(self.side.avg.split_id or 0)


@contextlib.contextmanager
def _raising(block, err: BaseException) -> Iterator[None]:
    """``block`` (an agreement) entered and ``err`` raised inside it: this rank joins refusing."""
    with block:
        raise err
    yield                                   # never reached: a context manager's generator


def _replica_device(group) -> str:
    from .._placement.gather import mesh_device

    return mesh_device(group)
