"""A fake GPU for fastema's CUDA launch path, on a machine without one (issue 37, D1-D2).

``fake_gpu()`` makes fastema take CPU torch tensors for tensors on ``cuda:0`` and runs everything
fastema's CUDA launchers do on the host, down to the launch: numba's dispatcher is replaced by a
recorder (``FakeDispatcher``: it picks an overload by the arguments' numba types as numba does and
records the launch), device arrays by ``FakeDeviceArray`` (what numba-cuda's ``_prepare_args`` reads),
numba's ``cuda`` module by ``FakeNumbaCuda`` (counts context pushes per device, uploads, stream
synchronisations, events), and the final driver call by ``driver`` (a no-op by default: see
:func:`fake_gpu`). The arguments are marshalled by numba-cuda's own ``_Kernel._prepare_args``.
Nothing runs on a device and no tensor is written: it measures and checks host-side work only.

Used by ``bench/gpu_host_cost.py`` (host us per launch and per ``EMA.update``) and by the fake-GPU
tests in ``tests/kernels/``.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np

_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
           "bfloat16": np.uint16, "float16": np.uint16, "uint8": np.uint8}


class FakeDeviceArray:
    """What numba-cuda's ``_prepare_args`` reads of a device array; typed by numba as a C-order array."""

    _next = 0x7F0000000000

    def __init__(self, n: int, dtype, ptr: int | None = None, host: np.ndarray | None = None):
        from numba.cuda import types as nb
        from numba.cuda.np import numpy_support

        if ptr is None:
            FakeDeviceArray._next += 0x10000
            ptr = FakeDeviceArray._next
        self.ptr, self.size, self.dtype, self.shape = int(ptr), int(n), np.dtype(dtype), (int(n),)
        self._layout = types.SimpleNamespace(strides_in_bytes=(self.dtype.itemsize,))
        self._numba_type_ = nb.Array(numpy_support.from_dtype(self.dtype), 1, "C")
        self.host = np.zeros(self.size, self.dtype) if host is None else host

    @property
    def __cuda_array_interface__(self):                   # what fastema's own ABI (fastema._launch.abi) reads
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3}

    def to_device(self, retr, stream):                   # wrap_arg(value).to_device(...) gives back itself
        return self

    def copy_to_device(self, values, stream=0):
        FAKE.log.append(("copy_to_device", FAKE.device_now(), stream))
        self.host[:len(values)] = values

    def copy_to_host(self):
        return self.host.copy()

    def __len__(self):
        return self.size

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a fake device array takes contiguous slices only")
        lo, hi, _ = item.indices(self.size)
        hi = max(lo, hi)
        return FakeDeviceArray(hi - lo, self.dtype, ptr=self.ptr + lo * self.dtype.itemsize, host=self.host[lo:hi])


class FakeEvent:
    def __init__(self):
        self.recorded_on = None

    def record(self, stream=0):
        FAKE.log.append(("event.record", FAKE.device_now(), stream))
        self.recorded_on = stream

    def query(self):
        FAKE.log.append(("event.query", FAKE.device_now(), None))
        return FAKE.events_done

    def synchronize(self):
        FAKE.log.append(("event.synchronize", FAKE.device_now(), None))


class FakeStream:
    def __init__(self, name):
        self.name = name

    def synchronize(self):
        FAKE.log.append(("stream.synchronize", FAKE.device_now(), self.name))

    def __repr__(self):
        return f"FakeStream({self.name!r})"

    def __bool__(self):
        return True


class _Context:
    """``cuda.gpus[i]``: a context push and pop on device ``i`` (counted)."""

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        FAKE.pushes[self.index] = FAKE.pushes.get(self.index, 0) + 1
        FAKE.stack.append(self.index)
        return self

    def __exit__(self, *exc):
        FAKE.stack.pop()


class _Gpus:
    def __getitem__(self, index):
        return _Context(index)


class FakeNumbaCuda:
    """The parts of ``numba.cuda`` fastema's CUDA launchers call."""

    gpus = _Gpus()

    def to_device(self, a, stream=0):
        a = np.ascontiguousarray(a)
        FAKE.log.append(("to_device", FAKE.device_now(), stream))
        return FakeDeviceArray(a.size, a.dtype, host=a.reshape(-1).copy())

    def pinned_array(self, n, dtype):
        return np.zeros(n, dtype)

    def event(self, timing=True):
        return FakeEvent()

    def default_stream(self):
        return FakeStream("legacy")

    def external_stream(self, ptr):
        return FakeStream(ptr)

    def stream(self):
        return FakeStream("new")


class FakeKernel:
    """An overload: its argument types, numba-cuda's own ``_prepare_args``, a fake cufunc."""

    extensions: list = []
    debug = cooperative = False

    def __init__(self, name, argument_types):
        from numba.cuda import dispatcher as D

        self.name, self.argument_types = name, argument_types
        self._prepare_args = types.MethodType(D._Kernel._prepare_args, self)
        self._codelibrary = types.SimpleNamespace(get_cufunc=self._get_cufunc)

    def _get_cufunc(self):
        FAKE.log.append(("get_cufunc", FAKE.device_now(), self.name))
        if FAKE.stub_driver:                              # a cuda.core Kernel over the stub driver
            kernel = _stub_kernel()
            return types.SimpleNamespace(kernel=kernel, handle=kernel.handle)
        return types.SimpleNamespace(kernel=f"{self.name}-CUFUNC", handle=FAKE.handle_of(self.name))


class FakeDispatcher:
    """A kernel factory's dispatcher: ``[blocks, threads(, stream)]`` gives one shared configuration
    per launch shape (numba-cuda's lru-cached ``configure``), whose call types the arguments as numba
    does, keeps the overload in ``overloads`` and runs the pre-launch callbacks, then records."""

    def __init__(self, name):
        self.name, self.configs, self.overloads = name, {}, {}

    def __getitem__(self, shape):
        if shape not in self.configs:
            self.configs[shape] = FakeConfigured(self, shape)
        return self.configs[shape]

    @property
    def py_func(self):                                   # for messages naming the kernel
        return types.SimpleNamespace(__qualname__=self.name)


class FakeConfigured:
    def __init__(self, dispatcher, shape):
        self.dispatcher, self.shape, self.pre_launch_callbacks = dispatcher, shape, []

    def __call__(self, *args):
        from numba.cuda.typing.typeof import Purpose, typeof

        types_ = tuple(typeof(a, Purpose.argument) for a in args)
        kernel = self.dispatcher.overloads.get(types_)
        if kernel is None:
            kernel = self.dispatcher.overloads[types_] = FakeKernel(self.dispatcher.name, types_)
        for cb in list(self.pre_launch_callbacks):
            cb(kernel, self)
        FAKE.log.append(("dispatcher", FAKE.device_now(), self.dispatcher.name))
        FAKE.launches.append(("dispatcher", self.dispatcher.name, self.shape, args))


class _State:
    """What the fake saw (reset by :func:`fake_gpu`)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.pushes: dict = {}
        self.stack: list = []
        self.log: list = []
        self.launches: list = []
        self.events_done = True
        self.current_context = None          # what the driver says is current (None: nothing)
        self.handles: dict = {}
        self.stub_driver = False

    def device_now(self):
        return self.stack[-1] if self.stack else None

    def handle_of(self, name):
        return self.handles.setdefault(name, 0xC0FFEE000 + len(self.handles))


FAKE = _State()
DISPATCHERS: dict = {}

# ---------------------------------------------------------------- a stub CUDA driver
#
# For "with the driver call" figures: a libcuda.so.1 whose every entry point returns CUDA_SUCCESS at
# once (cuCtxGetCurrent reports STUB_CONTEXT), so cuda-bindings' and cuda.core's own Python-side
# work runs as on a GPU, the driver's own work (about 1.5-2 us a launch on a GPU) excepted. It must be
# on LD_LIBRARY_PATH when the process starts: ``stub_driver_dir()`` builds it (gcc), and
# ``bench/gpu_host_cost.py`` runs its "stub driver" rows in a child process with it.

STUB_CONTEXT = 0xC0C0
_STUB_SOURCE = r"""
typedef int CUresult;
static CUresult ok(void) { return 0; }
static CUresult current(void **ctx) { *ctx = (void *)0xC0C0; return 0; }
static int same(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }
CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    *pfn = same(symbol, "cuCtxGetCurrent") ? (void *)current : (void *)ok; if (status) *status = 1; return 0; }
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    *pfn = same(symbol, "cuCtxGetCurrent") ? (void *)current : (void *)ok; return 0; }
"""


def stub_driver_dir() -> str | None:
    """A folder holding the stub ``libcuda.so.1`` (built once per user), or None where no C compiler is."""
    import os
    import shutil
    import subprocess
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), f"fastema-stub-cuda-{os.getuid()}")
    lib = os.path.join(folder, "libcuda.so.1")
    if os.path.exists(lib):
        return folder
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "stub.c")
    with open(src, "w") as f:
        f.write(_STUB_SOURCE)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, src], capture_output=True)
    return folder if done.returncode == 0 else None


_STUB_KERNEL = []


def _stub_kernel():
    """A cuda.core Kernel loaded through the stub driver (its handle is the stub's)."""
    if not _STUB_KERNEL:
        from cuda.core import ObjectCode

        _STUB_KERNEL.append(ObjectCode.from_cubin(b"\x7fELF" + b"0" * 60).get_kernel("kernel"))
    return _STUB_KERNEL[0]


def _loaded(event: tuple, name: str):
    """A variant's code as ``device_code.Loaded`` (its handle: the stub driver's kernel, or a fake)."""
    from fastema._launch import device_code

    FAKE.log.append(("load", FAKE.device_now(), name))
    FAKE.launches.append(event)
    if FAKE.stub_driver:
        kernel = _stub_kernel()
        from cuda.bindings import driver

        return device_code.Loaded(driver.CUfunction(int(kernel.handle)), kernel, "stub")
    return device_code.Loaded(FAKE.handle_of(name), None, "fake")


def _dispatcher(name):
    def factory(*kinds):
        key = (name, kinds)
        if key not in DISPATCHERS:
            DISPATCHERS[key] = FakeDispatcher(f"{name}{kinds}")
        return DISPATCHERS[key]
    return factory


_KERNELS = ("lerp_kernel", "plan_lerp_kernel", "copy_kernel", "swap_kernel", "nonfinite_kernel", "bema_kernel",
            "plan_kernel", "window_kernel", "zero_kernel", "ema_kernel", "sma_kernel")


def _launch_modules():
    """fastema's CUDA launcher modules (the bound launch may live in its own module)."""
    import importlib

    mods = [importlib.import_module("fastema._launch.cuda")]
    for name in ("cuda_base", "cuda_launch", "cuda_bound"):  # the launch path's modules, where this fastema has them
        try:
            mods.append(importlib.import_module(f"fastema._launch.{name}"))
        except ImportError:
            pass
    return mods


@contextlib.contextmanager
def fake_gpu(driver=None, torch_on_gpu: bool = True, primary_current: bool = True, record: bool = True,
             stub_driver: bool = False, cached: bool = True, real_kernels: bool = False):
    """fastema's CUDA launch path on fakes (see the module docstring) for the ``with`` block.

    ``driver``: called as ``driver(kernel_args)`` where the real launch would call the driver, with
    the argument block fastema hands over (a list of values before issue 37's D2, the address of a
    packed block after): default a no-op. ``torch_on_gpu``: CPU torch tensors are described as on
    ``cuda:0`` (stream handle 77). ``primary_current``: the driver reports device 0's primary context
    as current (as it is under torch). ``record``: each launch through the bound path is appended to
    ``FAKE.launches`` as ``("launch", stream, blocks, kernel)`` (off for timings). ``stub_driver``: the
    launch and the context query are fastema's real ones (cuda.core / cuda-bindings) into the stub
    driver (the process must have started with :func:`stub_driver_dir` on LD_LIBRARY_PATH); ``driver``
    and ``record`` are then unused. ``cached``: what ``cached_launch_available()`` says (False: every
    launch through the dispatcher). ``real_kernels``: fastema's real kernel factories and shipped device code
    (``fastema._launch.device_code``) find each variant's code; only its loading into the driver is faked
    (``("load", source, entry)`` in ``FAKE.launches``; compute capability 9.0), so a variant that is not
    shipped reaches numba-cuda's real compiler (what the NVVM-count tests count). Otherwise the kernel
    factories give fake dispatchers and loading a variant's code records ``("load", name)``."""
    from numba.cuda import dispatcher as D

    import fastema
    from fastema import _backends
    from fastema._backends import torch as tb
    from fastema._launch import device_code

    FAKE.reset()
    DISPATCHERS.clear()
    FAKE.current_context = "primary-0" if primary_current else None
    FAKE.stub_driver = stub_driver
    real = ("_core_stream", "_core_launch", "_core_config", "_driver_launch", "_driver_stream",
            "_current_context") if stub_driver else ()
    driver = driver or (lambda block: None)
    if record:
        inner = driver

        def driver(block, _where=None):
            FAKE.launches.append(("launch",) + (_where or ()))
            FAKE.log.append(("launch", FAKE.device_now(), None))
            return inner(block)
    patches = []

    def patch(obj, name, value):
        patches.append((obj, name, getattr(obj, name, _MISSING)))
        setattr(obj, name, value)

    fake_cuda = FakeNumbaCuda()
    mods = _launch_modules()
    for mod in mods:
        if hasattr(mod, "cuda"):
            patch(mod, "cuda", fake_cuda)
        if hasattr(mod, "SIMULATOR"):
            patch(mod, "SIMULATOR", False)
        for name, value in (
                ("cached_launch_available", lambda: cached),
                ("_core_stream", lambda raw: ("core stream", raw)),
                ("_core_launch", lambda stream, cfg, kernel, *args: driver(list(args), (stream, cfg, kernel))
                 if record else driver(list(args))),
                ("_driver_launch", lambda func, blocks, threads, stream, params: driver(params, (stream, blocks, func))
                 if record else driver(params)),
                ("_driver_stream", lambda raw: raw),
                ("_current_context", lambda: FAKE.current_context),
                ("_primary_context", (lambda index: STUB_CONTEXT if primary_current else 1) if stub_driver else
                 (lambda index: f"primary-{index}")),
                ("_sm_count", lambda index: 132),
                ("_upload_stream", lambda index: FakeStream(f"upload-{index}")),
                ("capturing", lambda device, raw: False)):
            if hasattr(mod, name) and name not in real:
                patch(mod, name, value)
        k = getattr(mod, "K", None)
        if k is not None and not real_kernels:
            for name in _KERNELS:
                patch(k, name, _dispatcher(name))
        loaded = getattr(mod, "_LOADED", None)
        if isinstance(loaded, dict):
            patch(mod, "_LOADED", {})
    if real_kernels:
        patch(device_code, "compute_capability", lambda index: (9, 0))
        patch(device_code, "_load", lambda kind, code, entry, source: _loaded(("load", source, entry), entry))
    else:
        patch(device_code, "kernel", lambda dispatcher, types, index: _loaded(("load", dispatcher.name),
                                                                             dispatcher.name))
    patch(D, "wrap_arg", lambda v: v)
    for mod in mods:                                  # zero flags kept for good: the fake's own, for the block
        flags = getattr(getattr(mod, "_zero_flag", None), "flags", None)
        if isinstance(flags, dict):
            patch(mod._zero_flag, "flags", {})
    for mod in mods:
        for name in ("_zero_flag", "external_stream"):
            fn = getattr(mod, name, None)
            if fn is not None and hasattr(fn, "cache_clear"):
                fn.cache_clear()
    fastema.ops._single_tables.cache_clear()
    if torch_on_gpu:
        backend = _backends.backend_named("torch")
        cls = type(backend)
        describe, control = cls.describe, cls.control

        def on_gpu(buf):
            return buf._replace(device="cuda:0") if buf.device == "cpu" else buf

        patch(cls, "describe", lambda self, t, what: on_gpu(describe(self, t, what)))
        patch(cls, "location", lambda self, a: (tb.NAME, "cuda:0"))
        patch(cls, "control", lambda self, x, what, writable: ("cuda:0",) + tuple(control(self, x, what, writable))[1:])
        patch(cls, "zeros", lambda self, device, n, dtype: _torch_zeros(n, dtype))
        patch(cls, "kernel_view", lambda self, a: FakeDeviceArray(a.numel(), _DTYPES[str(a.dtype)[6:]],
                                                                 ptr=a.data_ptr()))
        getter = _backends.stream_getter                  # lru-cached per (framework, device)
        patch(_backends, "stream_getter", lambda framework, device: (lambda: 77) if framework == tb.NAME and
              device != "cpu" else getter(framework, device))
    try:
        yield FAKE
    finally:
        for obj, name, old in reversed(patches):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        for mod in mods:
            for name in ("_zero_flag", "external_stream"):
                fn = getattr(mod, name, None)
                if fn is not None and hasattr(fn, "cache_clear"):
                    fn.cache_clear()
        fastema.ops._single_tables.cache_clear()
        DISPATCHERS.clear()


_MISSING = object()


def _torch_zeros(n, dtype):
    import torch

    return torch.zeros(n, dtype=getattr(torch, np.dtype(dtype).name))


def rl_mlp(hidden: int = 256, seed: int = 0):
    """The 6-tensor RL network of the probe (three Linear layers), on the CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 6))
