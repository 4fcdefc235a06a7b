"""The start of a child script that counts the fastema kernels numba compiles in it: ``compiled``, the
qualified names, appended at numba's compile event (which fires only where nothing was loaded from the
cache). Imported by the test modules as ``from compile_count import COUNT_COMPILES`` and put before a
child script's own lines."""

COUNT_COMPILES = r"""
from numba.core import event
compiled = []

class Count(event.Listener):
    def on_start(self, ev):
        fn = ev.data["dispatcher"].py_func
        if fn.__module__.startswith("fastema.kernels"):
            compiled.append(fn.__qualname__)
    def on_end(self, ev):
        pass

event.register("numba:compile", Count())
"""
