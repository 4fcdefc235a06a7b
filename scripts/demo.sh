#!/usr/bin/env bash
# The main job: set up .venv, train a small model with an EMA, print raw vs EMA
# validation loss and the EMA update time against a per-parameter loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m fastema demo "$@"
