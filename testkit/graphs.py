"""A CUDA-graph capture on the driver emulator (:mod:`testkit.emulator`): :class:`CUDAGraph` and :func:`graph`
stand in for ``torch.cuda.CUDAGraph`` and ``torch.cuda.graph`` (the torch here is a CPU build), through
cuda-bindings' real calls: ``cuStreamBeginCapture`` on the fake ``cuda:0``'s torch stream
(``testkit.fake_gpu.TORCH_STREAM``) in the capture error mode torch takes (``"global"``, ``"thread_local"``,
``"relaxed"``), ``cuStreamEndCapture`` (an invalidated capture raises, as torch does), ``cuGraphInstantiate``
and ``cuGraphLaunch`` (:meth:`CUDAGraph.replay`: the emulator records the captured launches again).

As torch 2.13's ``torch.cuda.graph`` does, entering the block runs no ``gc.collect()`` (only under
``torch.compiler.config.force_cudagraph_gc``): a collection inside the capture is the user's program's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .fake_gpu import TORCH_STREAM

_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}


class CaptureFailed(RuntimeError):
    """A capture the driver invalidated, or refused to begin or end (torch raises a RuntimeError too)."""


def _check(call: str, result: tuple):
    err = result[0]
    if err:
        raise CaptureFailed(f"{call} failed: {err.name} (the capture was invalidated by a call the driver "
                            f"does not permit during a capture)" if err.name.endswith("INVALIDATED") else
                            f"{call} failed: {err.name}")
    return result[1] if len(result) > 1 else None


class CUDAGraph:
    """``torch.cuda.CUDAGraph`` on the emulator: :meth:`capture_begin`, :meth:`capture_end`, :meth:`replay`."""

    def __init__(self):
        from cuda.bindings import driver

        self.d = driver
        self.stream = TORCH_STREAM
        self.graph = self.exec = None
        self.marks = (0, 0)            # the emulator's launch count at the capture's start and end

    def capture_begin(self, stream: int = TORCH_STREAM, capture_error_mode: str = "global") -> None:
        from .emulator import Emulator

        d = self.d
        self.stream = stream
        _check("cuStreamBeginCapture", d.cuStreamBeginCapture(d.CUstream(stream),
                                                              d.CUstreamCaptureMode(_MODES[capture_error_mode])))
        self.marks = (Emulator().mark(), 0)

    def capture_end(self) -> None:
        from .emulator import Emulator

        d = self.d
        self.graph = _check("cuStreamEndCapture", d.cuStreamEndCapture(d.CUstream(self.stream)))
        self.marks = (self.marks[0], Emulator().mark())
        self.exec = _check("cuGraphInstantiate", d.cuGraphInstantiate(self.graph, 0))

    def captured(self) -> list:
        """The launches the capture recorded (``testkit.emulator.Launch``, ``captured`` set)."""
        from .emulator import Emulator

        return [r for r in Emulator().launches(self.marks[0]) if r.seq <= self.marks[1] and r.captured]

    def replay(self) -> list:
        """The graph launched on its stream: the launches the emulator recorded for it."""
        from .emulator import Emulator

        e = Emulator()
        mark = e.mark()
        _check("cuGraphLaunch", self.d.cuGraphLaunch(self.exec, self.d.CUstream(self.stream)))
        return e.launches(mark)


@contextlib.contextmanager
def graph(g: CUDAGraph, stream: int = TORCH_STREAM, capture_error_mode: str = "global") -> Iterator[CUDAGraph]:
    """``torch.cuda.graph(g)``: the block captured into ``g`` on the raw stream ``stream``. The capture is
    ended however the block ends (an error inside it is raised, not the capture's)."""
    g.capture_begin(stream, capture_error_mode)
    try:
        yield g
    except BaseException:
        with contextlib.suppress(CaptureFailed):
            g.capture_end()
        raise
    g.capture_end()
