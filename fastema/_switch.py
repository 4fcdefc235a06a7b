"""One process-wide choice that a ``with`` block may change: :class:`Switch`.

fastema has three: the launch driver (``_launch.config.DRIVERS``: the tests' fake GPU, the variant
enumeration's recorder, a benchmark), the run-time compiler (``_launch.cuda.compiler.COMPILERS``)
and the adapters given to the boundary (``_backends.GIVEN``: the fake GPU's torch). Each is for
tests, tools and benchmarks, not for threads that launch meanwhile. A leaf: it imports nothing of
fastema's.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Generic, Iterator, NoReturn, TypeVar

T = TypeVar("T")


def _none_yet() -> NoReturn:
    raise LookupError("nothing is chosen and this switch has no default yet (its owner sets it when loaded)")


class Switch(Generic[T]):
    """What :meth:`using` gives for its ``with`` block (blocks nest: the innermost wins), else
    ``default()``. ``chosen``: the values given now, innermost last, read without a call by caches
    of what a value made (``_backends.kept``). ``changed()``, where given, runs after each change
    of ``chosen`` (on the way in and on the way out)."""

    __slots__ = ("chosen", "default", "changed")

    def __init__(self, default: Callable[[], T] = _none_yet, changed: Callable[[], None] | None = None):
        self.chosen: list[T] = []
        self.default = default          # the owner's; one set later where the owner loads after the switch
        self.changed = changed

    @contextlib.contextmanager
    def using(self, value: T) -> Iterator[T]:
        """``value`` is :meth:`current` for the ``with`` block."""
        self.chosen.append(value)
        try:
            if self.changed is not None:
                self.changed()
            yield value
        finally:
            self.chosen.remove(value)
            if self.changed is not None:
                self.changed()

    def current(self) -> T:
        """The innermost :meth:`using`'s value, else ``default()``."""
        chosen = self.chosen
        return chosen[-1] if chosen else self.default()
