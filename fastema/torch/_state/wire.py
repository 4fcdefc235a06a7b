"""A stream of ``(name, tensor)`` pairs as the inference engines take it
(:mod:`fastema.torch.engines`): each pair checked as it comes, consecutive runs of at most a
bucket's bytes, and a stream checked against the metadata the receivers allocated from. Imports
torch only (the engines where present, by name)."""
from __future__ import annotations

import importlib
import numbers
from collections.abc import Generator, Iterable, Iterator, Mapping, Sized
from types import ModuleType
from typing import Any

import torch

__all__ = ["STREAM_HINT", "bucket_bytes_of", "checked_pairs", "drain", "matching", "nbytes",
           "optional", "receives", "runs"]

STREAM_HINT = ("pass an average's iter_weights(...) (one pass: a new one each time) or a "
               "state_dict().items()")


# an engine's module where importable (never a dependency)
def optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def bucket_bytes_of(value: Any, where: str) -> int:       # a positive int, or refused
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{where}: bucket_bytes must be a positive int (bytes, e.g. 256 << 20), "
                         f"got {value!r}")
    return int(value)


def checked_pairs(weights: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Each ``(name, tensor)`` of ``weights``, checked as it comes (``weights`` itself at once: an
    empty mapping or list is refused, an iterator that yields nothing is not, as on a rank outside
    ``iter_weights(to=)``)."""
    if isinstance(weights, (torch.Tensor, str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"{where} takes an iterable of (name, tensor) pairs, got "
                        f"{type(weights).__name__}: {STREAM_HINT}")
    if isinstance(weights, Sized) and not len(weights):
        raise ValueError(f"{where}: the {type(weights).__name__} holds no (name, tensor) pairs, so "
                         f"there is nothing to send: {STREAM_HINT}")
    return _checked(weights.items() if isinstance(weights, Mapping) else weights, where)


def _checked(weights: Iterable[Any], where: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        yield from _each(weights, where)
    finally:                                # stopped early (a break, an error) or raised:
        if isinstance(weights, Generator):  # a stream (iter_weights) reads its other collectives
            weights.close()


def _each(weights: Iterable[Any], where: str) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[str] = set()
    for i, item in enumerate(weights):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"{where}: item {i} of the stream is {type(item).__name__}, not a "
                            f"(name, tensor) pair: {STREAM_HINT}")
        name, tensor = item
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: item {i} of the stream has the name {name!r}; names are the "
                            "model's state-dict keys (non-empty str)")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: {name!r} is {type(tensor).__name__}, not a torch.Tensor")
        if hasattr(tensor, "full_tensor"):          # a DTensor: one rank's shard, not the tensor
            raise TypeError(f"{where}: {name!r} is a DTensor (one rank's shard); stream the "
                            "average with iter_weights(), which gathers each tensor whole, or call "
                            "full_tensor() first")
        if name in seen:
            raise ValueError(f"{where}: {name!r} comes twice in the stream; an engine loads each "
                             "name once (iter_weights() yields tied tensors once)")
        seen.add(name)
        yield name, tensor


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def runs(pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int, align: bool
             ) -> Iterator[tuple[list[tuple[str, torch.Tensor, int]], int]]:
    """Consecutive runs of the stream, each at most ``bucket_bytes`` (a larger tensor alone), with
    each tensor's byte offset in its run (aligned to its element size when ``align``, as
    ``uint8[start:end].view(dtype)`` needs) and the run's size."""
    bucket: list[tuple[str, torch.Tensor, int]] = []
    size = 0
    for name, tensor in pairs:
        unit = tensor.element_size() if align else 1
        start = -(-size // unit) * unit
        if bucket and start + nbytes(tensor) > bucket_bytes:
            yield bucket, size
            bucket, start = [], 0
        bucket.append((name, tensor, start))
        size = start + nbytes(tensor)
    if bucket:
        yield bucket, size


def receives(to: Any) -> bool:
    """Whether this rank is one of ``to`` (``iter_weights``'s: "all", a global rank or a collection
    of them)."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    many = isinstance(to, (list, tuple, set, frozenset, range))
    return to == "all" or to == rank or (many and rank in to)


def drain(weights: Any) -> None:  # the rest of a stream read and dropped: a rank joins the others
    for _ in weights if isinstance(weights, Iterator) else ():
        pass


def matching(metas: list[Any], stream: Iterator[tuple[str, torch.Tensor]], owner: str,
             receiving: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream, each pair checked against the metadata the receivers allocated from (a rank
    outside ``to=`` gets nothing). On a mismatch the rest of the stream is drained before the error
    (every rank goes on to its end, as the other ranks' gathers need)."""
    count = 0
    for count, (name, tensor) in enumerate(stream, 1):
        if count > len(metas):
            drain(stream)
            raise RuntimeError(f"WeightSource: the {owner} yielded {name!r} after the {len(metas)} "
                               "tensors of its metadata; was the model changed between metadata() "
                               "and the iteration?")
        meta = metas[count - 1]
        if name != meta.name or (isinstance(tensor, torch.Tensor) and (
                tensor.dtype != meta.dtype or tuple(tensor.shape) != tuple(meta.shape))):
            got = ((name, tensor.dtype, tuple(tensor.shape)) if isinstance(tensor, torch.Tensor)
                   else (name,))
            drain(stream)
            raise RuntimeError(f"WeightSource: tensor {count} of the {owner}'s stream is {got}, "
                               f"but metadata() said {(meta.name, meta.dtype, tuple(meta.shape))}; "
                               "the receivers allocate from the metadata: was the model changed "
                               "between metadata() and the iteration?")
        yield name, tensor
    if count != len(metas) and (count or receiving):
        raise RuntimeError(f"WeightSource: the {owner} yielded {count} tensors but its metadata "
                           f"lists {len(metas)}; the receivers wait for every one")
