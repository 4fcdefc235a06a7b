"""The one dispatch point between fastema's Python layer and the kernels.

One launch form: a launch group (anything with the fields of :class:`Group`, and a :class:`Launches`
of its own: ``_layout.LayoutGroup``, ``pairs.PairGroup``, a plain :class:`Group`) prepares kernel
family ``op`` once, ``run = group.launch(op, **fixed)``, and ``run(*varying)`` launches it. The ops
and their fixed and varying arguments are the op table's (:mod:`.op`: :data:`.op.OPS`,
:data:`VARYING`). A prepared launch (:class:`Launch`) reads its group's tables at every call, on
both targets, so it never goes stale when the sources move (the owner replaces ``group.tables``);
only its fixed arguments key it. :func:`prepare` makes one from the target's table of prepare
functions (:data:`.cpu.launch.PREPARE`, or :data:`.cuda.launch.PREPARE`, imported when a CUDA buffer
first arrives); ``launch(op, group, **args)`` is one made for one call. Tunables live in
:mod:`.config`.

Dispatch names no framework: a group carries ``current_stream``, the function its backend
gave it (:func:`fastema._backends.stream_getter`) that returns the raw handle of the stream
its framework has current now; on CUDA every launch asks it. A CUDA launch keeps what a graph
capturing it reads: a one-off launch, and every launch of a group whose owner may drop its tables
(``group.pins``: the array functions' cached pairs), keeps the tables for good when the stream it
launches on is being captured (:mod:`.cuda.launch`).

After ``os.fork()`` (docs/guides/processes.md): the child's CPU launches run the serial twins when
the parent had started numba's OpenMP layer (:mod:`.cpu.pool`); its CUDA launches, those kept from
before the fork too, are refused with the way out (the ``spawn`` start method) when the parent had
launched on a GPU (:mod:`.cuda.forked`: :func:`.cuda.forked.refuse_cuda_after_fork`).

A checkpoint merge's weighted sums go through :func:`merge` (CPU: the merge reads its inputs from
host memory).

The package is a common top (this module: the tables; :mod:`.launches`, :mod:`.op`, :mod:`.config`)
and three wings: :mod:`.cpu` (the CPU's launches, pool and threads), :mod:`.cuda` (every CUDA
module, none imported before a CUDA buffer arrives) and :mod:`.shipped` (the shipped device code's
variants and build).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..kernels import _bits
from ..kernels.layout import chunk_table, segment_offsets
from . import config
from .cpu.pool import merge as merge  # the merge launcher (CPU only)
from .launches import Group, Launch, Launches, _cuda, default_stream, is_cuda, launch, prepare, spec  # noqa: F401
from .op import OPS, VARYING, Kernel, Spec

__all__ = ["Group", "Kernel", "Launch", "Launches", "OPS", "Spec", "Tables", "VARYING", "launch", "merge", "prepare",
           "refuse_during_capture", "spec", "tables", "update_addresses"]


def sr_noise(key: int, index: int) -> int:
    """The 32 stochastic-rounding bits every kernel draws for element ``index`` under ``key``
    (``kernels._bits.sr_noise``), computed on the host."""
    return int(_bits.sr_noise(np.uint32(key), np.int64(index)))

class Tables(NamedTuple):
    """Segment and chunk tables of one group, on the group's device."""
    shadow_addr: Any    # int64[S] where each segment's shadow (row 0) lives
    seg_addr: Any       # int64[S] where each source lives
    seg_offset: Any     # int64[S + 1]
    chunk_seg: Any      # int32[C]
    chunk_begin: Any    # int64[C + 1]
    n: int              # elements per shadow row (the row stride)
    chunks: int         # C
    staging: Any = None         # CUDA: the address tables and their pinned staging (cuda.AddressTables)

    def args(self):
        return self.n, self.shadow_addr, self.seg_addr, self.seg_offset, self.chunk_seg, self.chunk_begin

    def scanned(self) -> tuple:
        """What a scan of the sources reads (no shadow): sources, offsets, chunks."""
        return self.seg_addr, self.seg_offset, self.chunk_seg, self.chunk_begin

    def arrays(self) -> list:
        """Every array these tables hold (on CUDA their pinned staging too), for memory
        accounting."""
        out = [self.shadow_addr, self.seg_addr, self.seg_offset, self.chunk_seg, self.chunk_begin]
        if self.staging is not None:
            out += list(vars(self.staging).values())        # the caller keeps the arrays among them
        return out

    def __reduce_ex__(self, protocol):
        # A copy in another process (multiprocessing 'spawn', torch.multiprocessing) would launch on
        # addresses of this one (a spawned child crashed with SIGSEGV at its first update), a copy
        # in this one on the original's buffers: refuse both, naming the way that works.
        raise TypeError("fastema's kernel tables hold addresses in this process's memory, so an EMA, FlatShadow "
                        "or WindowShadow cannot be pickled or copied (e.g. to send it to a process started "
                        "with 'spawn'). Send its state instead: state = ema.state_dict() here, and in the "
                        "other process ema = EMA(model, ...); ema.load_state_dict(state)")


def refuse_during_capture(what: str, why: str, device: str | None = None, current_stream=None) -> None:
    """RuntimeError naming ``what`` and ``why`` it cannot happen while a CUDA graph is being
    captured on the stream ``current_stream()`` names on ``device``, or, with no device, on the
    current stream of any framework fastema made CUDA tables for; nothing where no capture runs (one
    driver query a stream, ``cuStreamIsCapturing``; no framework is imported for it)."""
    if device is None:
        if not _cuda.cache_info().currsize:
            return
        cuda = _cuda()
        pairs = [(dev, getter) for dev, _, getter in cuda.current().watched.live()]
    else:
        cuda = _cuda()
        pairs = [(device, current_stream)]
    for dev, getter in pairs:
        if cuda.capturing(dev, getter()):
            raise RuntimeError(f"fastema: {what} while a CUDA graph is being captured on {dev}'s current stream: "
                               f"{why} Nothing was changed.")


NEW_TABLES = ("that allocates and uploads device tables, which a capture forbids. Make the call once before the "
              "capture (a warm-up step), so that the capture reuses its tables.")
MOVED_SOURCES = ("the new addresses would be copied into the table once, at capture time, from a staging slot that "
                 "is reused later, so every replay would read stale addresses. Move or replace the tensors before "
                 "the capture and run one update outside it, then capture.")
CLEARING = "it would free tables the captured launches read. Clear the caches outside the capture."

def tables(src_addresses, counts, shadow_addresses, device: str, current_stream=default_stream,
           follow: bool = True, row_stride: int | None = None, handed_over: bool = False, base: int = 0) -> Tables:
    """Tables for sources at ``src_addresses`` with element ``counts`` on ``device``, averaged
    into shadows at ``shadow_addresses`` (one per source; ``flat_shadow`` for one flat buffer),
    uploaded on the stream ``current_stream()`` names (see :class:`Group`).
    ``follow``: the sources' addresses may change later (:func:`update_addresses`); on CUDA,
    sources handed over anew every step (``handed_over``: JAX, TensorFlow) get two address
    tables to alternate between, the others one, rewritten in place.
    ``row_stride``: elements between a shadow's rows (default: the sum of ``counts``).
    ``base``: where the first source starts in the whole row (a shadow holding a slice of it: the
    segments keep their places, which key stochastic rounding's noise).
    On CUDA the tables are written when this returns (they may be read by a launch on any stream),
    and refused while a CUDA graph is being captured on that stream
    (:func:`refuse_during_capture`)."""
    seg_offset = segment_offsets(counts) + np.int64(base)
    chunk = config.CUDA_CHUNK if is_cuda(device) else config.CPU_CHUNK
    chunk_seg, chunk_begin = chunk_table(seg_offset, chunk)
    as_i64 = lambda a: np.asarray(a, np.int64).reshape(-1)  # noqa: E731
    n = int(seg_offset[-1] - seg_offset[0]) if row_stride is None else int(row_stride)
    host = Tables(as_i64(shadow_addresses), as_i64(src_addresses), seg_offset, chunk_seg, chunk_begin, n,
                  len(chunk_seg))
    if not is_cuda(device):
        return host
    slots = (2 if handed_over else 1) if follow else 0
    refuse_during_capture("new kernel tables (a new array pair, shadow or average)", NEW_TABLES, device,
                          current_stream)
    cuda = _cuda()
    cuda.current().watch(device, current_stream)       # its current stream asked before a deferred free
    return cuda.upload(host, device, slots)


def flat_shadow(base: int, counts, itemsize: int) -> np.ndarray:
    """Per-segment shadow addresses of one flat buffer at ``base``."""
    return base + segment_offsets(counts)[:-1] * itemsize


def retired(at_launches: bool = False):
    """A holder of replaced CUDA sources: ``.release(kept, device, raw)`` keeps ``kept`` alive until
    the launches issued so far on the raw stream ``raw`` (see :func:`stream_of`) have run, without a
    sync (then dropped at the next release, or with ``at_launches`` at the next launch after that:
    ``cuda.Retired``)."""
    return _cuda().Retired(at_launches)


def update_addresses(t: Tables, addresses, device: str, current_stream=default_stream) -> Tables:
    """Same layout, new source addresses (a source was re-allocated in place). On CUDA the
    device table is rewritten in place on the stream ``current_stream()`` names (no allocation)."""
    seg_addr = np.asarray(addresses, np.int64).reshape(-1)
    if is_cuda(device):                            # (the caller refused it during a capture: _sources)
        cuda = _cuda()
        return cuda.update_addresses(t, seg_addr, device, current_stream())
    return t._replace(seg_addr=seg_addr)


def stream_of(group) -> int:
    """The raw handle of the stream a launch for ``group`` goes on now (0: the legacy default
    stream, and on the CPU)."""
    return group.current_stream() if is_cuda(group.device) else 0


CHOSEN_DRIVERS = config.DRIVERS.chosen
"""The drivers given to :func:`.cuda.drivers.using` now, innermost last (none: the process's own,
:func:`.cuda.drivers.default`): the tables and launches made now are the last one's, so a cache of
them is valid while the same one is chosen (``fastema._backends.kept``)."""
