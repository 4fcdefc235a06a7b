"""Every CUDA launch: fastema's own device code and argument block, and the launches bound once per group.

numba-cuda's dispatcher, at every launch, types the arguments, picks the compiled overload (compiling
it through NVVM at its first use, in every process) and marshals every argument, then cuda.core packs
them into a new parameter block and launches (measured on an H100: 170-590 us of host time per update).
fastema does none of that per step:

- the kernel's code is the shipped cubin or PTX of its variant (:mod:`.device_code`: loaded by cuda.core,
  no NVVM; a variant not shipped is compiled once per node into a cache), found once per binding by the
  kernel's factory name and the arguments' numba types (numba-cuda's public ``typeof``);
- the arguments are packed by fastema's own ABI (:mod:`.abi`, numba's array ABI written once) into one
  parameter block per binding; per step only an argument that is a new object (host weights, a
  stochastic-rounding key) is packed again, in place (D2);
- the launch is ``cuLaunchKernel`` with the block's address, with no context push and pop where the
  device's primary context is current already (one ``cuCtxGetCurrent``; torch keeps it current), else
  inside ``cuda.gpus[device]`` (D1). Every CUDA call of a binding (loading the code) runs inside its
  device's context (C4). Each call is the launch driver's (:mod:`.driver`), the one current when the
  launch is bound (:func:`.drivers.current`), which the binding keeps.

A prepared launch (:class:`LerpLaunch`, :class:`BoundLaunch`; :data:`PREPARE`) keeps its block from step
to step; a one-off :func:`fastema._launch.launch` prepares one and packs its block for that call.
An argument that does not fit its place (another dtype, ndim or number type: :meth:`.abi.Block.fits`,
no numba type) binds again. The dispatcher launches instead in the Numba CUDA simulator, under
``FASTEMA_CUDA_LAUNCH=dispatcher``, and where the driver refused every image of the variant
(:data:`.driver.REFUSALS`); an argument that is not device memory is refused
(:class:`.abi.NotDeviceMemory`), never copied over. No numba-cuda private name is used: numba-cuda's
version does not decide the fast path.
"""
from __future__ import annotations

import operator

import numpy as np

from ..kernels import cuda as K
from . import config
from . import cuda as C
from .cuda_launch import _Bound, _typeof, cached_launch_available  # noqa: F401

_ZERO_KEY = np.uint32(0)


class LerpLaunch(_Bound):
    """One group's ``"lerp"`` launch on CUDA, bound once (see the module docstring); called as
    ``run(weights, key=0)`` on the stream the group's framework has current at that call. ``cast``:
    the kernel's arithmetic type for host weights."""

    __slots__ = ("group", "flag", "stochastic", "cast", "w_in", "w")

    def __init__(self, group, flag, stochastic: bool, cast):
        super().__init__(group.device)
        self.group, self.stochastic, self.cast = group, stochastic, cast
        self.flag = C._zero_flag(group.device, self.driver) if flag is None else flag   # kept
        self.w_in: object = self                          # no host weights yet
        self.w: tuple = ()

    def __call__(self, weights, key=0) -> None:
        if type(weights) is tuple:
            if weights is not self.w_in and weights != self.w_in:
                self.w_in, self.w = weights, tuple(map(self.cast, weights))
            weights = self.w
        key = key if not isinstance(key, int) else (np.uint32(key) if key else _ZERO_KEY)
        g = self.group
        args = (*g.tables.args(), weights, self.flag, key)
        self._launch(self._dispatcher, args, g.current_stream(), max(1, min(g.tables.chunks, config.CUDA_MAX_BLOCKS)))

    once = __call__

    def _dispatcher(self, args):
        return K.lerp_kernel(self.group.shadow_kind, self.group.src_kind, self.stochastic,
                             not isinstance(args[-1], (int, np.integer)))


_TABLES = operator.methodcaller("args")           # a launch over the tables: n, shadows, sources, offsets, chunks


def _scanned(t) -> tuple:
    """The tables a scan of the sources reads (no shadow)."""
    return t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin


class BoundLaunch(_Bound):
    """A launch with its arguments bound once but for those given at each call (``run(*middle)``,
    between ``head`` and ``tail``; first, what ``tables_of`` takes of the group's tables at that call,
    none where None), on the stream current at that call. ``dispatcher``: the kernel's. The grid:
    ``grid`` blocks where given, else a block per chunk up to ``CUDA_MAX_BLOCKS`` and, with ``per_sm``
    (the name of a :mod:`.config` tunable), at most that many blocks per multiprocessor."""

    __slots__ = ("group", "dispatcher", "head", "tail", "per_sm", "tables_of", "grid")

    def __init__(self, group, dispatcher, head: tuple, tail: tuple, per_sm: str | None = None, tables_of=_TABLES,
                 grid: int | None = None):
        super().__init__(group.device)
        self.group, self.dispatcher, self.head, self.tail, self.per_sm = group, dispatcher, head, tail, per_sm
        self.tables_of, self.grid = tables_of, grid

    def __call__(self, *middle) -> None:
        g = self.group
        front = () if self.tables_of is None else self.tables_of(g.tables)
        self._launch(self._dispatcher, (*front, *self.head, *middle, *self.tail), g.current_stream(),
                     self.blocks(middle))

    once = __call__

    def blocks(self, middle: tuple = ()) -> int:
        if self.grid is not None:
            return self.grid if self.grid > 0 else _stream_blocks(middle[0].size)   # -1: by the values' size
        blocks = max(1, min(self.group.tables.chunks, config.CUDA_MAX_BLOCKS))   # a rank may hold no element
        if self.per_sm is not None:
            cap = getattr(config, self.per_sm) * self.driver.sm_count(self.index)
            if cap:
                blocks = min(blocks, cap)
        return blocks

    def _dispatcher(self, args):
        return self.dispatcher


def plan_launch(group, plan: dict) -> BoundLaunch:
    """``run(given)``: the one-thread plan kernel of a model EMA's device plan (see
    :func:`fastema._launch.plan_launcher`); ``group`` gives the device and the stream."""
    return BoundLaunch(group, K.plan_kernel(), (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"]), tables_of=None, grid=1)


def nonfinite_launch(group, flag) -> BoundLaunch:
    """``run()``: the scan of a group's sources for inf/NaN into ``flag`` (see
    :func:`fastema._launch.nonfinite_launcher`)."""
    return BoundLaunch(group, K.nonfinite_kernel(group.src_kind), (), (flag,), tables_of=_scanned)


def plan_lerp_launch(group, plan: dict, gi: int, stochastic: bool) -> BoundLaunch:
    """``run(given)``: see :func:`fastema._launch.plan_lerp_launcher` (``kernels.cuda.plan_lerp_kernel``).
    Its grid is capped at ``config.CUDA_PLAN_LERP_BLOCKS_PER_SM`` blocks per multiprocessor: every
    block's first thread runs the plan step (about 20 dependent loads and a float64 pow) before it
    streams, so a few waves of blocks that grid-stride over the chunks pay it far less often than a
    block per chunk (issue 37, D3)."""
    return BoundLaunch(group, K.plan_lerp_kernel(group.shadow_kind, group.src_kind, stochastic),
                       (plan["state"], plan["params"], plan["decays"]),
                       (plan["w32"], plan["w64"], plan["flag"], plan["keys"], plan["done"], np.int64(gi)),
                       per_sm="CUDA_PLAN_LERP_BLOCKS_PER_SM")


def copy_launch(group, to_shadow: bool, row_lo: int, row_hi: int, flag) -> BoundLaunch:
    """``run()``: see :func:`fastema._launch.copy_launcher`."""
    return BoundLaunch(group, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), (),
                       (row_lo, row_hi, C._zero_flag(group.device) if flag is None else flag))


def _stream_blocks(size: int) -> int:
    return max(1, min((size + config.CUDA_THREADS - 1) // config.CUDA_THREADS, config.CUDA_STREAM_MAX_BLOCKS))


def _flag(group, flag):
    return C._zero_flag(group.device) if flag is None else flag


PREPARE = {
    "lerp": lambda group, *, flag=None, stochastic=False, cast: LerpLaunch(group, flag, stochastic, cast),
    "bema": lambda group, *, flag=None: BoundLaunch(group, K.bema_kernel(group.shadow_kind), (),
                                                    (_flag(group, flag),)),                      # run(alpha)
    "plan": lambda group, *, state, params, decays, w32, w64, flag, keys: BoundLaunch(
        group, K.plan_kernel(), (state, params, decays), (w32, w64, flag, keys), tables_of=None, grid=1),
    "copy": lambda group, *, to_shadow, row_lo, row_hi, flag=None: copy_launch(group, to_shadow, row_lo, row_hi,
                                                                               flag),
    "swap": lambda group, *, mode, row: BoundLaunch(group, K.swap_kernel(group.shadow_kind, group.src_kind, mode),
                                                    (), (row,)),
    "nonfinite": lambda group, *, flag: nonfinite_launch(group, flag),
    "window": lambda group, *, ring_kind: BoundLaunch(group, K.window_kernel(ring_kind, group.src_kind), (), ()),
    "ema_streams": lambda group, *, mode, skip: BoundLaunch(group, K.ema_kernel(group.src_kind, mode, skip), (),
                                                            (), tables_of=None, grid=-1),
    "sma_streams": lambda group, *, skip: BoundLaunch(group, K.sma_kernel(group.src_kind, skip), (), (),
                                                      tables_of=None, grid=-1),
}
"""``op -> prepare(group, **fixed)``: the CUDA launches (:func:`fastema._launch.prepare`)."""
