"""fastema's benchmark tooling, run from the repository's root (``python -m bench.PACKAGE``); not
part of the wheel. One package a product:

- :mod:`bench.suite`: the pytest-benchmark scenarios against their baselines, the table and the
  plot (``python -m bench.suite [--quick]``);
- :mod:`bench.scripts`: measurements the suite does not make, one module each, live or historical
  (``python -m bench.scripts.NAME``);
- :mod:`bench.gpu`: the GPU run's stages and the machine-code analysis (``bash bench/gpu/run.sh``);
- :mod:`bench.gates`: CI's performance gates (``python -m bench.gates check``);
- :mod:`bench.tests`: the tooling's own tests (``pytest bench/tests``).

The stand-in GPU they share with the library's tests is ``testkit``
(``testkit.fake_gpu``); the library's tests never import ``bench``. How to run and read each:
``bench/README.md``; what each committed run found: ``bench/results/LOG.md``."""
