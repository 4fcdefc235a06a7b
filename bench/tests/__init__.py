"""The bench tooling's own tests (the gates' logic, the suite's report, the GPU plan in the
simulator, the machine-code checks, the layout): ``pytest bench/tests``; CI runs them beside
``tests/``."""
