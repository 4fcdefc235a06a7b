"""One-off measurements for issues, one module each, run from the repository's root as
``python -m bench.scripts.NAME [--help]``; their reports go to ``bench/results/``."""
