"""What the tests (and, until bench/ is reorganised, the benchmarks) share that stands in for a part
of the world: the fake GPU (:mod:`.fake_driver`, :mod:`.fake_gpu`). Imported as ``support``
(``tests/`` is on ``sys.path`` through its conftest; ``bench/`` puts it there)."""
