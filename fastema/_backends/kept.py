"""KeptLRU: the one keyed cache of what fastema prepared for arrays it was handed, found again by their keys.

The array functions (:mod:`fastema.ops`: a pair's launch group, a call's prepared launch) and the pair
cache of :func:`fastema.ema_update_many_` (:mod:`fastema.pairs`) keep what a first call checked and
made, so that a later call with the same arrays launches at once. Both key it the same way:

- a *cheap key* (:func:`cheap_key`): the arrays' addresses or identities in one C-level map
  (:func:`fastema._backends.address_key`), found only where every array is of one framework that has
  one (a NumPy shadow and a torch source: none); a hit then also needs the entry's *layout guard*
  (:func:`fastema._backends.layout_guard`: the same memory, dtype, shape, strides and writability now);
- or a *described key* the caller makes from the arrays' descriptions, with every field a first call
  checks (device, address, kind, shape, layout, writability, framework): a hit is an array that
  passes every check the first one passed.

An entry holds numbers, guards (weak references at most) and what fastema made (launch groups and
their tables), never an array of the caller's. It is valid in the world it was made in: the launch
driver chosen then (the launch layer's list of the drivers given to ``drivers.using``, handed over by
the owner: the boundary does not reach dispatch) and the adapters given then (:func:`using`: a fake
GPU's, testkit's); in another, the cache is emptied first (a fake GPU's launches are not a CPU's, a
stub driver's tables are not a GPU's). At most ``size`` entries, the least recently kept dropped
first (a hit does not reorder them: it costs no bookkeeping; a key kept again becomes the newest).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, NamedTuple, TypeVar

from . import GIVEN, address_key

V = TypeVar("V")


def cheap_key(tag: tuple, objs: list) -> tuple | None:
    """``objs``' cheap key under ``tag`` (a hit needs the entry's layout guard too), or None: an array
    with no cheap key, or arrays of more than one framework."""
    k = address_key(objs)
    return None if k is None else (tag, k)


class _Entry(NamedTuple):
    guard: Callable[[list], bool] | None         # what a hit must pass besides the key (None: nothing)
    value: Any


class KeptLRU(Generic[V]):
    """A bounded cache of ``key -> value``, each kept with a guard (see the module docstring). ``chosen_drivers``:
    the launch layer's list of the drivers given to ``drivers.using``, innermost last."""

    __slots__ = ("size", "_entries", "entry", "_drivers", "_given", "_driver", "_adapter", "_elsewhere")

    def __init__(self, size: int, chosen_drivers: list):
        self.size = size
        self._entries: OrderedDict = OrderedDict()        # key -> _Entry
        # The entry under a key as kept, or None: one C call, no guard called and no world checked, for
        # a caller that keeps and reads only where no stand-in is chosen and whose values check
        # themselves (ops' roads: torch's lerp_, whatever the driver)
        self.entry: Callable[[Hashable], _Entry | None] = self._entries.get
        self._drivers, self._given = chosen_drivers, GIVEN.chosen
        self._driver: Any = None                          # the world the entries were made in
        self._adapter: Any = None
        self._elsewhere = False                           # made under a chosen driver or a given adapter

    def hit(self, key: tuple, objs: list) -> V | None:
        """The value kept under ``key`` whose guard passes ``objs`` now (it becomes the newest), else None."""
        d, s = self._drivers, self._given                # the world now, read without a call
        if (d or s or self._elsewhere) and (
                (d[-1] if d else None) is not self._driver or (s[-1] if s else None) is not self._adapter):
            self._enter()                                 # another driver or adapter: nothing kept holds
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        guard, value = entry
        return value if guard is None or guard(objs) else None          # (not reordered: no bookkeeping)

    def keep(self, key: Hashable, value: V, guard: Callable[[list], bool] | None = None) -> V:
        """Keep ``value`` under ``key`` (``guard``: what a hit must pass besides the key; None for a
        described key, which says it all); the oldest entries go beyond ``size``."""
        d, s = self._drivers, self._given
        if (d[-1] if d else None) is not self._driver or (s[-1] if s else None) is not self._adapter:
            self._enter()
        self._entries[key] = _Entry(guard, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def _enter(self) -> None:
        """The world is another now: forget what the last one made."""
        d, s = self._drivers, self._given
        self._entries.clear()
        self._driver, self._adapter = (d[-1] if d else None), (s[-1] if s else None)
        self._elsewhere = self._driver is not None or self._adapter is not None

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        return list(self._entries)
