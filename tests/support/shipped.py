"""The CUDA tests held to fastema's shipped device code: no test compiles a kernel unless it is
marked ``compiles`` (issue 63 item 2).

On a GPU, a kernel launched through numba's dispatcher (``kernel[blocks, threads](...)``) is
compiled by NVVM at its first launch in each process: seconds a variant (a 16-bit-shadow lerp up
to 15 s), which made the CUDA tests of the 2026-11-26 H100 run take minutes. fastema ships every
variant its launchers ask for, compiled (``fastema._launch.cuda.device_code``); the tests use that code:

- :func:`launch`: a kernel variant launched by a test as the launch path launches it, through the
  current launch driver: on a GPU its shipped code, loaded (never compiled), with fastema's own
  argument block; in the Numba CUDA simulator through the dispatcher (no compile there). Either
  way the variant must be a shipped one (in every shipped set's index, ``kernels/device/<set>/``)
  and every array argument
  device memory, else AssertionError saying what to change: CI's simulator run catches a test that
  would compile on a GPU.
- The plugin (this module, named in ``tests/conftest.py``'s ``pytest_plugins``): around each
  ``cuda``-marked test not marked ``compiles``, in the simulator, every launch the test makes
  through fastema's launch path is checked to be a shipped variant (:class:`ShippedOnly`, a driver
  wrapping the current one); on a GPU, NVVM's compiles are counted (``compile_ir``, which numba's
  dispatcher and fastema's run-time compiler both call) and fastema's run-time compiles
  (``device_code.COMPILES``): a test that compiled fails, naming what. The count is kept in the
  test's ``user_properties`` (``("nvvm_calls", n)``) for the GPU command's log
  (its pytest plugin). Tests of the run-time compile path carry ``@pytest.mark.compiles``
  (the GPU command runs them last).
"""
from __future__ import annotations

import functools
import json
import os

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@functools.cache
def shipped_keys() -> frozenset:
    """The names of the variants fastema ships: those of every shipped set
    (``kernels/device/<set>/index.json``; each set holds the same variants)."""
    from fastema.kernels._store import store

    keys = None
    for name in store.SETS:
        with open(os.path.join(store.folder(), name, "index.json")) as f:
            got = frozenset(json.load(f)["variants"])
        keys = got if keys is None else keys & got
    return keys or frozenset()


def argument_types(args) -> tuple:
    from numba.cuda.typing.typeof import Purpose, typeof

    return tuple(typeof(a, Purpose.argument) for a in args)


def variant_of(kernel, types) -> str:
    """The name (``kernels._store.identity.variant_key``) of dispatcher ``kernel``'s variant for
    ``types``."""
    from fastema.kernels._store.identity import VARIANTS, variant_key

    name = VARIANTS.get(kernel)
    if name is None:
        raise AssertionError(f"{kernel!r} was not made by a fastema kernel factory (not shipped)")
    return variant_key(name, types)


def _check(kernel, args) -> tuple:
    import numpy as np

    host = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
    if host:
        raise AssertionError(f"arguments {host} are host arrays: copy them to the device "
                             f"(cuda.to_device), as the launch path passes device memory only")
    types = argument_types(args)
    key = variant_of(kernel, types)
    if key not in shipped_keys():
        raise AssertionError(f"{key} is not a shipped variant, so a GPU would compile it: pass the "
                             f"argument types fastema's launchers pass (fastema._launch.shipped.variants), "
                             f"or mark the test compiles")
    return types, key


def launch(kernel, blocks: int, threads: int, *args, raw: int = 0) -> None:
    """``kernel[blocks, threads](*args)`` on device 0's raw stream ``raw``, as fastema's launch
    path launches it (see the module docstring): a shipped variant, device arrays only."""
    from fastema._launch.cuda import abi, device_code, drivers
    from fastema._launch.cuda.launch import _code

    types, key = _check(kernel, args)
    driver = drivers.current()
    if not driver.loads:                                  # the simulator: numba's dispatcher
        driver.dispatch(kernel, 0, raw, blocks, threads, tuple(args))
        return
    before = len(device_code.COMPILES)
    loaded = _code(driver, kernel, types, 0)
    if loaded is None or loaded.source == "compiled" or len(device_code.COMPILES) > before:
        raise AssertionError(f"{key}: its shipped code was not loaded "
                             f"({getattr(loaded, 'source', None)}): see the warning above (device "
                             f"code stale or refused)")
    block = abi.Block(types, tuple(args))
    with driver.activate(0):
        driver.launch(loaded.func, blocks, threads, driver.stream(raw), block.address)


class ShippedOnly:
    """A launch driver (the current one, wrapped) that records every launch through numba's
    dispatcher whose variant is not shipped (``unshipped``): the launches a GPU would compile."""

    def __init__(self, inner):
        self.inner, self.unshipped = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, kernel, index, raw, blocks, threads, args):
        key = variant_of(kernel, argument_types(args))
        if key not in shipped_keys():
            self.unshipped.append(key)
        self.inner.dispatch(kernel, index, raw, blocks, threads, args)


_NVVM: list = []
"""``[calls]``: NVVM's ``compile_ir`` calls in this process, once counted (at a GPU's first cuda
test)."""


def _count_nvvm() -> None:
    if _NVVM:
        return
    from numba.cuda.cudadrv import nvvm

    _NVVM.append(0)
    real = nvvm.compile_ir

    @functools.wraps(real)
    def counted(*args, **kwargs):
        _NVVM[0] += 1
        return real(*args, **kwargs)

    nvvm.compile_ir = counted                     # numba-cuda's codegen calls nvvm.compile_ir


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if item.get_closest_marker("cuda") is None:
        return (yield)
    compiles = item.get_closest_marker("compiles") is not None
    if SIMULATOR:
        from fastema._launch.cuda import drivers

        with drivers.using(ShippedOnly(drivers.current())) as guard:
            result = yield
        if guard.unshipped and not compiles:
            raise AssertionError(f"launched {len(guard.unshipped)} variants that are not shipped, "
                                 f"which a GPU compiles (first: {guard.unshipped[0]}): mark the "
                                 f"test compiles, or launch what fastema's launchers launch")
        return result
    try:
        _count_nvvm()
        from fastema._launch.cuda import device_code
    except ImportError:                                   # no numba-cuda: the test skips itself
        return (yield)
    nvvm, runtime = _NVVM[0], len(device_code.COMPILES)
    try:
        result = yield
    finally:                                              # counted for the log, failed or not
        nvvm, runtime = _NVVM[0] - nvvm, device_code.COMPILES[runtime:]
        item.user_properties.append(("nvvm_calls", nvvm))
    if (nvvm or runtime) and not compiles:
        raise AssertionError(f"compiled at run time: {nvvm} NVVM calls, fastema's run-time "
                             f"compiles {runtime[:3]}: launch the shipped code "
                             f"(tests/support/shipped.py), or mark the test compiles")
    return result
