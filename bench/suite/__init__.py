"""The benchmark suite: pytest-benchmark scenarios (``test_bench_*.py``), each fastema
implementation against its baselines in the same run, their shapes (:mod:`.shapes`), and the
report (``python -m bench.suite``: ``bench/out/bench.json``, ``bench.md``, ``bench.png``)."""
