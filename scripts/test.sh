#!/usr/bin/env bash
# The whole test suite, on 2 cores: set up .venv with the dev, cuda (numba-cuda's compilers: no GPU
# needed), bench, distributed (DeepSpeed, run on the CPU) and docs (Sphinx) extras, then, all at once:
#   - every test but the CUDA ones on pytest-xdist's 2 workers (-n 2 --dist loadfile: each file's tests
#     in one worker, the files handed out longest first by their measured times, tests/durations.json,
#     so that both cores end together); the distributed tests run in long-lived gloo worlds, one per
#     size per worker (tests/worlds.py);
#   - in the background, one after the other: the CUDA kernel tests in the Numba CUDA simulator, in
#     their own process (the simulator must be switched on before numba is imported), then the
#     documentation (docs extra): a Sphinx build with warnings as errors, the coverage check among
#     them (docs/ext/coverage_check.py, a Sphinx extension: every public name in the API pages, with
#     a docstring, or a warning);
#   - in the background: ruff (lint and import order) and mypy (the public modules; every call of the
#     tests into fastema, CUDA tests included, pyproject's [tool.mypy]);
# then the background jobs' output, the files' times from the JUnit XML (the slowest first) and the
# count of test cases; a failure of any of them fails the run here, after every one has run. Then
#   - the CUDA tests on the real GPU when one is present,
#   - the benchmark suite in quick mode (python -m bench.suite --quick): its table is printed; timings
#     never fail the run, errors do; beside it, the bench gates' deterministic figures (python -m
#     bench.gates check --only instructions,counts,sass, issue 53: instructions per update counted by
#     valgrind, launches, syncs, allocations, collectives, machine code) against bench/gates.json;
#   - then, alone on the machine, the gates' same-run ratios with a wide factor; a gate that fails names
#     its scenario and the update command;
# and each stage's time. A pytest run that collects no test exits 5, which fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
work=$(mktemp -d)
stages=()
# CPU seconds of this script's finished children (user + system; /proc/PID/stat's fields 14-17): on
# a shared machine the wall time depends on the neighbours' load, the CPU time much less
cpu() {
  local f
  read -r -a f </proc/$$/stat 2>/dev/null || { echo 0; return; }
  echo $(((f[13] + f[14] + f[15] + f[16]) / $(getconf CLK_TCK)))
}
stage() { stages+=("$(printf '%5ds %6s  %s' "$2" "${3:-}" "$1")"); }  # stage NAME SECONDS [CPU]
finish() {                                                      # each stage's time, also after a failure
  stage "total" $((SECONDS - start)) "$(cpu)"
  echo "== stages (wall seconds, CPU seconds where known)"
  printf '%s\n' "${stages[@]}"
  rm -rf "$work"
}
trap finish EXIT

# Each module byte-compiled at its first import and kept (__pycache__), once for every process after
# it: the tests, docs and benchmarks import fewer than half of the 23,850 modules the set-up installs
# (a compileall of them all took 128 s of the set-up on 2 cores, 170 CPU seconds), and with
# PYTHONDONTWRITEBYTECODE (set on these machines) every process would compile again what it imports
unset PYTHONDONTWRITEBYTECODE
echo "== set-up $(date +%T)"
bash scripts/setup.sh dev,cuda,bench,distributed,docs,torchtitan
# CUDA 12.0's ptxas, outside the venv, for the CUDA 12 set's checks (tests/kernels/test_toolchain_cu12.py)
[ -x .toolchains/cu12-12.0/nvidia/cuda_nvcc/bin/ptxas ] || .venv/bin/python -m pip install -q --no-deps \
  --target .toolchains/cu12-12.0 nvidia-cuda-nvcc-cu12==12.0.76 || echo "set-up: no CUDA 12.0 ptxas: its checks skip"
stage "set-up" $((SECONDS - start)) "$(cpu)"
py=.venv/bin/python
export PYTHONUNBUFFERED=1

# Every test's time is kept in bench/out/tests-*.xml (JUnit XML): this run's files only.
mkdir -p bench/out
rm -f bench/out/tests-*.xml

lint() {
  local rc=0
  echo "== lint and types (ruff: pycodestyle, pyflakes, import order; mypy: the public modules, the tests' calls)"
  "$py" -m ruff check . || rc=1
  "$py" -m mypy || rc=1
  return $rc
}

simulator_and_docs() {
  local rc=0 t=$SECONDS
  # Only the files that say "cuda" are collected (a cuda-marked test's file does): the others' imports
  # (TensorFlow, JAX, transformers...) would cost this process a core for half a minute.
  local files
  mapfile -t files < <(grep -rlE 'cuda' tests --include='test_*.py' | sort)
  echo "== CUDA kernels in the Numba CUDA simulator (${#files[@]} files say cuda)"
  NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest "${files[@]}" -m cuda -q -p no:cacheprovider \
    --junitxml=bench/out/tests-cudasim.xml --basetemp="$work/cudasim" || rc=1
  echo "$((SECONDS - t))" >"$work/simulator.s"
  t=$SECONDS
  echo "== documentation (warnings are errors; site: docs/_build/html)"
  rm -rf docs/_build/html
  # coverage_check runs inside the build (docs/conf.py loads it): its script form, which imports every
  # framework again (15 CPU seconds), would repeat the same check on the same names
  "$py" -m sphinx -W --keep-going -b html docs docs/_build/html -q || rc=1
  echo "$((SECONDS - t))" >"$work/docs.s"
  return $rc
}

echo "== tests on 2 workers; the simulator's tests, the docs, lint and types in the background $(date +%T)"
t=$SECONDS
{ s=$SECONDS; rc=0; lint || rc=$?; echo "$((SECONDS - s))" >"$work/lint.s"; exit $rc; } >"$work/lint.log" 2>&1 &
lint_pid=$!
{ rc=0; simulator_and_docs || rc=$?; exit $rc; } >"$work/side.log" 2>&1 &
side_pid=$!
rc_tests=0
c=$(cpu)
# tests/ (the library) and bench/tests/ (the bench tooling's own tests) in the one run
"$py" -m pytest tests bench/tests -m "not cuda" -n 2 --dist loadfile -q --durations=10 \
  --junitxml=bench/out/tests-cpu.xml --basetemp="$work/cpu" || rc_tests=$?
stage "CPU tests (2 workers, pytest-xdist)" $((SECONDS - t)) $(($(cpu) - c))
rc_side=0; wait "$side_pid" || rc_side=$?
rc_lint=0; wait "$lint_pid" || rc_lint=$?
stage "  the simulator's CUDA tests (background)" "$(cat "$work/simulator.s" 2>/dev/null || echo '?')"
stage "  documentation (background)" "$(cat "$work/docs.s" 2>/dev/null || echo '?')"
stage "  lint and types (background)" "$(cat "$work/lint.s" 2>/dev/null || echo '?')"
stage "tests, docs, lint: all done" $((SECONDS - t)) $(($(cpu) - c))
cat "$work/side.log" "$work/lint.log"
echo "== the test files' times (JUnit XML: bench/out/tests-*.xml) $(date +%T)"
"$py" tests/timings.py table bench/out/tests-*.xml
if [ "$rc_tests" -ne 0 ] || [ "$rc_side" -ne 0 ] || [ "$rc_lint" -ne 0 ]; then
  echo "failed: CPU tests exit $rc_tests, simulator and docs exit $rc_side, lint and types exit $rc_lint" \
       "(their output above)" >&2
  exit 1
fi

if "$py" -c "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)" 2>/dev/null; then
  echo "== CUDA tests on the GPU $(date +%T)"
  t=$SECONDS
  "$py" -m pytest tests -m cuda -q
  stage "CUDA tests on the GPU" $((SECONDS - t))
fi

# The gates' deterministic figures (instructions counted by valgrind, counts, machine code: none of them
# depends on the load) are measured beside the quick benchmarks, which keep one core busy; the same-run
# ratios, which are timings, after both, alone.
echo "== quick benchmarks (table: bench/out/bench.md, plot: bench/out/bench.png), the deterministic gates beside them $(date +%T)"
t=$SECONDS c=$(cpu)
"$py" -m bench.gates check --only instructions,counts,sass >"$work/gates.log" 2>&1 &
gates_pid=$!
rc_bench=0
"$py" -m bench.suite --quick --out bench/out || rc_bench=$?
rc_gates=0; wait "$gates_pid" || rc_gates=$?
stage "quick benchmarks, deterministic gates beside them" $((SECONDS - t)) $(($(cpu) - c))
echo "== bench gates: deterministic figures against bench/gates.json (measured beside the benchmarks) $(date +%T)"
cat "$work/gates.log"
echo "== bench gates: same-run ratios (bench/README.md) $(date +%T)"
t=$SECONDS c=$(cpu)
rc_ratios=0
"$py" -m bench.gates check --only ratios || rc_ratios=$?
stage "bench gates: ratios" $((SECONDS - t)) $(($(cpu) - c))
if [ "$rc_bench" -ne 0 ] || [ "$rc_gates" -ne 0 ] || [ "$rc_ratios" -ne 0 ]; then
  echo "failed: quick benchmarks exit $rc_bench, deterministic gates exit $rc_gates, ratio gates exit $rc_ratios" >&2
  exit 1
fi
echo "== done $(date +%T)"
