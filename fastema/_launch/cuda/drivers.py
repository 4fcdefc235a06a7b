"""fastema's launch drivers (:class:`.driver.Driver`) and the one switch the launch path reads.

- :class:`CudaCoreDriver`, the fast path: each variant's image loaded by cuda.core (``ObjectCode``,
  ``get_kernel``) and made a function of the current context (``cuKernelGetFunction``), launched by
  ``cuLaunchKernel`` with fastema's own parameter block; the device work around the launches (the
  context push, the primary context, the compute capability and multiprocessor count, uploads on a
  stream of fastema's own, pinned staging and its copies, events) and the context, capture and
  version queries are cuda-bindings' calls (:mod:`.memory`): a process that launches shipped
  code imports no numba-cuda. Only a variant the driver refuses (:data:`.driver.REFUSALS`) goes
  through numba's dispatcher (:meth:`.numba_driver.NumbaDriver.dispatch`), importing numba-cuda
  then.
- :class:`DispatcherDriver`: numba's dispatcher launches every kernel (compiling it at its first
  use): the Numba CUDA simulator, ``FASTEMA_CUDA_LAUNCH=dispatcher``, or where cuda.core cannot be
  used. Its device work is numba-cuda's, whose device arrays its tables are
  (:class:`.numba_driver.NumbaDriver`, the base of both): numba-cuda is imported at the first of it,
  not with this module: choosing a driver imports none of it (:func:`simulator` reads
  ``NUMBA_ENABLE_CUDASIM`` itself).

Where cuda.core or the driver says an image cannot run here (a result of :data:`.driver.REFUSALS`),
:meth:`CudaCoreDriver.load` raises :class:`.driver.Refused`; every other error is raised as it is.

:func:`current` is the driver given to :func:`using` (the tests' fake GPU, the variant enumeration's
recorder, a benchmark), else the process's default (:func:`default`). The switch is process-wide,
for tests, tools and benchmarks, not for threads that launch meanwhile; the launch path reads it
when a launch is bound or tables are made (a bound launch keeps its driver), and at each unbound
launch.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any

from .. import config
from .driver import REFUSALS, Driver, Launcher, Loaded, Refused
from .frees import PENDING, free_pending
from .memory import Streams, api_error
from .numba_driver import NumbaDriver

DRIVERS = config.DRIVERS
using = DRIVERS.using
"""``using(driver)``: ``driver`` is the one the launch path takes (:func:`current`) for the ``with``
block."""
current = DRIVERS.current
"""``current()``: the driver the launch path takes now: the innermost :func:`using`'s, else
:func:`default`."""
CHOSEN = DRIVERS.chosen
"""The drivers given to :func:`using` now, innermost last (read without a call by caches of what a
driver made)."""


def simulator() -> bool:
    """Whether the Numba CUDA simulator is on (``NUMBA_ENABLE_CUDASIM``), without importing
    numba-cuda: its config's value where it is imported, else the variable as numba-cuda reads it
    (an integer; any other value is numba-cuda's default, off)."""
    config = sys.modules.get("numba.cuda.core.config")
    if config is not None:
        return bool(config.ENABLE_CUDASIM)
    try:
        return bool(int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0))
    except ValueError:
        return False


@functools.cache
def default() -> Driver:
    """The process's driver, chosen once: numba's dispatcher in the simulator and under
    ``FASTEMA_CUDA_LAUNCH=dispatcher``, and (with one warning saying why) where cuda.core cannot
    load and launch; else cuda.core's."""
    if simulator():
        return DispatcherDriver(simulated=True)
    if os.environ.get("FASTEMA_CUDA_LAUNCH", "bound") == "dispatcher":
        return DispatcherDriver()
    why = CudaCoreDriver.unavailable()
    if why is None:
        return CudaCoreDriver()
    warnings.warn(f"fastema: cuda.core cannot launch here ({why}), so every CUDA launch goes "
                  f"through numba's dispatcher (tens to hundreds of us of host time a call; "
                  f"kernels compiled at first use)", RuntimeWarning, stacklevel=4)
    return DispatcherDriver()


DRIVERS.default = default


class DispatcherDriver(NumbaDriver):
    """numba's dispatcher launches every kernel; see the module docstring."""

    name = "numba's dispatcher"
    loads = False


class CudaCoreDriver(NumbaDriver):
    """cuda.core and cuda-bindings: see the module docstring. ``bindings`` (cuda-bindings'
    ``driver`` module) and ``core`` (the ``cuda.core`` module) are what it calls (the tests give
    stand-ins that check the real bindings' arguments)."""

    name = "cuda.core"
    loads = True

    def __init__(self, bindings=None, core=None):
        super().__init__(bindings=bindings)
        if core is None:
            import cuda.core as core
        self.core = core
        self.core_error = _core_error()
        self._streams = Streams(self.d.CUstream)
        self.stream = self._streams.__getitem__  # type: ignore[method-assign] # a C call per launch
        self._devices = {}                       # index -> memory.Device

    def _stream_arg(self, raw: int):
        return self._streams[raw]                         # the launches' own stream objects (kept)

    def device(self, index: int):
        """Device ``index`` (:class:`.memory.Device`: its primary context retained once)."""
        got = self._devices.get(index)
        if got is None:
            from .memory import Device

            got = self._devices[index] = Device(index, self.d)
        return got

    def activate(self, index: int):
        return self.device(index)

    def compute_capability(self, index: int) -> tuple[int, int]:
        return self.device(index).compute_capability()

    def _sm_count(self, index: int) -> int:
        return self.device(index).sm_count()

    def _primary_context(self, index: int) -> int:
        return self.device(index).handle

    def upload(self, array, index: int):
        """See :meth:`.memory.Device.upload` (issue 37, C1); the deferred frees issued first where
        no watched stream captures (:mod:`.frees`: tables are made, so memory is wanted)."""
        if PENDING and not self.any_capturing(0, index):
            free_pending()
        return self.device(index).upload(array)

    def pinned(self, size: int, dtype):
        from .memory import pinned

        return pinned(size, dtype, self.d)

    def copy(self, device_array, values, raw: int) -> None:
        device_array.copy_to_device(values, stream=raw)

    def event(self):
        from .memory import BindingsEvent

        return BindingsEvent(self.d)

    @staticmethod
    def unavailable(core=None, bindings=None) -> str | None:
        """Why this driver cannot run here, or None: cuda.core missing or older than 0.5.1 (what it
        uses: ``ObjectCode`` and ``_utils.cuda_utils.CUDAError``; 0.3.2, which numba-cuda 0.20's
        ``cu13`` extra pins, has neither), or what of cuda-bindings it calls missing. ``core``,
        ``bindings``: the ``cuda.core`` and cuda-bindings ``driver`` modules asked (default: the
        installed ones)."""
        try:
            if core is None:
                import cuda.core as installed

                core = installed
            if bindings is None:
                from cuda.bindings import driver

                bindings = driver
            _core_error(core)
        except ImportError as err:
            return f"{err.__class__.__name__}: {err} (fastema needs cuda-core>=0.5.1,<2: pip install 'fastema[cuda]')"
        if not hasattr(core, "ObjectCode"):
            return (f"cuda.core {getattr(core, '__version__', '?')} has no ObjectCode (fastema needs "
                    f"cuda-core>=0.5.1,<2: pip install 'fastema[cuda]')")
        calls = ("cuLaunchKernel", "cuCtxGetCurrent", "cuKernelGetFunction", "cuStreamIsCapturing",
                 "cuDriverGetVersion", "CUfunction", "CUkernel", "CUstream", *_MEMORY_CALLS)
        missing = [f for f in calls if not hasattr(bindings, f)]
        return f"its driver bindings lack {', '.join(missing)}" if missing else None

    def load(self, kind: str, code: bytes, entry: str) -> Loaded:
        """Loaded by cuda.core, then (where a context is current: ``device_code`` runs inside the
        device's) made a function of that context now, where a refusal can still fall back, rather
        than lazily at the first launch (``CUDA_MODULE_LOADING=LAZY``, the default), which could be
        inside a capture."""
        obj = self.core.ObjectCode
        try:
            k = (obj.from_cubin(code) if kind == "cubin" else obj.from_ptx(code)).get_kernel(entry)
        except self.core_error as error:                  # cuda.core's "CUDA_ERROR_...: meaning"
            result, _, said = str(error).partition(":")
            if result.strip() in REFUSALS:
                raise Refused(result.strip(), said.strip()) from error
            raise
        d = self.d
        err, ctx = d.cuCtxGetCurrent()
        if err or not int(ctx):                           # no context: loaded at its launch
            return Loaded(d.CUfunction(int(k.handle)), k, kind)
        err, func = d.cuKernelGetFunction(d.CUkernel(int(k.handle)))   # the current context's
        if err:
            if err.name in REFUSALS:
                raise Refused(err.name, "cuKernelGetFunction")
            raise api_error("cuKernelGetFunction", err)
        return Loaded(func, k, kind)

    def launch(self, func, blocks: int, threads: int, stream, params: int) -> None:
        err, = self.d.cuLaunchKernel(func, blocks, 1, 1, threads, 1, 1, 0, stream, params, 0)
        if err:
            raise api_error("cuLaunchKernel", err)

    def launcher(self, index: int) -> Launcher:
        """cuda-bindings' ``cuLaunchKernel`` and ``cuCtxGetCurrent``, device ``index``'s primary
        context as a ``CUcontext`` (compared by value) and this driver's stream objects."""
        d = self.d
        primary = d.CUcontext(self.primary_context(index))
        return Launcher(d.cuLaunchKernel, d.cuCtxGetCurrent, primary, self._streams)

    def clear(self) -> None:
        super().clear()
        self._streams.clear()


_MEMORY_CALLS = ("cuInit", "cuDeviceGet", "cuDeviceGetAttribute", "cuDevicePrimaryCtxRetain", "cuCtxPushCurrent",
                 "cuCtxPopCurrent", "cuMemAlloc", "cuMemFree", "cuMemcpyHtoDAsync", "cuMemcpyDtoH",
                 "cuMemHostAlloc", "cuMemFreeHost", "cuStreamCreate", "cuStreamSynchronize", "cuEventCreate",
                 "cuEventRecord", "cuEventQuery", "cuEventSynchronize", "cuEventDestroy")
"""What of cuda-bindings :mod:`.memory` calls."""


def _core_error(core=None) -> Any:
    """The exception cuda.core raises for a driver's error, whose message starts with the result's
    name (``cuda.core._utils.cuda_utils.CUDAError``, its ``_check_driver_error``'s, in cuda.core
    0.5.1 to 1.2, the range the ``cuda`` and ``cuda12`` extras pin: 0.3 and 0.4 have no
    ``cuda.core._utils``; the private-names table's row); ImportError where ``core`` (default:
    ``cuda.core``) has none."""
    import importlib

    from ... import _privates

    if core is None:
        return _privates.get("cuda.core._utils.cuda_utils:CUDAError")
    return importlib.import_module(f"{core.__name__}._utils.cuda_utils").CUDAError


def _typed(core: CudaCoreDriver, numba: DispatcherDriver) -> tuple[Driver, Driver]:   # for mypy
    return core, numba
