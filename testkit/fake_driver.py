"""A GPU on the host for fastema's CUDA launch path: :class:`FakeDriver`, a launch driver
(``fastema._launch.cuda.driver.Driver``: mypy holds it to that protocol) that records what the launch
path asks of it and runs nothing on a device.

It stands for :class:`fastema._launch.cuda.drivers.CudaCoreDriver` on an sm_90 GPU under a CUDA 13
driver: ``load`` records the image fastema's real store hands it (the shipped code: nothing is faked
above the driver) and gives a ``CUfunction`` handle; ``launch`` records the launch; ``dispatch``
records what would have gone through numba's dispatcher; its context, stream and function handles
are of the types cuda-bindings takes (``tests/launch/test_driver.py`` calls the real bindings'
argument checks with them). Device memory is :class:`FakeDeviceArray` (host memory behind a fake
address, typed by numba as a device array); every call that would touch a device is logged with the
device whose context is current (:meth:`FakeDriver.activate` counts the pushes).
"""
from __future__ import annotations

import collections
import contextlib
import types
from typing import Any, Iterator

import numpy as np

from fastema._launch.cuda.driver import Driver, Launcher, Loaded
from fastema._launch.cuda.memory import Watched

PRIMARY = 0xC7000
"""Device ``i``'s primary context is ``PRIMARY + i``."""


class FakeDeviceArray:
    """A 1-d device array as numba types it and as fastema's ABI reads it
    (``__cuda_array_interface__``): host memory behind an address of its own."""

    _next = 0x7F0000000000

    def __init__(self, n: int, dtype, ptr: int | None = None, host: np.ndarray | None = None,
                 driver=None):
        if ptr is None:
            FakeDeviceArray._next += 0x10000
            ptr = FakeDeviceArray._next
        self.ptr, self.size, self.dtype, self.shape = int(ptr), int(n), np.dtype(dtype), (int(n),)
        self._layout = types.SimpleNamespace(strides_in_bytes=(self.dtype.itemsize,))   # for numba
        self.host = np.zeros(self.size, self.dtype) if host is None else host
        self.driver = driver

    @property
    def _numba_type_(self):
        """Its numba type, made where numba asks (numba-cuda imported then, not by a fake array's
        making: the stub driver's process imports no numba.cuda of its own)."""
        from numba.cuda import types as nb
        from numba.cuda.np import numpy_support

        return nb.Array(numpy_support.from_dtype(self.dtype), 1, "C")   # type: ignore[attr-defined]

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "strides": None, "version": 3}

    def to_device(self, retr, stream):                   # wrap_arg(v).to_device(...): itself
        return self

    def copy_to_host(self):                              # a device-to-host copy: the host waits
        if self.driver is not None:
            self.driver.counters["host_syncs"] += 1
        return self.host.copy()

    def __len__(self):
        return self.size

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a fake device array takes contiguous slices only")
        lo, hi, _ = item.indices(self.size)
        hi = max(lo, hi)
        return FakeDeviceArray(hi - lo, self.dtype, ptr=self.ptr + lo * self.dtype.itemsize,
                               host=self.host[lo:hi], driver=self.driver)


class FakeEvent:
    """An event: its record, query and wait logged; ``query()`` says what the driver's
    ``events_done`` says."""

    def __init__(self, driver: FakeDriver):
        self.driver = driver
        self.recorded_on: int | None = None

    def record(self, raw: int) -> None:
        self.driver.note("event.record", raw)
        self.recorded_on = raw

    def query(self) -> bool:
        self.driver.note("event.query", None)
        return self.driver.events_done

    def synchronize(self) -> None:
        self.driver.note("event.synchronize", None)
        self.driver.counters["host_syncs"] += 1


class _Push:
    """Device ``index``'s primary context pushed (counted) and popped (on a ``real`` driver, pushed there too)."""

    def __init__(self, driver: FakeDriver, index: int):
        self.driver, self.index, self.saved = driver, index, 0
        self.real = driver.real.activate(index) if driver.real is not None else None

    def __enter__(self):
        d = self.driver
        if self.real is not None:
            self.real.__enter__()
        d.pushes[self.index] = d.pushes.get(self.index, 0) + 1
        d.stack.append(self.index)
        self.saved, d.context = d.context, d.primary + self.index
        return self

    def __exit__(self, *exc):
        d = self.driver
        d.stack.pop()
        d.context = self.saved
        if self.real is not None:
            self.real.__exit__(*exc)


class FakeDriver:
    """See the module docstring. ``loads``: False stands for a driver that launches every kernel
    through numba's dispatcher. ``primary_current``: device 0's primary context is current (as torch
    keeps it). ``record``: launches are appended to :attr:`launches` (off for timings).
    ``on_launch(params)``: called at each launch with the address of the parameter block. ``real``:
    a driver whose ``load``, ``launch``, ``stream``, ``current_context``, capture queries, pushes and
    device work (uploads, pinned arrays, copies, events) run too (``fastema._launch.cuda.drivers.CudaCoreDriver``
    over the driver emulator: :mod:`.fake_gpu`); its contexts are then ``real_primary``.

    What it saw: :attr:`launches` (``("load", kind, entry)``, ``("launch", stream, blocks, func)``,
    ``("dispatcher", variant name, (blocks, threads, raw), args)``), :attr:`log` (``(what, device
    whose context is current, detail)`` of every call that touches a device), :attr:`pushes`
    (``device -> context pushes``), :attr:`counters` (device allocations, uploaded bytes, pinned
    allocations, host waits)."""

    name = "fake GPU"

    def __init__(self, *, loads: bool = True, primary_current: bool = True, record: bool = True,
                 on_launch=None, sm_count: int = 132, cc: tuple[int, int] = (9, 0),
                 version: int = 13000,
                 real: Driver | None = None, real_primary: int = 0):
        self.loads = loads
        self.zero_flags: dict = {}
        self.images: dict = {}
        self.record, self.on_launch, self.real = record, on_launch, real
        self.sms, self.cc, self.driver_version = sm_count, cc, version
        self.primary = real_primary if real is not None else PRIMARY
        self.context = self.primary if primary_current else 0
        self.capture = False                    # what capturing() says
        self.events_done = True                 # what an event's query() says
        self.pushes: dict = {}
        self.stack: list = []
        self.log: list = []
        self.launches: list = []
        self.handles: dict = {}
        self.counters: collections.Counter = collections.Counter()
        self.watched = Watched()                # what watch() was told (the real driver's, given one)
        if real is not None:
            self.watched = real.watched
            self.watch = real.watch             # type: ignore[method-assign]
            self.launch = real.launch           # type: ignore[method-assign]
            self.stream = real.stream           # type: ignore[method-assign]
            self.current_context = real.current_context   # type: ignore[method-assign]
            self.capturing = real.capturing     # type: ignore[method-assign]
            self.any_capturing = real.any_capturing   # type: ignore[method-assign]
            self.relaxed = real.relaxed         # type: ignore[method-assign]
            self.primary_context = real.primary_context   # type: ignore[method-assign]
            self.launcher = real.launcher       # type: ignore[method-assign]

    def device_now(self):
        return self.stack[-1] if self.stack else None

    def note(self, what: str, detail) -> None:
        self.log.append((what, self.device_now(), detail))

    def handle_of(self, entry: str) -> int:
        return self.handles.setdefault(entry, 0xC0FFEE000 + len(self.handles))

    # ---------------------------------------------------------------- images and launches
    def load(self, kind: str, code: bytes, entry: str) -> Loaded:
        self.note("load", entry)
        self.launches.append(("load", kind, entry))
        if self.real is not None:
            return self.real.load(kind, code, entry)
        from cuda.bindings import driver

        return Loaded(driver.CUfunction(self.handle_of(entry)), None, kind)

    def launch(self, func, blocks: int, threads: int, stream, params: int) -> None:
        if self.record:
            self.launches.append(("launch", stream, blocks, func))
            self.note("launch", None)
        if self.on_launch is not None:
            self.on_launch(params)

    def stream(self, raw: int):
        return raw

    def launcher(self, index: int) -> Launcher | None:
        """A kept launch's calls, with cuda-bindings' signatures, through this driver's own methods
        (each looked up at the call: a test that replaces one sees the kept launches use it)."""
        def launch(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra) -> tuple:
            assert (gy, gz, by, bz, shared, extra) == (1, 1, 1, 1, 0, 0)
            self.launch(func, gx, bx, stream, params)
            return (0,)

        return Launcher(launch, lambda: (0, self.current_context()), self.primary_context(index), _Streams(self))

    def dispatch(self, kernel, index: int, raw: int, blocks: int, threads: int,
                 args: tuple) -> None:
        from fastema.kernels._store.identity import VARIANTS

        with self.activate(index):
            name = VARIANTS.get(kernel, repr(kernel))
            self.note("dispatcher", name)
            self.launches.append(("dispatcher", name, (blocks, threads, raw), args))

    # ---------------------------------------------------------------- contexts, capture, the device
    def current_context(self) -> int:
        return self.context

    def primary_context(self, index: int) -> int:
        return self.primary + index

    def activate(self, index: int) -> _Push:
        return _Push(self, index)

    def capturing(self, raw: int, index: int | None = None) -> bool:
        return self.capture

    def any_capturing(self, raw: int, index: int | None) -> bool:
        return self.capture

    def watch(self, device: str, getter) -> None:
        self.watched.add(device, getter)

    def relaxed(self):                                   # no capture modes here (the real driver's, given one)
        return contextlib.nullcontext()

    def sm_count(self, index: int) -> int:
        return self.sms

    def compute_capability(self, index: int) -> tuple[int, int]:
        return self.cc

    def version(self) -> int:
        return self.driver_version

    # ---------------------------------------------------------------- memory and events
    def upload(self, array, index: int) -> Any:
        a = np.ascontiguousarray(array)
        if self.real is not None:
            self.counters["device_allocs"] += 1
            self.counters["uploaded_bytes"] += a.nbytes
            self.counters["host_syncs"] += 1
            return self.real.upload(a, index)
        with self.activate(index):
            self.note("to_device", f"upload-{index}")
            self.counters["device_allocs"] += 1
            self.counters["uploaded_bytes"] += a.nbytes
            out = FakeDeviceArray(a.size, a.dtype, host=a.reshape(-1).copy(), driver=self)
            self.note("stream.synchronize", f"upload-{index}")
            self.counters["host_syncs"] += 1
        return out

    def pinned(self, size: int, dtype) -> np.ndarray:
        self.counters["host_allocs"] += 1
        if self.real is not None:
            return self.real.pinned(size, dtype)
        return np.zeros(max(size, 1), dtype)

    def copy(self, device_array, values, raw: int) -> None:
        self.note("copy_to_device", raw)
        self.counters["uploaded_bytes"] += values.nbytes
        if self.real is not None:
            self.real.copy(device_array, values, raw)
        else:
            device_array.host[:len(values)] = values

    def event(self) -> Any:
        return self.real.event() if self.real is not None else FakeEvent(self)

    def clear(self) -> None:
        pass


class _Streams:
    """A fake driver's stream objects, as a kept launch reads them (``streams[raw]``)."""

    __slots__ = ("driver",)

    def __init__(self, driver: FakeDriver):
        self.driver = driver

    def __getitem__(self, raw: int):
        return self.driver.stream(raw)


def _itself(value):
    return value


def _as_driver(d: FakeDriver) -> Driver:                 # mypy: a FakeDriver is a Driver
    return d


@contextlib.contextmanager
def numba_marshalling() -> Iterator[Any]:
    """numba-cuda's own ``_Kernel._prepare_args`` for fake device arrays (its ``wrap_arg`` left them
    as they are) in the ``with`` block: yields ``params(types, args)``, the values numba-cuda 0.30
    hands cuda.core for a launch with ``args`` of numba ``types`` (what fastema's own ABI is held
    to). ``types`` may be fastema's own (``fastema._launch.cuda.argtypes``): numba's stand-ins are used."""
    from numba.cuda import dispatcher as D

    from fastema._launch.cuda.argtypes import as_numba

    kernel = types.SimpleNamespace(extensions=[], debug=False, cooperative=False)
    kernel._prepare_args = types.MethodType(D._Kernel._prepare_args, kernel)   # tuples recurse

    def params(argument_types, args) -> list:
        out: list = []
        retr: list = []
        for t, v in zip(argument_types, args):
            kernel._prepare_args(as_numba(t), v, 0, retr, out)
        assert not retr
        return out

    real = D.wrap_arg
    D.wrap_arg = _itself                                   # type: ignore[assignment]
    try:
        yield params
    finally:
        D.wrap_arg = real


class CompilesNothing:
    """A run-time compiler (``fastema._launch.cuda.compiler.Compiler``, given to ``compiler.using``) that
    compiles nothing: each call gives ``("cubin", b"new", "entry", {})`` for each image, and the
    launch layer records it as a compile of its own (``device_code.COMPILES``)."""

    name, set = "stand-in", "cu13"

    def identity(self) -> str:
        return f"stand-in {id(self)}"

    def compile(self, dispatcher, types, images):
        return {image: ("cubin", b"new", "entry", {}) for image in images}
