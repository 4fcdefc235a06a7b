"""What the tests share that stands in for a part of the world: the fake GPU
(:mod:`.fake_driver`, :mod:`.fake_gpu`), a library fastema replaces written out
(:mod:`.baselines`), the shipped device code held to (:mod:`.shipped`). Imported as ``support``
(``tests/`` is on ``sys.path`` through its conftest). The benchmark tooling imports it too (as
``tests.support``, from the repository's root); nothing here imports the tooling: the tests run
without it."""
