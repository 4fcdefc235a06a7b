"""The device work around fastema's launches, through cuda-bindings alone (no numba-cuda): what
:class:`.drivers.CudaCoreDriver` does besides loading and launching.

- :class:`Device`: one GPU's primary context (retained once, ``cuDevicePrimaryCtxRetain``), pushed
  for a ``with`` block (``cuCtxPushCurrent``/``cuCtxPopCurrent``), its attributes
  (``cuDeviceGetAttribute``) and fastema's upload stream on it (non-blocking, made once).
- :class:`DeviceArray`: a 1-d array of device memory as the launch path reads it
  (``__cuda_array_interface__`` v3, ``size``/``dtype``/``shape``, contiguous slices,
  ``copy_to_host``, ``copy_to_device``): either owning (``cuMemAlloc``, freed by ``cuMemFree`` in
  its device's context when the last view of it goes) or a view over memory someone else owns (a
  torch tensor's), which it keeps alive.
- :func:`pinned`: a NumPy array over page-locked host memory (``cuMemHostAlloc``, freed by
  ``cuMemFreeHost`` when the array goes).
- :class:`BindingsEvent`: an event without timing (``cuEventCreate``), recorded on raw stream
  handles.

Every ``CUresult`` is checked: an error is raised as :class:`CudaDriverError`, naming the call and
the result (``CUDA_ERROR_...``); none is ignored, but the driver's own shutdown at the interpreter's
exit, after which there is nothing left to free.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Callable

import numpy as np

from ..._device_view import DeviceView
from .frees import defer
from .results import CudaDriverError, api_error, check  # noqa: F401  (CudaDriverError: for callers)


def _d():
    from cuda.bindings import driver

    return driver


class Device:
    """Device ``index``: its primary context (retained at construction, kept for the process),
    pushed for a ``with`` block (re-entrant: a push each), its attributes, its upload stream.
    ``bindings``: cuda-bindings' ``driver`` module (a stand-in in tests)."""

    __slots__ = ("index", "d", "device", "context", "_upload_stream", "__weakref__")

    def __init__(self, index: int, bindings=None):
        d = self.d = bindings if bindings is not None else _d()
        check("cuInit", d.cuInit(0))
        self.index = index
        self.device = check("cuDeviceGet", d.cuDeviceGet(index))
        self.context = check("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self.device))
        self._upload_stream = None

    @property
    def handle(self) -> int:
        """The primary context's handle."""
        return int(self.context)

    def __enter__(self) -> Device:
        check("cuCtxPushCurrent", self.d.cuCtxPushCurrent(self.context))
        return self

    def __exit__(self, *exc) -> None:
        check("cuCtxPopCurrent", self.d.cuCtxPopCurrent())

    def attribute(self, name: str) -> int:
        """``cuDeviceGetAttribute`` of ``CU_DEVICE_ATTRIBUTE_<name>``."""
        d = self.d
        return int(check("cuDeviceGetAttribute",
                         d.cuDeviceGetAttribute(getattr(d.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}"),
                                                self.device)))

    def compute_capability(self) -> tuple[int, int]:
        return self.attribute("COMPUTE_CAPABILITY_MAJOR"), self.attribute("COMPUTE_CAPABILITY_MINOR")

    def sm_count(self) -> int:
        return self.attribute("MULTIPROCESSOR_COUNT")

    def upload_stream(self):
        """fastema's own stream on this device, non-blocking (it waits for no other stream's work,
        the legacy stream's included), for the construction-time uploads: made once (in this
        context), kept for the process."""
        if self._upload_stream is None:
            d = self.d
            with self:
                self._upload_stream = check("cuStreamCreate", d.cuStreamCreate(
                    d.CUstream_flags.CU_STREAM_NON_BLOCKING.value))
        return self._upload_stream

    def upload(self, array) -> DeviceArray:
        """A new device array holding ``array`` (NumPy; flattened), written when this returns:
        copied on :meth:`upload_stream`, which is then waited for (a wait for this copy alone, which
        orders it before every launch queued after it, on any stream: issue 37, C1)."""
        host = np.ascontiguousarray(array).reshape(-1)
        d = self.d
        with self:
            out = DeviceArray.allocate(self, host.size, host.dtype)
            if host.nbytes:
                stream = self.upload_stream()
                check("cuMemcpyHtoDAsync", d.cuMemcpyHtoDAsync(out.ptr, host.ctypes.data, host.nbytes, stream))
                check("cuStreamSynchronize", d.cuStreamSynchronize(stream))
        return out


class _Allocation:
    """Device memory of fastema's own, freed when the last array over it goes."""

    __slots__ = ("__weakref__",)


class DeviceArray(DeviceView):
    """A 1-d array of device memory (see the module docstring and
    :class:`fastema._device_view.DeviceView`), with the copies to and from the host; an
    owning one (:meth:`allocate`) frees its memory when the last array over it goes."""

    __slots__ = ()

    @classmethod
    def allocate(cls, device: Device, size: int, dtype) -> DeviceArray:
        """``size`` elements of ``dtype`` (at least one byte) on ``device`` (its context
        current)."""
        nbytes = max(int(size) * np.dtype(dtype).itemsize, 1)
        ptr = int(check("cuMemAlloc", device.d.cuMemAlloc(nbytes)))
        owner = _Allocation()
        weakref.finalize(owner, defer, device.d, device.context, "cuMemFree", ptr).atexit = False   # the exit frees it
        return cls(ptr, size, dtype, owner, device)

    def _bindings(self):
        return self.device.d if self.device is not None else _d()

    def copy_to_host(self) -> np.ndarray:
        """A new NumPy array of its values (``cuMemcpyDtoH``: the host waits for the copy, which
        runs after the work queued before it on the legacy stream)."""
        out = np.empty(self.size, self.dtype)
        if self.nbytes:
            with self._context():
                check("cuMemcpyDtoH", self._bindings().cuMemcpyDtoH(out.ctypes.data, self.ptr, self.nbytes))
        return out

    def _context(self):
        """Its device's context pushed for a copy (a view of memory of unknown device: as it is)."""
        return self.device if self.device is not None else contextlib.nullcontext()

    def copy_to_device(self, values, stream: int = 0) -> None:
        """``values`` (NumPy, at most :attr:`size` elements of its dtype) into its start, queued on
        the raw stream ``stream`` (``cuMemcpyHtoDAsync``: asynchronous where ``values`` is pinned;
        the caller keeps ``values`` unchanged until the copy has run)."""
        values = np.asarray(values)
        if values.dtype != self.dtype or values.ndim != 1 or values.size > self.size:
            raise ValueError(f"fastema: copy of {values.size} x {values.dtype} ({values.ndim}-d) into {self!r}")
        if not values.flags.c_contiguous:
            raise ValueError("fastema: a copy to the device takes a contiguous array")
        if values.nbytes:
            d = self._bindings()
            with self._context():
                check("cuMemcpyHtoDAsync", d.cuMemcpyHtoDAsync(self.ptr, values.ctypes.data, values.nbytes,
                                                               d.CUstream(stream)))
                block = _pinned_block(values)
                if block is not None:             # its free waits for this copy (frees)
                    if not block.guard:
                        block.guard.append(BindingsEvent(d))
                    block.guard[0].record(stream)


class _PinnedBlock:
    """Page-locked host memory, as NumPy reads it (``__array_interface__``), freed after it goes and
    the last copy from it (``guard``: the event recorded after that copy, in a list its free holds)
    has run."""

    __slots__ = ("__array_interface__", "guard", "__weakref__")

    def __init__(self, ptr: int, nbytes: int):
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}
        self.guard: list = []


def _pinned_block(values):
    """The pinned block ``values`` is a view of (its ``base`` chain), or None."""
    while values is not None and not isinstance(values, _PinnedBlock):
        values = getattr(values, "base", None)
    return values



def pinned(size: int, dtype, bindings=None) -> np.ndarray:
    """A new NumPy array of ``size`` (at least 1) elements of ``dtype`` over page-locked host memory
    (``cuMemHostAlloc``, portable: the copies of any context may read it), zeroed."""
    d = bindings if bindings is not None else _d()
    dtype = np.dtype(dtype)
    nbytes = max(int(size), 1) * dtype.itemsize
    ptr = int(check("cuMemHostAlloc", d.cuMemHostAlloc(nbytes, d.CU_MEMHOSTALLOC_PORTABLE)))
    context = check("cuCtxGetCurrent", d.cuCtxGetCurrent())          # freed in it, wherever that runs
    block = _PinnedBlock(ptr, nbytes)
    weakref.finalize(block, defer, d, context if int(context) else None, "cuMemFreeHost", ptr,
                     block.guard).atexit = False
    out = np.asarray(block).view(dtype)
    out[:] = 0
    return out


class BindingsEvent:
    """An event without timing (``CU_EVENT_DISABLE_TIMING``), made in the current context and
    destroyed in it when it goes (``cuEventDestroy`` wants a context); recorded on raw stream
    handles."""

    __slots__ = ("d", "event", "__weakref__")

    def __init__(self, bindings=None):
        d = self.d = bindings if bindings is not None else _d()
        self.event = check("cuEventCreate", d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING.value))
        context = check("cuCtxGetCurrent", d.cuCtxGetCurrent())
        weakref.finalize(self, defer, d, context if int(context) else None, "cuEventDestroy",
                         self.event).atexit = False

    def record(self, raw: int) -> None:
        """Recorded on the raw stream ``raw`` (0: the legacy default stream)."""
        d = self.d
        check("cuEventRecord", d.cuEventRecord(self.event, d.CUstream(raw)))

    def query(self) -> bool:
        """Whether the work before its record has run (``cuEventQuery``: no wait)."""
        d = self.d
        err, = d.cuEventQuery(self.event)
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        if err:
            raise api_error("cuEventQuery", err)
        return True

    def synchronize(self) -> None:
        """Wait for the work before its record (``cuEventSynchronize``)."""
        check("cuEventSynchronize", self.d.cuEventSynchronize(self.event))


STREAMS_MAX = 64
"""The most stream objects a driver keeps (made again after a clear)."""


class Streams(dict):
    """``raw -> make(raw)``, the stream object of each raw handle launched on, made at its first
    launch (a C-level lookup a launch after that); at most :data:`STREAMS_MAX` kept (a handle is
    never queried through this cache: it holds the objects, not whether their streams still
    exist)."""

    __slots__ = ("make",)

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, raw: int):
        if len(self) >= STREAMS_MAX:
            self.clear()
        made = self[raw] = self.make(raw)
        return made


class Watched:
    """The current-stream getters CUDA tables were made with, per device (:meth:`add`), for the
    capture check before deferred frees (:meth:`.drivers.DispatcherDriver.any_capturing`): a getter
    is asked for the stream current *now*, never a handle kept from before (a stream launched on
    earlier may have been destroyed since, and a query of a destroyed handle reads freed driver
    memory). Each getter is held weakly (a bound method by :class:`weakref.WeakMethod`; one that
    takes no weak reference, a builtin, strongly): one that nothing uses any more (a test's reader
    after its block, once its shadows are gone) is dropped, not asked. A getter must name a live
    stream whenever called (a framework's current stream)."""

    __slots__ = ("_kept",)

    def __init__(self):
        self._kept: dict = {}           # (device, id of the callable, partial args) -> (device, index, ref)

    def add(self, device: str, getter) -> None:
        func = getattr(getter, "func", getter)
        key = (device, id(getattr(func, "__func__", func)), id(getattr(func, "__self__", None)),
               getattr(getter, "args", ()))
        kept = self._kept.get(key)
        if kept is not None and kept[2]() is not None:
            return
        ref: Callable[[], Any]
        if inspect.ismethod(getter):
            ref = weakref.WeakMethod(getter)
        else:
            try:
                ref = weakref.ref(getter)
            except TypeError:                          # a builtin: lives as long as its module
                ref = lambda: getter                   # noqa: E731
        self._kept[key] = (device, int(device.split(":")[1]), ref)

    def live(self) -> list:
        """``(device, index, getter)`` of every getter still in use (the dropped ones forgotten)."""
        out = []
        for key, (device, index, ref) in tuple(self._kept.items()):
            getter = ref()
            if getter is None:
                self._kept.pop(key, None)
            else:
                out.append((device, index, getter))
        return out
