"""Compile the plain-Python element bodies for one numba target.

Numba compiles a function against its ``__globals__``: a plain helper that calls another
plain helper (``lerp_at`` -> ``decode``) would reach the uncompiled Python version, which
no target can call. :func:`bind` solves this once: it re-creates every function of
:mod:`._bits`, :mod:`._stats` and :mod:`._elementwise` over one shared namespace per
target, compiles each with the target's device-function decorator and puts the compiled
version back in that namespace, so every call between them resolves (at compile time,
which comes after the whole namespace is built) to the same target's sibling. The
target's hardware pieces (:mod:`._intrinsics`) replace the plain versions in it.
"""
import types

from . import _bits, _elementwise, _stats

MODULES = (_bits, _stats, _elementwise)


def bind(device_function, hardware: dict) -> types.SimpleNamespace:
    """Every function of :data:`MODULES`, compiled by ``device_function`` (e.g.
    ``partial(njit, inline="always")``), plus ``hardware``: a namespace to read the
    compiled functions from (bind them to locals before a kernel calls them)."""
    namespace: dict = {}
    for module in MODULES:
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    namespace.update(hardware)
    compiled = {}
    for module in MODULES:
        for name, fn in vars(module).items():
            if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__ and name not in hardware:
                clone = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__, fn.__closure__)
                clone.__qualname__, clone.__module__, clone.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
                compiled[name] = namespace[name] = device_function(clone)
    return types.SimpleNamespace(**compiled, **hardware)


def bodies(compiled: types.SimpleNamespace, wide: bool, *names: str) -> tuple:
    """The compiled element bodies ``names``, or their float64 twins (``<name>_wide``) when ``wide``."""
    return tuple(getattr(compiled, name + "_wide" if wide else name) for name in names)


WINDOW = ("window_at", "window_store_at", "window_add_at", "window_mean_at")   # push; the recompute's steps
