"""Holding a Ctrl-C over a few lines that must run whole (framework-free).

A swap that exchanges the model's tensors group by group, and a checkpoint load that writes the
averages tensor by tensor and then the counters, must not stop halfway: a KeyboardInterrupt
between two writes would leave some tensors changed and others not, with counters that say
neither. :class:`ctrl_c_held` holds a Ctrl-C (SIGINT) that arrives inside it and delivers it on
exit, once everything has been written. Used by :class:`fastema.average.ModelSwap` (swaps) and
the torch averages' ``load_state_dict``.

It costs two handler changes when it holds, a thread and handler check otherwise (about a
microsecond; the C functions are called directly, not :mod:`signal`'s enum-converting wrappers).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

try:                                        # the C functions: signal.signal/getsignal add enum conversions
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found]
    from _signal import signal as _setsignal  # type: ignore[import-not-found]
except ImportError:                         # pragma: no cover - an interpreter without _signal
    _getsignal, _setsignal = signal.getsignal, signal.signal

__all__ = ["ctrl_c_held"]


class _Hold:
    """The SIGINT handler while a block holds: records the Ctrl-Cs (their frames) for that block
    only. No module state: a Ctrl-C landing anywhere in ``__enter__``/``__exit__`` can leave
    nothing behind that a later block would trip on."""

    __slots__ = ("caught",)

    def __init__(self) -> None:
        self.caught: list[FrameType | None] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(frame)


class ctrl_c_held:
    """``with ctrl_c_held(): ...``: a Ctrl-C (SIGINT) that arrives inside the block is held and
    delivered when the block exits (also when it raises): the handler that was installed is called
    then, so Python's default raises KeyboardInterrupt right after the block.

    It holds only where a Ctrl-C could interrupt the block: in the main thread (Python runs signal
    handlers there only), when the SIGINT handler is a Python function (Python's default or one
    installed with :func:`signal.signal`). With ``SIG_IGN`` nothing interrupts; with ``SIG_DFL`` or
    a handler installed outside Python the process ends and no state survives. Nested blocks leave
    the holding to the outermost one (the handler installed is already a hold).
    """

    __slots__ = ("_old", "_hold")

    def __enter__(self) -> None:
        self._old = self._hold = None
        if threading.current_thread() is not threading.main_thread():
            return
        old = _getsignal(signal.SIGINT)
        if isinstance(old, _Hold) or not callable(old):
            return                          # an outer block holds, or nothing would interrupt
        hold = _Hold()
        _setsignal(signal.SIGINT, hold)     # a Ctrl-C before this line goes to `old`: nothing held yet
        self._old, self._hold = old, hold

    def __exit__(self, *exc) -> bool:
        old, hold = self._old, self._hold
        if old is None or hold is None:
            return False
        self._old = self._hold = None
        _setsignal(signal.SIGINT, old)     # first: a Ctrl-C from here on goes to the handler at once
        if hold.caught:                     # delivered now, as it would have been
            old(signal.SIGINT, hold.caught[0])
        return False
