#!/usr/bin/env bash
# Make ./.venv with fastema installed from this tree (editable).
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh dev
# torch==2.13.0: on these machines a CPU build lying on disk, in pip's find-links; with it installed
# the package's torch range is satisfied without a multi-GB download. Everything is installed by uv
# where it can be had (pip install uv): it resolves, downloads and unpacks the 160 packages in
# parallel, where pip does one after the other (on a clean 2-core machine pip took 150 s and uv 60),
# torch from the file pip would take without an index (uv does not read pip's configuration), else
# PyPI's, held at 2.13.0 (-c): a package asking for another torch fails the set-up instead of
# pulling a CUDA build. Where uv cannot be installed, pip installs torch first, then the extras.
# Byte-compiling: where PYTHONDONTWRITEBYTECODE is set (as on these machines), Python would compile
# torch's modules again in every process, so compileall does it here, on every core; where it is not
# (scripts/test.sh unsets it), each module is compiled once, at its first import, and kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="torch${1:+,$1}"
# torchtitan (fastema.torchtitan's tests): its release's requirements (datasets<4.8, wandb, torchdata...) would
# downgrade datasets and huggingface-hub; it is installed without them, with only what the modules fastema
# imports need (components.checkpointer, components.optimizer, distributed: spmd_types, tyro and tyro's two)
titan=()
if [[ ",$extras," == *",torchtitan,"* ]]; then
  extras=$(echo ",$extras," | sed 's/,torchtitan,/,/; s/^,//; s/,$//')
  titan=("torchtitan==0.3.0" "spmd_types==0.2.3" "tyro==1.0.17" "docstring-parser==0.18.0" "typeguard==4.6.1")
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
log=.venv/pip-install.log
install() {
  if .venv/bin/python -m pip install --no-compile "uv>=0.5"; then
    local torch py=.venv/bin/python
    local url='import json, sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])'
    torch=$("$py" -m pip install --dry-run --no-index --no-deps -q --report - torch==2.13.0 |
            "$py" -c "$url") && torch="torch @ $torch" || torch="torch==2.13.0"
    echo "setup: $torch"
    .venv/bin/python -m uv pip install --python .venv/bin/python -c <(echo "torch==2.13.0") \
      -e ".[${extras}]" "$torch"
    if [ ${#titan[@]} -gt 0 ]; then
      .venv/bin/python -m uv pip install --python .venv/bin/python --no-deps "${titan[@]}"
    fi
  else
    echo "setup: uv could not be installed; pip installs torch, then the extras"
    .venv/bin/python -m pip install --no-compile "torch==2.13.0" &&
      .venv/bin/python -m pip install --no-compile -e ".[${extras}]" &&
      { [ ${#titan[@]} -eq 0 ] || .venv/bin/python -m pip install --no-compile --no-deps "${titan[@]}"; }
  fi
}
if ! install >"$log" 2>&1; then
  cat "$log"
  echo "setup: the install failed (log above)" >&2
  exit 1
fi
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  # Not compiled (a third of the sources, none of them imported by the tests, the docs or the
  # benchmarks; a module left out still imports, compiled in memory): the packages' own test suites,
  # transformers' models but those the tests build or transformers and TRL load (auto, gpt2, llama,
  # bloom, encoder_decoder), diffusers' pipelines (the drop-in tests load diffusers.training_utils).
  skip='site-packages/([^/]+/(.+/)?tests/'
  skip+='|transformers/models/(?!(auto|gpt2|llama|bloom|encoder_decoder)/)'
  skip+='|diffusers/(modular_)?pipelines/[^/]+/)'
  # a file that does not compile stays as pip leaves it
  .venv/bin/python -m compileall -q -j 0 -x "$skip" "$site" >>"$log" 2>&1 || true
fi
echo "setup: .venv ready with fastema[${extras}] ($(.venv/bin/python -c 'import torch, numba; print("torch", torch.__version__, "numba", numba.__version__)'))"
