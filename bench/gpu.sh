#!/usr/bin/env bash
# CUDA tests and the GPU benchmark on a machine with an NVIDIA GPU and no network.
# Usage: bash bench/gpu.sh OUTDIR [--quick]
# fastema is installed from this source tree with nothing downloaded (no dependencies, no
# build isolation): the machine's Python must already have numpy, numba, numba-cuda, torch,
# pytest, pytest-benchmark and hypothesis. Missing baselines (torch_ema, ema-pytorch) are
# skipped. Writes into OUTDIR: cuda-tests.log, the probe's files, bench.json, bench.md, bench.png.
# The CPU tests do not touch the GPU: CI runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUTDIR [--quick]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; echo "gpu.sh: installing fastema from the tree failed" >&2; exit 1; }
"$py" - <<'PY'
import torch
from numba import cuda
assert torch.cuda.is_available() and cuda.is_available(), "no CUDA GPU visible to torch and numba-cuda"
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
# A failing test must not stop the benchmark, and no step may outlast a 10-minute device command.
echo "== CUDA tests on the GPU"
timeout 300 "$py" -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.log" || true
echo "== the probe (streams, host syncs, graphs, device time)"
timeout 420 "$py" bench/gpu_probe.py "$out" 2>&1 | tail -20 || true
echo "== benchmark, CUDA rows"
timeout 540 "$py" -m fastema bench --out "$out" -k cuda "$@" || true
