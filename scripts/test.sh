#!/usr/bin/env bash
# The whole test suite: set up .venv with the dev, cuda (numba-cuda's compilers: no GPU
# needed), bench, distributed (DeepSpeed, run on the CPU) and docs (Sphinx) extras, then
#   0. ruff (lint and import order) and mypy (the public modules), failing early,
#   1. in two lanes at once, one a core (each lane's output printed when both are done):
#      a. CPU tests of the kernels, arrays, merging and schedules (the shipped CUDA device code
#         checked: its stamp, its sm_90 machine code and PTX; nothing compiled), then the CUDA
#         kernel tests in the Numba CUDA simulator, in their own process (the simulator must be
#         switched on before numba is imported), then the documentation (docs extra): a Sphinx
#         build with warnings as errors and the coverage check (every public name in the API
#         pages, with a docstring);
#      b. CPU tests of the models' faces, bridges, faults, the docs' examples and the wheel;
#   2. the CUDA tests on the real GPU when one is present,
#   3. the benchmark suite in quick mode (python -m fastema bench --quick), alone on the
#      machine: its table is printed; timings never fail the run, errors do.
# A pytest run that collects no test exits 5, which fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== set-up $(date +%T)"
bash scripts/setup.sh dev,cuda,bench,distributed,docs
py=.venv/bin/python
export PYTHONUNBUFFERED=1

echo "== lint and types (ruff: pycodestyle, pyflakes, import order; mypy: the public modules) $(date +%T)"
"$py" -m ruff check .
"$py" -m mypy

# Every test's time is kept in bench/out/tests-*.xml (JUnit XML); each lane prints its slowest 15.
mkdir -p bench/out
lanes=$(mktemp -d)
models=(tests/torch tests/bridges tests/faults tests/test_docs.py tests/test_demo.py tests/test_wheel.py)
echo "== CPU tests, the simulator and the docs in two lanes $(date +%T)"
{
  echo "== lane a: CPU tests of the kernels, arrays, merging, schedules"
  "$py" -m pytest tests "${models[@]/#/--ignore=}" -m "not cuda" -q --durations=15 \
    --junitxml=bench/out/tests-cpu-kernels.xml --basetemp="$lanes/a"
  echo "== lane a: CUDA kernels in the Numba CUDA simulator $(date +%T)"
  NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest tests -m cuda -q -p no:cacheprovider \
    --junitxml=bench/out/tests-cudasim.xml --basetemp="$lanes/c"
  echo "== lane a: documentation (warnings are errors; site: docs/_build/html) $(date +%T)"
  rm -rf docs/_build/html
  "$py" -m sphinx -W --keep-going -b html docs docs/_build/html -q
  "$py" docs/ext/coverage_check.py docs/_build/html
  echo "== lane a: done $(date +%T)"
} >"$lanes/a.log" 2>&1 &
lane_a=$!
{
  echo "== lane b: CPU tests of the faces, bridges, faults, the docs' examples, the wheel"
  "$py" -m pytest "${models[@]}" -m "not cuda" -q --durations=15 \
    --junitxml=bench/out/tests-cpu-models.xml --basetemp="$lanes/b"
  echo "== lane b: done $(date +%T)"
} >"$lanes/b.log" 2>&1 &
lane_b=$!
rc_a=0; wait "$lane_a" || rc_a=$?
rc_b=0; wait "$lane_b" || rc_b=$?
cat "$lanes/a.log" "$lanes/b.log"
rm -rf "$lanes"
if [ "$rc_a" -ne 0 ] || [ "$rc_b" -ne 0 ]; then
  echo "tests failed: lane a exit $rc_a, lane b exit $rc_b (their output above)" >&2
  exit 1
fi

if "$py" -c "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)" 2>/dev/null; then
  echo "== CUDA tests on the GPU $(date +%T)"
  "$py" -m pytest tests -m cuda -q
fi

echo "== quick benchmarks (table: bench/out/bench.md, plot: bench/out/bench.png) $(date +%T)"
"$py" -m fastema bench --quick --out bench/out
echo "== done $(date +%T)"
