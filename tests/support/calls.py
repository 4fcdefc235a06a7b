"""What a library function is called with and returns, watched without replacing it.

A test that needs to see the calls of one of fastema's Python functions (how often, with what),
or to act right after one returns (a Ctrl-C between two launches), watches it here instead of
patching the module's name: :func:`watching` installs a profile function (``sys.setprofile``) on
this thread for the ``with`` block, so the library runs its own code, reached by its own names.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def watching(function: Callable, *, on_call: Callable | None = None,
             on_return: Callable | None = None, every_thread: bool = False) -> Iterator[None]:
    """For the ``with`` block, on this thread: ``on_call(arguments)`` at each call of the Python
    function ``function`` (its ``__code__``; a method: ``Class.method``), with its arguments by name
    (``self`` included), and ``on_return(arguments, value)`` at each return (``value`` None when it
    raised). What those raise (a ``KeyboardInterrupt``) comes out of ``function``'s call; the
    watch then ends. Watches nest (an enclosing one goes on); the thread's previous profile
    function is put back after. ``every_thread``: the threads started in the block (``threading``'s:
    a pool's workers) are watched too, from their start."""
    code = function.__code__
    previous = sys.getprofile()              # an enclosing watch's: it goes on watching

    def profile(frame, event, arg):
        if previous is not None:
            previous(frame, event, arg)
        if frame.f_code is not code:
            return
        if event == "call" and on_call is not None:
            on_call(dict(frame.f_locals))
        elif event == "return" and on_return is not None:
            on_return(dict(frame.f_locals), arg)

    sys.setprofile(profile)
    if every_thread:
        started = threading.getprofile()
        threading.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
        if every_thread:
            threading.setprofile(started)
