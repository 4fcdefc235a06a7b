"""What fastema's CUDA launch path asks of a GPU, as one interface: :class:`Driver`.

The launch path (:mod:`.tables`, :mod:`.launch`, :mod:`.device_code`) makes no driver call of its
own: it asks the driver it was given (:func:`.drivers.current` when a launch is bound, or a table
made) to load a variant's image, launch it, say which context is current and whether a stream is
being captured, and to do the device work around the launches (uploads, pinned staging, events). The
implementations: :class:`.drivers.CudaCoreDriver` (cuda.core and cuda-bindings: the fast path),
:class:`.drivers.DispatcherDriver` (numba's dispatcher: the fallback and the Numba CUDA simulator),
:class:`.shipped.variants.RecordingDriver` (records the variants the launchers ask for, launches
nothing: ``python -m fastema warm`` and the build) and the tests' ``FakeDriver``
(``tests/support``), a GPU on the host that is held to this interface by mypy and to cuda-bindings'
signatures by a test.

A driver's refusal of an image (:class:`Refused`) is the one error the launch path falls back on:
the driver's own results that mean "this image cannot run here" (:data:`REFUSALS`). Anything else a
driver raises is a defect (of fastema's call above all, as the ``TypeError`` of the first H100 run
was) and propagates.
"""
from __future__ import annotations

from typing import Any, ContextManager, NamedTuple, Protocol

REFUSALS = frozenset({
    "CUDA_ERROR_NO_BINARY_FOR_GPU",         # no image in it for this GPU's architecture
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",   # PTX of an ISA newer than the driver's (9.0 on CUDA 12)
    "CUDA_ERROR_INVALID_PTX",               # PTX this driver's compiler cannot assemble
    "CUDA_ERROR_INVALID_IMAGE",             # an image this driver cannot read (a newer cubin ABI)
    "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",    # PTX, and no PTX compiler in this driver installation
    "CUDA_ERROR_JIT_COMPILATION_DISABLED",  # PTX, and PTX compiles off (CUDA_DISABLE_PTX_JIT=1)
})
"""The names of the driver's results (``CUresult``) that mean an image cannot run on this GPU under
this driver, and that a compile here can mend: the launch path then compiles the variant for this
device (``device_code``) or, for code compiled here, launches through numba's dispatcher. Every
other result (an invalid handle or context, out of memory, a name not found in the image) is a
defect or a failure that a compile would not mend, and is raised."""


class Refused(Exception):
    """The driver's refusal of an image: ``result``, the name of its ``CUresult`` (one of
    :data:`REFUSALS`), and what it said."""

    def __init__(self, result: str, said: str = ""):
        super().__init__(f"{result}: {said}" if said else result)
        self.result = result


class Loaded:
    """A variant's code loaded for a device: ``func`` (the handle :meth:`Driver.launch` takes), what
    keeps it loaded (``kernel``: cuda.core's kernel, or the driver's own) and what it came from
    (``source``: the image's kind as loaded, then ``"sm_90"``, ``"ptx"`` or ``"compiled"`` as
    ``device_code`` names it)."""

    __slots__ = ("func", "kernel", "source")

    def __init__(self, func: Any, kernel: Any, source: str):
        self.func, self.kernel, self.source = func, kernel, source


class Launcher(NamedTuple):
    """What a kept launch on one device calls itself, bound once (:meth:`Driver.launcher`): the
    driver's own functions, with cuda-bindings' signatures, and what they are compared with. A kept
    launch is then one Python frame: ``err, ctx = context()``; where ``ctx == primary``,
    ``err, = launch(func, blocks, 1, 1, threads, 1, 1, 0, streams[raw], params, 0)``."""
    launch: Any
    """``cuLaunchKernel``'s signature: ``(func, gx, gy, gz, bx, by, bz, shared bytes, stream,
    parameter block address, extra) -> (CUresult,)``."""
    context: Any
    """``cuCtxGetCurrent``'s: ``() -> (CUresult, context)``."""
    primary: Any
    """The device's primary context, as :attr:`context` gives it (``==`` compares them)."""
    streams: Any
    """``raw handle -> the stream object`` :attr:`launch` takes: a mapping, read ``streams[raw]``,
    kept for good (:meth:`Driver.clear` empties it in place)."""


class Event(Protocol):
    """An event of a driver's (:meth:`Driver.event`)."""

    def record(self, raw: int) -> None:
        """Record it on the raw stream ``raw`` (0: the legacy default stream)."""

    def query(self) -> bool:
        """Whether the work before its record has run (no wait)."""

    def synchronize(self) -> None:
        """Wait for the work before its record."""


class Driver(Protocol):
    """What the CUDA launch path asks of a GPU. Devices are numbered as CUDA numbers them
    (``cuda:N``); streams are raw handles (0: the legacy default stream). A method given ``index``
    runs in that device's context (pushing it where another is current); the others run in the
    current one (the caller activates the device: :meth:`activate`)."""

    name: str
    """What it is, for messages."""
    loads: bool
    """True: the launch path loads each variant's image (:meth:`load`) and launches it with its own
    parameter block (:meth:`launch`); False: every launch goes through :meth:`dispatch`."""
    zero_flags: dict
    """``device -> int32[1] zero`` made with this driver by the launch path, kept for good (a
    captured CUDA graph reads it at every replay)."""
    images: dict
    """``(dispatcher, argument types, device index) -> Loaded`` (None: dispatched) loaded with this
    driver by the launch path, once per variant and device."""

    # ---------------------------------------------------------------- images and launches
    def load(self, kind: str, code: bytes, entry: str) -> Loaded:
        """Kernel ``entry`` of ``code`` (``kind``: ``"cubin"`` or ``"ptx"``) loaded and made a
        function of the current context now, not at its first launch. :class:`Refused` where the
        driver says the image cannot run here (:data:`REFUSALS`); any other error is raised as it
        is."""

    def launch(self, func: Any, blocks: int, threads: int, stream: Any, params: int) -> None:
        """``func`` on ``blocks`` blocks of ``threads`` threads on ``stream`` (:meth:`stream`), with
        the parameter block whose array of addresses is at ``params``; raises on an error."""

    def stream(self, raw: int) -> Any:
        """The stream :meth:`launch` takes for the raw handle ``raw``."""

    def launcher(self, index: int) -> Launcher | None:
        """What a kept launch on device ``index`` calls itself (:class:`Launcher`: the same calls
        :meth:`launch`, :meth:`current_context` and :meth:`stream` make, bound once), or None where
        every launch must go through :meth:`launch` (a driver that loads no image)."""

    def dispatch(self, kernel: Any, index: int, raw: int, blocks: int, threads: int,
                 args: tuple) -> None:
        """Launch numba dispatcher ``kernel`` with ``args`` on device ``index``'s raw stream ``raw``
        (numba compiles it at its first use and copies host arrays over)."""

    # ---------------------------------------------------------------- contexts, capture, the device
    def current_context(self) -> int:
        """The handle of the context current on this thread (0: none)."""

    def primary_context(self, index: int) -> int:
        """Device ``index``'s primary context (the one its launches run in)."""

    def activate(self, index: int) -> ContextManager[Any]:
        """Device ``index``'s primary context pushed for a ``with`` block (``cuCtxPushCurrent`` and
        ``cuCtxPopCurrent``; ``numba.cuda.gpus[index]`` in numba's dispatcher driver)."""

    def capturing(self, raw: int, index: int | None = None) -> bool:
        """Whether work queued on ``raw`` now would be captured into a CUDA graph rather than run
        (the stream captures, or another stream's capture makes the legacy stream illegal). The
        legacy stream (``raw`` 0) is device ``index``'s (asked in its context; None: the current
        context's)."""

    watched: Any
    """:class:`.memory.Watched`: the getters :meth:`watch` was given (``live()``: those in use),
    whose current streams :meth:`any_capturing` asks."""

    def watch(self, device: str, getter: Any) -> None:
        """Tables were made for ``device``, launched on the stream ``getter()`` names at each call
        (a getter must name a live stream whenever called: a framework's current stream)."""

    def any_capturing(self, raw: int, index: int | None) -> bool:
        """Whether ``raw``, device ``index``'s legacy stream, or the current stream of a watched
        getter (and its device's legacy stream) is being captured now: where event queries and frees
        must wait (they are not permitted during a capture, in global mode from any thread). A
        handle that is not current is never asked: its stream may have been destroyed."""

    def relaxed(self) -> ContextManager[Any]:
        """The calling thread's capture mode relaxed for a ``with`` block
        (``cuThreadExchangeStreamCaptureMode``), restored after: the event queries and frees of a
        safe point, made inside, leave a capture in global mode on another thread intact
        (:func:`.frees.relaxed`)."""

    def sm_count(self, index: int) -> int:
        """Device ``index``'s multiprocessor count (0: unknown)."""

    def compute_capability(self, index: int) -> tuple[int, int]:
        """Device ``index``'s compute capability."""

    def version(self) -> int:
        """The CUDA version the driver implements, ``1000 * major + 10 * minor``
        (``cuDriverGetVersion``: 12040 for CUDA 12.4; 0: none, the simulator)."""

    # ---------------------------------------------------------------- memory and events
    def upload(self, array: Any, index: int) -> Any:
        """A new device array on device ``index`` holding ``array`` (NumPy), written when this
        returns."""

    def pinned(self, size: int, dtype: Any) -> Any:
        """A new pinned host array (NumPy) of ``size`` elements of ``dtype``."""

    def copy(self, device_array: Any, values: Any, raw: int) -> None:
        """``values`` (pinned) copied into the start of ``device_array`` on ``raw``, asynchronously.
        """

    def event(self) -> Event | None:
        """A new event (None where every launch has run when it returns: the simulator)."""

    def clear(self) -> None:
        """Drop the stream objects kept for raw handles (``fastema.clear_caches()``)."""
