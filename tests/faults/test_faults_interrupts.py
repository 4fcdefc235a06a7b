"""fastema._interrupts.ctrl_c_held: a Ctrl-C landing at any line of the hold itself (entering or
leaving) leaves nothing behind, so every later block still holds."""
import signal
import sys

import pytest

from fastema._interrupts import ctrl_c_held


@pytest.fixture
def default_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _lines_of(*functions):
    return sorted({(f.__code__, line) for f in functions for _, _, line in f.__code__.co_lines()
                   if line is not None and line > f.__code__.co_firstlineno}, key=lambda w: (w[0].co_name, w[1]))


def _ctrl_c_at(code, line):
    """A tracer that sends SIGINT once, just before ``line`` of ``code`` runs."""
    def local(frame, event, arg):
        if event == "line" and frame.f_code is code and frame.f_lineno == line:
            sys.settrace(None)
            frame.f_trace = None
            signal.raise_signal(signal.SIGINT)
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code:
            frame.f_trace_lines = True
            return local
        return None

    return tracer


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("where", _lines_of(ctrl_c_held.__enter__, ctrl_c_held.__exit__),
                         ids=lambda w: f"{w[0].co_name}:{w[1]}")
def test_a_ctrl_c_inside_the_hold_itself_leaves_every_later_hold_working(where):
    code, line = where
    sys.settrace(_ctrl_c_at(code, line))
    try:
        with ctrl_c_held():
            pass
    except KeyboardInterrupt:
        pass                                   # delivered at once or after the block: both fine
    finally:
        sys.settrace(None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is back
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            signal.raise_signal(signal.SIGINT)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
