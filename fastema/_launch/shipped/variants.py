"""Every CUDA kernel variant fastema's launches can ask for, enumerated from the launches
themselves, op by op of the op table (:mod:`.op`).

A variant is a kernel (its factory and the factory's arguments:
``kernels._store.identity.VARIANTS``) and the numba types of the arguments its launch passes.
:func:`every_variant` prepares every op of :data:`.op.OPS` (:func:`fastema._launch.prepare`, named
by the table's fixed arguments) and calls it with the table's varying ones, over the space its
callers use (:func:`_space`), with placeholder device arrays of the dtypes those callers pass, and
records what reaches the launch instead of launching (through an ordinary launch driver that
records, :class:`RecordingDriver`, given to :func:`.cuda.drivers.using`): the launches' own code
picks the kernel and builds the arguments, so a new argument or kernel choice changes the
enumeration without a hand list.

The space (the storage-kind pairs and modes the faces ask for; the ``fastema.ops`` array functions
can ask for others, which compile at their first use, once per node: ``device_code``):

- shadow <- source kinds (:data:`PAIRS`): float32, bfloat16, float16 (nearest and stochastic
  rounding) or float64 shadows of float32, bfloat16 and float16 sources; float64 <- float64;
- the lerp with host weights for 1 to ``MAX_ROWS`` rows, with device weights (the flat API) and with
  device weights and key (a device plan's groups that do not carry the plan step); the fused plan
  step and lerp; the plan step alone; the buffer copy both ways, with and without a skip flag; the
  non-finite scan; the swaps (``EXCHANGE``; ``PACK``/``UNPACK`` for float32 <- bfloat16); BEMA; the
  window push (float32 and bfloat16 rings; float64 for float64 sources); the metric smoothers.

Used by the build (``python -m fastema warm --into``: what is compiled and shipped, :mod:`.store`),
:func:`warm` (``python -m fastema warm``) and the tests that hold the shipped sets to it. Needs
numba-cuda (its types); no GPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from ...kernels.kinds import BF16, EMA_PART, EXCHANGE, F16, F32, F64, MAX_ROWS, PACK, SMA_PART, UNPACK, wide
from ..cuda import device_code
from ..cuda.device_code import variant_key
from ..cuda.driver import Driver
from ..cuda.memory import Watched
from ..op import OPS

PAIRS = tuple((sk, xk) for sk in (F32, BF16, F16, F64) for xk in (F32, BF16, F16)) + ((F64, F64),)
"""The (shadow, source) storage kinds the faces ask for: a float32, bfloat16, float16 or float64
shadow (``shadow_dtype``, ``"same"``) of 32- and 16-bit sources; float64 sources keep float64
shadows. A source's own kind is also the offload pack's chunk (the buffer copy of a pair of one
kind)."""
_BITS = {F32: np.uint32, BF16: np.uint16, F16: np.uint16, F64: np.float64}   # a metric value's kernel view
_WINDOWS = ((F32, F32), (F32, BF16), (F32, F16), (BF16, F32), (BF16, BF16), (BF16, F16), (F64, F64))   # ring, source


class _Placeholder:
    """A device array as numba's ``typeof`` sees it (``_numba_type_``): a 1-D C-order array of
    ``dtype``; never read or written."""

    def __init__(self, dtype, size: int = 4):
        from numba.cuda import types
        from numba.cuda.np import numpy_support

        self.dtype, self.size, self.shape = np.dtype(dtype), size, (size,)
        array = types.Array                               # type: ignore[attr-defined]
        self._numba_type_ = array(numpy_support.from_dtype(self.dtype), 1, "C")

    def __getitem__(self, item):
        return self


def _tables():
    from .. import Tables

    P = _Placeholder
    return Tables(P(np.int64), P(np.int64), P(np.int64), P(np.int32), P(np.int64), n=1024, chunks=4)


def _plan() -> dict:
    P = _Placeholder
    return {"state": P(np.float64), "params": P(np.float64), "decays": P(np.float64, 2), "w32": P(np.float32),
            "w64": P(np.float64), "flag": P(np.int32), "keys": P(np.int64), "done": P(np.int32)}


class RecordingDriver:
    """A launch driver (:class:`.cuda.driver.Driver`) that records each launch the launchers ask for
    into ``seen`` (``key -> (dispatcher, argument types)``) instead of making it: it loads no image,
    so every launch reaches :meth:`dispatch`, and touches no device (its uploads are placeholders,
    no stream captures)."""

    name = "recorder"
    loads = False

    def __init__(self, seen: dict):
        self.seen = seen
        self.watched = Watched()
        self.zero_flags: dict = {}
        self.images: dict = {}

    def dispatch(self, kernel, index: int, raw: int, blocks: int, threads: int,
                 args: tuple) -> None:
        from numba.cuda.typing.typeof import Purpose, typeof

        from ...kernels._store.identity import VARIANTS

        types = tuple(typeof(a, Purpose.argument) for a in args)
        self.seen.setdefault(variant_key(VARIANTS[kernel], types), (kernel, types))

    def upload(self, array, index: int):
        return _Placeholder(array.dtype, array.size)

    def capturing(self, raw: int, index: int | None = None) -> bool:
        return False

    def any_capturing(self, raw: int, index: int | None) -> bool:
        return False

    def watch(self, device: str, getter) -> None:
        pass

    def relaxed(self):
        return contextlib.nullcontext()

    def activate(self, index: int):
        return contextlib.nullcontext()

    def sm_count(self, index: int) -> int:
        return 1

    def compute_capability(self, index: int) -> tuple[int, int]:
        return 0, 0

    def version(self) -> int:
        return 0

    def current_context(self) -> int:
        return 0

    def primary_context(self, index: int) -> int:
        return 0

    def stream(self, raw: int):
        return raw

    def launcher(self, index: int):
        return None

    def pinned(self, size: int, dtype):
        return np.zeros(max(size, 1), dtype)

    def copy(self, device_array, values, raw: int) -> None:
        pass

    def event(self):
        return None

    def clear(self) -> None:
        pass

    def load(self, kind: str, code: bytes, entry: str):
        raise RuntimeError("fastema: the variant recorder loads no image")

    def launch(self, func, blocks: int, threads: int, stream, params: int) -> None:
        raise RuntimeError("fastema: the variant recorder launches no image")


def _space() -> Iterator[tuple[str, Any, dict, dict]]:
    """``(op, group, fixed, varying)`` of every launch the faces ask for (see the module docstring),
    each op's arguments named as the op table names them (:data:`.op.OPS`)."""
    from ... import _launch as L

    P = _Placeholder
    plan = _plan()
    for sk, xk in PAIRS:
        g = L.Group("cuda:0", sk, xk, _tables())
        w = np.float64 if wide(sk, xk) else np.float32
        for stochastic in (False, True) if sk in (BF16, F16) else (False,):
            for rows in range(1, MAX_ROWS + 1):
                yield "lerp", g, {"stochastic": stochastic}, {"weights": (0.5,) * rows, "key": 1 if stochastic else 0}
            yield "lerp", g, {"stochastic": stochastic}, {"weights": P(w), "key": 0}            # the flat API
            yield "lerp", g, {"flag": P(np.int32, 1), "stochastic": stochastic}, {"weights": P(w),
                                                                                   "key": P(np.int64, 1)}
            yield "plan_lerp", g, {**plan, "gi": 0, "stochastic": stochastic}, {"given": -1}
        for to_shadow in (True, False):
            for flag in (None, P(np.int32, 1)):
                yield "copy", g, {"to_shadow": to_shadow, "row_lo": 0, "row_hi": 1, "flag": flag}, {}
        yield "nonfinite", g, {"flag": P(np.int32, 1)}, {}
        for mode in (EXCHANGE, PACK, UNPACK) if (sk, xk) == (F32, BF16) else (EXCHANGE,):
            yield "swap", g, {"mode": mode, "row": 0}, {}
        for flag in (None, P(np.int32, 1)):
            yield "bema", g, {"flag": flag}, {"alpha": 0.5}
    yield "plan", L.Group("cuda:0", F32, F32, _tables()), {k: plan[k] for k in OPS["plan"].fixed}, {"given": -1}
    for rk, xk in _WINDOWS:
        g = L.Group("cuda:0", F32, xk, _tables())
        for recompute in (False, True):
            yield "window", g, {"ring_kind": rk}, {"ring_addr": P(np.int64), "slot": 0, "full": False, "count": 1,
                                                   "recompute": recompute}
    for kind in (F32, F64, BF16, F16):
        g = L.Group("cuda:0", None, kind, None)
        f64, i32 = P(np.float64), P(np.int32)
        varying = {"values": P(_BITS[kind]), "w0": 1.0, "c": f64, "per_stream": False, "mode": 0, "d": 0.5,
                   "ab": f64, "ring_v": f64, "sc": f64, "n": i32, "ring_w": f64, "wsc": f64, "bad": i32,
                   "slot": 0, "filled": 0, "widen": False}
        for parts in (EMA_PART, SMA_PART, EMA_PART | SMA_PART):
            for skip in (False, True):
                for weighted in (False, True):
                    yield "streams", g, {"parts": parts, "skip": skip, "weighted": weighted}, varying


def every_variant() -> dict:
    """``key -> (dispatcher, argument types)`` of every variant (see the module docstring), in a
    stable order (sorted by key): every op of the op table prepared over the space (:func:`_space`)
    and called with its varying arguments in the table's order."""
    from ... import _launch as L
    from ..cuda.drivers import using

    seen: dict = {}
    with using(RecordingDriver(seen)):
        for op, g, fixed, varying in _space():
            L.prepare(op, g, **fixed)(*[varying[k] for k in OPS[op].varying])
    return dict(sorted(seen.items()))


def warm() -> list:
    """Load every variant on every visible GPU (``python -m fastema warm``): its shipped code where
    the driver takes it, else compiled into the cache (a variant not shipped for the GPU's
    architecture, code the driver refuses); ``[(what, seconds)]`` of what was compiled (nothing
    where no GPU is visible). RuntimeError, saying what to do, where nothing compiled could be kept
    (the cache off or its folder refused)."""
    import time

    from numba import cuda

    if not cuda.is_available():
        return []
    if device_code.cache_folder() is None:
        raise RuntimeError("the CUDA kernel cache is off (FASTEMA_CUDA_CACHE=0) or its folder is not one of your "
                           "own, so nothing compiled now would be kept; set NUMBA_CACHE_DIR to a folder only you "
                           "can write")
    done = []
    for index, gpu in enumerate(cuda.gpus):
        cc = tuple(gpu.compute_capability)
        with gpu:
            for key, (dispatcher, types) in every_variant().items():
                t = time.perf_counter()
                before = len(device_code.COMPILES)
                device_code.kernel(dispatcher, types, index)
                if len(device_code.COMPILES) > before:
                    done.append((f"{key} sm_{cc[0]}{cc[1]}", time.perf_counter() - t))
    return done


def _typed(recorder: RecordingDriver) -> Driver:          # mypy: the recorder is a launch driver
    return recorder
