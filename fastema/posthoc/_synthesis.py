"""Synthesis: the average of any profile from the snapshots, computed in float64 one tensor at a
time (memory: that tensor's float64 sum, and one buffer its profiles are read into in turn, with
``pread``), and loaded into a model.

Every tensor read is checked (:func:`~._snapshots.tensor_reader`: shape, dtype,
checksum, a size this machine's memory can hold), every profile read must be finite, and so must
the result. Running out of memory is a MemoryError naming the tensor (and the file, when reading)."""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Any, Callable, Iterable, Iterator

from .._io.safe_files import first_line, out_of_memory
from ._meta import Snapshot, kept_key, profile_key
from ._profiles import MAX_ERROR, Solution, solve
from ._snapshots import Scratch, read_snapshots, tensor_reader

__all__ = ["SynthesisPlan", "Synthesized", "synthesize", "synthesize_iter"]


class Synthesized(dict):
    """``name -> tensor`` of a synthesised average; ``.solution`` tells how it was made
    (coefficients, relative error, condition number, time, gamma, sigma_rel)."""
    solution: Solution


def _solution_for(snaps: list[Snapshot], sigma_rel, gamma, time, max_error) -> Solution:
    times = [s.time for s in snaps for _ in s.gammas]
    gammas = [g for s in snaps for g in s.gammas]
    return solve(times, gammas, sigma_rel=sigma_rel, gamma=gamma, time=time, max_error=max_error)


def _up_to(snaps: list[Snapshot], time) -> list[Snapshot]:
    """The snapshots a synthesis at ``time`` combines (all of them when ``time`` is None)."""
    if time is None:
        return snaps
    if isinstance(time, bool) or not isinstance(time, numbers.Real) or not math.isfinite(time):
        raise ValueError(f"time must be a finite number, got {time!r}")
    chosen = [s for s in snaps if s.time <= float(time)]
    later = min((s.time for s in snaps if s.time > float(time)), default=None)
    if chosen and later is not None and (before := max(s.time for s in chosen)) < float(time):
        a, b = (f"{t:.17g}" for t in (before, later))     # exact: a time to pass back
        raise ValueError(f"time={time!r} falls between the snapshots at {a} and {b}: a profile "
                         f"is combined from the snapshots up to its time, and the last of them "
                         f"must be at that time. Ask for a snapshot's time, such as {a} or {b}")
    return chosen or snaps


class SynthesisPlan:
    """A synthesis made ready (:func:`synthesize`'s arguments checked, the folder read, the
    coefficients solved), whose tensors are computed one at a time: ``names`` (the averaged tensors,
    then the ones kept as they are), ``tensor(name)`` (each checked as :func:`synthesize` checks it),
    ``solution``. It keeps each snapshot's reader (:func:`~._snapshots.tensor_reader`: a safetensors
    snapshot's descriptor, held open, its tensors read with ``pread``; a DCP snapshot's parsed
    metadata) from its first read until :meth:`close`. ``reader``: ``snapshot -> reader`` (a
    ``key -> tensor`` callable with ``close()``; default :func:`~._snapshots.tensor_reader`)."""

    def __init__(self, directory: str | os.PathLike, sigma_rel: float | None, gamma: float | None,
                 time: float | None, max_error: float, dtype: Any,
                 reader: Callable[[Snapshot], Any] = tensor_reader) -> None:
        import torch

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype (default torch.float32), got {dtype!r}")
        snaps = _up_to(read_snapshots(directory), time)
        self.solution = _solution_for(snaps, sigma_rel, gamma, time, max_error)
        self.dtype = torch.float32 if dtype is None else dtype
        self.terms = [(s, k) for s in snaps for k in range(len(s.gammas))]
        self.last = snaps[-1]
        self.names: list[str] = [*self.last.averaged, *self.last.others]
        self._averaged, self._kept = set(self.last.averaged), set(self.last.others)
        self._files: dict = {}
        self._reader = reader
        self._scratch = Scratch()

    def _read(self, s: Snapshot, key: str, reuse: bool = False):
        """Tensor ``key`` of snapshot ``s``; ``reuse``: read into the plan's one buffer (valid until
        the next such read: a profile, added to the sum and dropped)."""
        if s.path not in self._files:
            self._files[s.path] = self._reader(s)
        return self._files[s.path](key, self._scratch if reuse else None)

    def tensor(self, name: str):
        """The synthesised tensor ``name`` (an averaged one combined in float64, in ``dtype``; one kept
        as it is read from the last snapshot)."""
        last = self.last
        if name not in self._averaged:
            if name not in self._kept:
                raise KeyError(f"the snapshots hold no tensor {name!r}")
            return self._read(last, kept_key(name))
        try:
            out = _combine(name, self.terms, self.solution, last, self._read, self.dtype)
        except (RuntimeError, MemoryError) as err:
            if not out_of_memory(err) or (isinstance(err, MemoryError) and str(err)):
                raise                                 # not memory, or a reader's MemoryError naming its file
            size = math.prod(last.shapes.get(name, [0]))
            raise MemoryError(f"synthesising {name!r} ({size} values, float64 while combining) ran out of memory "
                              f"({first_line(err)}): synthesise on a machine with more memory") from None
        for seen in list(_WATCHERS):                 # watched(): each combined tensor, as made
            seen(name, out)
        return out

    def close(self) -> None:
        """Closes the snapshots' readers (their open files) and frees the read buffer."""
        files, self._files = self._files, {}
        self._scratch = Scratch()
        for read in files.values():
            read.close()


def synthesize(directory: str | os.PathLike, sigma_rel: float | None = None, *, gamma: float | None = None,
               time: float | None = None, max_error: float = MAX_ERROR, dtype=None, into=None) -> Synthesized:
    """The average of the power-function profile ``sigma_rel`` (or ``gamma``) at ``time``
    (default: the last snapshot's), from the snapshots in ``directory``, computed in float64 one
    tensor at a time. Returns a :class:`Synthesized` ``name -> tensor`` dict (``dtype``: default
    float32) whose ``.solution`` holds the coefficients and the relative error; ``into=model``
    also loads it into that ``nn.Module`` (strict; an FSDP2 / tensor-parallel model through
    ``set_model_state_dict``, which every rank must call). Reading is local to the caller (DCP
    snapshots with ``no_dist``): one rank alone may synthesise. Refuses a target the snapshots cannot
    represent to ``max_error`` (see :func:`solve`). :func:`synthesize_iter` yields the same tensors
    one at a time, never holding the whole average.

    Nothing in ``directory`` can run code (see :mod:`fastema.posthoc`). Refused with a
    ``ValueError`` naming the file (and the tensor): a folder that mixes runs or shapes (see
    :func:`read_snapshots`), a snapshot that is truncated, corrupt or fails its checksum (move it
    out of the folder to synthesise from the others; also one truncated or rewritten in place while
    it is read: each snapshot's tensors are read with ``pread`` from a descriptor held until the
    synthesis is done, never memory-mapped), a profile holding inf or NaN, a result that is
    not finite in ``dtype``, and one that ``into``'s dtypes cannot hold (nothing loaded).
    """
    plan = SynthesisPlan(directory, sigma_rel, gamma, time, max_error, dtype)
    out = Synthesized()
    try:
        for name in plan.names:
            out[name] = plan.tensor(name)
    finally:
        plan.close()                          # the snapshots' files, also when a read raised
    out.solution = plan.solution
    if into is not None:
        _load_into(into, out)
    return out


def synthesize_iter(directory: str | os.PathLike, sigma_rel: float | None = None, *, gamma: float | None = None,
                    time: float | None = None, max_error: float = MAX_ERROR, dtype=None,
                    order: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """:func:`synthesize`'s tensors as ``(name, tensor)`` pairs, each computed when the iterator
    reaches it (bit for bit :func:`synthesize`'s): host memory holds one tensor's float64 sum while
    it is combined and the tensor yielded, never the whole average. ``order``: the names to yield, in
    that order (default: every tensor, the averaged ones first, in the snapshots' order).

    The arguments are checked, the folder read and the coefficients solved when it is called (each
    refusal of :func:`synthesize`, and a name in ``order`` the snapshots do not hold, raised then); a
    profile holding inf or NaN, a result not finite in ``dtype`` or a damaged tensor raises when the
    iterator reaches that tensor, after the ones before it were yielded.

    Each snapshot is opened when the iterator first reads it and its descriptor held until the
    iterator ends or is closed: its tensors are read with ``pread`` (never memory-mapped), so a
    snapshot truncated in place meanwhile is a ValueError naming it (never SIGBUS), one rewritten
    in place fails its checksum, and one removed or renamed over is read whole."""
    plan = SynthesisPlan(directory, sigma_rel, gamma, time, max_error, dtype)
    names = plan.names if order is None else list(order)
    unknown = sorted(set(names) - set(plan.names))
    if unknown:
        raise ValueError(f"order names tensors the snapshots do not hold: {unknown[:5]}")
    return _yielded(plan, names)


def _yielded(plan: SynthesisPlan, names: list[str]) -> Iterator[tuple[str, Any]]:
    try:
        for name in names:
            yield name, plan.tensor(name)
    finally:
        plan.close()


_WATCHERS: list = []          # the open watched() blocks' functions


@contextlib.contextmanager
def watched(seen: Callable[[str, Any], None]) -> Iterator[None]:
    """For the ``with`` block, ``seen(name, tensor)`` after each averaged tensor is combined, on the
    thread that reads it (what the tests watch: when each is made, how long it lives, a snapshot
    changed between two). Put back after, however the block ends."""
    _WATCHERS.append(seen)
    try:
        yield
    finally:
        _WATCHERS.remove(seen)


def _combine(name: str, terms: list, sol: Solution, last: Snapshot, read, dtype):
    """One averaged tensor: the sum of its profiles by the coefficients, in float64, checked."""
    import torch

    acc: Any = None
    first = None
    for (s, k), x in zip(terms, sol.coefficients):
        v = read(s, profile_key(k, name), True)     # in the plan's read buffer: added, then dropped
        if first is None:
            first = (s, v.shape)
        elif v.shape != first[1]:
            raise ValueError(f"{s.path!r} stores {name!r} with shape {list(v.shape)}, {first[0].path!r} with "
                             f"shape {list(first[1])}: snapshots of different models in one directory")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{s.path!r}: the profile {profile_key(k, name)} holds inf or NaN (a run that diverged, "
                             f"or a float16 snapshot of values beyond +-65504): synthesise at a time before it "
                             f"(time=), or move it out of the folder")
        if acc is None:
            acc = v.to(torch.float64, copy=True).mul_(float(x))
        else:
            acc.add_(v, alpha=float(x))             # in float64, of v's values (exact in float64)
    shape = last.shapes.get(name, list(acc.shape))
    if acc.numel() != math.prod(shape):
        raise ValueError(f"{last.path!r} gives {name!r} the shape {shape}, but stores {acc.numel()} values; the "
                         f"snapshot is corrupt")
    result = acc.to(dtype).reshape(shape)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"the synthesised {name!r} does not fit in {dtype} (values beyond its range): pass "
                         f"dtype=torch.float32")
    return result


def _load_into(model, weights: dict) -> None:
    import torch

    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(f"the snapshots do not match this model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         f"load them into the model they were taken of")
    lost = [n for n, t in own.items() if not _lands(weights[n], t.dtype)]
    if lost:
        raise ValueError(f"the synthesised tensors {', '.join(map(repr, lost[:3]))} hold values beyond the model's "
                         f"dtype ({str(own[lost[0]].dtype).replace('torch.', '')}: they would load as inf or wrap); "
                         f"nothing was loaded: load into a model of a wider dtype")
    if any(type(t).__name__ == "DTensor" for t in own.values()):      # FSDP2 / TP: each rank keeps its part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True))
        return
    bad = [f"{n} {tuple(weights[n].shape)} into {tuple(t.shape)}" for n, t in own.items()
           if t.shape != weights[n].shape]
    if bad:
        hint = (" (DeepSpeed ZeRO-3 parameters are partitioned: load inside deepspeed.zero.GatheredParameters("
                "params, modifier_rank=0), or into an unpartitioned copy of the model)"
                if any(hasattr(t, "ds_shape") for t in own.values()) else "")
        raise ValueError(f"the synthesised tensors do not fit this model: {', '.join(bad[:3])}{hint}; nothing "
                         f"was loaded")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(weights[name])


def _lands(value, dtype) -> bool:
    """Whether ``value`` (finite: checked when combined) keeps its values in ``dtype`` up to rounding:
    no float beyond its range (inf), no integer wrapped into a narrower integer dtype (a float into
    an integer one is torch's copy, as the model's own load would make it)."""
    import torch

    if value.dtype == dtype or value.numel() == 0 or dtype == torch.bool or dtype.is_complex:
        return True
    cast = value.to(dtype)
    if dtype.is_floating_point:
        return bool(torch.isfinite(cast).all())
    return value.is_floating_point() or torch.equal(cast.to(value.dtype), value)
