"""Every CUDA launch of fastema: the variant's device code, one argument block of fastema's own, ``cuLaunchKernel``.

(See :mod:`.cuda_bound` for why and for the prepared launches, which derive from :class:`_Bound`:
:func:`fastema._launch.prepare`; a one-off :func:`fastema._launch.launch` is one prepared and run.)
"""
from __future__ import annotations

import itertools
import operator

import numpy as np

from . import abi, argtypes, config, device_code, forked, kernel_refs
from . import cuda_base as C
from .drivers import current


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
    None: the dispatcher launches it), once per driver, variant and device (``driver.images``); a load
    is refused while a capture runs (launch on the raw stream ``raw``)."""
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


class _Bound:
    """A kernel launch bound once (see the module docstring): the variant's loaded code and one parameter
    block, patched in place where an argument is a new object."""

    __slots__ = ("device", "index", "driver", "func", "loaded", "held", "block", "last")

    def __init__(self, device: str):
        self.device, self.index = device, C._index(device)
        self.driver = current()                           # kept: it loads and launches with it
        self.func = None                                  # the driver handle of the bound code
        self.loaded = None                                # what keeps it loaded (driver.Loaded)
        self.held: list = []                              # per argument: the object its block values are of
        self.block: abi.Block = None  # type: ignore[assignment]  # set with func at the first bind, read after
        self.last: tuple = ()                             # the last launch's arguments

    def _launch(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Launch ``dispatcher``'s kernel with ``args`` on the raw stream ``raw``: the bound block (patched
        where an argument changed) where every argument fits it, else bound again (``dispatcher(args)``
        gives the kernel). Refused in a child forked after CUDA (:mod:`.forked`: a launch kept from before
        the fork meets the refusal here, at every launch, before any driver call)."""
        if forked.FORKED_AFTER_CUDA:                      # one module-level read per launch; no call
            forked.refuse_cuda_after_fork()
        if C.WAITING:                                     # released sources waiting for their events
            C.prune_retired(self.driver, raw, self.index)
        if self.func is not None:
            last = self.last
            if (len(args) == len(last) and all(map(operator.is_, args, last))) or self._patch(args):
                self.last = args
                self._go(raw, blocks)
                return
        self._bind(dispatcher(args), args, raw, blocks)

    def _go(self, raw: int, blocks: int) -> None:
        d = self.driver
        if d.current_context() == d.primary_context(self.index):
            d.launch(self.func, blocks, config.CUDA_THREADS, d.stream(raw), self.block.address)
        else:                                             # another context current (or none): push ours
            with d.activate(self.index):
                d.launch(self.func, blocks, config.CUDA_THREADS, d.stream(raw), self.block.address)

    def _patch(self, args) -> bool:
        """Write the arguments that are new objects into the block (numbers and tuples equal to the held
        ones count as the same); False when one does not fit its place (another dtype, ndim, number type:
        another variant, so the launch binds again). A cheap check, no numba type (:meth:`.abi.Block.patched`)."""
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

    def _bind(self, dispatcher, args, raw: int, blocks: int) -> None:
        """Find the variant's code (:func:`_code`), pack the block and launch; through the dispatcher where
        the driver launches no image of fastema's (the simulator), or where it refused every image of this
        variant (:data:`.driver.REFUSALS`: ``device_code`` warned once, and compiled here where it could).
        Nothing else falls back: an argument numba cannot type, one that is not device memory
        (:class:`.abi.NotDeviceMemory`) or has no kernel ABI is fastema's defect, and raised."""
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
            d.dispatch(kernel_refs.dispatcher(dispatcher), self.index, raw, blocks, config.CUDA_THREADS, args)
            return
        block = abi.Block(types, args)
        self.func, self.loaded, self.block, self.held, self.last = loaded.func, loaded, block, list(args), args
        self._go(raw, blocks)
