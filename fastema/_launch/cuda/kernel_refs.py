"""The CUDA kernels the launchers ask for, by name: the variants of the shipped code found and
loaded without importing the kernels' Python (``fastema.kernels.cuda``: numba dispatchers,
numba-cuda).

A kernel factory of ``kernels.cuda`` (``lerp_kernel(shadow_kind, src_kind, stochastic,
device_key)``) makes one numba dispatcher per arguments, named ``lerp_kernel(0,1,0,0)``
(``kernels._store.identity .variant``); a shipped variant is that name and its arguments' types
(:mod:`.argtypes`). This module's factories of the same names give a :class:`KernelRef` of the same
name at once, and its dispatcher only where one is needed (:meth:`KernelRef.dispatcher`: a variant
not shipped, compiled here; a launch through numba's dispatcher; the build), importing
``kernels.cuda`` then. What the launch path reads of a dispatcher besides its name, its own launch
bounds (the shipped code's bounds check), is :func:`own_bounds`.
``tests/launch/test_kernel_refs.py`` holds the factories' parameters and :func:`own_bounds` to
``kernels.cuda``'s for every shipped variant.
"""
from __future__ import annotations

import functools

from ...kernels.kinds import wide  # plain constants and rules: no numba

FACTORIES = {"lerp_kernel": 4, "plan_lerp_kernel": 3, "bema_kernel": 1, "copy_kernel": 3, "swap_kernel": 3,
             "window_kernel": 2, "plan_kernel": 0, "zero_kernel": 0, "streams_kernel": 4,
             "nonfinite_kernel": 1}
"""``kernels.cuda``'s variant factories and how many arguments each takes (the launchers give them
all, by position)."""

_SR_LERP, _PLAN_LERP, _SCAN = (256, 4), (256, 4), (256, 6)   # kernels.cuda's SR_LERP_BOUNDS, PLAN_LERP_BOUNDS,
                                                             # _cuda_scan's SCAN_BOUNDS


def own_bounds(factory: str, numbers: tuple):
    """The launch bounds ``kernels.cuda``'s factory gives its dispatcher (``targetoptions``), or
    None."""
    if factory == "lerp_kernel":
        return _SR_LERP if numbers[2] else None
    if factory == "plan_lerp_kernel":                # a float64 one (wide) has none
        return None if wide(numbers[0], numbers[1]) else _SR_LERP if numbers[2] else _PLAN_LERP
    if factory == "nonfinite_kernel":
        return _SCAN
    return None


@functools.cache
def kernels():
    """``fastema.kernels.cuda``, imported where a dispatcher is first needed, its dispatcher cache
    switch set before (``FASTEMA_CUDA_CACHE``)."""
    from ...kernels import _cuda_jit
    from .. import config

    _cuda_jit.CACHE = config.CUDA_DISPATCHER_CACHE  # numba's own cache of the dispatcher path
    from ...kernels import cuda

    return cuda


class KernelRef:
    """A variant's kernel by name (``lerp_kernel(0,1,0,0)``): equal and hashed by it."""

    __slots__ = ("factory", "numbers", "name", "own_bounds")

    def __init__(self, factory: str, numbers: tuple):
        self.factory, self.numbers = factory, numbers
        self.name = f"{factory}({','.join(map(str, numbers))})"
        self.own_bounds = own_bounds(factory, numbers)

    def dispatcher(self):
        """``kernels.cuda``'s dispatcher of this kernel (see the module docstring): the factory's,
        asked each time (it keeps what it made until ``fastema.clear_caches()`` or a test clears
        it)."""
        return getattr(kernels(), self.factory)(*self.numbers)

    def __eq__(self, other) -> bool:
        return type(other) is KernelRef and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"KernelRef({self.name})"


@functools.cache
def _kernel(factory: str, numbers: tuple) -> KernelRef:
    return KernelRef(factory, numbers)


def _factory(factory: str, count: int):
    def make(*args) -> KernelRef:
        if len(args) != count:
            raise TypeError(f"fastema: {factory} takes {count} arguments by position, got {len(args)}")
        return _kernel(factory, tuple(int(a) for a in args))

    make.__name__ = make.__qualname__ = factory
    return make


def dispatcher(kernel):
    """The numba dispatcher of ``kernel`` (a :class:`KernelRef`, or a dispatcher: itself)."""
    return kernel.dispatcher() if type(kernel) is KernelRef else kernel


lerp_kernel = _factory("lerp_kernel", 4)
plan_lerp_kernel = _factory("plan_lerp_kernel", 3)
bema_kernel = _factory("bema_kernel", 1)
copy_kernel = _factory("copy_kernel", 3)
swap_kernel = _factory("swap_kernel", 3)
window_kernel = _factory("window_kernel", 2)
plan_kernel = _factory("plan_kernel", 0)
zero_kernel = _factory("zero_kernel", 0)
streams_kernel = _factory("streams_kernel", 4)
nonfinite_kernel = _factory("nonfinite_kernel", 1)
