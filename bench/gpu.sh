#!/usr/bin/env bash
# The GPU plan in four stages, each one command on a device machine (issue 37):
#
#   bash bench/gpu.sh STAGE OUTDIR [--quick] [--simulate] [-- EXTRA ARGS]
#
#   env    the versions (env.txt: driver, python, torch, numba, numba-cuda, cuda-core, cuda-bindings,
#          llvmlite, numpy, nvjitlink, cuda-toolkit, NVVM, pytest-xdist, cached_launch) and the
#          preflight bench/gpu_smoke.py (smoke.json, rewritten after each of its lines; smoke.log)
#   tests  the CUDA tests (pytest -m cuda; -n 4 --dist loadfile where pytest-xdist is there;
#          --durations=20 -rfE -v): cuda-tests.log. EXTRA ARGS go to pytest (e.g. -- -k vector)
#   probe  bench/gpu_probe.py: probe.json (rewritten after every check and timing), probe.md,
#          lerp_f32.sass, probe.log
#   bench  the benchmark's CUDA rows (python -m fastema bench -k cuda): bench.json, bench.md,
#          bench.png, bench.log. EXTRA ARGS go to the suite's pytest
#
# Every stage first sources bench/gpu_env.sh (numpy without row_stack fixed, fastema importable from
# this tree; setup.log), so each runs on a fresh machine as on a warm one. Every stage writes its files
# as it goes (tee, never tail) and at most 8 files into OUTDIR (the device returns at most 8); each
# stage's timeouts, the set-up's included, add up to less than 540 s (tests/test_gpu_plan.py checks
# both), so a 570-s device command always returns its files. --quick: the probe's and the bench's
# quick modes. --simulate (or GPU_SIMULATE=1): the Numba CUDA simulator at tiny sizes, nothing
# installed (CI runs every stage so: tests/test_gpu_plan.py). The exact device commands, in order,
# and the summary: bench/README.md, "GPU runs". Exit status: the stage's main command's (124: its
# timeout; the smoke: 1 when a check failed).
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash bench/gpu.sh env|tests|probe|bench OUTDIR [--quick] [--simulate] [-- EXTRA ARGS]"
stage=${1:?$usage}
out=${2:?$usage}
shift 2
quick=() sim=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --simulate) GPU_SIMULATE=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
export GPU_SIMULATE=${GPU_SIMULATE:-0}
[ "$GPU_SIMULATE" = 1 ] && sim=(--simulate)
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
export OUT_DIR=$out
echo "== gpu.sh $stage into $out ($(date -u +%FT%TZ))${sim:+, simulator}"
GPU_SETUP_LOG=$out/setup.log
: >"$GPU_SETUP_LOG"
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh

case "$stage" in
  env)
    timeout -k 5 60 "$PY" bench/gpu_versions.py "$out/env.txt" "${sim[@]}"
    timeout -k 10 240 "$PY" bench/gpu_smoke.py "$out" "${sim[@]}" 2>&1 | tee "$out/smoke.log"
    rc=${PIPESTATUS[0]}
    ;;
  tests)
    args=(tests -m cuda)
    if [ "$GPU_SIMULATE" = 1 ]; then      # CI: two small simulator tests, the command's plumbing
      args=(tests/kernels/test_cuda.py -m cuda
            -k "test_ema_update_on_device_arrays_matches_cpu or test_flat_shadow_on_device_arrays")
    fi
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n 4 --dist loadfile)
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 180)   # one hung test is not all
    args+=(--durations=20 -rfE -v --tb=line -p no:cacheprovider "${extra[@]}")   # -v: each test named as it ends (a cut run still says which failed)
    echo "pytest ${args[*]}" | tee "$out/cuda-tests.log"
    timeout -k 10 400 "$PY" -m pytest "${args[@]}" 2>&1 | tee -a "$out/cuda-tests.log"
    rc=${PIPESTATUS[0]}
    ;;
  probe)
    timeout -k 10 400 "$PY" bench/gpu_probe.py "$out" --budget 330 "${quick[@]}" "${sim[@]}" 2>&1 \
      | tee "$out/probe.log"
    rc=${PIPESTATUS[0]}
    ;;
  bench)
    select=(-k cuda)
    if [ "$GPU_SIMULATE" = 1 ]; then      # CI: no CUDA rows without a GPU; four tiny CPU rows instead
      select=(-k "test_flat_float32 and cpu and 16") quick=(--quick)
    fi
    timeout -k 10 400 "$PY" -m fastema bench --out "$out" "${select[@]}" "${quick[@]}" "${extra[@]}" 2>&1 \
      | tee "$out/bench.log"
    rc=${PIPESTATUS[0]}
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
[ "$rc" = 124 ] && echo "gpu.sh: $stage stopped at its timeout: its files hold what it wrote until then"
echo "== gpu.sh $stage: exit $rc after ${SECONDS}s; files: $(cd "$out" && ls | tr '\n' ' ')"
"$PY" bench/gpu_summary.py "$out" 2>/dev/null || true
exit "$rc"
