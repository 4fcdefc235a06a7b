"""Every CUDA launch of fastema: the variant's device code, one argument block of fastema's own, ``cuLaunchKernel``.

(See :mod:`.cuda_bound` for why and for the launches bound once per group, which derive from :class:`_Bound`;
:func:`launch_once` is the one-off launch of the ops of :func:`fastema._launch.launch`.)
"""
from __future__ import annotations

import functools
import operator

import numpy as np
from numba import cuda

from . import abi, config, device_code
from . import cuda_base as C


@functools.cache
def cached_launch_available() -> bool:
    """True when fastema's own launch path can run here: a real GPU (not the simulator), cuda.core
    importable, and FASTEMA_CUDA_LAUNCH not set to ``dispatcher``."""
    import importlib
    import os

    if C.SIMULATOR or os.environ.get("FASTEMA_CUDA_LAUNCH", "bound") == "dispatcher":
        return False
    try:
        importlib.import_module("cuda.core")              # what device_code loads the shipped code with
        driver = C._driver()
        ok = all(hasattr(driver, f) for f in ("cuLaunchKernel", "cuCtxGetCurrent", "CUfunction", "CUstream"))
        why = "its driver bindings lack cuLaunchKernel"
    except Exception as err:                              # noqa: BLE001 - any difference: the dispatcher
        ok, why = False, f"{err.__class__.__name__}: {err}"
    if not ok:
        import warnings

        warnings.warn(f"fastema: cuda.core cannot launch here ({why}), so every CUDA launch goes through numba's "
                      f"dispatcher (tens to hundreds of us of host time a call; kernels compiled at first use)",
                      RuntimeWarning, stacklevel=3)
    return ok


# ---------------------------------------------------------------- the driver calls (the fake GPU replaces them)

def _current_context() -> int:
    """The handle of the CUDA context current on this thread (0: none)."""
    d = C._driver()
    err, ctx = d.cuCtxGetCurrent()
    return 0 if err else int(ctx)


@functools.cache
def _primary_context(index: int) -> int:
    """The handle of device ``index``'s primary context (retained once by numba; not pushed)."""
    return int(cuda.gpus[index].get_primary_context().handle)


@functools.lru_cache(maxsize=64)
def _driver_stream(raw: int):
    return C._driver().CUstream(raw)


def _driver_launch(func, blocks: int, threads: int, stream, params: int) -> None:
    """``cuLaunchKernel`` with the parameter block at address ``params``; raises on an error."""
    d = C._driver()
    err, = d.cuLaunchKernel(func, blocks, 1, 1, threads, 1, 1, 0, stream, params, 0)
    if err:
        from numba.cuda.cudadrv.driver import CudaAPIError

        raise CudaAPIError(int(err), f"cuLaunchKernel: {err!r}")


@functools.cache
def _sm_count(index: int) -> int:
    """Device ``index``'s multiprocessor count (0 where it cannot be read: no cap from it)."""
    try:
        return int(cuda.gpus[index].MULTIPROCESSOR_COUNT)
    except Exception:                                     # noqa: BLE001 - the simulator, an odd device
        return 0


# ---------------------------------------------------------------- bound launches

def _typeof(value):
    """The numba type the dispatcher gives ``value`` as a kernel argument."""
    from numba.cuda.typing.typeof import Purpose, typeof

    return typeof(value, Purpose.argument)


def _same_type(value, ty) -> bool:
    try:
        return _typeof(value) == ty
    except Exception:                                     # noqa: BLE001 - untyped: bind again
        return False


_LOADED: dict = {}
"""``(dispatcher, argument types, device index) -> device_code.Loaded`` (None: the dispatcher launches it):
each variant's code loaded once per process and device."""


def _code(dispatcher, types: tuple, index: int):
    key = (dispatcher, types, index)
    try:
        return _LOADED[key]
    except KeyError:
        pass
    with cuda.gpus[index]:                                # every CUDA call of a binding on its device (C4)
        loaded = _LOADED[key] = device_code.kernel(dispatcher, types, index)
    return loaded


class _Bound:
    """A kernel launch bound once (see the module docstring): the variant's loaded code and one parameter
    block, patched in place where an argument is a new object."""

    __slots__ = ("device", "index", "func", "loaded", "held", "block", "last")

    def __init__(self, device: str):
        self.device, self.index = device, C._index(device)
        self.func = None                                  # the driver handle of the bound code
        self.loaded = None                                # what keeps it loaded (device_code.Loaded)
        self.held: list = []                              # per argument: the object its block values are of
        self.block: abi.Block | None = None
        self.last: tuple = ()                             # the last launch's arguments

    def _launch(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Launch ``dispatcher``'s kernel with ``args`` on the raw stream ``raw``: the bound block (patched
        where an argument changed) where every argument fits it, else bound again (``dispatcher(args)``
        gives the kernel)."""
        if C.WAITING:                                     # released sources waiting for their events
            C.prune_retired(self.device, raw)
        if self.func is not None:
            last = self.last
            if (len(args) == len(last) and all(map(operator.is_, args, last))) or self._patch(args):
                self.last = args
                self._go(raw, blocks)
                return
        self._bind(dispatcher(args), args, raw, blocks)

    def _go(self, raw: int, blocks: int) -> None:
        stream = _driver_stream(raw)
        if _current_context() == _primary_context(self.index):
            _driver_launch(self.func, blocks, config.CUDA_THREADS, stream, self.block.address)
        else:                                             # another context current (or none): push ours
            with cuda.gpus[self.index]:
                _driver_launch(self.func, blocks, config.CUDA_THREADS, stream, self.block.address)

    def _patch(self, args) -> bool:
        """Write the arguments that are new objects into the block (numbers and tuples equal to the held
        ones count as the same); False when one has another numba type than the bound one, or is not
        device memory (the launch binds again)."""
        block = self.block
        if len(args) != len(block.types):
            return False
        for i, value in enumerate(args):
            held = self.held[i]
            if held is value or (isinstance(value, (int, np.integer, tuple)) and type(held) is type(value)
                                 and held == value):
                continue
            if not _same_type(value, block.types[i]):
                return False
            try:
                block.patch(i, value)
            except TypeError:
                return False
            self.held[i] = value
        return True

    def _bind(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Find the variant's code (:func:`_code`), pack the block and launch; through the dispatcher where
        that cannot be (see the module docstring)."""
        block = loaded = None
        if cached_launch_available():
            try:
                types = tuple(map(_typeof, args))
            except Exception:                             # noqa: BLE001 - untyped: the dispatcher decides
                types = None
            loaded = None if types is None else _code(dispatcher, types, self.index)
            if loaded is not None:
                try:
                    block = abi.Block(types, args)
                except TypeError:                         # not device memory: numba copies it over
                    loaded = None
        if loaded is None:
            self.func = None
            C._dispatch(dispatcher, self.device, raw, blocks, *args)
            return
        self.func, self.loaded, self.block, self.held, self.last = loaded.func, loaded, block, list(args), args
        self._go(raw, blocks)


def launch_once(kernel, device: str, raw: int, blocks: int, args: tuple) -> None:
    """One launch of ``kernel`` with ``args`` on the raw stream ``raw`` (see the module docstring): a block
    packed for this call."""
    _Bound(device)._bind(kernel, args, raw, blocks)


