"""What the library's tests and the benchmark tooling share, and neither owns: the fake GPU
(:mod:`.fake_driver`, a launch driver held to ``fastema._launch.cuda.driver.Driver``; :mod:`.fake_backend`,
fastema's torch adapter with CPU tensors on ``cuda:0``; :mod:`.fake_gpu`, fastema on both, taking the
road a GPU takes, and the stub ``libcuda.so.1``) and the baselines, libraries
fastema replaces written out where they cannot be installed (:mod:`.baselines`).

A package at the repository's root, imported as ``testkit`` by the tests (``python -m pytest``
from the root; pyproject's ``pythonpath``) and by ``python -m bench....``; not in the wheel
(pyproject's ``packages`` name fastema's only). It imports neither the tests nor the tooling
(``tests/test_structure.py``, ``bench/tests/test_layout.py``); what only the tests use stays in
``tests/support``."""
