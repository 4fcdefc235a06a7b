"""Measurements the suite does not make, one module each, run from the repository's root as
``python -m bench.scripts.NAME [--help]``; their reports go to ``bench/results/``. Each docstring's
first line says whether it is live (listed in ``bench/README.md``, "Scripts") or historical (kept as
the record of one issue's figures, listed in ``bench/results/LOG.md``, "Historical scripts")."""
