"""The streaming part of a merge: every output tensor, piece by piece, through the weighted-sum
kernel (:mod:`fastema.kernels.merge_cpu`, launched through :func:`fastema._launch.merge`) to the output file.

Pieces flow through a two-stage pipeline: a helper thread fetches the next piece of every input
(``read="pread"``: copied into one of two sets of small buffers; ``read="mmap"``: its pages mapped
in one ``madvise`` call, read in place by the kernel, so a file that shrinks from then until the
kernel has read them is SIGBUS) while this thread runs the kernel on the current one and writes its
output; the read, the kernel and the write all release the GIL, so reading overlaps computing and
writing. An
input that cannot be read in pieces (a DCP checkpoint: :attr:`Source.mappable` False) is summed one
input at a time into a whole-tensor accumulator instead: the same bits, as the kernel adds the
inputs in the same order either way.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np

from .. import _launch
from .._io.safetensors import ITEMSIZE
from ._plan import KIND, Item

__all__ = ["Engine", "PIECE_BYTES", "tuned"]

PIECE_BYTES = {"mmap": 4 << 20, "pread": 512 << 10}
"""Bytes of one input read per kernel launch, per read mode (a larger tensor is merged in pieces): with
``pread`` small enough that the pieces read (two sets of them) stay in the cache for the kernel."""


PARALLEL_CORES = 4
"""The kernel runs parallel (numba's threads over chunks) on machines with at least this many cores."""


@contextlib.contextmanager
def tuned(*, mmap_piece: int | None = None, pread_piece: int | None = None,
          parallel_cores: int | None = None) -> Iterator[None]:
    """For the ``with`` block, each one given: :data:`PIECE_BYTES` of ``read="mmap"`` and of
    ``read="pread"`` (tiny pieces: every tensor merged in many), :data:`PARALLEL_CORES` (1: the
    parallel kernel on any machine). Read where a merge's engine is made; put back after, however
    the block ends. Not thread-safe (process-wide, as :func:`fastema._launch.config.tuned`)."""
    global PARALLEL_CORES
    given = {"mmap_piece": mmap_piece, "pread_piece": pread_piece, "parallel_cores": parallel_cores}
    bad = [f"{k}={v!r}" for k, v in given.items()
           if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]
    if bad:
        raise ValueError(f"merge tuned() takes positive whole numbers, got {', '.join(bad)}; nothing was changed")
    saved = dict(PIECE_BYTES), PARALLEL_CORES
    PIECE_BYTES.update({read: v for read, v in (("mmap", mmap_piece), ("pread", pread_piece)) if v is not None})
    PARALLEL_CORES = saved[1] if parallel_cores is None else parallel_cores
    try:
        yield
    finally:
        PIECE_BYTES.update(saved[0])
        PARALLEL_CORES = saved[1]


class _Job(NamedTuple):
    item: Item               # the plan's entry
    kind: str                # "piece" (averaged, in pieces), "whole" (averaged, one input at a time), "copy"
    lo: int                  # first element (piece) or byte (copy)
    size: int                # elements (piece) or bytes (copy)
    last: bool               # the item's last job


class Engine:
    """The kernel launches and reads of one merge (``sources`` in order, ``weights`` normalised).
    An input of weight 0 is left out: never read, not in the sums (its 0 x inf would be nan); the
    donor is read for the copied entries whatever its weight."""

    def __init__(self, sources: list, donor, weights, *, wide: bool, stochastic: bool, seed: int, read: str):
        kept = [i for i, w in enumerate(weights) if w != 0]
        self.sources, self.donor = [sources[i] for i in kept], donor
        self.wide, self.stochastic, self.seed = wide, stochastic, seed
        self.w32 = np.asarray([weights[i] for i in kept], np.float32)
        self.w64 = np.asarray([weights[i] for i in kept], np.float64)
        self.negative = bool((self.w64 < 0).any())   # then a sum may leave even the inputs' own range
        self.piece = PIECE_BYTES[read]
        # the helper thread keeps a core busy reading: the kernel runs on the other threads only where
        # there are more cores (on 2 cores a parallel kernel was slower, the two threads fighting the reader)
        self.parallel = read == "mmap" and (os.cpu_count() or 1) >= PARALLEL_CORES
        self.mappable = all(s.mappable for s in self.sources)
        self.scratch = [[np.empty(self.piece, np.uint8) for _ in self.sources] for _ in range(2)]
        self.out = self.piece * 2           # bytes of a piece's output buffer (float32 out of bfloat16 in: 2x)

    # ------------------------------------------------------------ jobs

    def _jobs(self, items: list):
        for it in items:
            if it.action == "copy":
                n = it.nbytes
                for lo in range(0, n, self.piece):
                    yield _Job(it, "copy", lo, min(self.piece, n - lo), lo + self.piece >= n)
                if n == 0:
                    yield _Job(it, "copy", 0, 0, True)
                continue
            n = int(np.prod(it.shape, dtype=np.int64))
            if not self.mappable:
                yield _Job(it, "whole", 0, n, True)
                continue
            step = max(1, self.piece // ITEMSIZE[it.dtype])
            for lo in range(0, n, step):
                yield _Job(it, "piece", lo, min(step, n - lo), lo + step >= n)
            if n == 0:
                yield _Job(it, "piece", 0, 0, True)

    def _fetch(self, job: _Job, slot: int):
        """What ``job`` reads, ready: the inputs' piece addresses, or a copy's bytes (helper thread)."""
        name = job.item.name
        if job.kind == "piece":
            if job.size == 0:
                return [0] * len(self.sources)
            return [s.piece(name, job.lo, job.size, self.scratch[slot][i]) for i, s in enumerate(self.sources)]
        if job.kind == "copy":
            return self.donor.raw(name, job.lo, job.size, self.scratch[slot][0])
        return None

    # ------------------------------------------------------------ the loop

    def write_items(self, items: list, write: Callable, bar, after_each: Callable[[], None]) -> None:
        """Every item of ``items`` (the plan's, in file order) through ``write``, a piece at a time: the
        next piece fetched on one helper thread and the last one written on another while this one is
        summed."""
        jobs = self._jobs(items)
        with ThreadPoolExecutor(1, thread_name_prefix="fastema-merge-read") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="fastema-merge-write") as writes:
            out = _WriteBehind(write, writes, self.out)
            slot = 0
            current = next(jobs, None)
            pending = pool.submit(self._fetch, current, slot) if current is not None else None
            try:
                while current is not None and pending is not None:
                    data = pending.result()
                    here = slot                     # the buffers current's reads use; the next fetch, the others
                    nxt = next(jobs, None)
                    slot ^= 1
                    pending = pool.submit(self._fetch, nxt, slot) if nxt is not None else None
                    self._run(current, data, out, bar, here)
                    del data
                    if current.last:
                        if current.kind == "copy":
                            self.donor.done(current.item.name)
                        else:
                            for s in self.sources:
                                s.done(current.item.name)
                        after_each()
                    current = nxt
                out.drain()
            except BaseException:
                if pending is not None and not pending.cancel():
                    pending.exception()             # the fetch under way ends before the inputs close
                out.drain(quiet=True)               # and the writes before the output is removed
                data = pending = None               # no view of an input outlives the merge
                raise

    def _run(self, job: _Job, data, out: _WriteBehind, bar, here: int) -> None:
        it = job.item
        if job.kind == "copy":
            out.now(data)                           # an input's bytes: written before its pages may go
            bar.update(job.size)
            return
        key = (zlib.crc32(it.name.encode()) ^ (self.seed * 0x9E3779B9)) & 0xFFFFFFFF
        if job.kind == "whole":
            self._whole(it, job.size, key, out, bar, here)
            return
        if job.size:
            buf = out.buffer()
            self._launch(it, job.size, buf.ctypes.data, 0, data, slice(None), True, True, key, job.lo)
            if (self.negative or _narrows(it)) and _inf(it, buf, job.size).any():
                exact = np.empty(job.size, np.float64)          # the sums again, in float64, to tell
                self._launch(it._replace(out_dtype="float64"), job.size, exact.ctypes.data, 0, data, slice(None),
                             True, True, key, job.lo)
                _refuse_overflow(it, exact[_inf(it, buf, job.size)])
            out.submit(job.size * ITEMSIZE[it.out_dtype])
            bar.update(job.size * ITEMSIZE[it.dtype] * len(self.sources))

    def _whole(self, it, n: int, key: int, out: _WriteBehind, bar, here: int) -> None:
        """One input at a time into a whole-tensor accumulator (inputs read whole, e.g. DCP), reading
        through the buffers of slot ``here`` (the helper thread fetches the next job into the other)."""
        xb, qb = ITEMSIZE[it.dtype], ITEMSIZE[it.out_dtype]
        wide = self.wide or "float64" in (it.dtype, it.out_dtype)
        acc = np.empty(n, np.float64 if wide else np.float32)
        step = max(1, self.piece // xb)
        for i, s in enumerate(self.sources):
            for lo in range(0, n, step):
                count = min(step, n - lo)
                addr = s.piece(it.name, lo, count, self.scratch[here][i])
                self._launch(it, count, 0, acc.ctypes.data + lo * acc.itemsize, [addr], slice(i, i + 1), i == 0,
                             False, key, lo)
                bar.update(count * xb)
            s.done(it.name)
        none = np.zeros(0, np.int64)
        for lo in range(0, n, step):                   # the sums, stored: a launch over no input
            count = min(step, n - lo)
            buf = out.buffer()
            self._launch(it, count, buf.ctypes.data, acc.ctypes.data + lo * acc.itemsize, none, slice(0, 0),
                         False, True, key, lo)
            if (self.negative or _narrows(it)) and _inf(it, buf, count).any():
                _refuse_overflow(it, acc[lo:lo + count][_inf(it, buf, count)])
            out.submit(count * qb)
        out.drain()                                    # the accumulator goes: nothing may still read it

    def _launch(self, it, count, out_addr, acc_addr, addrs, which, start, finish, key, first) -> None:
        wide = self.wide or it.dtype == "float64" or it.out_dtype == "float64"
        sr = self.stochastic and it.out_dtype == "bfloat16"
        _launch.merge(KIND[it.dtype], KIND[it.out_dtype], wide, sr, self.parallel, count, out_addr, acc_addr,
                      np.asarray(addrs, np.int64), (self.w64 if wide else self.w32)[which], start, finish, key, first)


class _WriteBehind:
    """The output's writes, in order, on one helper thread, from two buffers that take turns: a piece is
    summed into one while the other is written."""

    def __init__(self, write: Callable, pool: ThreadPoolExecutor, nbytes: int):
        self.write, self.pool = write, pool
        self.buffers = [np.empty(nbytes, np.uint8) for _ in range(2)]
        self.writing: list = [None, None]
        self.turn = 0

    def buffer(self) -> np.ndarray:
        """The buffer to sum the next piece into (its previous write done)."""
        done = self.writing[self.turn]
        if done is not None:
            self.writing[self.turn] = None
            done.result()
        return self.buffers[self.turn]

    def submit(self, nbytes: int) -> None:
        """Write the first ``nbytes`` of :meth:`buffer`'s buffer, after every write before it."""
        self.writing[self.turn] = self.pool.submit(self.write, self.buffers[self.turn][:nbytes])
        self.turn ^= 1

    def now(self, data) -> None:
        """Write ``data`` here, after every write before it."""
        self.drain()
        self.write(data)

    def drain(self, quiet: bool = False) -> None:
        """Every write submitted, done (``quiet``: their errors dropped, another one is on its way)."""
        for i in (self.turn, self.turn ^ 1):          # the older one first
            done, self.writing[i] = self.writing[i], None
            if done is not None:
                if quiet:
                    done.exception()
                else:
                    done.result()


def _inf(it, buf: np.ndarray, count: int) -> np.ndarray:
    """Which elements of an output piece are inf."""
    out = buf[:count * ITEMSIZE[it.out_dtype]]
    if it.out_dtype == "bfloat16":
        return (out.view(np.uint16) & 0x7FFF) == 0x7F80
    return np.isinf(out.view({"float16": np.float16, "float32": np.float32, "float64": np.float64}[it.out_dtype]))


def _narrows(it) -> bool:
    """The output dtype's range is narrower than the sums' (float16 out of a wider dtype, anything out of
    float64): a merged value may not fit."""
    return (it.out_dtype == "float16" and it.dtype != "float16") or (it.dtype == "float64" and
                                                                    it.out_dtype != "float64")


def _refuse_overflow(it, sums: np.ndarray) -> None:
    """MergeError when sums that the output holds as inf were finite (values beyond its range)."""
    finite = sums[np.isfinite(sums)]
    if finite.size:
        from ._source import MergeError

        top = float(np.abs(finite).max())
        raise MergeError(f"tensor {it.name!r}: merged values reach {top:g}, beyond the range of {it.out_dtype}, and "
                         f"would be written as inf; merge to a wider dtype (dtype='float32' or 'bfloat16'). Nothing "
                         f"was written")
