"""The test process's objects frozen out of the cyclic collector's walk (a pytest plugin, named in
``tests/conftest.py``'s ``pytest_plugins``: its hooks see every test, those of a folder with no
conftest too).

A test process ends up holding every framework (torch, TensorFlow, JAX, transformers...): about
780,000 objects, which the collector walked at every full collection (0.47 s on CI's machine), the
automatic ones and each ``gc.collect()`` of a test: 16.5 of 97 CPU seconds over six of the files.
They are moved out of its reach (``gc.freeze``) after a collection: once the test modules are
imported, then as each file's first test starts, after the file before it was torn down (its
module fixtures included), so that only what it left alive is frozen.

What a frozen object gives up is the cycle collection: reference counting still frees it, but in a
garbage cycle it is never freed, nor what it refers to. ``gc.get_objects()`` and
``gc.get_referrers()`` do not see it. A test that checks what is freed or who holds what makes its
objects itself. The distributed worlds' ranks freeze too (``tests/worlds.py``).
"""
from __future__ import annotations

import gc

import pytest

_FILE: list = [None]


def freeze() -> None:
    """Collect, then freeze what is left."""
    gc.collect()
    gc.freeze()


def new_cycle_collected() -> bool:
    """Whether a reference cycle made now is freed by ``gc.collect()`` (freezing leaves new objects
    to the collector)."""
    import weakref

    class Cycle:
        pass

    c = Cycle()
    c.me = c  # type: ignore[attr-defined]
    ref = weakref.ref(c)
    del c
    gc.collect()
    return ref() is None


def pytest_collection_finish(session):
    freeze()


@pytest.hookimpl(tryfirst=True)          # before the runner sets up the file's fixtures
def pytest_runtest_protocol(item, nextitem):
    if item.path != _FILE[0]:
        _FILE[0] = item.path
        freeze()
