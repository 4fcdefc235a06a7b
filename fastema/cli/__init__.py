"""The ``python -m fastema COMMAND`` verbs, one module each (not part of the library namespace):

- :mod:`.demo`: train a small model with an EMA of its weights;
- :mod:`.plot`: raw, SMA and EMA curves of a logged metric, to a PNG;
- :mod:`.bench`: run the benchmark suite and write its report;
- :mod:`.posthoc`: synthesise a post-hoc EMA from ``PostHocEMA`` snapshots.

Each has ``main(argv) -> int``; :mod:`fastema.__main__` dispatches to them.
"""
