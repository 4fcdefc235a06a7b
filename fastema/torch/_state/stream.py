"""The average streamed out: ``(name, tensor)`` in the model's state-dict order, with bounded memory.

What ``iter_weights()`` / ``weights_metadata()`` of the torch faces run (``EMA``, ``WindowAverage``,
``PostHocEMA``'s synthesised averages, ``TargetNetwork``'s target), for engines that take weights as
a stream (vLLM's ``WeightSource``, SGLang's buckets, TRL's and verl's loops):

- every tensor yielded is a fresh tensor of its own: never a view of the shadow, of the model or of
  a buffer a later swap, update or export writes (verl#7014: a lazy iterator yielding live views);
- an average split over replicas (``shard_replicas``) is read bucket by bucket: its pieces in the
  stream's order, cut into buckets of one rank's consecutive pieces of at most ``bucket_bytes``, one
  broadcast from that rank per bucket, each full tensor made from the buckets as they come (HSDP:
  each local shard so made, then one ``full_tensor()`` per parameter over the shard dimension). What
  streaming adds is one bucket and the tensor being made. (An all-gather per bucket would be
  balanced only in the slices' own order, not the state dict's: in the state dict's order
  consecutive tensors lie in one rank's slice, so each rank's part of a bucket would be padded to
  that rank's, ``ranks`` times the bytes moved and held.) Other sharded tensors (FSDP2, tensor
  parallel, ZeRO) are gathered one at a time (one ``full_tensor()`` per parameter);
- an offloaded average (host shadow) is brought to the model's device a tensor at a time (the
  split one: a bucket at a time, through the owner's packing);
- each floating tensor is cast to the wire ``dtype`` on the way (from the model's dtype: a streamed
  tensor is ``full_state_dict()[name].to(dtype)`` bit for bit); integer tensors never;
- a tied tensor (several state-dict names of one tensor) is yielded once, under its first name;
- a module's extra state that is not a tensor (``get_extra_state()`` returning a dict, an int) is
  left out: the stream and its metadata are tensors only (``averaged_state_dict()`` and ``save()``
  to a ``.pt`` file hold it, as ``model.state_dict()`` gives it);
- it is a collective where the average is sharded or split: every rank iterates it, in the same
  order, and the ranks of ``to`` keep what is gathered (the others' iterators yield nothing). The
  ranks agree first, in the exchange every gathering read makes (:mod:`.agree`): a rank that skipped
  an ``update()``, makes another read, refuses an argument, or passes other arguments makes every
  rank raise. A stream ends on every rank: one closed early on a rank (a ``break``, a consumer that
  raised, an iterator dropped or closed, even before its first item) reads the rest of its
  collectives there without yielding, and so does one that ran out of memory making a split entry
  this rank keeps (its buckets: :mod:`.buckets`), so the other ranks finish and the next read works.

``update()`` is untouched: it makes no collective and knows of no stream. A stream is of one state:
an ``update()`` or a swap while it is open makes its next step raise (every rank does the same when
every rank updated, as they must).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Generator, Iterable, Iterator, NamedTuple, Union

import torch

from .._sharding import params as _sharded
from .agree import Read, Sequence, Stamp, agreed
from .buckets import BucketReads, bucketed

TorchCheckpoint = Any       # .checkpoint.TorchCheckpoint, which reads through this module

__all__ = ["DEFAULT_BUCKET", "Ranks", "Stream", "WeightMeta", "average_meta", "average_stream", "check_stream",
           "receives", "synthesized_meta", "synthesized_order", "synthesized_stream", "target_meta", "target_stream",
           "tensors_only", "tied_once"]

DEFAULT_BUCKET = 256 << 20        # bytes of one bucket read (TRL's 256 MB)
Stream = Iterator[tuple[str, torch.Tensor]]        # what iter_weights() returns
_Closable = Generator[tuple[str, torch.Tensor], None, None]   # close() reads the rest
Ranks = Union[str, int, Iterable[int]]             # to=: "all", a global rank, or a collection of them
_DIFFERS = "iter_weights() arguments (row, dtype, bucket_bytes, to)"
_TARGET_DIFFERS = ("iter_weights() arguments (row, dtype, bucket_bytes, to) or number of "
                   "hard_update() calls")


class WeightMeta(NamedTuple):
    """One tensor of a stream, known before anything is gathered (vLLM's ``ParamMeta``)."""
    name: str                 # its state-dict name (the first one of a tied tensor)
    dtype: torch.dtype        # the dtype it is streamed in (the wire dtype for floating tensors)
    shape: torch.Size         # its full, global shape


def check_stream(dtype, bucket_bytes, to) -> frozenset | None:
    """The stream's arguments checked (each refusal names the fix); returns the receiving global
    ranks (None: every rank)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None (the model's dtypes) or a floating torch dtype (torch.bfloat16, ...), "
                        f"got {dtype!r}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 16:
        raise ValueError(f"bucket_bytes must be a number of bytes >= 16 (what one bucket read from a split "
                         f"average may hold), got {bucket_bytes!r}")
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if isinstance(to, str):
        if to != "all":
            raise ValueError(f"to must be 'all', a global rank or a collection of global ranks, got {to!r}")
        return None
    ranks = [to] if isinstance(to, int) else list(to) if isinstance(to, (list, tuple, set, frozenset, range)) else None
    if ranks is None or not ranks or any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
        raise TypeError(f"to must be 'all', a global rank (int) or a non-empty collection of global ranks, "
                        f"got {to!r}")
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ValueError(f"to={to!r} names rank(s) {bad[:5]} outside the {world} rank(s) of this job (global ranks "
                         f"0..{world - 1}{'; no process group is initialised' if world == 1 else ''})")
    return frozenset(ranks)


def receives(receivers: frozenset | None) -> bool:
    """Whether this rank keeps what a stream to ``receivers`` (:func:`check_stream`'s) yields."""
    dist = torch.distributed
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return receivers is None or me in receivers


def _wire(model_dtype: torch.dtype, dtype) -> torch.dtype:
    return dtype if dtype is not None and model_dtype.is_floating_point else model_dtype


def _shape(t) -> torch.Size:
    ds_shape = getattr(t, "ds_shape", None)               # a ZeRO-3 parameter: its full shape
    return torch.Size(ds_shape) if ds_shape is not None else torch.Size(t.shape)


def tensors_only(entries: list) -> list:
    """``entries`` (``(name, model tensor, source, value)``) without a module's extra state that
    is not a tensor (``get_extra_state()``'s dict or int): a stream is tensors only."""
    return [e for e in entries if isinstance(e[1], torch.Tensor)]


def tied_once(entries: list) -> list:
    """``entries`` (``(name, model tensor, source, value)``) with each tied tensor once, under its first
    name: one tracked source, or one model tensor where nothing tracks it; tensors only
    (:func:`tensors_only`)."""
    seen: set = set()
    out = []
    for e in tensors_only(entries):
        key = ("source", e[2]) if e[2] is not None else ("tensor", id(e[1]))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _fresh(out: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
    """``out`` itself when it shares no storage with ``sources``, else a copy of it."""
    ptr = out.untyped_storage().data_ptr()
    if any(s.untyped_storage().data_ptr() == ptr for s in sources if s.device == out.device):
        return out.clone()
    return out


# ------------------------------------------------------------------ a model average (EMA, WindowAverage)

def average_meta(ckpt: TorchCheckpoint, row: int, dtype) -> list[WeightMeta]:
    """What :func:`average_stream` yields, described from the model alone: no gather, no collective."""
    check_stream(dtype, DEFAULT_BUCKET, "all")
    return [WeightMeta(name, _wire(t.dtype, dtype), _shape(t)) for name, t, _, _ in tied_once(ckpt.entries(row))]


class _Item(NamedTuple):
    name: str
    t: Any                      # the model's tensor (a DTensor, a ZeRO-3 parameter, or plain)
    source: str | None          # what the average tracks it as (None: the model's own value is streamed)
    value: Callable | None      # this rank's part of the average (or the copied buffer)
    wire: torch.dtype
    spec: Any                   # the sharding Spec of the source, or None
    home: torch.device | None   # where the streamed tensor is made (None: where it is read)


def average_stream(ckpt: TorchCheckpoint, read: Read, dtype, bucket_bytes: int | None, to,
                   check: Callable[[], None] | None = None, whole: bool = False) -> _Closable:
    """The stream of average ``read.row`` (see the module). The ranks agree now, at the call (a
    collective where the average is sharded or split; ``read``: which read it is); the tensors are
    read as the iterator is consumed. ``check``: the caller's checks, run inside the agreement.
    ``whole``: ``full_state_dict()``'s form (every name of a tied tensor, each tensor where it is
    read, the arguments its own). ``bucket_bytes`` None: the split's own bucket
    (``ShardReplicas(bucket=)``)."""
    row, what = read.row, read.kind
    if bucket_bytes is None:
        bucket_bytes = ckpt.side.avg.gather_bucket or DEFAULT_BUCKET     # a split's own, declared
    box: list = []
    agreement = ckpt.agreement
    stamp = None if whole else Stamp(agreement.calls(None), agreement.split_id,      # the host's
                                     _digest(row, dtype, bucket_bytes, to), agreement.plan())
    with agreement.agreed(read, stamp=stamp, differs=_DIFFERS):
        calls = agreement.calls(True)          # the device's, once (CUDA graph replays count it)
        if check is not None:
            check()                                    # the caller's argument checks: inside, never a hang
        box.append(check_stream(dtype, bucket_bytes, to))
        ckpt.swap.refuse(what)
        entries = tensors_only(ckpt.entries(row))
        ckpt.nonfinite.refuse(what, row)               # inf or NaN: refused on every rank (agreed)
        items = _items(ckpt, entries if whole else tied_once(entries), dtype, whole)
        reads = BucketReads(items, bucket_bytes)
        reads.reserve()                                # its buckets' buffer: a refusal if it fails

    def unchanged(last: bool = False) -> None:   # the device's again after the last entry only
        if agreement.calls(True if last else None) != calls or ckpt.swap.swapped:
            raise RuntimeError(f"{ckpt.kind}.{what}: the average changed while it was streamed (update() or swap() "
                               f"was called after iter_weights() began); {_yielded(last)}")

    return _primed(items, box[0], reads, unchanged, bool(agreement.groups()))


def _yielded(last: bool) -> str:
    """What a stream that saw a change had yielded, and what to do: the earlier state where an eager
    call is seen at the next tensor; a mix where the device's count is read after the last one
    (compiled steps and CUDA graph replays advance it alone)."""
    yielded = ("the tensors yielded may mix the earlier and the later state (a compiled update or "
               "a CUDA graph replay is seen after the last tensor): discard them" if last else
               "the tensors yielded so far are of the earlier state")
    return (f"{yielded}. Consume a stream whole between two updates (on every rank), then start "
            f"a new one")


def _items(ckpt: TorchCheckpoint, entries: list, dtype, whole: bool) -> list[_Item]:
    specs = ckpt.side.specs
    items = []
    for name, t, source, value in entries:
        spec = specs.get(source) if source else None
        split = spec is not None and spec.pieces is not None and spec.slices
        if whole:             # full_state_dict(): where the average is kept (offloaded: the host)
            home = value().device if split else None
        else:                 # a stream: on the model's device (an offloaded average brought there)
            home = _sharded.local_tensor(t).device
        items.append(_Item(name, t, source, value, _wire(t.dtype, dtype), spec, home))
    return items


def _digest(*args) -> int:
    """A digest of a stream's arguments (``to`` as the ranks it names), which every rank must pass alike."""
    to = args[-1]
    try:
        ranks = check_stream(None, 16, to)
        to = "all" if ranks is None else sorted(ranks)
    except (TypeError, ValueError):
        to = repr(to)                                  # refused by the checks, inside the agreement
    return zlib.crc32(repr((*map(str, args[:-1]), to)).encode())


def _primed(items: list, receivers, reads: BucketReads, unchanged, collective: bool) -> _Closable:
    """:func:`_stream`, started: from here its close (even before its first item) reads the rest."""
    stream = _stream(items, receivers, reads, unchanged, collective)
    next(stream)
    return stream


def _stream(items: list, receivers, reads: BucketReads, unchanged, collective: bool) -> _Closable:
    """Every entry of ``items`` in order: split pieces through ``reads``' broadcasts, each received
    when the entry being made needs it, the others one at a time. Held besides what the consumer
    holds: the latest bucket and the entry being made, never more.

    ``collective`` (the ranks agreed: every rank joins each collective): a stream closed before its
    end (a ``break``, a consumer that raised, an iterator dropped or closed) reads the rest of its
    collectives without yielding (nothing kept), and so does one that ran out of memory making a
    split entry this rank keeps, so that the other ranks finish; then the consumer's exception, or
    the error, goes on."""
    keep = receives(receivers)
    k = -1
    try:
        yield None                              # type: ignore[misc]  # primed: not handed out
        for k in range(len(items)):
            out = _entry(items, reads, k, keep, unchanged)
            if out is not None:
                yield items[k].name, out
                out = None                      # the consumer holds it, the stream does not
        unchanged(True)                         # a CUDA graph replayed meanwhile: the device knows
    except GeneratorExit:                       # closed at a yield: entry k was read whole
        if collective:
            _rest(items, reads, k + 1, unchanged)
        raise
    except (torch.OutOfMemoryError, MemoryError):
        if collective and bucketed(items[k]):   # a kept entry's allocation: before its collectives
            _rest(items, reads, k, unchanged)
        raise


def _entry(items: list, reads: BucketReads, k: int, keep: bool, unchanged) -> torch.Tensor | None:
    if bucketed(items[k]):
        return reads.entry(k, keep, unchanged)
    unchanged()
    return _one(items[k], keep)


def _rest(items: list, reads: BucketReads, start: int, unchanged) -> None:
    """Entries ``start..`` read and dropped: every collective of the stream joined, nothing kept (an
    ``unchanged()`` that fails stops it there: the owner's pieces must not come from another state).
    """
    for k in range(start, len(items)):
        _entry(items, reads, k, False, unchanged)


def _one(item: _Item, keep: bool) -> torch.Tensor | None:
    """One entry that is not a split piece, fresh, cast, on its device: the model's own value (not
    averaged), a plain average or copied buffer, or a sharded one gathered (``full_tensor()``: a
    collective every rank joins, receiving or not)."""
    name, t, source, value, wire, spec, home = item
    with torch.no_grad():
        if source is None or value is None:
            if _sharded.is_zero3(t):                      # not averaged: gathered on every rank (a collective)
                full = _sharded.zero3_full(t)
                return _cast(full, wire, home) if keep else None
            v = t.detach()
            if _sharded.is_dtensor(v):                    # gathered on every rank (a collective)
                full = _fresh(_sharded.full(v), v.to_local())
                return _cast(full, wire, home) if keep else None
            return v.to(device=home or v.device, dtype=wire, copy=True) if keep else None
        if spec is None:
            if not keep:
                return None                               # a plain average: nothing to gather
            v = value().to(t.dtype)
            return v.to(device=home or v.device, dtype=wire, copy=True) if keep else None
        v = _sharded.full(_sharded.wrap(value().to(t.dtype, copy=True), spec))   # fresh: gathered from a copy
        ds_shape = getattr(t, "ds_shape", None)
        if ds_shape is not None:
            v = v.view(ds_shape)                          # ZeRO-3 partitions gather flat
        return _cast(v, wire, home) if keep else None


def _cast(v: torch.Tensor, wire: torch.dtype, home: torch.device | None) -> torch.Tensor:
    return v.to(device=home or v.device, dtype=wire)


# ------------------------------------------------------------------ a target network's target

def _target_entries(target) -> list:
    from .._tensors.hooks import unwrap

    return tied_once([(n, t, None, None) for n, t in unwrap(target).state_dict(keep_vars=True).items()])


def _one_row(row) -> None:
    if row != 0 or isinstance(row, bool):
        raise IndexError(f"row must be 0: a target network keeps one average (its target), got {row!r}")


def target_meta(target, row: int, dtype) -> list[WeightMeta]:
    """What :func:`target_stream` yields, described from the target alone: no gather, no collective."""
    _one_row(row)
    check_stream(dtype, DEFAULT_BUCKET, "all")
    return [WeightMeta(n, _wire(t.dtype, dtype), _shape(t)) for n, t, _, _ in _target_entries(target)]


def target_stream(target, calls: Callable[..., int], row: int, dtype, bucket_bytes: int, to,
                  sequence: Sequence, what: str = "TargetNetwork.iter_weights()",
                  version: Callable[..., Any] | None = None) -> _Closable:
    """The target network's tensors streamed (see the module): each a fresh copy; a sharded one
    (DTensor) gathered with one ``full_tensor()``, a ZeRO-3 one with DeepSpeed's
    ``GatheredParameters``, collectives every rank of the group joins after the ranks agree
    (``sequence``: the target's agreements so far). ``version``: what changes with every write of
    the target (default: ``calls``), which the ranks agree on too; both read the device's count
    given True (CUDA graph replays count there alone: at the stream's start and end only), the
    host's as it is given None (between)."""
    import torch.distributed as dist

    entries = _target_entries(target)
    groups: list = []
    for _, t, _, _ in entries:
        found: list = []
        if _sharded.is_dtensor(t):
            found = [(t.device_mesh.get_group(d), t.device_mesh.device_type) for d in range(t.device_mesh.ndim)]
        elif _sharded.is_zero3(t):
            found = [(getattr(t, "ds_process_group", None) or dist.group.WORLD, t.ds_tensor.device.type)]
        groups += [g for g in found if all(g[0] is not h[0] for h in groups)]
    box: list = []
    read = Read("iter_weights()", row=row if isinstance(row, int) else None, owner="TargetNetwork")
    # the target's writes besides update() (hard_update()) travel in the digest: a rank that
    # copied alone holds other values, which a gather would mix (ZeRO-3: gathers out of step)
    writes = () if version is None else (version(),)
    stamp = Stamp(calls(), 0, _digest(dtype, bucket_bytes, *writes, to))
    with agreed(groups, read, stamp, sequence, _DIFFERS if version is None else _TARGET_DIFFERS):
        _one_row(row)
        box.append(check_stream(dtype, bucket_bytes, to))
        version = version or calls
        first = version(True)                  # the device's, once (CUDA graph replays count it)
    items = [_Item(n, t, None, None, _wire(t.dtype, dtype), None, _sharded.local_tensor(t).device)
             for n, t, _, _ in entries]

    def unchanged(last: bool = False) -> None:   # the device's again after the last entry only
        if version(True if last else None) != first:
            raise RuntimeError(f"{what}: the target changed while it was streamed (update() or hard_update() was "
                               f"called after iter_weights() began); {_yielded(last)}")

    return _primed(items, box[0], BucketReads(items, bucket_bytes), unchanged, bool(groups))


# ------------------------------------------------------------------ PostHocEMA's synthesised averages

def synthesized_meta(ckpt: TorchCheckpoint, dtype) -> list[WeightMeta]:
    """What :func:`synthesized_stream` yields, described from the model alone (no snapshot read): the
    averaged tensors in ``dtype`` (synthesis's default: float32), the others in the model's (or the
    wire) dtype."""
    check_stream(dtype, DEFAULT_BUCKET, "all")
    averaged = set(ckpt.side.avg.names)
    return [WeightMeta(n, (dtype or torch.float32) if s in averaged else _wire(t.dtype, dtype), _shape(t))
            for n, t, s, _ in tied_once(ckpt.entries(0))]


def synthesized_stream(model, plan, dtype) -> Stream:
    """A synthesis (``plan``: ``.names``, ``.tensor(name)``, fresh: computed or read from the snapshots
    when the stream reaches it) in ``model``'s state-dict order, each tied tensor once, floating tensors
    in ``dtype``; each handed over as it is yielded (the stream keeps none)."""
    try:
        for name in synthesized_order(model, plan.names):
            v = plan.tensor(name)
            yield name, v.to(dtype) if dtype is not None and v.is_floating_point() else v
    finally:
        plan.close()                                   # also when the consumer stops early or it raised


def synthesized_order(model, names: Iterable[str]) -> list[str]:
    """``names`` (a synthesised average's) in ``model``'s state-dict order, each tied tensor once (its
    first name), then any the model does not name."""
    from .._tensors.hooks import unwrap

    given = list(names)
    wanted = set(given)
    order = [n for n, _, _, _ in tied_once([(n, t, None, None) for n, t in
                                            unwrap(model).state_dict(keep_vars=True).items()])]
    named = set(unwrap(model).state_dict().keys())
    return [n for n in order if n in wanted] + [n for n in given if n not in named]
