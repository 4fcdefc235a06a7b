#!/usr/bin/env bash
# The GPU plan, each command one device command on a bare or a warm machine (issues 63 and 86):
#
#   bash bench/gpu/run.sh speed|all|targets|rest OUTDIR [--quick] [--simulate] [-- EXTRA ARGS]
#
#   speed  issue 86's GPU run (item 7), first whenever a GPU is lent, one window: the compiled step
#          (bench/gpu/compiled.py: compiled.json, compiled.md, compiled-trace.json.gz: 21 batches
#          against the foreach step, a torch.profiler trace of 10 steps, mode="reduce-overhead"
#          replayed against eager), the launch mechanisms side by side (bench/gpu/mechanisms.py:
#          mechanisms.json, mechanisms.md: the kept launch, raw cuLaunchKernel, a 1-node graph's
#          cuGraphLaunch, torch lerp_), then each target of issue 86 items 3-4 against its same-run
#          checked baseline with its verdict (bench/gpu/targets.py: targets.json, targets.md);
#   all    what one GPU window must give, in this order, at most 8 minutes with its set-up:
#          1. the versions (env.txt: the GPU's name from nvidia-smi, driver, python, torch, numba,
#             numba-cuda, cuda-core, NVVM, cached_launch...), then the GPU contract on the real driver
#             (bench/gpu/contract.py: contract.json; what the driver emulator holds fastema to in CI,
#             testkit/gpu_scenarios.py: captures by torch.cuda.graph with a collection inside, a forked
#             DataLoader worker, first binds after a warm-up), then the preflight bench/gpu/smoke.py
#             (smoke.json, rewritten after each check);
#          2. the CUDA tests (bench/gpu/cuda_tests.py: cuda-tests.log, a line a test as it ends with its
#             result, seconds and NVVM calls; the kernels and the launch path first, the tests that
#             compile last; a timeout a test). EXTRA ARGS go to pytest (e.g. -- -k vector);
#          3. the headline figures against their baselines in the same process (bench/gpu/
#             headline.py: headline.json after every figure, headline.md): EMA.update() host and
#             device time at 6, 148 and 3000 tensors against torch._foreach_lerp_, a flat 2^28
#             lerp against a device copy, the first update of a fresh process and its NVVM calls,
#             a GPT-2-size training step with and without the update (float32, bfloat16);
#          then the gpu-summary line (summary.txt).
#   targets  issue 86's targets alone (bench/gpu/targets.py, a longer budget: targets.json, targets.md).
#   rest   what a window with time left after `all` adds, in this order: the probe (bench/gpu/
#          probe.py: probe.json, probe.md, lerp_f32.sass), the offloaded EMA's figures (bench/
#          scripts/offload.py --gpu: offload.md), the benchmark suite's CUDA rows (python -m bench.suite
#          -k cuda --quick: bench.json, bench.md, bench.png). EXTRA ARGS go to the suite.
#
# Every command first sources bench/gpu/env.sh (numpy without row_stack fixed, fastema importable
# from this tree). Each writes its files as it goes (tee, never tail), run.log holding what it
# printed (the set-up's pip output too), and at most 8 files into OUTDIR (the device returns at most
# 8); its timeouts, the set-up's included, add up to at most 480 s (bench/tests/test_gpu_plan.py checks
# it and runs `all` and `rest` in the simulator), so a 540-s device command always returns its
# files. --quick: the probe's quick mode. --simulate (or GPU_SIMULATE=1): the Numba CUDA simulator
# at tiny sizes, nothing installed (CI); GPU_PROBE_BUDGET: the probe's budget (120 s). The device
# calls, in order, and where the results go: bench/README.md, "GPU runs". Exit status: 0 when
# every part did; else the first failure's (124: a timeout; 1: a failed check or test).
set -uo pipefail
cd "$(dirname "$0")/../.."
usage="usage: bash bench/gpu/run.sh speed|all|targets|rest OUTDIR [--quick] [--simulate] [-- EXTRA ARGS]"
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
case "$stage" in speed|all|targets|rest) ;; *) echo "$usage" >&2; exit 2 ;; esac
export GPU_SIMULATE=${GPU_SIMULATE:-0}
[ "$GPU_SIMULATE" = 1 ] && sim=(--simulate)
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
export OUT_DIR=$out
log=$out/run.log
: >"$log"
say() { echo "$*" | tee -a "$log"; }
say "== run.sh $stage into $out ($(date -u +%FT%TZ))${sim:+, simulator}"
GPU_SETUP_LOG=$log                          # what pip printed, into run.log too
# shellcheck source=bench/gpu/env.sh
source bench/gpu/env.sh >>"$log" 2>&1
grep "^gpu_env:" "$log"
status=0
part() {                                  # part NAME RC: the first failure is the command's status
  [ "$2" = 124 ] && say "run.sh: $1 stopped at its timeout: its files hold what it wrote until then"
  say "== $1: exit $2 after ${SECONDS}s"
  [ "$status" = 0 ] && [ "$2" != 0 ] && status=$2
  return 0
}

case "$stage" in
  speed)
    timeout -k 10 170 "$PY" -m bench.gpu.compiled "$out" --budget 130 "${sim[@]}" 2>&1 | tee -a "$log"
    part "compiled step" "${PIPESTATUS[0]}"
    timeout -k 5 60 "$PY" -m bench.gpu.mechanisms "$out" "${sim[@]}" 2>&1 | tee -a "$log"
    part "launch mechanisms" "${PIPESTATUS[0]}"
    timeout -k 10 150 "$PY" -m bench.gpu.targets "$out" --budget 110 "${sim[@]}" 2>&1 | tee -a "$log"
    part "issue 86 targets" "${PIPESTATUS[0]}"
    ;;
  all)
    timeout -k 5 20 "$PY" -m bench.gpu.versions "$out/env.txt" "${sim[@]}" 2>&1 | tee -a "$log"
    part versions "${PIPESTATUS[0]}"
    timeout -k 5 40 "$PY" -m bench.gpu.contract "$out" "${sim[@]}" 2>&1 | tee -a "$log"
    part "GPU contract" "${PIPESTATUS[0]}"
    timeout -k 5 40 "$PY" -m bench.gpu.smoke "$out" "${sim[@]}" 2>&1 | tee -a "$log"
    part smoke "${PIPESTATUS[0]}"
    timeout -k 10 195 "$PY" -m bench.gpu.cuda_tests "$out" --budget 180 "${sim[@]}" -- "${extra[@]}"
    part "CUDA tests" "$?"
    timeout -k 5 80 "$PY" -m bench.gpu.headline "$out" --budget 50 "${sim[@]}" 2>&1 | tee -a "$log"
    part headline "${PIPESTATUS[0]}"
    ;;
  targets)
    timeout -k 10 360 "$PY" -m bench.gpu.targets "$out" --budget 300 "${sim[@]}" 2>&1 | tee -a "$log"
    part "issue 86 targets" "${PIPESTATUS[0]}"
    ;;
  rest)
    timeout -k 10 180 "$PY" -m bench.gpu.probe "$out" --budget "${GPU_PROBE_BUDGET:-120}" \
      "${quick[@]}" "${sim[@]}" 2>&1 | tee -a "$log"
    part probe "${PIPESTATUS[0]}"
    if [ "$GPU_SIMULATE" = 1 ]; then          # its --gpu mode needs torch CUDA
      say "== offload: needs a GPU (not in the simulator)"
    else
      timeout -k 5 90 "$PY" -m bench.scripts.offload --gpu --sizes 256,1024 --chunks 16,64,256 \
        --reps 5 --out "$out/offload.md" 2>&1 | tee -a "$log"
      part offload "${PIPESTATUS[0]}"
    fi
    select=(-k cuda --quick)
    if [ "$GPU_SIMULATE" = 1 ]; then          # CI: no CUDA rows without a GPU; five tiny CPU rows
      select=(-k "test_flat_float32 and cpu and 16" --quick)
    fi
    timeout -k 10 110 "$PY" -m bench.suite --out "$out" "${select[@]}" "${extra[@]}" 2>&1 \
      | tee -a "$log"
    part "benchmark suite" "${PIPESTATUS[0]}"
    ;;
esac
summary=$out/summary.txt                 # all: 8 files; rest: 8 without it (the line is in run.log)
[ "$stage" = all ] || summary=/dev/null
timeout -k 5 10 "$PY" -m bench.gpu.summary "$out" 2>>"$log" | tee "$summary" | tee -a "$log"
say "== run.sh $stage: exit $status after ${SECONDS}s; files: $(cd "$out" && ls | tr '\n' ' ')"
exit "$status"
