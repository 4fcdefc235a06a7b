"""The one dispatch point between fastema's Python layer and the kernels.

One launch form: ``run = prepare(op, group, **fixed)`` prepares kernel family ``op`` over a group
of sources on the group's device, from the target's table of prepare functions (:data:`.cpu.PREPARE`,
or :data:`.cuda_bound.PREPARE`, imported when a CUDA buffer first arrives), and ``run(*varying)``
launches it (:data:`VARYING`: the arguments each call gives; the others, in the table below, are
fixed). An owner keeps its ``run``; ``launch(op, group, **args)`` is ``prepare`` run once. A group
is anything with the fields of :class:`Group` (``_layout.LayoutGroup`` is one). Tunables live in
:mod:`.config`.

Dispatch names no framework: a group carries ``current_stream``, the function its backend
gave it (:func:`fastema._backends.stream_getter`) that returns the raw handle of the stream
its framework has current now; on CUDA every launch asks it.

After ``os.fork()`` (docs/guides/processes.md): the child's CPU launches run the serial twins when
the parent had started numba's OpenMP layer (:mod:`.cpu`); its CUDA launches are refused with the
way out (the ``spawn`` start method) when the parent had launched on a GPU.

======================  ==================================================================
op                      keyword arguments
======================  ==================================================================
``"lerp"``              ``weights`` (tuple or float32[K] device array), ``flag=None``,
                        ``key=0`` (an int, or an int64[1] device array), ``stochastic=False``
``"bema"``              ``alpha`` (a host number), ``flag=None`` (3-row shadows: BEMA's
                        output ``row0 <- row1 + alpha * (row0 - row2)``)
``"plan"``              ``state``, ``params``, ``decays``, ``given``, ``w32``, ``w64``, ``flag``,
                        ``keys`` (one call of a model EMA's plan: ``kernels._stats.plan_step``;
                        :func:`plan_lerp_launcher` makes it and a group's lerp one launch,
                        :func:`plan_launcher` binds it alone)
``"copy"``              ``to_shadow``, ``row_lo``, ``row_hi``, ``flag=None``
``"swap"``              ``mode`` (``kinds.EXCHANGE/PACK/UNPACK``), ``row``
``"nonfinite"``         ``flag`` (bound once: :func:`nonfinite_launcher`)
``"window"``            ``ring_kind``, ``ring_addr``, ``slot``, ``full``, ``count``, ``recompute``
``"ema_streams"``       ``values``, ``w0``, ``c``, ``per_stream``, ``a``, ``b``, ``d``, ``mode``, ``skip``
``"sma_streams"``       ``values``, ``w0``, ``c``, ``per_stream``, ``ring_v``, ``ring_w``, ``s``,
                        ``comp``, ``ws``, ``wcomp``, ``n``, ``bad``, ``slot``, ``skip``
======================  ==================================================================

The kernels' math and their arguments are documented in :mod:`fastema.kernels.cpu`. A checkpoint
merge's weighted sums go through :func:`merge` (CPU: the merge reads its inputs from host memory).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from ..kernels import _bits
from ..kernels.kinds import F64, MAX_ROWS, PLAN_KEYS_MAX, wide
from ..kernels.layout import chunk_table, segment_offsets
from . import config
from . import cpu as _cpu_target
from .cpu import merge as merge  # the merge launcher (CPU only)


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

    def arrays(self) -> list:
        """Every array these tables hold (on CUDA their pinned staging too), for memory accounting."""
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


def default_stream() -> int:
    """The stream getter of sources without a current stream: the legacy default stream (0)."""
    return 0


class Group(NamedTuple):
    """What one launch needs to know about its sources besides the op's own arguments."""
    device: str                  # "cpu" or "cuda:N"
    shadow_kind: int | None      # storage kind of the shadow (None for metric streams)
    src_kind: int                # storage kind of the sources (the values, for metric streams)
    tables: Tables | None        # None for metric streams
    current_stream: Callable[[], int] = default_stream   # the raw handle of the stream to launch on now


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


VARYING = {"lerp": ("weights", "key"), "bema": ("alpha",), "plan": ("given",), "copy": (), "swap": (),
           "nonfinite": (), "window": ("ring_addr", "slot", "full", "count", "recompute"),
           "ema_streams": ("values", "w0", "c", "per_stream", "a", "b", "d"),
           "sma_streams": ("values", "w0", "c", "per_stream", "ring_v", "ring_w", "s", "comp", "ws", "wcomp", "n",
                           "bad", "slot")}
"""Per op, the arguments a prepared launch takes at each call (:func:`prepare`), in that order; the
op's other keyword arguments (the table above) are fixed when it is prepared."""


class Launch(Protocol):
    """A prepared launch of one op over one group (:func:`prepare`): the seam between the launches'
    owners and the two targets (:mod:`.cpu`, :mod:`.cuda_bound`). Its fixed arguments are bound when
    it is made; the group's tables are the group's (a launch reads them at each call); ``run(*varying)``
    takes the op's :data:`VARYING` arguments, in that order."""

    def __call__(self, *varying: Any) -> None:
        """Launch on the group's device (on CUDA, on the stream current for the group's framework now)."""

    def once(self, *varying: Any) -> None:
        """The same launch made for one call only (:func:`launch`): nothing kept from it for a next call."""


def prepare(op: str, group, **fixed) -> Launch:
    """Kernel family ``op``'s launch over ``group``, prepared once: ``run = prepare(op, group, **fixed)``
    binds every argument of the table above but the op's :data:`VARYING` ones, which ``run(*varying)``
    takes at each call (``run(weights, key=0)`` for ``"lerp"``, ``run()`` for ``"copy"``). The one
    launch form of both targets (:data:`.cpu.PREPARE`, :data:`.cuda_bound.PREPARE`): on the CPU the
    compiled overload's entry point after the first call; on CUDA the variant's code and one argument
    block packed at C speed (:mod:`.abi`), an argument rewritten only where it is a new object. Runs
    on the stream that is current for the group's framework at each call. Make a new one when the
    group's tables change; an empty group launches nothing."""
    t = group.tables
    if t is not None and t.chunks == 0 and op != "plan":     # the plan step reads no table
        return _NOTHING
    if op == "lerp":                                 # host weights: the kernel's arithmetic type
        fixed["cast"] = np.float64 if wide(group.shadow_kind, group.src_kind) else np.float32
    target = _cuda_bound() if is_cuda(group.device) else _cpu_target
    run = target.PREPARE[op](group, **fixed)
    if op == "bema":                                 # alpha: the shadow's arithmetic type
        return _CastFirst(run, np.float64 if group.shadow_kind == F64 else np.float32)
    return run


class _CastFirst:
    """A prepared launch whose first varying argument is cast to ``cast`` at each call."""

    __slots__ = ("run", "cast")

    def __init__(self, run, cast):
        self.run, self.cast = run, cast

    def __call__(self, first, *rest) -> None:
        self.run(self.cast(first), *rest)

    def once(self, first, *rest) -> None:
        self.run.once(self.cast(first), *rest)


def launch(op: str, group, **args) -> None:
    """Run kernel family ``op`` (see the table above) over ``group`` on its device, once:
    ``prepare(op, group, **fixed)(*varying)``.

    On CUDA the launch goes on the stream that is current for the group's framework *now*
    (``group.current_stream()``), never one remembered from an earlier call: an update inside
    ``with torch.cuda.stream(side)`` or a ``torch.cuda.graph`` capture is ordered (or
    captured) with the caller's other work."""
    t = group.tables
    if t is not None and t.chunks == 0:
        return
    if is_cuda(group.device):
        note_capture(group)
    varying = VARYING[op]
    run = prepare(op, group, **{k: v for k, v in args.items() if k not in varying})
    run.once(*[args[k] for k in varying if k in args])


def note_capture(group) -> None:
    """Before a CUDA launch that no owner keeps prepared (:func:`launch`, the array functions' cached
    launches): retired sources pruned, and the group's tables kept for good where the launch is
    being captured into a CUDA graph (:data:`_CAPTURED`)."""
    cuda = _cuda()
    raw = group.current_stream()
    driver = cuda.current()
    if cuda.WAITING:                           # released sources waiting for their events, deferred frees
        cuda.prune_retired(driver, raw, cuda._index(group.device))
    if group.tables is not None and driver.capturing(raw, None if raw else cuda._index(group.device)):
        _CAPTURED.append(group.tables)         # a graph reads these tables at every replay: never freed


_CAPTURED: list = []
"""Tables a CUDA graph captured a launch of (through :func:`launch`: the array functions' cached
pairs, a shadow's unbound launches): kept for the life of the process, so that no cache eviction or
``fastema.clear_caches()`` frees memory a graph replay reads (issue 37, C3). The launches bound once
(:func:`lerp_launcher` and the like) belong to their shadow, which keeps its tables."""


def refuse_during_capture(what: str, why: str, device: str | None = None, current_stream=None) -> None:
    """RuntimeError naming ``what`` and ``why`` it cannot happen while a CUDA graph is being captured on
    the stream ``current_stream()`` names on ``device``, or, with no device, on the current stream of
    any framework fastema made CUDA tables for; nothing where no capture runs (one driver query a
    stream, ``cuStreamIsCapturing``; no framework is imported for it)."""
    if device is None:
        if not _STREAMS or not _cuda.cache_info().currsize:
            return
        cuda = _cuda()
        driver = cuda.current()          # the streams tables were made for through this driver
        pairs = [(dev, getter) for dev, getter, made_by in _STREAMS.values() if made_by is driver]
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

_STREAMS: dict = {}
"""``(device, getter identity, driver identity) -> (device, current-stream getter, driver)`` of every
CUDA table made (the driver kept: its identity stays its own):
the streams :func:`refuse_during_capture` asks the current driver about when given no device (those
another driver made tables for, a stand-in driver since gone, are not its to answer)."""


def _getter_key(getter) -> tuple:
    return getattr(getter, "func", getter), getattr(getter, "args", ())


def lerp_launcher(group, *, flag=None, stochastic: bool = False) -> Launch:
    """``prepare("lerp", group, flag=flag, stochastic=stochastic)``: ``run(w, key=0)``, made once per
    group and flag (the per-step path of an owner whose groups stay). On the CPU the tables, the flag,
    the cast of host weights and the compiled overload are bound once (:class:`.cpu.LerpLaunch`); on
    CUDA the kept variant and one packed parameter block (:class:`.cuda_bound.LerpLaunch`). Make a new
    one when the group changes."""
    return prepare("lerp", group, flag=flag, stochastic=stochastic)


def plan_lerp_launcher(group, plan: dict, gi: int, *, stochastic: bool = False) -> Callable[[int], None]:
    """One ``update()`` call of a model EMA whose plan lives on the device, in one launch: the plan
    kernel's step and group ``gi``'s lerp with the weights, skip flag and rounding key it writes
    (``kernels.cpu.plan_lerp_kernel``; exact: the arrays and the shadow end as the plan kernel then
    the lerp leave them). ``plan``: the device's plan arrays as kernel views (``state``, ``params``,
    ``decays``, ``w32``, ``w64``, ``flag``, ``keys``, and ``done``, an int32[1] zero the CUDA kernel
    counts its finished blocks in). Returns ``run(given)`` (``given``: the training step, -1 for
    the update count), bound once like :func:`lerp_launcher`. The group must have elements
    (``tables.chunks > 0``): an empty group launches nothing, so it cannot carry the plan."""
    if group.tables.chunks == 0:
        raise ValueError("an empty group cannot carry the plan step")
    keys, rows = plan["keys"].size, plan["decays"].size
    if keys > PLAN_KEYS_MAX or rows > MAX_ROWS:
        raise ValueError(f"a plan step carried by a lerp launch takes at most {PLAN_KEYS_MAX} groups and "
                         f"{MAX_ROWS} rows (its per-block copy), got {keys} and {rows}")
    target = _cuda_bound() if is_cuda(group.device) else _cpu_target
    return target.plan_lerp_launch(group, plan, gi, stochastic)


def copy_launcher(group, *, to_shadow: bool, row_lo: int, row_hi: int, flag=None) -> Callable[[], None]:
    """``prepare("copy", group, ...)``: ``run()`` with every argument bound once (a model average's
    buffer copy at every update). Make a new one when the group's tables change."""
    return prepare("copy", group, to_shadow=to_shadow, row_lo=row_lo, row_hi=row_hi, flag=flag)


def plan_launcher(group, plan: dict) -> Callable[[int], None]:
    """``prepare("plan", group, ...)`` with the plan arrays bound once (``plan``: the device's plan
    arrays as kernel views, as for :func:`plan_lerp_launcher`): ``run(given)`` (the training step, -1
    for the update count), what a device plan advances with at every call where no lerp launch carries
    the step (issue 37, D5)."""
    return prepare("plan", group, **{k: plan[k] for k in ("state", "params", "decays", "w32", "w64", "flag",
                                                           "keys")})


def nonfinite_launcher(group, flag) -> Callable[[], None]:
    """``prepare("nonfinite", group, flag=flag)``: ``run()``, ``skip_nonfinite``'s scan at every update
    (issue 37, D5). Make a new one when the group's tables change."""
    return prepare("nonfinite", group, flag=flag)


class _Nothing:
    """The launch of an empty group: nothing at all."""

    __slots__ = ()

    def __call__(self, *varying: Any) -> None:
        return None

    once = __call__


_NOTHING: Launch = _Nothing()


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
    and refused while a CUDA graph is being captured on that stream (:func:`refuse_during_capture`)."""
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
    driver = cuda.current()
    _STREAMS.setdefault((device, _getter_key(current_stream), id(driver)), (device, current_stream, driver))
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


_FORKED_AFTER_CUDA = False      # this process was forked from one that had launched on a GPU


@functools.cache
def _cuda():
    if _FORKED_AFTER_CUDA:
        raise RuntimeError("fastema cannot launch a CUDA kernel in this process: it was forked (os.fork(), "
                           "multiprocessing's or a DataLoader's default 'fork' start method) from a process that "
                           "had already used CUDA, and CUDA does not survive a fork. Start the worker processes "
                           "with the 'spawn' start method instead (multiprocessing.get_context('spawn'), "
                           "DataLoader(multiprocessing_context='spawn')); see docs/guides/processes.md")
    from . import cuda

    return cuda


@functools.cache
def _cuda_bound():
    """The bound CUDA launches (:mod:`.cuda_bound`), after :func:`_cuda`'s fork check."""
    _cuda()
    from . import cuda_bound

    return cuda_bound


def _after_fork_in_child() -> None:
    global _FORKED_AFTER_CUDA
    if _cuda.cache_info().currsize and not _cuda().SIMULATOR:    # the parent loaded the CUDA launchers
        _FORKED_AFTER_CUDA = True
        _cuda.cache_clear()                                       # the next CUDA launch asks again, and is refused
        _cuda_bound.cache_clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
