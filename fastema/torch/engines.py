"""The average handed to inference engines: vLLM's ``WeightSource``, SGLang's flattened buckets,
``load_weights``.

Recipes: ``docs/guides/rl_teachers.md`` ("Publishing to inference engines"). Every form consumes
``(name, tensor)`` pairs in the model's state-dict order: an average's ``iter_weights()`` (fresh
tensors, gathered bucket by bucket where the average is sharded or split: a collective there, which
every rank iterates; a form stopped early closes it, and it reads the rest of its collectives, so
the other ranks finish) or any iterable of pairs. Buckets fill in stream order up to
``bucket_bytes``; a larger tensor travels alone, in a bucket of its own size (vLLM's packed IPC
producer refuses one; verl's bucketing sends it alone, as here).

**Checked against consumers written from the engines' sources, untested against the engines
themselves** (they cannot be installed where fastema is tested): ``tests/bridges/test_engines.py``
round-trips each form bit for bit through the receiving code of vLLM's
``vllm/distributed/weight_transfer/`` (``base.py``, ``nccl_engine.py``, ``packed_tensor.py``) and
SGLang's ``python/sglang/srt/weight_sync/tensor_bucket.py`` (both layouts) and
``_update_weights_from_flattened_bucket``.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ._state import wire

__all__ = ["DEFAULT_BUCKET_BYTES", "FlattenedTensorMetadata", "WeightSource", "flattened_buckets",
           "load_weights", "named_tensor_buckets"]

#: The bucket size every form takes by default: 256 MiB, TRL's weight-sync bucket
#: (``iter_weights``'s default).
DEFAULT_BUCKET_BYTES = 256 << 20

_VLLM = "vllm.distributed.weight_transfer.base"


@dataclasses.dataclass
class FlattenedTensorMetadata:
    """Where one tensor sits in a flattened bucket: SGLang's ``FlattenedTensorMetadata``, field for
    field.

    :func:`flattened_buckets` builds SGLang's class where ``sglang`` imports (the engine unpickles
    nothing of fastema's), else this one (or ``metadata_type=``'s). Offsets: bytes in a ``uint8``
    bucket of several dtypes, elements in one of one dtype (older SGLang)."""

    name: str                  # the tensor's name in the stream (the model's state-dict key)
    shape: torch.Size          # its shape
    dtype: torch.dtype         # its dtype
    start_idx: int             # where it starts in the bucket's flattened_tensor
    end_idx: int               # where it ends (exclusive)
    numel: int                 # end_idx - start_idx, in the same unit


def named_tensor_buckets(weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES
                         ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The stream cut into lists of ``(name, tensor)`` of at most ``bucket_bytes`` each, in stream
    order.

    verl's and slime's ``get_named_tensor_buckets(iterable, bucket_bytes)``: a tensor joins the
    current bucket while the bucket's bytes stay within ``bucket_bytes``, else it starts the next; a
    tensor larger than ``bucket_bytes`` is a bucket alone. The tensors are the stream's own (no
    copy); a lazy stream (``iter_weights()``) is read one tensor past the bucket handed out, so at
    most one bucket and one tensor are held here. The shared piece of :func:`flattened_buckets` and
    :func:`load_weights`.

    Args:
        weights: ``(name, tensor)`` pairs (``iter_weights()``, a ``state_dict().items()``) or a
            mapping.
        bucket_bytes: the most bytes of tensors in one bucket (a positive int).

    Yields:
        ``list[tuple[str, torch.Tensor]]``, never empty; none from a stream that yields nothing (a
        rank outside ``iter_weights(to=...)``, which must still iterate its stream).

    Raises:
        ValueError: ``bucket_bytes`` not a positive int, a name twice, or an empty mapping or list.
        TypeError: an item not a ``(str, torch.Tensor)`` pair, or a DTensor shard.
    """
    where = "named_tensor_buckets"
    size, pairs = wire.bucket_bytes_of(bucket_bytes, where), wire.checked_pairs(weights, where)
    return ([(n, t) for n, t, _ in bucket] for bucket, _ in wire.runs(pairs, size, False))


def _flat(bucket: list[tuple[str, torch.Tensor, int]], size: int, dtype: torch.dtype, unit: int,
          metadata_type: Callable[..., Any]) -> dict[str, Any]:
    """One SGLang bucket: a fresh 1-D ``dtype`` tensor of ``size`` units, the tensors at their
    offsets, gaps zeroed."""
    flat = torch.empty(size, dtype=dtype, device=bucket[0][1].device)
    metadata, end = [], 0
    for name, tensor, start_bytes in bucket:
        start = start_bytes // unit
        if start > end:
            # alignment padding: defined bytes, never stale memory
            flat[end:start].zero_()
        values = tensor.detach().reshape(-1)
        end = start + (values.numel() * tensor.element_size()) // unit
        # bytes, or the tensor's own dtype (a no-op view)
        flat[start:end].copy_(values.view(dtype))
        metadata.append(metadata_type(name=name, shape=tensor.shape, dtype=tensor.dtype,
                                      start_idx=start, end_idx=end, numel=end - start))
    return {"flattened_tensor": flat, "metadata": metadata}


def flattened_buckets(weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, *, multi_dtype: bool | None = None,
                      metadata_type: Callable[..., Any] | None = None) -> Iterator[dict[str, Any]]:
    """The stream packed as SGLang's flattened buckets, what ``update_weights_from_tensor`` takes
    with ``load_format="flattened_bucket"``.

    Each item is ``{"flattened_tensor": tensor, "metadata": [FlattenedTensorMetadata, ...]}``, what
    SGLang's ``FlattenedTensorBucket`` is rebuilt from on the engine side (its
    ``reconstruct_tensors()`` slices each tensor out for the model's ``load_weights``). Serialize
    it per TP rank (``sglang.srt.utils``) and send it::

        payloads = [MultiprocessingSerializer.serialize(bucket, output_str=True) for _ in
        range(tp_size)] engine.update_weights_from_tensor(payloads, load_format="flattened_bucket",
        flush_cache=False)

    The layout follows SGLang's ``python/sglang/srt/weight_sync/tensor_bucket.py``:

    - ``multi_dtype=True`` (SGLang's ``FlattenedTensorBucket.supports_multi_dtypes``): one ``uint8``
      ``flattened_tensor`` per bucket holding every dtype, ``start_idx`` / ``end_idx`` / ``numel``
      in bytes, the tensors in stream order. SGLang's own packer puts each tensor right after the
      last; here a tensor starts at a multiple of its element size, the gap zeroed, because the
      engine's ``view(dtype)`` of an unaligned slice fails (an odd-sized ``uint8`` or ``bool``
      buffer before a float tensor); the metadata carries the offsets, so the engine reads either
      layout alike.
    - ``multi_dtype=False`` (older SGLang, before that flag): one ``flattened_tensor`` per dtype, in
      that dtype, offsets in elements. Each bucket of the stream is split by dtype as slime and verl
      do, one item per dtype in the order each dtype first comes in the bucket (the stream order
      within a dtype); each is its own ``update_weights_from_tensor`` call.
    - ``None`` (the default): as the SGLang importable here says (its ``FlattenedTensorBucket``'s
      flag, read as slime reads it: absent is ``False``); ``True`` where SGLang is not importable.

    Every bucket is a fresh tensor (SGLang may still copy from one over CUDA IPC after its call
    returns) of at most ``bucket_bytes``, but a larger tensor, alone in a bucket of its own size.

    Args:
        weights: ``(name, tensor)`` pairs: an average's ``iter_weights(dtype=...)`` (cast to the
            engine's dtype there) or a ``state_dict().items()``; a bucket is made on the device of
            its first tensor.
        bucket_bytes: the most bytes in one ``flattened_tensor`` (a positive int).
        multi_dtype: the layout (above).
        metadata_type: the class each metadata entry is built as (keyword arguments ``name``,
            ``shape``, ``dtype``, ``start_idx``, ``end_idx``, ``numel``); by default SGLang's
            ``FlattenedTensorMetadata`` when importable, else :class:`FlattenedTensorMetadata`.

    Yields:
        ``dict`` with ``"flattened_tensor"`` (1-D ``torch.Tensor``) and ``"metadata"`` (a list);
        none from a stream that yields nothing (a rank outside ``iter_weights(to=...)``; SGLang
        refuses an empty bucket).

    Raises:
        ValueError: as :func:`named_tensor_buckets`.
        TypeError: as :func:`named_tensor_buckets`, ``multi_dtype`` not a bool or None, or
            ``metadata_type`` not callable.
    """
    where = "flattened_buckets"
    bucket_bytes = wire.bucket_bytes_of(bucket_bytes, where)
    if multi_dtype is not None and not isinstance(multi_dtype, bool):
        raise TypeError(f"{where}: multi_dtype must be True (one uint8 bucket of every dtype), "
                        "False (one bucket per dtype, SGLang before supports_multi_dtypes) or None "
                        f"(as SGLang here says), got {multi_dtype!r}")
    if metadata_type is not None and not callable(metadata_type):
        raise TypeError(f"{where}: metadata_type must be a class taking name=, shape=, dtype=, "
                        "start_idx=, end_idx=, numel= (SGLang's FlattenedTensorMetadata), got "
                        f"{metadata_type!r}")
    sglang = wire.optional("sglang.srt.weight_sync.tensor_bucket")
    # read as slime reads it; no SGLang here: today's layout
    if multi_dtype is None:
        bucket = getattr(sglang, "FlattenedTensorBucket", None)
        flag = getattr(bucket, "supports_multi_dtypes", False)
        multi_dtype = bool(flag) if wire.optional("sglang") is not None else True
    meta = metadata_type if metadata_type is not None else \
        getattr(sglang, "FlattenedTensorMetadata", FlattenedTensorMetadata)
    pieces = wire.runs(wire.checked_pairs(weights, where), bucket_bytes, multi_dtype)
    return _flattened(pieces, multi_dtype, meta)


def _flattened(buckets: Iterator[tuple[list[tuple[str, torch.Tensor, int]], int]],
               multi_dtype: bool, meta: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    for bucket, size in buckets:
        if multi_dtype:
            yield _flat(bucket, size, torch.uint8, 1, meta)
            continue
        by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor, int]]] = {}
        for name, tensor, _ in bucket:
            group = by_dtype.setdefault(tensor.dtype, [])
            group.append((name, tensor, group[-1][2] + wire.nbytes(group[-1][1]) if group else 0))
        for dtype, group in by_dtype.items():
            unit = group[0][1].element_size()
            units = (group[-1][2] + wire.nbytes(group[-1][1])) // unit
            yield _flat(group, units, dtype, unit, meta)


def load_weights(model: Any,
                 weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], *,
                 bucket_bytes: int | None = None) -> set[str]:
    """Feed the stream to ``model.load_weights``, the loader of vLLM's and SGLang's models.

    ``model.load_weights(weights: Iterable[tuple[str, torch.Tensor]])`` is how a vLLM or SGLang
    model takes weights (and what vLLM's weight-transfer engines call with each received chunk).
    With ``bucket_bytes=None`` the checked stream is handed over in one call, one tensor at a time;
    with a size, the model gets one call per bucket of :func:`named_tensor_buckets` (a list), as
    vLLM's packed NCCL receiver calls it. The whole stream is always consumed, even where the model
    stops early or raises (the stream is a collective on a sharded average: every rank must finish
    it); a model that stopped early is then refused by name. A stream that yields nothing (a rank
    outside ``iter_weights(to=...)``) calls nothing.

    Args:
        model: anything with a callable ``load_weights(iterable)`` (a vLLM or SGLang model, or
            ``types.SimpleNamespace(load_weights=fn)`` around a function).
        weights: ``(name, tensor)`` pairs: an average's ``iter_weights(...)`` or a
            ``state_dict().items()``.
        bucket_bytes: ``None`` (one streamed call) or the most bytes per call (a positive int).

    Returns:
        The names the model reports loaded (vLLM's ``load_weights`` returns a set of them, possibly
        the fused names), or the names fed where it returns ``None``.

    Raises:
        TypeError: a model without ``load_weights``, or as :func:`named_tensor_buckets`.
        ValueError: as :func:`named_tensor_buckets`, or a model that returned before the stream's
            end.
    """
    where = "load_weights"
    loader = getattr(model, "load_weights", None)
    if not callable(loader):
        raise TypeError(f"{where}: {type(model).__name__} has no load_weights(weights) method; "
                        "pass a vLLM or SGLang model, or wrap a loader function: "
                        "types.SimpleNamespace(load_weights=fn)")
    size = None if bucket_bytes is None else wire.bucket_bytes_of(bucket_bytes, where)
    fed: list[str] = []
    loaded: set[str] = set()

    # what a call reports loaded (vLLM: a set), else names
    def report(result: Any, names: list[str]) -> None:
        loaded.update(result if isinstance(result, (set, frozenset, list, tuple)) else names)

    if size is not None:
        try:
            for bucket in named_tensor_buckets(weights, size):
                report(loader(bucket), [name for name, _ in bucket])
        except Exception:
            # the other ranks' gathers go on: this rank joins them, then raises
            wire.drain(weights)
            raise
        return loaded
    stream = wire.checked_pairs(weights, where)
    first = next(stream, None)
    # a rank outside iter_weights(to=...): nothing to load
    if first is None:
        return loaded

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in itertools.chain((first,), stream):
            fed.append(name)
            yield name, tensor

    try:
        report(loader(counted()), fed)
    except Exception:
        wire.drain(stream)
        raise
    # drained: on a sharded average the other ranks' gathers go on
    left = sum(1 for _ in stream)
    if left:
        raise ValueError(f"{where}: {type(model).__name__}.load_weights returned after {len(fed)} "
                         f"of the {len(fed) + left} tensors (the rest were read and dropped, so no "
                         "rank hangs); the model must take every tensor of the stream, or pass "
                         "bucket_bytes= to hand it lists")
    return loaded


class WeightSource:
    """An average as vLLM's trainer-side ``WeightSource``: ``metadata()`` without a gather,
    ``iter()`` a fresh pass.

    vLLM >= 0.29 moves a trainer's weights through a ``TrainerWeightTransferEngine`` (NCCL, IPC,
    ...) built with ``source=``; its ``send_weights()`` reads ``source.metadata()`` (each entry's
    ``name``, ``dtype``, ``shape``: the receivers allocate from it) and then iterates the source, on
    every trainer rank (``vllm/distributed/weight_transfer/base.py``, ``nccl_engine.py``). This
    source is the average's stream:

    - ``metadata()`` is the average's ``weights_metadata(row, dtype=dtype)``: names, wire dtypes and
      full shapes, no gather; as vLLM's ``ParamMeta`` when vLLM is importable here.
    - ``iter(source)`` is a new ``iter_weights(row, dtype=..., bucket_bytes=..., to=...)`` each time
      (vLLM replays the source each round; a collective where the average is sharded or split, which
      every rank iterates), each tensor checked against the metadata (vLLM allocated from it).
    - Where vLLM is importable, this is registered as a virtual subclass of vLLM's ``WeightSource``
      ABC.

    Args:
        average: a fastema torch average with ``iter_weights`` and ``weights_metadata``
            (:class:`~fastema.torch.EMA`, ``WindowAverage``, ``TargetNetwork``, ``PostHocEMA``).
        row: which average, passed on first where given: a row of a multi-decay EMA,
            ``PostHocEMA``'s ``sigma_rel`` (the profile it synthesises: it has no default, give
            one); None for the average's default (row 0).
        dtype: the wire dtype (the engine's, e.g. ``torch.bfloat16``), or None for the average's
            own.
        bucket_bytes: the gather bucket of ``iter_weights`` (bounds the extra memory while
            streaming).
        to: the ranks that keep the gathered tensors (``iter_weights``'s; vLLM's sender, rank 0, is
            enough).
        names: a predicate on the name keeping the tensors to send (the others are read: the gathers
            stay in step), or None; vLLM's packed path fails after an odd-sized ``bool``/``uint8``
            buffer: send floats.

    Raises:
        TypeError: ``average`` without ``iter_weights`` / ``weights_metadata``, or ``dtype`` not a
            torch dtype.
        ValueError: ``bucket_bytes`` not a positive int, or an average with no tensors (named).
    """

    def __init__(self, average: Any, row: Any = None, *, dtype: torch.dtype | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, to: Any = "all",
                 names: Callable[[str], bool] | None = None) -> None:
        missing = [m for m in ("iter_weights", "weights_metadata")
                   if not callable(getattr(average, m, None))]
        if missing:
            raise TypeError("WeightSource needs a fastema.torch average (EMA, WindowAverage, "
                            f"TargetNetwork, PostHocEMA), got {type(average).__name__} without "
                            f"{' and '.join(missing)}(); for a plain module, vLLM's own "
                            "ModuleSource(module) is the source")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError("WeightSource: dtype must be a torch.dtype (the engine's, e.g. "
                            f"torch.bfloat16) or None (the average's own), got {dtype!r}")
        if names is not None and not callable(names):
            raise TypeError("WeightSource: names must be a predicate on a tensor's name (lambda "
                            f"name: ...) or None (every tensor), got {names!r}")
        self.average, self.row, self.dtype, self.to, self.names = average, row, dtype, to, names
        self._row = () if row is None else (row,)
        self.bucket_bytes = wire.bucket_bytes_of(bucket_bytes, "WeightSource")
        vllm_source = getattr(wire.optional(_VLLM), "WeightSource", None)
        if vllm_source is not None and callable(getattr(vllm_source, "register", None)):
            vllm_source.register(WeightSource)
        # the average's own checks of row and dtype; empty refused
        self.metadata()

    def _keeps(self, name: str) -> bool:
        return self.names is None or bool(self.names(name))

    def _metas(self) -> list[Any]:
        metas = [m for m in self.average.weights_metadata(*self._row, dtype=self.dtype)
                 if self._keeps(m.name)]
        if not metas:
            raise ValueError(f"WeightSource: the {type(self.average).__name__} holds no "
                             f"tensors{'' if self.names is None else ' that names= keeps'}, so "
                             "there is nothing to send; average a model with floating-point "
                             "parameters")
        return metas

    def metadata(self) -> list[Any]:
        """``(name, dtype, shape)`` of every tensor the stream yields, in its order, with no gather.

        Returns:
            vLLM's ``ParamMeta(name, dtype, shape)`` (``shape`` a tuple) when vLLM is importable,
            else the average's ``WeightMeta`` entries (the same three fields).
        """
        metas = self._metas()
        param_meta = getattr(wire.optional(_VLLM), "ParamMeta", None)
        if param_meta is None:
            return metas
        return [param_meta(m.name, m.dtype, tuple(m.shape)) for m in metas]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A fresh pass over the average: ``(name, tensor)`` in state-dict order, each checked
        against :meth:`metadata` (a collective where the average is sharded or split: iterate on
        every rank)."""
        metas = self._metas()
        stream = self.average.iter_weights(*self._row, dtype=self.dtype,
                                           bucket_bytes=self.bucket_bytes, to=self.to)
        kept = ((n, t) for n, t in stream if self._keeps(n))
        return wire.matching(metas, kept, type(self.average).__name__, wire.receives(self.to))

    def __repr__(self) -> str:
        return (f"WeightSource({type(self.average).__name__}, row={self.row!r}, "
                f"dtype={self.dtype}, to={self.to!r})")
