"""fastema._interrupts.ctrl_c_held: a Ctrl-C landing at any line of the hold itself (entering or
leaving) leaves nothing behind, so every later block still holds."""
import signal
import sys

import pytest
from support.calls import watching

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


@pytest.mark.usefixtures("default_sigint")
def test_a_ctrl_c_during_an_engine_load_is_raised_once_every_row_and_the_plan_are_in():
    # The engine's checkpoint (fastema.jax.EMA, fastema.tensorflow.EMA, Keras on those backends):
    # a Ctrl-C after the first array written goes on to the last one and the counters, then raises
    import numpy as np

    from fastema import _backends
    from fastema.average import EMAOptions
    from fastema.average._core import Average

    def average(values):
        sources = {n: np.full(4, v, np.float32) for n, v in values.items()}
        return Average.of_sources(EMAOptions([0.9, 0.5]), sources, [(4,)] * len(sources), "fastema.test.EMA"), sources

    src, arrays = average({"a": 1.0, "b": 2.0, "c": 3.0})
    for k in range(3):
        for a in arrays.values():
            a += 1.0
        src.update(None, lambda: list(arrays.values()))
    state = src.state_dict()
    dst, _ = average({"a": 0.0, "b": 0.0, "c": 0.0})
    calls = []

    def copied_then_ctrl_c(args, value):   # a Ctrl-C right after the first host copy landed
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    with watching(_backends.copy_from_host, on_return=copied_then_ctrl_c), pytest.raises(KeyboardInterrupt):
        dst.load_state_dict(state)
    assert (dst.plan.updates, dst.plan.calls) == (src.plan.updates, src.plan.calls) == (3, 3)
    for name, rows in dst.state_dict()["averaged"].items():
        np.testing.assert_array_equal(rows, state["averaged"][name], err_msg=name)
