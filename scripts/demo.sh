#!/usr/bin/env bash
# The main job: set up .venv, train a small model with an EMA, print raw vs EMA
# validation loss and the EMA update time against a per-parameter loop, and write a
# PNG of the loss curves (its path is printed last).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec .venv/bin/python -m fastema demo "$@"
