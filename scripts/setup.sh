#!/usr/bin/env bash
# Make ./.venv with fastema installed from this tree (editable).
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh dev
# torch==2.13.0 goes in first: on these machines it is a CPU build lying on disk, and
# with it installed the package's torch range is satisfied without a multi-GB download.
# pip byte-compiles what it installs in one process; here compileall does it after the install, on every
# core (the compiled files are needed: with PYTHONDONTWRITEBYTECODE, as on these machines, Python would
# compile torch's modules again in every process).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="torch${1:+,$1}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
log=.venv/pip-install.log
if ! { .venv/bin/python -m pip install --no-compile "torch==2.13.0" &&
      .venv/bin/python -m pip install --no-compile -e ".[${extras}]"; } >"$log" 2>&1; then
  cat "$log"
  echo "setup: pip install failed (log above)" >&2
  exit 1
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
.venv/bin/python -m compileall -q -j 0 "$site" >>"$log" 2>&1 || true     # a file that does not compile stays as pip leaves it
echo "setup: .venv ready with fastema[${extras}] ($(.venv/bin/python -c 'import torch, numba; print("torch", torch.__version__, "numba", numba.__version__)'))"
