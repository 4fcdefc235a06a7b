"""The numba-cuda side of fastema's launch drivers (:mod:`.drivers`): :class:`NumbaDriver`, the
base of both. The device work :class:`.drivers.DispatcherDriver` does through numba-cuda (uploads,
pinned arrays and their copies, events, the context push and the device's figures), whose device
arrays its tables are; the dispatch through numba's dispatcher that both drivers do (every launch
of the dispatcher driver, and a variant the cuda.core driver refused, :data:`.driver.REFUSALS`);
and the context, capture and version queries both make through cuda-bindings (none in the
simulator). numba-cuda is imported at the first device work done through it (:func:`numba_cuda`),
not with this module: choosing a driver imports none of it.
"""
from __future__ import annotations

import functools

import numpy as np

from .driver import Loaded
from .frees import relaxed
from .memory import Watched, api_error


class _NumbaEvent:
    """A numba event, recorded on raw stream handles."""

    __slots__ = ("event", "streams")

    def __init__(self, event, streams):
        self.event, self.streams = event, streams

    def record(self, raw: int) -> None:
        self.event.record(self.streams(raw))

    def query(self) -> bool:
        return bool(self.event.query())

    def synchronize(self) -> None:
        self.event.synchronize()


def numba_cuda():
    """``numba.cuda``, imported at the first device work done through it (an upload, a pinned array,
    an event, a context push or query, a dispatch)."""
    from numba import cuda

    return cuda


class NumbaDriver:
    """The device work :class:`.drivers.DispatcherDriver` does through numba-cuda (see the module
    docstring), the dispatch both drivers do through it, and the queries they make through
    cuda-bindings (none in the simulator): the base of both drivers (:mod:`.drivers`)."""

    name = "numba"
    loads = False

    def __init__(self, simulated: bool = False, bindings=None):
        self.simulated = simulated
        self.zero_flags: dict = {}
        self.images: dict = {}
        self.watched = Watched()        # the current-stream getters tables were made with
        self.numba_stream = functools.lru_cache(maxsize=64)(self._numba_stream)
        self.primary_context = functools.cache(self._primary_context)
        self.sm_count = functools.cache(self._sm_count)
        self._uploads: dict = {}
        if bindings is None and not simulated:
            from cuda.bindings import driver

            bindings = driver
        self.d = bindings

    def _numba_stream(self, raw: int):
        """The numba stream object of ``raw`` (0: the legacy default stream, as a stream object, so
        that copies on it are asynchronous: numba copies synchronously where given no stream)."""
        return numba_cuda().external_stream(raw) if raw else numba_cuda().default_stream()

    def activate(self, index: int):
        return numba_cuda().gpus[index]

    def compute_capability(self, index: int) -> tuple[int, int]:
        cc = tuple(numba_cuda().gpus[index].compute_capability)
        return int(cc[0]), int(cc[1])

    def _sm_count(self, index: int) -> int:
        return 0 if self.simulated else int(numba_cuda().gpus[index].MULTIPROCESSOR_COUNT)

    def _primary_context(self, index: int) -> int:
        """Device ``index``'s primary context (retained once by numba; not pushed)."""
        return 0 if self.simulated else int(numba_cuda().gpus[index].get_primary_context().handle)

    def current_context(self) -> int:
        if self.simulated:
            return 0
        err, ctx = self.d.cuCtxGetCurrent()
        return 0 if err else int(ctx)

    def capturing(self, raw: int, index: int | None = None) -> bool:
        """One ``cuStreamIsCapturing`` (the legacy stream's in device ``index``'s context, pushed
        where another is current); False in the simulator, and where the query fails (no context:
        nothing can be capturing)."""
        if self.simulated:
            return False
        if not raw and index is not None and self.current_context() != self.primary_context(index):
            with self.activate(index):
                return self._capturing(0)
        return self._capturing(raw)

    def _capturing(self, raw: int) -> bool:
        d = self.d
        err, status = d.cuStreamIsCapturing(self._stream_arg(raw))
        if err:
            return err == d.CUresult.CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
        return status != d.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE

    def _stream_arg(self, raw: int):
        return self.d.CUstream(raw)

    def watch(self, device: str, getter) -> None:
        """Tables were made for ``device`` whose launches go on the stream ``getter()`` names
        (:class:`.memory.Watched`: its current stream asked by :meth:`any_capturing`)."""
        self.watched.add(device, getter)

    def any_capturing(self, raw: int, index: int | None) -> bool:
        """``raw``, device ``index``'s legacy stream, then the current stream of every watched
        getter and its device's legacy stream: a query each until one captures (asked only where
        something waits for a safe point). Only handles current now are asked (a stream launched on
        earlier may have been destroyed since: a query of one crashed an H200 run), so a capture on
        a stream current on another thread only is not seen (what runs at a safe point runs in
        relaxed capture mode: :meth:`relaxed`). A getter that fails counts as capturing (what waits,
        waits)."""
        if self.simulated:
            return False
        if self.capturing(raw, index) or (raw and index is not None and self.capturing(0, index)):
            return True
        for _, i, getter in self.watched.live():
            try:
                now = getter()
            except Exception:                          # noqa: BLE001 - any framework's failure: keep waiting
                return True
            if ((now, i) != (raw, index) and self.capturing(now, i)) or (now and i != index
                                                                         and self.capturing(0, i)):
                return True
        return False

    def relaxed(self):
        return relaxed(None if self.simulated else self.d)

    def version(self) -> int:
        if self.simulated:
            return 0
        err, version = self.d.cuDriverGetVersion()
        if err:
            raise api_error("cuDriverGetVersion", err)
        return int(version)

    def dispatch(self, kernel, index: int, raw: int, blocks: int, threads: int,
                 args: tuple) -> None:
        with numba_cuda().gpus[index]:
            if self.simulated or not raw:
                kernel[blocks, threads](*args)
            else:
                kernel[blocks, threads, self.numba_stream(raw)](*args)

    def _upload_stream(self, index: int):
        """A stream of fastema's own on device ``index`` (current), non-blocking (it waits for no
        other stream's work, the legacy stream's included), for the construction-time uploads."""
        stream = self._uploads.get(index)
        if stream is None:
            if self.simulated:
                stream = numba_cuda().stream()
            else:
                from numba.cuda.cudadrv.driver import binding, driver

                handle = driver.cuStreamCreate(binding.CUstream_flags.CU_STREAM_NON_BLOCKING.value)
                stream = numba_cuda().external_stream(int(handle))   # one per device and process, kept
            self._uploads[index] = stream
        return stream

    def upload(self, array, index: int):
        """Copied on fastema's upload stream, which is then waited for: a wait for this copy only
        (the stream waits for nothing else), which orders it before every launch queued after it, on
        any stream (issue 37, C1)."""
        with numba_cuda().gpus[index]:
            stream = self._upload_stream(index)
            out = numba_cuda().to_device(np.ascontiguousarray(array), stream=stream)
            stream.synchronize()
            return out

    def pinned(self, size: int, dtype):
        return numba_cuda().pinned_array(max(size, 1), dtype)

    def copy(self, device_array, values, raw: int) -> None:
        if self.simulated:                                # copies at once; no external streams
            device_array.copy_to_device(values)
        else:
            device_array.copy_to_device(values, stream=self.numba_stream(raw))

    def event(self):
        return None if self.simulated else _NumbaEvent(numba_cuda().event(timing=False), self.numba_stream)

    def clear(self) -> None:
        self.numba_stream.cache_clear()

    def load(self, kind: str, code: bytes, entry: str) -> Loaded:
        raise RuntimeError(f"fastema: {self.name} loads no image (asking it is a defect)")

    def launch(self, func, blocks: int, threads: int, stream, params: int) -> None:
        raise RuntimeError(f"fastema: {self.name} launches no image (asking it is a defect)")

    def stream(self, raw: int):
        return raw

    def launcher(self, index: int):
        return None                                       # it launches no image of fastema's
