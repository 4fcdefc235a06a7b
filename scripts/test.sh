#!/usr/bin/env bash
# The whole test suite: set up .venv with the dev, cuda (numba-cuda's compilers: no GPU
# needed), bench, distributed (DeepSpeed, run on the CPU) and docs (Sphinx) extras, then
#   0. ruff (lint and import order) and mypy (the public modules), failing early,
#   1. CPU tests (kernels, API, FlatShadow, EMA, compat, training loops, and every CUDA
#      kernel compiled to sm_90 PTX through the real numba-cuda pipeline),
#   2. CUDA kernel tests in the Numba CUDA simulator, in their own process
#      (the simulator must be switched on before numba is imported),
#      and on the real GPU as well when one is present,
#   3. the benchmark suite in quick mode (python -m fastema bench --quick): its table is
#      printed; timings never fail the run, errors do,
#   4. the documentation (docs extra): a Sphinx build with warnings as errors, then the
#      coverage check (every public name in the API pages, with a docstring).
# A pytest run that collects no test exits 5, which fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,cuda,bench,distributed,docs
py=.venv/bin/python
export PYTHONUNBUFFERED=1

echo "== lint and types (ruff: pycodestyle, pyflakes, import order; mypy: the public modules)"
"$py" -m ruff check .
"$py" -m mypy

echo "== CPU tests"
mkdir -p bench/out      # every test's time kept in bench/out/tests-*.xml (JUnit XML); the slowest 20 printed
"$py" -m pytest tests -m "not cuda" -q --durations=20 --junitxml=bench/out/tests-cpu.xml

echo "== CUDA kernels in the Numba CUDA simulator"
NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml=bench/out/tests-cudasim.xml

if "$py" -c "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)" 2>/dev/null; then
  echo "== CUDA tests on the GPU"
  "$py" -m pytest tests -m cuda -q
fi

echo "== quick benchmarks (table: bench/out/bench.md, plot: bench/out/bench.png)"
"$py" -m fastema bench --quick --out bench/out

echo "== documentation (warnings are errors; site: docs/_build/html)"
rm -rf docs/_build/html
"$py" -m sphinx -W --keep-going -b html docs docs/_build/html -q
"$py" docs/ext/coverage_check.py docs/_build/html
