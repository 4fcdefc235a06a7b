"""What only the tests share: the shipped device code a CUDA test is held to (:mod:`.shipped`, a
pytest plugin), the faults they inject (:mod:`.faults`), a function's calls watched
(:mod:`.calls`), the attach scenarios (:mod:`.attach`), blocks of source written twice
(:mod:`.repeats`), the objects frozen as each test file starts (:mod:`.frozen`, a pytest
plugin), the schedule tests' ulps and JAX device decays (:mod:`.schedules`). Imported as
``support`` (``tests/`` is on ``sys.path`` through its conftest). What the tests share with the
benchmark tooling (the fake GPU, the baselines) is the root's ``testkit`` package: the tooling
imports nothing from ``tests/``."""
