"""Every CUDA launch: fastema's own device code and argument block, and the launches bound once per
group.

numba-cuda's dispatcher, at every launch, types the arguments, picks the compiled overload
(compiling it through NVVM at its first use, in every process) and marshals every argument, then
cuda.core packs them into a new parameter block and launches (measured on an H100: 170-590 us of
host time per update). fastema does none of that per step:

- the kernel's code is the shipped cubin or PTX of its variant (:mod:`.device_code`: loaded by
  cuda.core, no NVVM; a variant not shipped is compiled once per node into a cache), found once per
  binding by the kernel's factory name and the arguments' numba types (numba-cuda's public
  ``typeof``);
- the arguments are packed by fastema's own ABI (:mod:`.abi`, numba's array ABI written once) into
  one parameter block per binding; per step only an argument that is a new object (host weights, a
  stochastic-rounding key) is packed again, in place (D2);
- the launch is ``cuLaunchKernel`` with the block's address, with no context push and pop where the
  device's primary context is current already (one ``cuCtxGetCurrent``; torch keeps it current),
  else inside ``cuda.gpus[device]`` (D1). Every CUDA call of a binding (loading the code) runs
  inside its device's context (C4). Each call is the launch driver's (:mod:`.driver`), the one
  current when the launch is bound (:func:`.drivers.current`), which the binding keeps.

A prepared launch (:class:`CudaLerp`, :class:`CudaLaunch`; :data:`PREPARE`, whose keyword signatures
are the op table's, :mod:`.op`) keeps its block from step to step and reads its group's tables at
every call (never stale when the sources move); a one-off :func:`fastema._launch.launch` prepares
one and packs its block for that call. Where the tables and its own arguments are the objects its
block was packed from, a prepared launch is one Python frame around the driver's own two calls
(``cuCtxGetCurrent``, ``cuLaunchKernel``, bound once: :meth:`.driver.Driver.launcher`; issue 86
item 3), everything else the path checks read as module-level flags (:class:`CudaKernel`). A
launch whose owner may drop its tables (a one-off, ``group.pins``) keeps them for good where it
launches on a stream being captured (:data:`CAPTURED`),
as Warp's ``Launch`` keeps its module in a capturing graph. An argument that does not fit its place
(another dtype, ndim or number type: :meth:`.abi.Block.fits`, no numba type) binds again. The
dispatcher launches instead in the Numba CUDA simulator, under ``FASTEMA_CUDA_LAUNCH=dispatcher``,
and where the driver refused every image of the variant (:data:`.driver.REFUSALS`); an argument that
is not device memory is refused (:class:`.abi.NotDeviceMemory`), never copied over. No numba-cuda
private name is used: numba-cuda's version does not decide the fast path.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any

import numpy as np

from .. import config
from ..config import EPOCH
from ..op import Kernel
from . import abi, argtypes, device_code, forked
from . import base as C
from . import kernel_refs as K  # the kernels by name: no numba-cuda at a launch
from .drivers import current
from .forked import FORKED
from .frees import WAITING
from .results import api_error
from .tables import _zero_flag

_UNKEPT = object()                                  # a kept launch's tables before anything is kept


def cached_launch_available() -> bool:
    """True when the current driver (:func:`.drivers.current`) launches fastema's own device code
    (loads each variant's image, launches it with fastema's parameter block); False where every
    launch goes through numba's dispatcher (the simulator, ``FASTEMA_CUDA_LAUNCH=dispatcher``, no
    cuda.core)."""
    return current().loads


# ---------------------------------------------------------------- bound launches

def _typeof(value):
    """The numba type the dispatcher gives ``value`` as a kernel argument (:func:`.argtypes.typeof`:
    without numba-cuda for what the launchers pass): read once per binding (its variant and layout),
    never per launch."""
    return argtypes.typeof(value)


def _code(driver, dispatcher, types: tuple, index: int, raw: int = 0):
    """The variant's code loaded with ``driver`` for device ``index`` (:class:`.driver.Loaded`;
    None: the dispatcher launches it), once per driver, variant and device (``driver.images``); a
    load is refused while a capture runs (launch on the raw stream ``raw``)."""
    key = (dispatcher, types, index)
    images = driver.images
    try:
        return images[key]
    except KeyError:
        pass
    C.refuse_load_during_capture(driver, raw, index, dispatcher)
    with driver.activate(index):                          # a binding's CUDA calls: its device (C4)
        loaded = images[key] = device_code.kernel(dispatcher, types, index, driver)
    return loaded


class CudaKernel(Kernel):
    """A kernel launch bound once (see the module docstring): the variant's loaded code and one
    parameter block, patched in place where an argument is a new object.

    Kept: after a launch through the block, what the next one needs if nothing moved, in this
    object (:meth:`_keep`): the driver's own calls bound once (:meth:`.driver.Driver.launcher`), the
    function handle, the block's address, the grid and block size, and the objects the block was
    packed from (the group's tables, and the subclass's own: the weights and key, or the call's
    middle arguments). A subclass's ``__call__`` launches in its own frame where those are the held
    ones, the tunables did not move (:data:`.config.EPOCH`), no holder waits for a safe point
    (:data:`.frees.WAITING`) and the process was not forked after CUDA (:data:`.forked.FORKED`);
    anything else takes :meth:`_launch`, which refuses, prunes, patches or binds again as it must,
    and keeps again."""

    __slots__ = ("device", "index", "driver", "func", "loaded", "held", "block", "last", "tables",
                 "epoch", "grid", "threads", "address", "calls", "cu_launch", "context", "primary",
                 "streams")

    def __init__(self, device: str):
        self.device, self.index = device, C._index(device)
        self.driver = current()                           # kept: it loads and launches with it
        self.func = None                                  # the driver handle of the bound code
        self.loaded = None                                # what keeps it loaded (driver.Loaded)
        self.held: list = []                              # per argument: the object its block values are of
        self.block: abi.Block = None  # type: ignore[assignment]  # set with func at the first bind, read after
        self.last: tuple = ()                             # the last launch's arguments
        self.tables: object = _UNKEPT                     # the kept launch's: nothing kept yet
        self.epoch = self.grid = self.threads = self.address = 0
        self.calls: bool | None = None                    # whether the driver gives a Launcher
        self.cu_launch: Any = None                        # its fields, once kept
        self.context: Any = None
        self.primary: Any = None
        self.streams: Any = None

    def _launch(self, dispatcher, args, raw: int, blocks: int) -> bool:
        """Launch ``dispatcher``'s kernel with ``args`` on the raw stream ``raw``: the bound block
        (patched where an argument changed) where every argument fits it, else bound again
        (``dispatcher(args)`` gives the kernel); True where it launched through the block (what the
        caller may keep: :meth:`_keep`). Refused in a child forked after CUDA (:mod:`.forked`: a
        launch kept from before the fork meets the refusal here, before any driver call)."""
        self.tables = _UNKEPT                             # kept again by the caller, once launched
        if forked.FORKED_AFTER_CUDA:
            forked.refuse_cuda_after_fork()
        if WAITING:                                       # released sources waiting for events
            C.prune_retired(self.driver, raw, self.index)
        if self.func is not None:
            last = self.last
            if (len(args) == len(last) and all(map(operator.is_, args, last))) or self._patch(args):
                self.last = args
                self._go(raw, blocks)
                return True
        return self._bind(dispatcher(args), args, raw, blocks)

    def _keep(self, tables, blocks: int) -> None:
        """After a launch through the block: keep what the next launch over the same ``tables``
        needs (the subclass keeps its own arguments), where the driver gives its calls
        (:meth:`.driver.Driver.launcher`)."""
        if self.calls is None:
            got = self.driver.launcher(self.index)
            self.calls = got is not None
            if got is not None:
                self.cu_launch, self.context, self.primary, self.streams = got
        if self.calls:
            self.epoch, self.grid, self.threads = EPOCH[0], blocks, config.CUDA_THREADS
            self.address = self.block.address
            self.tables = tables

    def _pushed(self, raw: int) -> None:
        """A kept launch where the device's primary context is not current: pushed for it."""
        d = self.driver
        with d.activate(self.index):
            d.launch(self.func, self.grid, self.threads, d.stream(raw), self.address)

    def _go(self, raw: int, blocks: int) -> None:
        if self.calls:                                    # the driver's own calls, bound (_keep)
            err, ctx = self.context()
            if not err and ctx == self.primary:
                err, = self.cu_launch(self.func, blocks, 1, 1, config.CUDA_THREADS, 1, 1, 0,
                                      self.streams[raw], self.block.address, 0)
                if err:
                    raise api_error("cuLaunchKernel", err)
                return
        d = self.driver
        if d.current_context() == d.primary_context(self.index):
            d.launch(self.func, blocks, config.CUDA_THREADS, d.stream(raw), self.block.address)
        else:                                             # another context current (or none): push ours
            with d.activate(self.index):
                d.launch(self.func, blocks, config.CUDA_THREADS, d.stream(raw), self.block.address)

    def _patch(self, args) -> bool:
        """Write the arguments that are new objects into the block (numbers and tuples equal to the
        held ones count as the same); False when one does not fit its place (another dtype, ndim,
        number type: another variant, so the launch binds again). A cheap check, no numba type
        (:meth:`.abi.Block.patched`)."""
        block = self.block
        if len(args) != len(block.types):
            return False
        held_all = self.held
        # only the places whose object is new, found at C speed (a smoother's window launch: 14
        # arguments, one new a call, the ring slot)
        for i in itertools.compress(range(len(args)), map(operator.is_not, args, held_all)):
            value, held = args[i], held_all[i]
            if type(held) is type(value) and isinstance(value, (int, np.integer, tuple)) and held == value:
                continue
            if not block.patched(i, value):
                return False
            held_all[i] = value
        return True

    def _bind(self, dispatcher, args, raw: int, blocks: int) -> bool:
        """Find the variant's code (:func:`_code`), pack the block and launch; through the
        dispatcher where the driver launches no image of fastema's (the simulator), or where it
        refused every image of this variant (:data:`.driver.REFUSALS`: ``device_code`` warned once,
        and compiled here where it could). Nothing else falls back: an argument numba cannot type,
        one that is not device memory (:class:`.abi.NotDeviceMemory`) or has no kernel ABI is
        fastema's defect, and raised."""
        d = self.driver
        loaded = None
        if d.loads:
            try:
                types = tuple(map(_typeof, args))
            except ValueError as err:                     # numba's "cannot determine Numba type"
                raise TypeError(f"fastema: an argument of kernel {getattr(dispatcher, '__name__', dispatcher)} has "
                                f"no numba type ({err}); this is a defect of fastema's launcher") from err
            loaded = _code(d, dispatcher, types, self.index, raw)
        if loaded is None:
            self.func = None
            d.dispatch(K.dispatcher(dispatcher), self.index, raw, blocks, config.CUDA_THREADS, args)
            return False
        block = abi.Block(types, args)
        self.func, self.loaded, self.block, self.held, self.last = loaded.func, loaded, block, list(args), args
        self._go(raw, blocks)
        return True


# ---------------------------------------------------------------- the prepared launches

_ZERO_KEY = np.uint32(0)

CAPTURED: list = []
"""Tables a CUDA graph captured a launch over, where the launch's owner may drop them (a one-off
launch, the array functions' cached pairs: ``group.pins``): kept for the life of the process, so
that no cache eviction or ``fastema.clear_caches()`` frees memory a graph replay reads (issue 37,
C3). The launches a shadow keeps belong to its groups, which keep their tables."""


def _pin(launch, raw: int) -> None:
    """Keep ``launch``'s group's tables for good where the stream ``raw`` is being captured."""
    t = launch.group.tables
    if t is not None and launch.driver.capturing(raw, launch.index) and not any(k is t for k in CAPTURED):
        CAPTURED.append(t)                 # a graph reads these tables at every replay: never freed


class CudaLerp(CudaKernel):
    """One group's ``"lerp"`` launch on CUDA, bound once (see the module docstring); called as
    ``run(weights, key=0)`` on the stream the group's framework has current at that call, over the
    group's tables at that call. ``cast``: the kernel's arithmetic type for host weights. Kept (see
    :class:`CudaKernel`): the tables, the weights (the cast tuple) and the key given."""

    __slots__ = ("group", "flag", "stochastic", "cast", "w_in", "w", "pins", "kept_w", "kept_key")

    def __init__(self, group, flag, stochastic: bool, cast):
        super().__init__(group.device)
        self.group, self.stochastic, self.cast = group, stochastic, cast
        self.flag = _zero_flag(group.device, self.driver) if flag is None else flag   # kept
        self.w_in: object = self                          # no host weights yet
        self.w: tuple = ()
        self.pins = getattr(group, "pins", False)
        self.kept_w = self.kept_key = _UNKEPT

    def __call__(self, weights, key=0) -> None:
        if weights.__class__ is tuple:
            if weights is not self.w_in and weights != self.w_in:
                self.w_in, self.w = weights, tuple(map(self.cast, weights))
            weights = self.w
        g = self.group
        t = g.tables
        raw = g.current_stream()
        if (t is self.tables and weights is self.kept_w and key is self.kept_key
                and self.epoch == EPOCH[0] and not FORKED and not WAITING):   # kept: this frame
            err, ctx = self.context()
            if err or ctx != self.primary:
                self._pushed(raw)
            else:
                err, = self.cu_launch(self.func, self.grid, 1, 1, self.threads, 1, 1, 0,
                                      self.streams[raw], self.address, 0)
                if err:
                    raise api_error("cuLaunchKernel", err)
        else:
            blocks = max(1, min(t.chunks, config.CUDA_MAX_BLOCKS))
            k = key if not isinstance(key, int) else (np.uint32(key) if key else _ZERO_KEY)
            if self._launch(self._dispatcher, (*t.args(), weights, self.flag, k), raw, blocks):
                self.kept_w, self.kept_key = weights, key
                self._keep(t, blocks)
        if self.pins:                                     # after the launch: its fork check comes first
            _pin(self, raw)

    def once(self, weights, key=0) -> None:
        """One launch, its tables kept for good where it is captured (no owner keeps them for
        it)."""
        self.pins = True
        self(weights, key)

    def _dispatcher(self, args):
        return K.lerp_kernel(self.group.shadow_kind, self.group.src_kind, self.stochastic,
                             not isinstance(args[-1], (int, np.integer)))


_TABLES = operator.methodcaller("args")           # a launch over the tables: n, shadows, sources, offsets, chunks
_SCANNED = operator.methodcaller("scanned")       # a scan of the sources (no shadow)


class CudaLaunch(CudaKernel):
    """A launch with its arguments bound once but for those given at each call (``run(*middle)``,
    between ``head`` and ``tail``; first, what ``tables_of`` takes of the group's tables at that
    call, none where None), on the stream current at that call. ``dispatcher``: the kernel's. The
    grid: ``grid`` blocks where given, else a block per chunk up to ``CUDA_MAX_BLOCKS`` and, with
    ``per_sm`` (the name of a :mod:`.config` tunable), at most that many blocks per
    multiprocessor."""

    __slots__ = ("group", "dispatcher", "head", "tail", "per_sm", "tables_of", "size", "pins",
                 "kept")

    def __init__(self, group, dispatcher, head: tuple, tail: tuple, per_sm: str | None = None, tables_of=_TABLES,
                 grid: int | None = None):
        super().__init__(group.device)
        self.group, self.dispatcher, self.head, self.tail, self.per_sm = group, dispatcher, head, tail, per_sm
        self.tables_of, self.size = tables_of, grid
        self.pins = getattr(group, "pins", False)
        self.kept: tuple = ()                             # the kept launch's middle arguments

    def __call__(self, *middle) -> None:
        g = self.group
        t = g.tables
        kept = self.kept
        raw = g.current_stream()
        if (t is self.tables and len(middle) == len(kept) and all(map(operator.is_, middle, kept))
                and self.epoch == EPOCH[0] and not FORKED and not WAITING):   # kept: see CudaLerp
            err, ctx = self.context()
            if err or ctx != self.primary:
                self._pushed(raw)
            else:
                err, = self.cu_launch(self.func, self.grid, 1, 1, self.threads, 1, 1, 0,
                                      self.streams[raw], self.address, 0)
                if err:
                    raise api_error("cuLaunchKernel", err)
        else:
            front = () if self.tables_of is None else self.tables_of(t)
            blocks = self.blocks(middle)
            args = (*front, *self.head, *middle, *self.tail)
            if self._launch(self._dispatcher, args, raw, blocks):
                self.kept = middle
                self._keep(t, blocks)
        if self.pins:                                     # after the launch: its fork check comes first
            _pin(self, raw)

    def once(self, *middle) -> None:
        """One launch, its tables kept for good where it is captured (no owner keeps them for
        it)."""
        self.pins = True
        self(*middle)

    def blocks(self, middle: tuple = ()) -> int:
        if self.size is not None:
            return self.size if self.size > 0 else _stream_blocks(middle[0].size)   # -1: by size
        blocks = max(1, min(self.group.tables.chunks, config.CUDA_MAX_BLOCKS))   # a rank may hold no element
        if self.per_sm is not None:
            cap = getattr(config, self.per_sm) * self.driver.sm_count(self.index)
            if cap:
                blocks = min(blocks, cap)
        return blocks

    def _dispatcher(self, args):
        return self.dispatcher


def _stream_blocks(size: int) -> int:
    return max(1, min((size + config.CUDA_THREADS - 1) // config.CUDA_THREADS, config.CUDA_STREAM_MAX_BLOCKS))


def _flag(group, flag):
    return _zero_flag(group.device) if flag is None else flag


# ------------------------------------------------------------ the prepare functions (the op table's signatures)

def _lerp(group, *, flag=None, stochastic=False, cast) -> CudaLerp:                    # run(weights, key=0)
    return CudaLerp(group, flag, stochastic, cast)


def _plan_lerp(group, *, state, params, decays, w32, w64, flag, keys, done, gi, stochastic=False) -> CudaLaunch:
    """``run(given)``: one ``update()`` of a model EMA with its plan on the device, in one launch
    (``kernels.cuda.plan_lerp_kernel``). Its grid is capped at
    ``config.CUDA_PLAN_LERP_BLOCKS_PER_SM`` blocks per multiprocessor: every block's first thread
    runs the plan step (about 20 dependent loads and a float64 pow) before it streams, so a few
    waves of blocks that grid-stride over the chunks pay it far less often than a block per chunk
    (issue 37, D3)."""
    return CudaLaunch(group, K.plan_lerp_kernel(group.shadow_kind, group.src_kind, stochastic),
                       (state, params, decays), (w32, w64, flag, keys, done, np.int64(gi)),
                       per_sm="CUDA_PLAN_LERP_BLOCKS_PER_SM")


def _bema(group, *, flag=None) -> CudaLaunch:                                           # run(alpha)
    return CudaLaunch(group, K.bema_kernel(group.shadow_kind), (), (_flag(group, flag),))


def _plan(group, *, state, params, decays, w32, w64, flag, keys) -> CudaLaunch:
    """``run(given)``: the one-thread plan kernel of a model EMA's device plan; ``group`` gives the
    device and the stream."""
    return CudaLaunch(group, K.plan_kernel(), (state, params, decays), (w32, w64, flag, keys), tables_of=None,
                       grid=1)


def _copy(group, *, to_shadow, row_lo, row_hi, flag=None) -> CudaLaunch:                # run()
    return CudaLaunch(group, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), (),
                       (row_lo, row_hi, _flag(group, flag)))


def _swap(group, *, mode, row) -> CudaLaunch:                                           # run()
    return CudaLaunch(group, K.swap_kernel(group.shadow_kind, group.src_kind, mode), (), (row,))


def _nonfinite(group, *, flag) -> CudaLaunch:                                           # run()
    """The scan of a group's sources for inf/NaN into ``flag``."""
    return CudaLaunch(group, K.nonfinite_kernel(group.src_kind), (), (flag,), tables_of=_SCANNED)


def _window(group, *, ring_kind) -> CudaLaunch:               # run(ring_addr, slot, full, count, recompute)
    return CudaLaunch(group, K.window_kernel(ring_kind, group.src_kind), (), ())


def _streams(group, *, parts, skip, weighted) -> CudaLaunch:   # run(values, w0, c, ..., slot, filled, widen)
    return CudaLaunch(group, K.streams_kernel(group.src_kind, parts, skip, weighted), (), (), tables_of=None,
                      grid=-1)


PREPARE = {"lerp": _lerp, "plan_lerp": _plan_lerp, "bema": _bema, "plan": _plan, "copy": _copy, "swap": _swap,
           "nonfinite": _nonfinite, "window": _window, "streams": _streams}
"""``op -> prepare(group, **fixed)``: the CUDA launches (:func:`fastema._launch.prepare`)."""
